"""Method registry: ``get_method(name)``.

Entries are 'module:attribute' strings imported on first use, so a method's
dependencies load only when it runs. Add a method with one line here.
"""

from __future__ import annotations

import importlib

from cxr_jax.methods.base import DataSpec, EarlyStopping, LossContext, Method, Stage

METHODS = {
    "baseline": "cxr_jax.methods.baseline:Baseline",
    "msml": "cxr_jax.methods.msml:MSML",
    "vkd": "cxr_jax.methods.vkd:VKD",
}


def get_method(name: str) -> Method:
  """A fresh instance of the method registered as ``name``."""
  if name not in METHODS:
    raise KeyError(f"unknown method {name!r}; known: {sorted(METHODS)}")
  module, _, attr = METHODS[name].partition(":")
  return getattr(importlib.import_module(module), attr)()


__all__ = ["METHODS", "DataSpec", "EarlyStopping", "LossContext", "Method", "Stage", "get_method"]
