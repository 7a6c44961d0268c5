"""Shared flag handling of the console scripts.

Config files are plain Python (``configs/x.py``) that import their presets with
``from configs import common``; the folder holding ``configs/`` must be on
``sys.path`` before absl parses ``--config``, wherever the command runs from.

XLA:CPU defaults (``set_cpu_xla_defaults``): set in the environment before JAX
creates its CPU client, by cxr-train, cxr-eval, cxr-bench's figure processes and
the test suite, so that all of them compile alike.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import sys

from absl import app

# jaxlib 0.10's XLA:CPU hands convolutions (and reductions) to YNNPACK by default; on a
# 2-core AMD EPYC the ResNet-18 128 px train step is then 1.44x slower than with XLA's own
# convolution kernels, while YNNPACK's dots are as fast as the alternatives
# (benchmarks/RESULTS.md, issue 11). Only for jaxlib releases where this was measured: a
# release that no longer knows an XLA flag aborts at start-up.
CPU_XLA_FLAGS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
CPU_XLA_FLAGS_JAXLIB = ("0.10.",)


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


def set_cpu_xla_defaults(environ=None) -> list[str]:
  """Appends ``CPU_XLA_FLAGS`` that XLA_FLAGS does not set yet to ``environ['XLA_FLAGS']``
  (default ``os.environ``), on the jaxlib releases of ``CPU_XLA_FLAGS_JAXLIB``; returns the
  flags it added. A flag the user set, with any value, is left alone."""
  environ = os.environ if environ is None else environ
  try:
    jaxlib = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return []
  if not jaxlib.startswith(CPU_XLA_FLAGS_JAXLIB):
    return []
  current = environ.get("XLA_FLAGS", "")
  added = [f"--{name}={value}" for name, value in CPU_XLA_FLAGS.items()
           if not re.search(rf"--{name}(=|\s|$)", current)]
  if added:
    environ["XLA_FLAGS"] = " ".join(current.split() + added)
  return added


def run_config_app(main, *, xla_defaults: bool = True) -> None:
  """``app.run(main)`` of a command taking ``--config``: its config root on sys.path first,
  and for commands that run JAX themselves (``xla_defaults``) the XLA:CPU defaults."""
  add_config_root_to_path(sys.argv)
  if xla_defaults:
    set_cpu_xla_defaults()
  app.run(main)
