"""The configs of the figures: ``configs/<name>.py`` of a checkout, with dotted overrides."""

from __future__ import annotations

import importlib
import sys


def load_config(config_root: str, name: str, arg: str = "", overrides: dict | None = None):
  """configs/<name>.py:get_config(arg) from ``config_root`` with dotted ``overrides`` applied."""
  if config_root not in sys.path:
    sys.path.insert(0, config_root)
  module = importlib.import_module(f"configs.{name}")
  config = module.get_config(arg or None)
  with config.unlocked():
    for key, value in (overrides or {}).items():
      *parents, leaf = key.split(".")
      node = config
      for p in parents:
        node = node[p]
      if leaf not in node:
        raise KeyError(f"bench override {key!r}: configs/{name}.py has no such field")
      node[leaf] = value
  return config
