"""One figure in this process: ``python -m cxr_jax.bench.worker SPEC_JSON OUT_JSON CONFIG_ROOT``.

Writes the figure's result dict (``figures.run``) plus the machine description to
OUT_JSON, or {'error': ...} with the traceback when the figure fails.
"""

from __future__ import annotations

import json
import os
import sys
import traceback


def main(argv: list[str]) -> int:
  if len(argv) != 4:
    print(__doc__, file=sys.stderr)
    return 2
  spec, out_path, config_root = json.loads(argv[1]), argv[2], argv[3]
  try:  # torch's triton segfaults when its library loads after TensorFlow's (clu): load it first
    import triton  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    pass
  from cxr_jax.bench import figures, machine  # pylint: disable=import-outside-toplevel
  try:
    result = figures.run(spec, config_root)
    status = 0
  except Exception:  # pylint: disable=broad-except  (reported in the JSON, the suite goes on)
    result = {"error": traceback.format_exc(limit=8)}
    status = 1
  try:
    result["machine"] = machine.describe(devices=not spec["kind"].startswith("torch_"))
  except Exception:  # pylint: disable=broad-except
    result["machine"] = machine.describe(devices=False)
  tmp = out_path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(result, f, indent=1, default=float)
  os.replace(tmp, out_path)
  return status


if __name__ == "__main__":
  sys.exit(main(sys.argv))
