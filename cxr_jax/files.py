"""Atomic file writes: every result file of the library goes through here.

A file is written to a temp name in its own folder, fsynced (unless
``fsync=False``), made 0644 and renamed over the target (``os.replace``):
readers see the old file or the new one, never a part, and a failed write
leaves neither a temp file nor a half-written target. Temp names are ``.tmp-<name>.<random>.tmp``
(``is_temp_name``), so a folder's leftovers of a killed process can be found.

``atomic_path`` / ``atomic_open`` stream a large file (a dataset shard, a
weights archive) without holding it in memory; ``write_bytes_atomic``,
``write_text_atomic``, ``write_json_atomic`` and ``write_npz_atomic`` write
what is already in memory. Renaming a whole folder into place is not done here.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from typing import IO, Any, Callable

import numpy as np

TEMP_PREFIX = ".tmp-"
TEMP_SUFFIX = ".tmp"


def is_temp_name(name: str) -> bool:
  """Whether file name ``name`` is one of this module's temp names."""
  return name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)


@contextlib.contextmanager
def atomic_path(path: str, *, fsync: bool = True) -> Iterator[str]:
  """Yields a temp path (an empty file) in ``path``'s folder (folders created) for a writer
  that takes a path; on a clean exit the file there is fsynced, made 0644 and renamed to
  ``path``, on an exception it is removed and ``path`` is left as it was.

  ``fsync=False`` skips the fsync (~4 ms a file on ext4): for many small files that are
  cheap to write again, where a power cut may leave a renamed but empty file.
  """
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{TEMP_PREFIX}{os.path.basename(path)}.",
                             suffix=TEMP_SUFFIX)
  os.close(fd)
  try:
    yield tmp
    if fsync:
      fd = os.open(tmp, os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be read by others
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb", *, fsync: bool = True, **open_kwargs
                ) -> Iterator[IO]:
  """``open(temp, mode, **open_kwargs)`` of an ``atomic_path`` temp: the file appears at
  ``path`` whole when the block exits cleanly, and not at all when it raises.

  ``mode`` is a write mode ('w', 'wb', ...); ``open_kwargs`` go to ``open`` (encoding,
  newline); ``fsync`` as in ``atomic_path``.
  """
  if not mode.startswith("w") or "+" in mode:
    raise ValueError(f"atomic_open: mode {mode!r} is not a write mode ('w', 'wb')")
  with atomic_path(path, fsync=fsync) as tmp:
    with open(tmp, mode, **open_kwargs) as f:
      yield f


def write_bytes_atomic(path: str, data: bytes, *, fsync: bool = True) -> None:
  """Writes ``data`` to ``path`` (folders created) through a temp file and ``os.replace``
  (``fsync`` as in ``atomic_path``)."""
  with atomic_open(path, "wb", fsync=fsync) as f:
    f.write(data)


def write_text_atomic(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` as UTF-8, atomically."""
  write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str, payload: Any, *, indent: int | None = 2,
                      default: Callable[[Any], Any] | None = None) -> None:
  """``payload`` as strict JSON (NaN is an error: metrics write undefined values as null).

  ``indent`` (None: one line) and ``default`` (called on objects JSON does not
  know, e.g. ``float`` for numpy scalars) are ``json.dumps``'. The payload is
  serialized before anything is written, so one that does not serialize
  leaves an existing file untouched.
  """
  write_bytes_atomic(path, json.dumps(payload, indent=indent, default=default,
                                      allow_nan=False).encode())


def write_npz_atomic(path: str, **arrays: np.ndarray) -> None:
  """``np.savez`` of ``arrays`` to ``path``, atomically (streamed: no copy in memory)."""
  with atomic_open(path, "wb") as f:
    np.savez(f, **arrays)


def update_json_atomic(path: str, updates: dict) -> dict:
  """Reads the JSON object at ``path`` (or {} when absent), sets ``updates``' top-level
  keys over it and writes it back atomically. Returns the written object."""
  payload = {}
  if os.path.exists(path):
    with open(path) as f:
      payload = json.load(f)
  payload.update(updates)
  write_json_atomic(path, payload)
  return payload
