"""A paper's table from the runs of its sweep, with the paper's numbers beside ours.

The spec (``paper_tables.json`` in this package, or a file given to ``load_spec``)
holds, per paper, its tables: the caption, the eval JSON the metrics come from
(``split`` / ``file``), the ``scale`` of the paper's numbers over ours (100 where
the paper prints %), the columns as printed (each a metric path into the eval
JSON), the rows as printed with the paper's numbers, optional trivial
``reference`` rows and notes. A run of a table is a workdir whose config.json has
``table.paper`` / ``table.table`` / ``table.row`` (set by the config's
``get_sweep('table=N')``) and whose ``method`` is the paper's.

``collect`` groups the runs by row (workdirs of another paper, table or method
are an error that lists them), ``build`` makes the ``Table`` (per row and column:
mean and sample std over the row's runs in the paper's units, the paper's number
and ours - paper; the reference rows as the mean over all the table's runs), and
``render_markdown`` / ``render_csv`` / ``render_latex`` print it. Rows without a
finished run and workdirs without the eval JSON (unfinished) are listed in the
output; their cells are '—', undefined (NaN / null) metrics 'n/a'.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.resources
import io
import json
import math
import os
import re
from collections.abc import Mapping, Sequence

import numpy as np

SPEC_FILE = "paper_tables.json"
NO_RUN = "—"
UNDEFINED = "n/a"

# Metric names per eval JSON section; a column's path is
# <section>/<metric>[/mean | /per_class/<class>] (a bare metric with a 'mean' reads its mean).
_T = r"(iou|ior)@\d+(\.\d+)?"
METRIC_NAMES = {
    "classification": r"auroc|auprc|f1|w_auc|d_auc|n_auc|w_auc_normalized",
    "localization": rf"{_T}|mean_iou",
    "patch_grid": rf"{_T}|all_positive/{_T}",
    "cam_shift": r"delta_mse|delta_dice",
    "cam_kinds": r"mean_iou/(gradcam|gradcam\+\+|scorecam)",
}


class TableError(ValueError):
  """Bad input (unknown paper / table / row, foreign workdirs, a malformed spec): one line."""


@dataclasses.dataclass
class Cell:
  """One column of one row: ours (paper units) over ``count`` runs, the paper's number."""
  values: list[float]          # ours per run, in the paper's units (NaN: undefined)
  paper: float | None          # the published number (None: the paper prints none)

  @property
  def mean(self) -> float:
    return mean_std(self.values)[0]

  @property
  def std(self) -> float:
    return mean_std(self.values)[1]

  @property
  def diff(self) -> float | None:
    """ours - paper (None without a paper number or a run; NaN when ours is undefined)."""
    if self.paper is None or not self.values:
      return None
    return self.mean - self.paper


@dataclasses.dataclass
class Row:
  name: str                    # as printed in the paper (reference rows: the spec's name)
  kind: str                    # 'row' or 'reference'
  n: int                       # finished runs the row is computed from
  cells: dict[str, Cell]       # column name -> cell
  note: str = ""               # the spec's note on the row


@dataclasses.dataclass
class Table:
  paper: str
  table: str
  title: str
  caption: str
  scale: float
  eval_file: str               # eval/<file> the metrics were read from
  columns: list[str]           # as printed, in order
  rows: list[Row]              # the paper's rows in order, then the reference rows
  missing_rows: list[str]      # rows without a finished run
  unfinished: list[tuple[str, str]]  # (workdir, row) without the eval JSON
  absent: list[str]            # 'column: path (k runs)' for metrics not in a run's eval JSON
  notes: list[str]             # the spec's notes


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample std (ddof=1; NaN for one value) over the defined values; NaN if none."""
  defined = np.asarray([v for v in values if not math.isnan(v)], np.float64)
  if defined.size == 0:
    return math.nan, math.nan
  std = float(defined.std(ddof=1)) if defined.size > 1 else math.nan
  return float(defined.mean()), std


def load_spec(path: str | None = None) -> dict:
  """The tables spec: ``path``, else the package's ``paper_tables.json``."""
  if path is not None:
    if not os.path.exists(path):
      raise TableError(f"no tables spec at {path}")
    with open(path) as f:
      return json.load(f)
  resource = importlib.resources.files("cxr_jax.evaluation").joinpath(SPEC_FILE)
  if not resource.is_file():
    raise TableError(f"cxr_jax/evaluation/{SPEC_FILE} is not installed (give --spec=PATH)")
  return json.loads(resource.read_text())


def known_tables(spec: Mapping) -> str:
  """'paper: table, table; ...' of the spec, for error messages."""
  return "; ".join(f"{paper}: {', '.join(entry.get('tables', {}))}"
                   for paper, entry in spec.items())


def metric_path_problem(path: str) -> str | None:
  """Why ``path`` is not of the eval JSON schema's form, or None when it is."""
  section, _, rest = path.partition("/")
  if section not in METRIC_NAMES:
    return f"section {section!r} is none of {sorted(METRIC_NAMES)}"
  names = METRIC_NAMES[section]
  if not re.fullmatch(rf"({names})(/mean|/per_class/[^/]+)?", rest):
    return f"{rest!r} is not <metric>[/mean|/per_class/<class>] of {section} ({names})"
  return None


def table_problems(table: Mapping) -> list[str]:
  """What is malformed in one table of the spec (empty when nothing)."""
  problems = []
  columns = [c.get("name") for c in table.get("columns", [])]
  rows = [r.get("name") for r in table.get("rows", [])]
  if not columns or not rows:
    problems.append("no columns or no rows")
  for kind, names in (("column", columns), ("row", rows)):
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
      problems.append(f"{kind} names not unique: {duplicated}")
  for column in table.get("columns", []):
    problem = metric_path_problem(column.get("metric", ""))
    if problem:
      problems.append(f"column {column.get('name')!r}: {problem}")
  entries = [("row", r, r.get("paper", {})) for r in table.get("rows", [])]
  entries += [("reference", r, r.get("paper", {})) for r in table.get("reference", [])]
  for kind, row, paper in entries:
    undeclared = sorted(set(paper) - set(columns))
    if undeclared:
      problems.append(f"{kind} {row.get('name')!r}: paper values for undeclared columns {undeclared}")
    bad = [k for k, v in paper.items() if v is not None and not isinstance(v, (int, float))]
    if bad:
      problems.append(f"{kind} {row.get('name')!r}: paper values not numbers or null: {bad}")
  for ref in table.get("reference", []):
    metrics = ref.get("metrics", {})
    undeclared = sorted(set(metrics) - set(columns))
    if undeclared:
      problems.append(f"reference {ref.get('name')!r}: metrics for undeclared columns {undeclared}")
    for column, path in metrics.items():
      problem = metric_path_problem(path)
      if problem:
        problems.append(f"reference {ref.get('name')!r} column {column!r}: {problem}")
  return problems


def table_spec(spec: Mapping, paper: str, table: str) -> dict:
  """The spec of ``paper``'s table ``table``; unknown or malformed ones raise ``TableError``."""
  if paper not in spec:
    raise TableError(f"unknown paper {paper!r}; known: {', '.join(spec)}")
  tables = spec[paper].get("tables", {})
  if table not in tables:
    raise TableError(f"unknown table {table!r} of {paper}; known: {', '.join(tables)}")
  problems = table_problems(tables[table])
  if problems:
    raise TableError(f"{paper} table {table} in the spec: {'; '.join(problems)}")
  return tables[table]


def list_tables(spec: Mapping, paper: str) -> str:
  """One line per table of ``paper``: its number, caption and row count."""
  if paper not in spec:
    raise TableError(f"unknown paper {paper!r}; known: {', '.join(spec)}")
  entry = spec[paper]
  lines = [f"{paper}: {entry.get('title', '')} (method {entry.get('method', '?')})"]
  for name, table in entry.get("tables", {}).items():
    lines.append(f"  table {name}: {table.get('caption', '')} ({len(table.get('rows', []))} rows)")
  return "\n".join(lines) + "\n"


def eval_file(table: Mapping) -> str:
  """The eval JSON's file name under WORKDIR/eval/."""
  return table.get("file") or f"{table.get('split', 'test')}.json"


def run_identity(config: Mapping) -> tuple[str, str, str, str]:
  """(paper, table, row, method) of a resolved config ('' where unset)."""
  ident = config.get("table") or {}
  if not isinstance(ident, Mapping):
    ident = {}
  return (str(ident.get("paper", "") or ""), str(ident.get("table", "") or ""),
          str(ident.get("row", "") or ""), str(config.get("method", "") or ""))


def describe(workdir: str, identity: tuple[str, str, str, str] | None) -> str:
  """What a foreign workdir is, for the error message."""
  if identity is None:
    return f"{workdir} (no config.json)"
  paper, table, row, method = identity
  if not paper:
    return f"{workdir} (method {method or '?'}, not a run of a paper table)"
  return f"{workdir} ({paper} table {table} row {row!r}, method {method or '?'})"


def collect(workdirs: Sequence[str], spec: Mapping, paper: str, table: str
            ) -> tuple[dict[str, list[tuple[str, dict]]], list[tuple[str, str]]]:
  """({row: [(workdir, eval JSON)]} of the finished runs, [(workdir, row)] unfinished).

  Paths that are not folders (a sweep root's sweep.sbatch under DIR/*) are skipped. Raises
  ``TableError`` when a workdir is not a run of this table (no config.json, another paper /
  table / method, no table) or names a row the table does not have.
  """
  entry = table_spec(spec, paper, table)
  method = spec[paper].get("method", "")
  rows = [r["name"] for r in entry["rows"]]
  name = eval_file(entry)
  finished: dict[str, list[tuple[str, dict]]] = {r: [] for r in rows}
  unfinished, foreign, bad_rows = [], [], []
  for workdir in workdirs:
    if not os.path.isdir(workdir):
      continue
    path = os.path.join(workdir, "config.json")
    identity = None
    if os.path.exists(path):
      with open(path) as f:
        identity = run_identity(json.load(f))
    if identity is None or identity[:2] != (paper, table) or (method and identity[3] != method):
      foreign.append(describe(workdir, identity))
      continue
    if identity[2] not in finished:
      bad_rows.append(f"{workdir} (row {identity[2]!r})")
      continue
    result = os.path.join(workdir, "eval", name)
    if not os.path.exists(result):
      unfinished.append((workdir, identity[2]))
      continue
    with open(result) as f:
      finished[identity[2]].append((workdir, json.load(f)))
  if foreign:
    raise TableError(f"{len(foreign)} workdir(s) are not runs of {paper} table {table} (method "
                     f"{method or '?'}): {'; '.join(foreign)}; known tables: {known_tables(spec)}")
  if bad_rows:
    raise TableError(f"rows not in {paper} table {table}: {'; '.join(bad_rows)}; "
                     f"its rows: {', '.join(rows)}")
  return finished, unfinished


_ABSENT = object()


def metric_value(payload: Mapping, path: str):
  """The number at ``path`` in an eval JSON (a metric dict reads its 'mean'; null -> NaN);
  ``_ABSENT`` when the path is not there."""
  node = payload
  for key in path.split("/"):
    if not isinstance(node, Mapping) or key not in node:
      return _ABSENT
    node = node[key]
  if isinstance(node, Mapping):
    node = node.get("mean", _ABSENT)
  if node is _ABSENT:
    return _ABSENT
  if node is None:
    return math.nan
  if not isinstance(node, (int, float)):
    return _ABSENT
  return float(node)


def _cells(runs: Sequence[tuple[str, dict]], metrics: Mapping[str, str], paper: Mapping,
           columns: Sequence[str], scale: float, absent: dict) -> dict[str, Cell]:
  cells = {}
  for column in columns:
    values = []
    if column in metrics:
      for workdir, payload in runs:
        value = metric_value(payload, metrics[column])
        if value is _ABSENT:
          absent.setdefault((column, metrics[column]), []).append(workdir)
          value = math.nan
        values.append(value * scale)
    cells[column] = Cell(values, paper.get(column))
  return cells


def build(spec: Mapping, paper: str, table: str,
          finished: Mapping[str, Sequence[tuple[str, dict]]],
          unfinished: Sequence[tuple[str, str]]) -> Table:
  """The ``Table`` of ``collect``'s runs."""
  entry = table_spec(spec, paper, table)
  scale = float(entry.get("scale", 1.0))
  columns = [c["name"] for c in entry["columns"]]
  metrics = {c["name"]: c["metric"] for c in entry["columns"]}
  absent: dict[tuple[str, str], list[str]] = {}
  rows = []
  for row in entry["rows"]:
    runs = finished.get(row["name"], [])
    rows.append(Row(row["name"], "row", len(runs),
                    _cells(runs, metrics, row.get("paper", {}), columns, scale, absent),
                    row.get("note", "")))
  every_run = [run for row in entry["rows"] for run in finished.get(row["name"], [])]
  for ref in entry.get("reference", []):
    rows.append(Row(ref["name"], "reference", len(every_run),
                    _cells(every_run, ref.get("metrics", {}), ref.get("paper", {}), columns,
                           scale, absent), ref.get("note", "")))
  return Table(
      paper=paper, table=table, title=spec[paper].get("title", ""),
      caption=entry.get("caption", ""), scale=scale, eval_file=eval_file(entry),
      columns=columns, rows=rows,
      missing_rows=[r.name for r in rows if r.kind == "row" and r.n == 0],
      unfinished=list(unfinished),
      absent=[f"{c}: {p} ({len(w)} run(s), e.g. {w[0]})" for (c, p), w in absent.items()],
      notes=list(entry.get("notes", [])))


def digits_for(scale: float) -> int:
  """Decimals of our numbers: 3 in [0, 1] units, 1 in %."""
  return max(0, 3 - round(math.log10(scale))) if scale > 0 else 3


def _number(value: float | None, digits: int) -> str:
  if value is None:
    return NO_RUN
  if math.isnan(value):
    return UNDEFINED
  return f"{value:.{digits}f}"


def ours_text(cell: Cell, digits: int, pm: str = " ± ") -> str:
  """'mean ± std' ('mean' for one defined run; '—' without runs; 'n/a' if all undefined)."""
  if not cell.values:
    return NO_RUN
  mean, std = mean_std(cell.values)
  if math.isnan(mean):
    return UNDEFINED
  return f"{mean:.{digits}f}" + ("" if math.isnan(std) else f"{pm}{std:.{digits}f}")


def paper_text(value: float | None) -> str:
  """The paper's number as printed (its own decimals)."""
  return NO_RUN if value is None else f"{value:g}"


def missing_lines(table: Table) -> list[str]:
  """The 'missing' note: rows without a finished run, unfinished workdirs, absent metrics."""
  lines = []
  if table.missing_rows:
    lines.append(f"rows without a finished run: {', '.join(table.missing_rows)}")
  if table.unfinished:
    lines.append(f"unfinished (no eval/{table.eval_file}): "
                 + ", ".join(f"{w} (row {r})" for w, r in table.unfinished))
  if table.absent:
    lines.append(f"metrics not in eval/{table.eval_file}: {'; '.join(table.absent)}")
  return lines


def header(table: Table) -> str:
  units = "" if table.scale == 1 else f" (×{table.scale:g}, the paper's units)"
  return (f"{table.paper} Table {table.table}: {table.caption}. Ours{units}: mean ± sample std "
          f"over the row's n runs; paper: the published number; Δ = ours − paper.")


def render_markdown(table: Table) -> str:
  digits = digits_for(table.scale)
  head = ["Row", "n"] + [f"{c}{s}" for c in table.columns for s in ("", " paper", " Δ")]
  lines = [f"**{header(table)}**", "", "| " + " | ".join(head) + " |",
           "|---|---:|" + "---:|" * (3 * len(table.columns))]
  for row in table.rows:
    name = row.name if row.kind == "row" else f"*{row.name}* (reference)"
    cells = [name, str(row.n)]
    for column in table.columns:
      cell = row.cells[column]
      cells += [ours_text(cell, digits), paper_text(cell.paper), _number(cell.diff, digits)]
    lines.append("| " + " | ".join(cells) + " |")
  extra = [f"{r.name}: {r.note}" for r in table.rows if r.note] + table.notes
  if extra:
    lines += ["", "Notes:"] + [f"- {n}" for n in extra]
  missing = missing_lines(table)
  if missing:
    lines += ["", "Missing:"] + [f"- {m}" for m in missing]
  return "\n".join(lines) + "\n"


def _csv_number(value: float | None) -> str:
  if value is None:
    return ""
  return UNDEFINED if math.isnan(value) else f"{value:.6g}"


def render_csv(table: Table) -> str:
  """kind,row,n, then per column <c>,<c>_std,<c>_paper,<c>_diff, then note. Kinds: 'row',
  'reference' and 'unfinished' (one line per workdir without the eval JSON, in note).
  Empty: no run / no paper number / one run's std; 'n/a': undefined."""
  out = io.StringIO()
  writer = csv.writer(out)
  writer.writerow(["kind", "row", "n"]
                  + [f"{c}{s}" for c in table.columns for s in ("", "_std", "_paper", "_diff")]
                  + ["note"])
  for row in table.rows:
    values = []
    for column in table.columns:
      cell = row.cells[column]
      mean, std = mean_std(cell.values) if cell.values else (None, None)
      if mean is not None and not math.isnan(mean) and math.isnan(std):
        std = None  # one defined run: no std
      values += [_csv_number(mean), _csv_number(std), _csv_number(cell.paper),
                 _csv_number(cell.diff)]
    note = row.note or ("no finished run" if row.kind == "row" and row.n == 0 else "")
    writer.writerow([row.kind, row.name, row.n] + values + [note])
  for workdir, name in table.unfinished:
    writer.writerow(["unfinished", name, 0] + [""] * (4 * len(table.columns))
                    + [f"no eval/{table.eval_file} in {workdir}"])
  return out.getvalue()


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}", "—": "---", "±": r"$\pm$", "Δ": r"$\Delta$",
                  "−": "$-$", "×": r"$\times$"}


def latex_escape(text: str) -> str:
  return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def render_latex(table: Table) -> str:
  """A table environment: one tabular with 2 + 3 columns per metric (ours, paper, Δ)."""
  digits = digits_for(table.scale)
  lines = [r"\begin{table}", r"\centering", rf"\caption{{{latex_escape(header(table))}}}",
           rf"\begin{{tabular}}{{lr{'rrr' * len(table.columns)}}}", r"\toprule",
           " & ".join(["Row", "$n$"] + [rf"\multicolumn{{3}}{{c}}{{{latex_escape(c)}}}"
                                        for c in table.columns]) + r" \\",
           " & ".join(["", ""] + ["ours", "paper", r"$\Delta$"] * len(table.columns)) + r" \\",
           r"\midrule"]
  for i, row in enumerate(table.rows):
    if row.kind == "reference" and (i == 0 or table.rows[i - 1].kind == "row"):
      lines.append(r"\midrule")
    name = latex_escape(row.name)
    cells = [name if row.kind == "row" else rf"\textit{{{name}}} (reference)", str(row.n)]
    for column in table.columns:
      cell = row.cells[column]
      cells += [latex_escape(ours_text(cell, digits)), latex_escape(paper_text(cell.paper)),
                latex_escape(_number(cell.diff, digits))]
    lines.append(" & ".join(cells) + r" \\")
  lines += [r"\bottomrule", r"\end{tabular}"]
  extra = [f"{r.name}: {r.note}" for r in table.rows if r.note] + table.notes
  missing = [f"Missing: {m}" for m in missing_lines(table)]
  if extra or missing:
    lines.append(rf"\par\footnotesize {latex_escape(' '.join(extra + missing))}")
  lines.append(r"\end{table}")
  return "\n".join(lines) + "\n"


RENDERERS = {"md": render_markdown, "csv": render_csv, "latex": render_latex}


def render(table: Table, fmt: str) -> str:
  return RENDERERS[fmt](table)


def paper_table(workdirs: Sequence[str], spec: Mapping, paper: str, table: str) -> Table:
  """``collect`` then ``build``: the table of these workdirs."""
  finished, unfinished = collect(workdirs, spec, paper, table)
  return build(spec, paper, table, finished, unfinished)
