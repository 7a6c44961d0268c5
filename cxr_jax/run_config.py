"""WORKDIR/config.json: the resolved config a run was trained with.

The trainer writes it (process 0, atomically) once the config has been checked
and before anything else goes into the workdir; cxr-sweep writes the same file
for each row before launching it. cxr-eval reads it when no ``--config`` is
given, and cxr-train / cxr-eval compare a given config with it (``check``): a
difference is an error listing the differing fields unless ``force``.

The format is ml_collections' ``to_json_best_effort`` (sorted keys, indent 2).
JSON has no tuples, so ``load`` turns lists back into tuples (config fields
hold tuples, never lists).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import ml_collections

from cxr_jax import errors, files

CONFIG_FILE = "config.json"
# Differing fields named in full in a mismatch error; the rest are counted.
LISTED_DIFFERENCES = 8
_MISSING = object()


def config_path(workdir: str) -> str:
  return os.path.join(workdir, CONFIG_FILE)


def to_json(config: ml_collections.ConfigDict) -> str:
  """The text of WORKDIR/config.json for ``config``."""
  return config.to_json_best_effort(indent=2, sort_keys=True) + "\n"


def write(workdir: str, config: ml_collections.ConfigDict) -> str:
  """Writes WORKDIR/config.json atomically (folders created); returns its path."""
  path = config_path(workdir)
  files.write_text_atomic(path, to_json(config))
  return path


def read(workdir: str) -> dict[str, Any] | None:
  """WORKDIR/config.json as a dict, or None where there is none."""
  path = config_path(workdir)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise errors.UserError(f"{path} is not valid JSON ({e}): remove it, or pass --config") from None


def _tuples(value):
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def load(workdir: str) -> ml_collections.ConfigDict:
  """The locked config of WORKDIR/config.json (lists as tuples)."""
  saved = read(workdir)
  if saved is None:
    raise errors.MissingPath(f"{config_path(workdir)} does not exist: pass --config "
                             "(the training run's config)")
  config = ml_collections.ConfigDict(_tuples(saved))
  config.lock()
  return config


def _flat(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def differences(saved: Mapping, config: ml_collections.ConfigDict) -> dict[str, tuple[Any, Any]]:
  """{field: (saved value, given value)} of the fields where ``config`` differs from the saved
  JSON dict (a field missing on one side is ``None`` there)."""
  a, b = _flat(saved), _flat(json.loads(to_json(config)))
  return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys())
          if a.get(k, _MISSING) != b.get(k, _MISSING)}


def describe(diff: Mapping[str, tuple[Any, Any]]) -> str:
  """'data.image_size (saved 32, given 64), ...' (the first ``LISTED_DIFFERENCES``)."""
  shown = [f"{k} (saved {json.dumps(s)}, given {json.dumps(g)})"
           for k, (s, g) in list(diff.items())[:LISTED_DIFFERENCES]]
  more = len(diff) - len(shown)
  return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


def check(workdir: str, config: ml_collections.ConfigDict, *, force: bool = False,
          advice: str = "use the same config or another workdir") -> None:
  """Raises ``errors.UserError`` when WORKDIR/config.json exists and differs from ``config``
  (naming the differing fields, then ``advice``); with ``force`` logs a warning instead."""
  saved = read(workdir)
  if saved is None:
    return
  diff = differences(saved, config)
  if not diff:
    return
  message = (f"the config differs from {config_path(workdir)} in {len(diff)} field(s): "
             f"{describe(diff)}")
  if not force:
    raise errors.UserError(f"{message}; {advice}, or pass --force to go on with the given "
                           "config where the shapes allow")
  logging.warning("--force: %s; going on with the given config", message)
