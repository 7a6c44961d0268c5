"""XLA:CPU defaults, set in the environment before JAX creates its CPU client.

cxr-train, cxr-eval, cxr-bench's figure processes and the test suite call
``set_cpu_xla_defaults`` so that all of them compile alike.
"""

from __future__ import annotations

import importlib.metadata
import os
import re

# jaxlib 0.10's XLA:CPU hands convolutions (and reductions) to YNNPACK by default; on a
# 2-core AMD EPYC the ResNet-18 128 px train step is then 1.44x slower than with XLA's own
# convolution kernels, while YNNPACK's dots are as fast as the alternatives
# (benchmarks/RESULTS.md, issue 11). Only for jaxlib releases where this was measured: a
# release that no longer knows an XLA flag aborts at start-up.
CPU_XLA_FLAGS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
CPU_XLA_FLAGS_JAXLIB = ("0.10.",)


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
