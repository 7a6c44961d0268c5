"""cxr_jax/evaluation/paper_tables.json: the papers' published numbers, checked against the papers.

The layout checks need nothing but the JSON. The text check reads each table's ``source``
('<paper>.txt lines A-B, line C (...)') in ../shared/papers/ and requires every number of
the table to be printed there in the table's order: a row's numbers (a column's, for a table
with ``"transposed": true``, printed with the runs as columns) are consecutive numbers of
one printed line, where a null may stand for a printed '-' or for nothing; only after the
last number of a line may the next number be found further on (a row printed over two
blocks, an extra column the paper does not print). Rows start in the printed order and no
printed number serves two cells, so a mistyped or exchanged number fails.
"""

from __future__ import annotations

import copy
import json
import math
import pathlib
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

import pytest

from cxr_jax.data import schema

REPO = pathlib.Path(__file__).resolve().parents[1]
SPEC_PATH = REPO / "cxr_jax" / "evaluation" / "paper_tables.json"
PAPERS = REPO.parent / "shared" / "papers"

SECTIONS = ("classification", "localization", "patch_grid", "cam_shift", "cam_kinds")
CLASSES = set(schema.NIH14.classes) | set(schema.CHEXPERT14.classes)
BOXED = set(schema.NIH14.boxed)
DASH = "-"
# A number not glued to a word ('VGG16', 'X-ray14' are not numbers; 'ResNet-50' gives 50,
# '[18]' gives 18, '+14' gives 14), or a table cell that is just '-'.
TOKEN = re.compile(r"(?P<num>(?<![\w.])\+?\d+(?:\.\d+)?(?!\w)(?!\.\d))"
                   r"|(?P<dash>(?:^|(?<=\t))-(?=\t|$))")


def _unique_keys(pairs):
  keys = [k for k, _ in pairs]
  repeated = sorted({k for k in keys if keys.count(k) > 1})
  if repeated:
    raise ValueError(f"paper_tables.json repeats the keys {repeated}")
  return dict(pairs)


def load_spec() -> dict:
  return json.loads(SPEC_PATH.read_text(), object_pairs_hook=_unique_keys)


def _tables() -> list[tuple[str, str, dict]]:
  try:
    spec = load_spec()
  except (OSError, ValueError):
    return []  # test_spec_parses reports it
  return [(paper, name, table) for paper, entry in spec.items()
          for name, table in entry.get("tables", {}).items()]


TABLES = _tables()
IDS = [f"{paper}-{name}" for paper, name, _ in TABLES]


def test_spec_parses():
  spec = load_spec()
  assert set(spec) == {"ge2018", "vansonsbeek2023", "rozenberg2020", "kim2022", "talasila2023"}
  for paper, entry in spec.items():
    assert entry.get("title") and entry.get("method") and entry.get("tables"), paper


# ----------------------------------------------------------------------------- layout
def metric_problem(path) -> str | None:
  """Why a column's metric path cannot name a number of the eval JSON (None if it can)."""
  if not isinstance(path, str) or not path:
    return f"metric {path!r} is not a path"
  parts = path.split("/")
  if parts[0] not in SECTIONS:
    return f"{path!r}: section {parts[0]!r} is none of {SECTIONS}"
  if "per_class" in parts:
    i = parts.index("per_class")
    if i != len(parts) - 2:
      return f"{path!r}: per_class must be followed by one class name"
    names = BOXED if parts[0] in ("localization", "patch_grid") else CLASSES
    if parts[-1] not in names:
      return f"{path!r}: class {parts[-1]!r} is not one of the project's class names"
  return None


def value_problem(value, metric: str, scale: float) -> str | None:
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    return f"{value!r} is not a finite number"
  low, high = (-100.0, 100.0) if metric.startswith("cam_shift/") else (0.0, scale)
  if not low <= value <= high:
    return f"{value!r} is outside [{low:g}, {high:g}] for {metric}"
  return None


def layout_problems(table: Mapping) -> list[str]:
  """What is malformed in one table: names, metric paths, paper values and their ranges."""
  problems = []
  for key in ("caption", "source", "split"):
    if not isinstance(table.get(key), str) or not table.get(key):
      problems.append(f"no {key}")
  if "file" in table and not str(table["file"]).endswith(".json"):
    problems.append(f"file {table['file']!r} is not a JSON file name")
  scale = table.get("scale", 1)
  if scale not in (1, 100):
    problems.append(f"scale {scale!r} is neither 1 nor 100")
  if not isinstance(table.get("transposed", False), bool):
    problems.append("transposed is not true/false")
  columns, rows = table.get("columns") or [], table.get("rows") or []
  if not columns or not rows:
    problems.append("no columns or no rows")
  for kind, names in (("column", [c.get("name") for c in columns]),
                      ("row", [r.get("name") for r in rows])):
    if any(not isinstance(n, str) or not n.strip() for n in names):
      problems.append(f"an empty {kind} name")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
      problems.append(f"{kind} names not unique: {repeated}")
  metrics = {c.get("name"): c.get("metric") for c in columns}
  problems += [f"column {n!r}: {p}" for n, m in metrics.items() if (p := metric_problem(m))]
  numbers = 0
  for row in rows:
    paper = row.get("paper")
    if not isinstance(paper, dict):
      problems.append(f"row {row.get('name')!r} has no paper values")
      continue
    undeclared = sorted(set(paper) - set(metrics))
    if undeclared:
      problems.append(f"row {row.get('name')!r}: paper values of undeclared columns {undeclared}")
    for column, value in paper.items():
      problem = value_problem(value, str(metrics.get(column, "")), scale)
      if problem:
        problems.append(f"row {row.get('name')!r} column {column!r}: {problem}")
      numbers += value is not None
  if not numbers:
    problems.append("no paper number at all")
  for ref in table.get("reference", []):
    refs = ref.get("metrics") or {}
    if not ref.get("name") or not refs:
      problems.append(f"reference {ref.get('name')!r} has no name or no metrics")
    undeclared = sorted(set(refs) - set(metrics))
    if undeclared:
      problems.append(f"reference {ref.get('name')!r}: metrics of undeclared columns {undeclared}")
    problems += [f"reference {ref.get('name')!r} column {c!r}: {p}"
                 for c, m in refs.items() if (p := metric_problem(m))]
  return problems


@pytest.mark.parametrize("paper, name, table", TABLES, ids=IDS)
def test_table_layout(paper, name, table):
  assert not layout_problems(table), f"{paper} table {name}: " + "; ".join(layout_problems(table))


def test_layout_check_rejects_bad_tables():
  _, _, table = next(t for t in TABLES if t[0] == "kim2022" and t[1] == "3")
  first, column = table["rows"][0]["name"], table["columns"][0]["name"]
  breakages = {
      "repeated row": lambda t: t["rows"].append(copy.deepcopy(t["rows"][0])),
      "undeclared column": lambda t: t["rows"][0]["paper"].update({"Hernia ": 0.5}),
      "AUROC above 1": lambda t: t["rows"][0]["paper"].update({column: 1.2}),
      "misspelt class": lambda t: t["columns"][12].update(
          metric="classification/auroc/per_class/Pleural Thickening"),
      "string number": lambda t: t["rows"][0]["paper"].update({column: "0.70"}),
  }
  for what, breakage in breakages.items():
    broken = copy.deepcopy(table)
    breakage(broken)
    assert layout_problems(broken), f"{what} (row {first!r}) passed the layout check"


# ----------------------------------------------------------------------------- paper text
class Token(NamedTuple):
  line: int                   # 1-based line of the paper's .txt
  value: float | str          # a number, or DASH for a '-' cell


def source_region(source: str) -> tuple[str, list[tuple[int, int]]]:
  """(the .txt file name, [(first, last) line]) named by a table's ``source``."""
  files = re.findall(r"[\w.-]+\.txt", source)
  ranges = [(int(a), int(b or a)) for a, b in re.findall(r"\blines? (\d+)(?:-(\d+))?", source)]
  if len(files) != 1 or not ranges:
    raise ValueError(f"source {source!r} names no single .txt file and line range")
  return files[0], ranges


def region_tokens(lines: Sequence[str], ranges: Sequence[tuple[int, int]]) -> list[Token]:
  """The numbers and '-' cells of the lines in ``ranges``, in the order the ranges are given."""
  tokens = []
  for first, last in ranges:
    if not 1 <= first <= last <= len(lines):
      raise ValueError(f"lines {first}-{last} are outside the file ({len(lines)} lines)")
    for number in range(first, last + 1):
      for m in TOKEN.finditer(lines[number - 1]):
        tokens.append(Token(number, float(m["num"]) if m["num"] else DASH))
  return tokens


def _line_ends_at(tokens: Sequence[Token], i: int) -> bool:
  return i + 1 >= len(tokens) or tokens[i + 1].line != tokens[i].line


def match_rest(tokens: Sequence[Token], values: Sequence, pos: int, anywhere: bool,
               used: set[int]) -> list[int] | None:
  """The tokens (from ``pos`` on, none in ``used``) that print ``values``, or None.

  A number follows the previous one directly on the same line unless ``anywhere`` (the
  previous number ended its line); a None consumes an adjacent '-' or nothing.
  """
  if not values:
    return []
  value, rest = values[0], values[1:]
  adjacent = (not anywhere and 0 < pos < len(tokens) and pos not in used
              and tokens[pos].line == tokens[pos - 1].line)
  if value is None:
    if adjacent and tokens[pos].value == DASH:
      found = match_rest(tokens, rest, pos + 1, _line_ends_at(tokens, pos), used)
      if found is not None:
        return [pos] + found
    return match_rest(tokens, rest, pos, anywhere, used)
  if anywhere:
    candidates = [i for i in range(pos, len(tokens)) if tokens[i].value == value and i not in used]
  else:
    candidates = [pos] if adjacent and tokens[pos].value == value else []
  for i in candidates:
    found = match_rest(tokens, rest, i + 1, _line_ends_at(tokens, i), used)
    if found is not None:
      return [i] + found
  return None


def find_group(tokens: Sequence[Token], values: Sequence, pos: int,
               used: set[int]) -> list[int] | None:
  """The tokens printing ``values``, starting at the first possible token from ``pos`` on."""
  values = list(values)
  while values and values[0] is None:
    values.pop(0)
  for i in range(pos, len(tokens)):
    if tokens[i].value == values[0] and i not in used:
      found = match_rest(tokens, values[1:], i + 1, _line_ends_at(tokens, i), used)
      if found is not None:
        return [i] + found
  return None


def groups(table: Mapping) -> Iterator[tuple[str, list]]:
  """(name, values) per printed line of the table: its rows, or its columns when transposed."""
  columns = [c["name"] for c in table["columns"]]
  if table.get("transposed"):
    for column in columns:
      yield f"column {column!r}", [row["paper"].get(column) for row in table["rows"]]
  else:
    for row in table["rows"]:
      yield f"row {row['name']!r}", [row["paper"].get(column) for column in columns]


def text_problems(table: Mapping, lines: Sequence[str], ranges) -> list[str]:
  """The rows (columns) whose numbers are not printed in order in the source region.

  Each row starts after the previous row's start (rows are printed in order; a row printed
  over two blocks may reach past the next row's start), and no printed number is used twice.
  """
  tokens, problems, pos, used = region_tokens(lines, ranges), [], 0, set()
  for name, values in groups(table):
    if all(v is None for v in values):
      continue
    found = find_group(tokens, values, pos, used)
    if found is None:
      problems.append(f"{name}: {[v for v in values if v is not None]} not printed in that "
                      "order after the previous one")
    else:
      pos, used = found[0] + 1, used | set(found)
  return problems


def _paper_lines(table: Mapping) -> tuple[list[str], list[tuple[int, int]]]:
  if not PAPERS.is_dir():
    pytest.skip(f"the papers' text is not here ({PAPERS}): the numbers are not checked "
                "against the papers")
  name, ranges = source_region(table["source"])
  path = PAPERS / name
  assert path.is_file(), f"source names {name}, which is not in {PAPERS}"
  return path.read_text().split("\n"), ranges


@pytest.mark.parametrize("paper, name, table", TABLES, ids=IDS)
def test_numbers_as_printed_in_the_paper(paper, name, table):
  lines, ranges = _paper_lines(table)
  problems = text_problems(table, lines, ranges)
  assert not problems, f"{paper} table {name} ({table['source']}): " + "; ".join(problems)


def _number_cells(table: Mapping) -> list[tuple[int, str]]:
  """(row index, column) of the paper numbers, in the order of ``groups``."""
  columns = [c["name"] for c in table["columns"]]
  cells = [(r, c) for r in range(len(table["rows"])) for c in columns]
  if table.get("transposed"):
    cells = [(r, c) for c in columns for r in range(len(table["rows"]))]
  return [(r, c) for r, c in cells if table["rows"][r]["paper"].get(c) is not None]


@pytest.mark.parametrize("paper, name, table", TABLES, ids=IDS)
def test_text_check_rejects_mistyped_and_swapped_numbers(paper, name, table):
  lines, ranges = _paper_lines(table)
  cells = _number_cells(table)
  r, c = cells[len(cells) // 2]
  mistyped = copy.deepcopy(table)
  value = mistyped["rows"][r]["paper"][c]
  mistyped["rows"][r]["paper"][c] = value + (0.01 if value < 1 else 1)
  assert text_problems(mistyped, lines, ranges), (
      f"{paper} table {name}: {value} -> {value + (0.01 if value < 1 else 1)} in row "
      f"{table['rows'][r]['name']!r} column {c!r} passed the text check")
  # Two different numbers of one printed line, exchanged.
  for (r1, c1), (r2, c2) in zip(cells, cells[1:]):
    same_group = c1 == c2 if table.get("transposed") else r1 == r2
    a, b = table["rows"][r1]["paper"][c1], table["rows"][r2]["paper"][c2]
    if same_group and a != b:
      swapped = copy.deepcopy(table)
      swapped["rows"][r1]["paper"][c1], swapped["rows"][r2]["paper"][c2] = b, a
      assert text_problems(swapped, lines, ranges), (
          f"{paper} table {name}: swapping {a} and {b} passed the text check")
      break
