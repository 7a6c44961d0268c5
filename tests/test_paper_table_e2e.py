"""A paper table end to end at tiny scale: cxr-sweep of get_sweep('table=N'), then
cxr-table --paper --table over its runs (issue 30, item 3; Ge 2018 Table 2 here)."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest

from cxr_jax.evaluation import paper_table
from test_sweep import TINY, _cli


@pytest.mark.slow
def test_ge_table_2_from_its_sweep(tmp_path):
  root = tmp_path / "ge_t2"
  tiny = [o for o in TINY if not o.startswith("model.width")] + ["model.width=0.0625"]
  out = _cli("cxr_jax.cli.sweep", "--config=configs/msml.py:table=2,seeds=1",
             f"--workdir_root={root}", *[f"--override={o}" for o in tiny], timeout=600,
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  runs = sorted(p for p in root.iterdir() if p.is_dir())
  assert out.returncode == 0, out.stderr[-2000:]
  spec = paper_table.load_spec()["ge2018"]["tables"]["2"]
  assert len(runs) == len(spec["rows"])
  rendered = _cli("cxr_jax.cli.table", "--paper=ge2018", "--table=2", "--format=csv",
                  *map(str, runs))
  assert rendered.returncode == 0, rendered.stderr[-2000:]
  rows = {r["row"]: r for r in csv.DictReader(io.StringIO(rendered.stdout)) if r["kind"] == "row"}
  # Every row of the paper's table, in its order, with the paper's number and ours from its run.
  assert list(rows) == [row["name"] for row in spec["rows"]]
  for run in runs:
    name = json.loads((run / "config.json").read_text())["table"]["row"]
    auroc = json.loads((run / "eval" / "test.json").read_text())["classification"]["auroc"]["mean"]
    row = rows[name]
    assert row["n"] == "1" and np.isfinite(auroc)
    assert float(row["AUC"]) == pytest.approx(auroc, abs=1e-6)
    paper = next(r["paper"]["AUC"] for r in spec["rows"] if r["name"] == name)
    assert float(row["AUC_paper"]) == pytest.approx(paper)
    assert float(row["AUC_diff"]) == pytest.approx(auroc - paper, abs=1e-6)
