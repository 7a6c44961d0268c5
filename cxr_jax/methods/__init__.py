"""Method registry: ``get_method(name)``.

Entries are 'module:attribute' strings imported on first use, so a method's
dependencies load only when it runs. Add a method with one line here.
"""

from __future__ import annotations

import importlib

from cxr_jax.train.stage import (DataSpec, EarlyStopping, LossContext, Method, PrepareContext,
                                   Stage)

METHODS = {
    "baseline": "cxr_jax.methods.baseline:Baseline",
    "byol_cam": "cxr_jax.methods.byol_cam:BYOLCAM",
    "msml": "cxr_jax.methods.msml:MSML",
    "patch_loc": "cxr_jax.methods.patch_loc:PatchLoc",
    "vkd": "cxr_jax.methods.vkd:VKD",
    "disease_masks": "cxr_jax.methods.disease_masks:DiseaseMasks",
}


def get_method(name: str) -> Method:
  """A fresh instance of the method registered as ``name``."""
  if name not in METHODS:
    raise KeyError(f"unknown method {name!r}; known: {sorted(METHODS)}")
  module, _, attr = METHODS[name].partition(":")
  return getattr(importlib.import_module(module), attr)()


__all__ = ["METHODS", "DataSpec", "EarlyStopping", "LossContext", "Method", "PrepareContext",
           "Stage", "get_method"]
