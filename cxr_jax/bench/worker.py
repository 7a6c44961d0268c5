"""One figure in this process: ``python -m cxr_jax.bench.worker SPEC_JSON OUT_JSON CONFIG_ROOT``.

Writes the figure's result dict (``run``) plus the machine description to
OUT_JSON, or {'error': ...} with the traceback when the figure fails.
"""

from __future__ import annotations

import json
import sys
import traceback


def run(spec: dict, config_root: str) -> dict:
  """The figure ``spec['kind']`` (JAX figures in ``figures`` and ``input_figures``, 'torch_*'
  in ``torch_ref``) + memory peaks."""
  # pylint: disable=import-outside-toplevel  (imported after triton, see ``main``)
  from cxr_jax.bench import figures, input_figures, memory
  kind = spec["kind"]
  if kind.startswith("torch_"):
    from cxr_jax.bench import torch_ref
    fn = torch_ref.FIGURES[kind]
  else:
    fn = {**figures.FIGURES, **input_figures.FIGURES}[kind]
  result = fn(spec, config_root)
  result.update(memory.host_peak())
  if not kind.startswith("torch_"):
    result.update(memory.device_peak())
  return result


def main(argv: list[str]) -> int:
  if len(argv) != 4:
    print(__doc__, file=sys.stderr)
    return 2
  spec, out_path, config_root = json.loads(argv[1]), argv[2], argv[3]
  try:  # torch's triton segfaults when its library loads after TensorFlow's (clu): load it first
    import triton  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    pass
  from cxr_jax import files  # pylint: disable=import-outside-toplevel
  from cxr_jax.bench import machine  # pylint: disable=import-outside-toplevel
  try:
    result = run(spec, config_root)
    status = 0
  except Exception:  # pylint: disable=broad-except  (reported in the JSON, the suite goes on)
    result = {"error": traceback.format_exc(limit=8)}
    status = 1
  try:
    result["machine"] = machine.describe(devices=not spec["kind"].startswith("torch_"))
  except Exception:  # pylint: disable=broad-except
    result["machine"] = machine.describe(devices=False)
  files.write_json_atomic(out_path, result, indent=1, default=float)
  return status


if __name__ == "__main__":
  sys.exit(main(sys.argv))
