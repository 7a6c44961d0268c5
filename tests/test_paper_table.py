"""cxr-table --paper/--table: a paper's table from synthetic workdirs (no training)."""

from __future__ import annotations

import csv
import importlib.resources
import io
import json
import math
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from cxr_jax.evaluation import paper_table

REPO = pathlib.Path(__file__).resolve().parents[1]
CLASSES = ("Atelectasis", "Mass")

SPEC = {
    "toy2020": {
        "title": "A toy paper", "method": "patch_loc",
        "tables": {
            "1": {
                "caption": "IoU accuracy at T = 0.1", "split": "test", "scale": 100.0,
                "columns": [
                    {"name": "Mass", "metric": "patch_grid/iou@0.1/per_class/Mass"},
                    {"name": "Atelectasis", "metric": "patch_grid/iou@0.1/per_class/Atelectasis"},
                    {"name": "AUC", "metric": "classification/auroc"},
                ],
                "rows": [
                    {"name": "Li loss", "paper": {"Mass": 40.0, "Atelectasis": 55.5, "AUC": None}},
                    {"name": "new loss", "paper": {"Mass": 52.0, "Atelectasis": 61.0, "AUC": 80.0},
                     "note": "the paper's headline row"},
                    {"name": "new loss + CRF", "paper": {"Mass": 55.0}},
                ],
                "reference": [{"name": "all patches positive", "metrics": {
                    "Mass": "patch_grid/all_positive/iou@0.1/per_class/Mass",
                    "Atelectasis": "patch_grid/all_positive/iou@0.1/per_class/Atelectasis"}}],
                "notes": ["the 20 % row cannot run here"],
            },
            "II": {
                "caption": "AUROC", "split": "val", "file": "val_ensemble.json",
                "columns": [{"name": "AUC", "metric": "classification/auroc/mean"}],
                "rows": [{"name": "R18", "paper": {"AUC": 0.8}}],
            },
        },
    },
    "other2021": {
        "title": "Another paper", "method": "msml",
        "tables": {"3": {"caption": "x", "split": "test",
                         "columns": [{"name": "AUC", "metric": "classification/auroc/mean"}],
                         "rows": [{"name": "R18", "paper": {"AUC": 0.9}}]}},
    },
}


@pytest.fixture
def spec_path(tmp_path):
  path = tmp_path / "spec.json"
  path.write_text(json.dumps(SPEC))
  return path


def _payload(mass, atel, auroc, ap_mass, ap_atel):
  metric = lambda per: {"mean": float(np.nanmean([np.nan if v is None else v for v in per.values()])),
                        "per_class": per, "n": {c: 5 for c in per}}
  return {"method": "patch_loc", "dataset": "synthetic", "split": "test",
          "classification": {"auroc": {"mean": auroc, "per_class": {}}},
          "patch_grid": {"iou@0.1": metric({"Mass": mass, "Atelectasis": atel}),
                         "all_positive": {"iou@0.1": metric({"Mass": ap_mass,
                                                             "Atelectasis": ap_atel})}}}


def _run(root, name, row, payload=None, paper="toy2020", table="1", method="patch_loc",
         file="test.json"):
  workdir = root / name
  workdir.mkdir(parents=True)
  config = {"method": method, "seed": 0, "table": {"paper": paper, "table": table, "row": row}}
  (workdir / "config.json").write_text(json.dumps(config))
  if payload is not None:
    (workdir / "eval").mkdir()
    (workdir / "eval" / file).write_text(json.dumps(payload))
  return str(workdir)


@pytest.fixture
def runs(tmp_path):
  """3 finished 'Li loss' runs, 2 finished 'new loss' runs (one with an undefined AUROC)
  plus one unfinished; no 'new loss + CRF' run. Returns (workdirs, values)."""
  rng = np.random.default_rng(0)
  values = {"Li loss": rng.uniform(0.2, 0.9, size=(3, 5)),
            "new loss": rng.uniform(0.2, 0.9, size=(2, 5))}
  values["new loss"][1, 2] = np.nan
  workdirs = []
  for row, table in values.items():
    for i, v in enumerate(table):
      auroc = None if math.isnan(v[2]) else float(v[2])
      workdirs.append(_run(tmp_path / "runs", f"{row.replace(' ', '_')}_{i}", row,
                           _payload(v[0], v[1], auroc, v[3], v[4])))
  workdirs.append(_run(tmp_path / "runs", "new_loss_unfinished", "new loss"))
  (tmp_path / "runs" / "sweep.sbatch").write_text("#!/bin/bash\n")  # DIR/* holds it: skipped
  return workdirs + [str(tmp_path / "runs" / "sweep.sbatch")], values


def _cli(*args):
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "cxr_jax.cli.table", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=60)


def _md_rows(text):
  """{row name: [cells]} of the markdown table's body, and its header cells."""
  lines = [l for l in text.splitlines() if l.startswith("| ")]
  split = lambda l: [c.strip() for c in l.strip("|").split("|")]
  return split(lines[0]), {split(l)[0]: split(l)[1:] for l in lines[1:]}


def test_table_layout_mean_std_paper_and_diff(runs):
  workdirs, values = runs
  table = paper_table.paper_table(workdirs, SPEC, "toy2020", "1")
  assert table.columns == ["Mass", "Atelectasis", "AUC"]
  assert [(r.name, r.kind) for r in table.rows] == [
      ("Li loss", "row"), ("new loss", "row"), ("new loss + CRF", "row"),
      ("all patches positive", "reference")]
  head, body = _md_rows(paper_table.render_markdown(table))
  assert head == ["Row", "n", "Mass", "Mass paper", "Mass Δ", "Atelectasis", "Atelectasis paper",
                  "Atelectasis Δ", "AUC", "AUC paper", "AUC Δ"]
  assert list(body) == ["Li loss", "new loss", "new loss + CRF",
                        "*all patches positive* (reference)"]
  li = values["Li loss"] * 100  # the paper prints %: ours in its units
  assert body["Li loss"][0] == "3"
  for k, (column, paper) in enumerate([("Mass", 40.0), ("Atelectasis", 55.5)]):
    cell = table.rows[0].cells[column]
    assert cell.mean == pytest.approx(li[:, k].mean()) and cell.std == pytest.approx(
        np.std(li[:, k], ddof=1))
    assert cell.diff == pytest.approx(li[:, k].mean() - paper)
    assert body["Li loss"][1 + 3 * k:4 + 3 * k] == [
        f"{li[:, k].mean():.1f} ± {np.std(li[:, k], ddof=1):.1f}", f"{paper:g}",
        f"{li[:, k].mean() - paper:.1f}"]
  # A null paper number: '—' paper and Δ; a bare metric dict reads its mean.
  assert body["Li loss"][7:10] == [f"{li[:, 2].mean():.1f} ± {np.std(li[:, 2], ddof=1):.1f}",
                                   "—", "—"]
  # 'new loss': 2 finished runs (the unfinished one not counted); AUROC null in one run.
  new = values["new loss"] * 100
  assert body["new loss"][0] == "2"
  assert body["new loss"][7:10] == [f"{new[0, 2]:.1f}", "80", f"{new[0, 2] - 80:.1f}"]
  # No run: n = 0 and every ours / Δ cell '—', the paper's numbers still shown.
  assert body["new loss + CRF"] == ["0", "—", "55", "—", "—", "—", "—", "—", "—", "—"]


def test_reference_row_is_the_mean_over_all_runs(runs):
  workdirs, values = runs
  table = paper_table.paper_table(workdirs, SPEC, "toy2020", "1")
  ref = table.rows[-1]
  every = np.concatenate([values["Li loss"], values["new loss"]]) * 100
  assert ref.kind == "reference" and ref.n == 5
  assert ref.cells["Mass"].mean == pytest.approx(every[:, 3].mean())
  assert ref.cells["Atelectasis"].std == pytest.approx(np.std(every[:, 4], ddof=1))
  assert ref.cells["AUC"].values == [] and ref.cells["Mass"].paper is None
  _, body = _md_rows(paper_table.render_markdown(table))
  assert body["*all patches positive* (reference)"][1] == (
      f"{every[:, 3].mean():.1f} ± {np.std(every[:, 3], ddof=1):.1f}")


def test_undefined_metrics_render_na(tmp_path):
  nan_runs = [_run(tmp_path, f"r{i}", "Li loss", _payload(None, 0.5, None, 0.4, 0.4))
              for i in range(2)]
  table = paper_table.paper_table(nan_runs, SPEC, "toy2020", "1")
  _, body = _md_rows(paper_table.render_markdown(table))
  assert body["Li loss"][:4] == ["2", "n/a", "40", "n/a"]
  assert body["Li loss"][4] == "50.0 ± 0.0"
  parsed = list(csv.DictReader(io.StringIO(paper_table.render_csv(table))))
  assert parsed[0]["Mass"] == "n/a" and parsed[0]["Mass_std"] == "n/a"
  assert parsed[0]["Mass_diff"] == "n/a" and parsed[0]["Mass_paper"] == "40"


def test_missing_rows_and_unfinished_workdirs_are_listed(runs, spec_path):
  workdirs, _ = runs
  out = _cli(f"--spec={spec_path}", "--paper=toy2020", "--table=1", "--workdirs", *workdirs)
  assert out.returncode == 0, out.stderr
  missing = out.stdout.split("Missing:")[1]
  assert "rows without a finished run: new loss + CRF" in missing
  unfinished = [w for w in workdirs if w.endswith("unfinished")]
  assert f"unfinished (no eval/test.json): {unfinished[0]} (row new loss)" in missing
  assert "Li loss" not in missing
  assert "rows without a finished run: new loss + CRF" in out.stderr
  assert unfinished[0] in out.stderr
  assert "- new loss: the paper's headline row" in out.stdout
  assert "- the 20 % row cannot run here" in out.stdout


def test_csv_and_latex_parse(runs, tmp_path):
  workdirs, values = runs
  table = paper_table.paper_table(workdirs, SPEC, "toy2020", "1")
  parsed = list(csv.DictReader(io.StringIO(paper_table.render_csv(table))))
  assert [(r["kind"], r["row"], r["n"]) for r in parsed] == [
      ("row", "Li loss", "3"), ("row", "new loss", "2"), ("row", "new loss + CRF", "0"),
      ("reference", "all patches positive", "5"), ("unfinished", "new loss", "0")]
  li = values["Li loss"] * 100
  assert float(parsed[0]["Atelectasis"]) == pytest.approx(li[:, 1].mean(), rel=1e-5)
  assert float(parsed[0]["Atelectasis_std"]) == pytest.approx(np.std(li[:, 1], ddof=1), rel=1e-5)
  assert float(parsed[0]["Atelectasis_diff"]) == pytest.approx(li[:, 1].mean() - 55.5, rel=1e-5)
  assert parsed[1]["AUC_std"] == "" and parsed[2]["Mass"] == "" and parsed[2]["Mass_paper"] == "55"
  assert parsed[2]["note"] == "no finished run" and "new_loss_unfinished" in parsed[4]["note"]
  latex = paper_table.render_latex(table)
  spec = re.search(r"\\begin\{tabular\}\{(\w+)\}", latex).group(1)
  assert len(spec) == 2 + 3 * 3
  body = latex.split(r"\midrule")[1].split(r"\bottomrule")[0]
  rows = [l for l in latex.split(r"\begin{tabular}")[1].split(r"\end{tabular}")[0].splitlines()
          if l.endswith(r"\\")]
  assert all(len(l.split(" & ")) == len(spec) for l in rows[1:])  # row 0 uses \multicolumn
  assert r"\multicolumn{3}{c}{Mass}" in rows[0] and r"$\pm$" in body
  assert r"\textit{all patches positive} (reference)" in latex
  assert latex.count(r"\begin{tabular}") == latex.count(r"\end{tabular}") == 1
  assert r"Missing: rows without a finished run: new loss + CRF" in latex
  # The CLI writes the chosen format to --output.
  out = _cli_spec(tmp_path, "--paper=toy2020", "--table=1", "--format=latex",
                  f"--output={tmp_path / 't.tex'}", "--workdirs", *workdirs)
  assert out.returncode == 0 and out.stdout == ""
  assert (tmp_path / "t.tex").read_text() == latex


def _cli_spec(tmp_path, *args):
  path = tmp_path / "spec_cli.json"
  path.write_text(json.dumps(SPEC))
  return _cli(f"--spec={path}", *args)


def test_table_file_override(tmp_path):
  """Table II reads eval/val_ensemble.json, not eval/test.json."""
  wd = _run(tmp_path, "r", "R18", {"classification": {"auroc": {"mean": 0.7}}}, table="II",
            file="val_ensemble.json")
  _run(tmp_path, "u", "R18", {"classification": {"auroc": {"mean": 0.1}}}, table="II")
  table = paper_table.paper_table([wd, str(tmp_path / "u")], SPEC, "toy2020", "II")
  assert table.rows[0].n == 1 and table.rows[0].cells["AUC"].mean == pytest.approx(0.7)
  assert table.unfinished == [(str(tmp_path / "u"), "R18")]


@pytest.mark.parametrize("args, expected", [
    (["--paper=nosuch", "--table=1"], "unknown paper 'nosuch'; known: toy2020, other2021"),
    (["--paper=toy2020", "--table=7"], "unknown table '7' of toy2020; known: 1, II"),
    (["--paper=nosuch"], "unknown paper 'nosuch'; known: toy2020, other2021"),
    (["--table=1"], "--table needs --paper"),
])
def test_unknown_paper_or_table_is_one_line_error(tmp_path, args, expected):
  out = _cli_spec(tmp_path, *args)
  assert out.returncode == 2
  assert out.stderr.startswith(f"cxr-table: error: {expected}")
  assert len(out.stderr.strip().splitlines()) == 1


def test_workdirs_of_another_table_or_method_are_an_error(runs, tmp_path):
  workdirs, _ = runs
  root = tmp_path / "foreign"
  other_paper = _run(root, "other", "R18", paper="other2021", table="3", method="msml")
  other_table = _run(root, "table2", "R18", table="II")
  other_method = _run(root, "method", "Li loss", method="msml")
  no_table = root / "plain"
  no_table.mkdir()
  (no_table / "config.json").write_text(json.dumps({"method": "baseline"}))
  out = _cli_spec(tmp_path, "--paper=toy2020", "--table=1", "--workdirs", *workdirs,
                  other_paper, other_table, other_method, str(no_table))
  assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
  err = out.stderr
  assert err.startswith("cxr-table: error: 4 workdir(s) are not runs of toy2020 table 1 "
                        "(method patch_loc)")
  assert f"{other_paper} (other2021 table 3 row 'R18', method msml)" in err
  assert f"{other_table} (toy2020 table II row 'R18', method patch_loc)" in err
  assert f"{other_method} (toy2020 table 1 row 'Li loss', method msml)" in err
  assert f"{no_table} (method baseline, not a run of a paper table)" in err
  assert "known tables: toy2020: 1, II; other2021: 3" in err
  assert not any(w in err for w in workdirs)  # the table's own runs are not listed
  with pytest.raises(paper_table.TableError, match=r"no config.json"):
    paper_table.collect([str(tmp_path)], SPEC, "toy2020", "1")
  bad_row = _run(tmp_path / "rows", "r", "Li-loss")
  with pytest.raises(paper_table.TableError,
                     match=r"rows not in toy2020 table 1: .*\(row 'Li-loss'\); its rows: Li loss, "):
    paper_table.collect([bad_row], SPEC, "toy2020", "1")


def test_paper_without_table_lists_its_tables(tmp_path):
  out = _cli_spec(tmp_path, "--paper=toy2020")
  assert out.returncode == 0, out.stderr
  assert out.stdout.splitlines() == [
      "toy2020: A toy paper (method patch_loc)",
      "  table 1: IoU accuracy at T = 0.1 (3 rows)", "  table II: AUROC (1 rows)"]


def test_classic_table_rejects_latex(tmp_path):
  out = _cli("--format=latex", "--workdirs", str(tmp_path))
  assert out.returncode == 2 and "--format=latex needs --paper and --table" in out.stderr


def test_malformed_spec_tables_are_rejected():
  bad = json.loads(json.dumps(SPEC))
  table = bad["toy2020"]["tables"]["1"]
  table["rows"][1]["name"] = "Li loss"
  table["rows"][0]["paper"]["IoR"] = 1.0
  table["columns"][2]["metric"] = "classification/auroc/per_class"
  problems = paper_table.table_problems(table)
  assert any("row names not unique: ['Li loss']" in p for p in problems)
  assert any("undeclared columns ['IoR']" in p for p in problems)
  assert any("column 'AUC'" in p for p in problems)
  assert paper_table.table_problems(SPEC["toy2020"]["tables"]["1"]) == []
  with pytest.raises(paper_table.TableError, match="toy2020 table 1 in the spec"):
    paper_table.table_spec(bad, "toy2020", "1")


@pytest.mark.parametrize("path, ok", [
    ("classification/auroc/per_class/Atelectasis", True), ("classification/w_auc", True),
    ("patch_grid/iou@0.1/per_class/Mass", True), ("cam_shift/delta_dice/mean", True),
    ("patch_grid/all_positive/ior@0.7/per_class/Mass", True),
    ("cam_kinds/mean_iou/gradcam++", True), ("localization/iou@0.5", True),
    ("classification/auroc/per_class", False), ("patchgrid/iou@0.1", False),
    ("localization/iou@x/mean", False), ("cam_shift/delta_dice/ci95", False),
])
def test_metric_path_form(path, ok):
  assert (paper_table.metric_path_problem(path) is None) == ok


def test_installed_paper_tables_are_well_formed():
  resource = importlib.resources.files("cxr_jax.evaluation").joinpath(paper_table.SPEC_FILE)
  if not resource.is_file():
    pytest.skip("cxr_jax/evaluation/paper_tables.json is not there yet (the papers' numbers)")
  spec = paper_table.load_spec()
  assert spec, "paper_tables.json has no paper"
  problems = []
  for paper, entry in spec.items():
    if not entry.get("method") or not entry.get("tables"):
      problems.append(f"{paper}: no method or no tables")
    for name, table in entry.get("tables", {}).items():
      problems += [f"{paper} table {name}: {p}" for p in paper_table.table_problems(table)]
  assert not problems, "\n".join(problems)
