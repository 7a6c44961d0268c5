"""``--print_config``: a resolved config's fields with their values and one-line comments.

The comments are read from the config source files (``configs/common.py`` and
the method config), where every field is declared with a comment:

  c.data.image_size = a.size or size       # square side the images are resized to, pixels

A field's comment is the one after its first assignment (or, without one, the
first sentence of the comment lines right above it); a keyword of a ``dict(...)``
/ ``ConfigDict(...)`` value takes the comment on its line. Inside a function,
``c`` (a parameter) or the name it returns is the config's root, and names bound
to a field (``b = c.byol = ConfigDict()``) are that field. A function that
returns a ConfigDict it fills (``common.optimizer``) lends its comments to every
field assigned its result (``c.optimizer``, ``byol.optimizer``). Earlier files
win, so ``common.py`` describes the shared fields.
"""

from __future__ import annotations

import ast
import io
import os
import re
import tokenize
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ml_collections

# Width of the 'key = value' column before the comment.
KEY_VALUE_WIDTH = 48
# Longest comment printed; longer ones end with '...'.
MAX_COMMENT = 110
# A full stop that ends a sentence (not 'Sec. 4', 'Eq. 5', 'e.g. x').
SENTENCE_END = r"(?<!Sec)(?<!Eq)(?<!e\.g)(?<!i\.e)(?<!vs)\.\s"


def _comments(source: str) -> tuple[dict[int, str], set[int]]:
  """({line: comment text}, lines that hold only a comment) of a Python source."""
  comments, code_lines = {}, set()
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      comments[tok.start[0]] = tok.string.lstrip("#").strip()
    elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                          tokenize.ENDMARKER):
      for line in range(tok.start[0], tok.end[0] + 1):
        code_lines.add(line)
  return comments, set(comments) - code_lines


def _first_sentence(lines: Sequence[str]) -> str:
  """The first sentence of a comment block (ends at '. ' or a line ending in '.' / ':')."""
  text = ""
  for line in lines:
    text = f"{text} {line}".strip()
    if text.endswith((".", ":")):
      break
  match = re.search(SENTENCE_END, text)
  return text[:match.start() + 1] if match else text


def _path(node: ast.AST, aliases: Mapping[str, str]) -> str | None:
  """'data.image_size' of ``c.data.image_size`` (``aliases``: local name -> field path)."""
  parts = []
  while isinstance(node, ast.Attribute):
    parts.append(node.attr)
    node = node.value
  if not isinstance(node, ast.Name) or node.id not in aliases:
    return None
  return ".".join(p for p in [aliases[node.id]] + parts[::-1] if p)


def _called_name(node: ast.AST) -> str | None:
  """'optimizer' of ``optimizer(...)`` / ``common.optimizer(...)``."""
  if isinstance(node, ast.Call):
    func = node.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
  return None


def _keywords(node: ast.AST) -> list[ast.keyword]:
  """The keywords of a ``dict(...)`` / ``ConfigDict(dict(...))``-like value (unwrapped)."""
  while isinstance(node, ast.Call) and not node.keywords and len(node.args) == 1:
    node = node.args[0]
  return [k for k in node.keywords if k.arg] if isinstance(node, ast.Call) else []


class _FileComments:
  """The field comments of one config source file, per function."""

  def __init__(self, path: str):
    with open(path) as f:
      source = f.read()
    self.comments, self.comment_only = _comments(source)
    self.functions = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef)]

  def statement_comment(self, node: ast.stmt, claimed: set[int]) -> str:
    """The comment after ``node`` on its last or first line (unless a keyword of its value
    ``claimed`` that line), else the first sentence of the block right above it."""
    for line in (node.end_lineno, node.lineno):
      if line in self.comments and line not in self.comment_only and line not in claimed:
        return self.comments[line]
    block, line = [], node.lineno - 1
    while line in self.comment_only:
      block.insert(0, self.comments[line])
      line -= 1
    return _first_sentence(block)

  def keyword_comments(self, keywords: Sequence[ast.keyword]) -> dict[str, tuple[int, str]]:
    """{keyword: (line, comment)}: the comment on the line where a keyword's value ends, if
    no other keyword ends there."""
    out = {}
    for keyword in keywords:
      line = keyword.value.end_lineno
      if (sum(k.value.end_lineno == line for k in keywords) == 1 and line in self.comments
          and line not in self.comment_only):
        out[keyword.arg] = (line, self.comments[line])
    return out

  def of_function(self, fn: ast.FunctionDef) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """({relative field path: comment}, [(field path, called function)]) of one function."""
    returned = {n.value.id for n in ast.walk(fn) if isinstance(n, ast.Return)
                and isinstance(n.value, ast.Name)}
    params = {a.arg for a in fn.args.args}
    aliases = {name: "" for name in returned | ({"c"} & params)}
    out, calls = {}, []
    assigns = sorted((n for n in ast.walk(fn) if isinstance(n, ast.Assign)), key=lambda n: n.lineno)
    for node in assigns:
      paths = [_path(t, aliases) for t in node.targets]
      fields = [p for p, t in zip(paths, node.targets) if p is not None
                and isinstance(t, ast.Attribute)]
      for target, path in zip(node.targets, paths):
        if isinstance(target, ast.Name) and path is None and fields:
          aliases[target.id] = fields[0]  # b = c.byol = ConfigDict()
      if not fields:
        continue
      keywords = self.keyword_comments(_keywords(node.value))
      comment = self.statement_comment(node, {line for line, _ in keywords.values()})
      for path in fields:
        if comment:
          out.setdefault(path, comment)
        for name, (_, text) in keywords.items():
          out.setdefault(f"{path}.{name}", text)
        if _called_name(node.value):
          calls.append((path, _called_name(node.value)))
    return out, calls


def field_comments(paths: Iterable[str]) -> dict[str, str]:
  """{dotted field path: comment} from the config source files ``paths`` (earlier files win)."""
  files = [_FileComments(p) for p in paths]
  per_function = [(fn.name, *f.of_function(fn)) for f in files for fn in f.functions]
  templates = {called for _, _, calls in per_function for _, called in calls}
  out: dict[str, str] = {}
  for name, comments, _ in per_function:
    if name not in templates:
      for key, text in comments.items():
        out.setdefault(key, text)
  for _, _, calls in per_function:
    for path, called in calls:
      for fn_name, comments, _ in per_function:
        if fn_name == called:
          for key, text in comments.items():
            out.setdefault(f"{path}.{key}", text)
  return out


def config_sources(config_file: str) -> list[str]:
  """The config files a config is built from: those ``config_file`` imports from its own
  folder (``from configs import common``), recursively, shared ones first, then itself."""
  config_file = os.path.abspath(config_file)
  folder, package = os.path.dirname(config_file), os.path.basename(os.path.dirname(config_file))
  order: list[str] = []

  def visit(path: str) -> None:
    if path in order or not os.path.isfile(path):
      return
    with open(path) as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      names = []
      if isinstance(node, ast.ImportFrom) and node.module == package:
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(package + "."):
        names = [node.module.split(".", 1)[1]]
      elif isinstance(node, ast.Import):
        names = [a.name.split(".", 1)[1] for a in node.names if a.name.startswith(package + ".")]
      for name in names:
        visit(os.path.join(folder, name.replace(".", os.sep) + ".py"))
    order.append(path)

  visit(config_file)
  return order


def flatten(config: ml_collections.ConfigDict | Mapping, prefix: str = "") -> dict[str, Any]:
  """{dotted path: value} of a config's leaves (nested dicts are walked)."""
  out = {}
  for key in sorted(config.keys()):
    value = config[key]
    if isinstance(value, (ml_collections.ConfigDict, Mapping)):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _shorten(text: str) -> str:
  return text if len(text) <= MAX_COMMENT else text[:MAX_COMMENT - 3].rstrip() + "..."


def render(config: ml_collections.ConfigDict, comments: Mapping[str, str], header: str = "") -> str:
  """One line per field, 'key = value  # comment', sorted by key; a section's comment heads it."""
  lines = [f"# {header}"] if header else []
  seen = set()
  for key, value in flatten(config).items():
    parts = key.split(".")
    for depth in range(1, len(parts)):
      section = ".".join(parts[:depth])
      if section not in seen:
        seen.add(section)
        if comments.get(section):
          lines.append(f"# {section}: {_shorten(comments[section])}")
    left = f"{key} = {value!r}"
    comment = comments.get(key, "")
    lines.append(f"{left:<{KEY_VALUE_WIDTH}}  # {_shorten(comment)}" if comment else left)
  return "\n".join(lines) + "\n"


def describe(config: ml_collections.ConfigDict, config_file: str, spec: str = "") -> str:
  """``render`` with the comments of ``config_file`` and the configs it imported."""
  sources = config_sources(config_file)
  names = ", ".join(os.path.relpath(p) for p in sources)
  return render(config, field_comments(sources),
                header=f"{spec or config_file}: field = value  # comment (from {names}); "
                       "override one with --config.FIELD=VALUE")
