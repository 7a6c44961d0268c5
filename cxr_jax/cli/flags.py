"""Shared flag handling of the console scripts.

Config files are plain Python (``configs/x.py``) that import their presets with
``from configs import common``; the folder holding ``configs/`` must be on
``sys.path`` before absl parses ``--config``, wherever the command runs from.
"""

from __future__ import annotations

import logging
import os
import sys


def add_config_root_to_path(argv: list[str]) -> None:
  """Puts the parent of the --config file's folder on sys.path (idempotent)."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      value = arg[len("--config="):]
    elif arg == "--config" and i + 1 < len(argv):
      value = argv[i + 1]
    else:
      continue
    path = value.split(":", 1)[0]
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if root not in sys.path:
      sys.path.insert(0, root)


class _DropChattyInfo(logging.Filter):
  """Drops INFO records of Orbax and Grain internals (every save logs a dozen lines)."""

  def filter(self, record: logging.LogRecord) -> bool:
    chatty = ("orbax" in record.pathname or "/grain/" in record.pathname)
    return record.levelno >= logging.WARNING or not chatty


def quiet_library_logs() -> None:
  """Keeps the console readable: library INFO chatter off, our own INFO on."""
  for handler in logging.getLogger().handlers + logging.getLogger("absl").handlers:
    handler.addFilter(_DropChattyInfo())
