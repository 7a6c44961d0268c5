"""cxr-table: the eval JSONs of many runs as one results table.

  cxr-table --workdirs /tmp/qs_sweep/*                       # markdown, test split
  cxr-table --workdirs /tmp/qs_sweep/* --split=val --format=csv --output=val.csv

One row per (method, dataset, setting), the form of the papers' tables: the
number of runs, the mean of each ``--metrics`` metric and the per-class values
of the first one, each as mean +- std (sample std, ddof=1) over the runs of the
row (seeds, folds). A run's setting is its sweep row (WORKDIR/sweep.json, see
cxr-sweep) without the ``--replicate_keys`` (default: seed, fold), so runs that
differ only in those are aggregated; a workdir without sweep.json is its own
setting, named after the folder. Workdirs without WORKDIR/eval/<split>.json are
listed on stderr and left out.

  cxr-table --paper=ge2018                                   # the paper's tables
  cxr-table --paper=ge2018 --table=1 --workdirs /tmp/ge_t1/* [--format=latex]

With ``--paper`` and ``--table``, a paper's table in its layout
(``cxr_jax.evaluation.paper_table``): runs are grouped by the row their
config.json names (``table.row``), each cell is ours (mean ± sample std over the
row's runs, with their count n) beside the paper's number and the difference;
the eval JSON is the one the table's spec names (``--split`` does not apply).
Rows without a finished run and unfinished workdirs are listed in the output and
on stderr. An unknown paper or table, or workdirs of another paper, table or
method, is an error (exit 2) that lists the known ones.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

import numpy as np
from absl import app
from absl import flags

from cxr_jax import errors, files
from cxr_jax.cli import flags as cli_flags
from cxr_jax.evaluation import paper_table

FLAGS = flags.FLAGS
flags.DEFINE_list("workdirs", [], "Run folders (also taken from the positional arguments, so "
                  "`--workdirs DIR/*` works).")
flags.DEFINE_string("split", "test", "Which eval/<split>.json to read.")
flags.DEFINE_enum("format", "md", ["md", "csv", "latex"],
                  "Markdown table, CSV or LaTeX (LaTeX: --paper/--table only).")
flags.DEFINE_list("metrics", ["auroc", "auprc", "f1"],
                  "classification metrics; the first one also gets per-class columns.")
flags.DEFINE_list("replicate_keys", ["seed", "fold"],
                  "Override keys (last component) that replicate a setting: aggregated over.")
flags.DEFINE_string("output", None, "Write the table here instead of stdout.")
flags.DEFINE_string("paper", None, "A paper of cxr_jax/evaluation/paper_tables.json: render its "
                    "--table (without --table: list its tables).")
flags.DEFINE_string("table", None, "The --paper's table number as the paper prints it ('1', 'II').")
flags.DEFINE_string("spec", None, "Advanced: a tables spec file instead of the package's "
                    "paper_tables.json.")


def run_setting(workdir: str, replicate_keys: Sequence[str]) -> str:
  """'key=value,...' of the run's sweep overrides minus the replicate keys ('-' if none)."""
  path = os.path.join(workdir, "sweep.json")
  if not os.path.exists(path):
    return os.path.basename(os.path.normpath(workdir))
  with open(path) as f:
    row = json.load(f)["row"]
  parts = [f"{k}={v}" for k, v in sorted(row.items()) if k.split(".")[-1] not in replicate_keys]
  return ",".join(parts) or "-"


def metric_values(classification: dict, metric: str) -> tuple[float, dict[str, float]]:
  """(mean, {class: value}) of one metric of an eval JSON; undefined values as NaN."""
  if metric not in classification:
    raise errors.UnknownKey(f"--metrics: {metric!r} is not in the eval JSON; available: "
                            f"{sorted(classification)}")
  entry = classification[metric]
  as_float = lambda v: math.nan if v is None else float(v)
  if not isinstance(entry, dict):
    return as_float(entry), {}
  return as_float(entry.get("mean")), {k: as_float(v) for k, v in entry.get("per_class", {}).items()}


def collect(workdirs: Sequence[str], split: str, metrics: Sequence[str],
            replicate_keys: Sequence[str]) -> tuple[list[dict], list[str]]:
  """(table rows, workdirs without an eval JSON). A row: {'method', 'dataset', 'setting',
  'runs', 'columns': {name: [value per run]}} in first-seen order."""
  groups: dict[tuple, dict] = {}
  missing = []
  for workdir in workdirs:
    path = os.path.join(workdir, "eval", f"{split}.json")
    if not os.path.exists(path):
      missing.append(workdir)
      continue
    with open(path) as f:
      payload = json.load(f)
    key = (payload.get("method", "?"), payload.get("dataset", "?"),
           run_setting(workdir, replicate_keys))
    group = groups.setdefault(key, {"method": key[0], "dataset": key[1], "setting": key[2],
                                    "runs": 0, "columns": {}})
    group["runs"] += 1
    values = {m: metric_values(payload["classification"], m)[0] for m in metrics}
    values.update(metric_values(payload["classification"], metrics[0])[1])
    for name, value in values.items():
      group["columns"].setdefault(name, []).append(value)
  return list(groups.values()), missing


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample std (NaN for one run) over the defined values; NaN if none."""
  defined = np.asarray([v for v in values if not math.isnan(v)], np.float64)
  if defined.size == 0:
    return math.nan, math.nan
  return float(defined.mean()), float(defined.std(ddof=1)) if defined.size > 1 else math.nan


def render(rows: Sequence[dict], fmt: str, digits: int = 3) -> str:
  """The rows as a markdown table ('mean ± std' cells) or CSV (mean and std columns)."""
  names = []
  for row in rows:
    names += [n for n in row["columns"] if n not in names]
  head = ["method", "dataset", "setting", "runs"]
  cells = []
  for row in rows:
    stats = {n: mean_std(row["columns"].get(n, [])) for n in names}
    cells.append(([row["method"], row["dataset"], row["setting"], str(row["runs"])], stats))
  if fmt == "csv":
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(head + [f"{n}{s}" for n in names for s in ("", "_std")])
    for fixed, stats in cells:
      writer.writerow(fixed + ["" if math.isnan(v) else f"{v:.6g}" for n in names for v in stats[n]])
    return out.getvalue()

  def cell(mean, std):
    if math.isnan(mean):
      return "-"
    return f"{mean:.{digits}f}" + ("" if math.isnan(std) else f" ± {std:.{digits}f}")

  lines = ["| " + " | ".join(head + names) + " |", "|" + "---|" * (len(head) + len(names))]
  for fixed, stats in cells:
    lines.append("| " + " | ".join(fixed + [cell(*stats[n]) for n in names]) + " |")
  return "\n".join(lines) + "\n"


def fail(message: str) -> NoReturn:
  """A user error: one line on stderr, exit status 2."""
  print(f"cxr-table: error: {message}", file=sys.stderr)
  raise SystemExit(2)


def emit(text: str) -> None:
  if FLAGS.output:
    files.write_text_atomic(FLAGS.output, text)
  else:
    sys.stdout.write(text)


def paper_main(workdirs: Sequence[str]) -> None:
  """--paper [--table]: the paper's table list, or its table from the workdirs."""
  try:
    spec = paper_table.load_spec(FLAGS.spec)
    if FLAGS.table is None:
      emit(paper_table.list_tables(spec, FLAGS.paper))
      return
    table = paper_table.paper_table(workdirs, spec, FLAGS.paper, FLAGS.table)
  except paper_table.TableError as e:
    fail(str(e))
  for line in paper_table.missing_lines(table):
    print(f"cxr-table: {line}", file=sys.stderr)
  emit(paper_table.render(table, FLAGS.format))


def main(argv):
  workdirs = cli_flags.rejoin_paths(list(FLAGS.workdirs)) + list(argv[1:])
  if FLAGS.paper is not None:
    paper_main(workdirs)
    return
  if FLAGS.table is not None:
    fail("--table needs --paper (cxr-table --paper=NAME lists its tables)")
  if FLAGS.format == "latex":
    fail("--format=latex needs --paper and --table")
  if not workdirs:
    raise app.UsageError("no workdirs: cxr-table --workdirs DIR/*")
  rows, missing = collect(workdirs, FLAGS.split, FLAGS.metrics, FLAGS.replicate_keys)
  for workdir in missing:
    print(f"cxr-table: no eval/{FLAGS.split}.json in {workdir} (unfinished?): left out",
          file=sys.stderr)
  if not rows:
    raise errors.MissingPath(f"none of the {len(workdirs)} workdirs has eval/{FLAGS.split}.json")
  emit(render(rows, FLAGS.format))


def run():
  cli_flags.run_app(main)


if __name__ == "__main__":
  run()
