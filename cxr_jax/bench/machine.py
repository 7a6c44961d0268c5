"""What a figure ran on, and the peak FLOP rate that MFU divides by."""

from __future__ import annotations

import os
import platform
from importlib import metadata

# Dense peak FLOP/s per device by a substring of ``device_kind``: (bfloat16, float32).
# float32 matmuls / convolutions run as TF32 on these GPUs under XLA's default
# precision, so the float32 peak is the TF32 one.
PEAK_FLOPS = (
    ("H200", (989e12, 494.5e12)),
    ("H100 PCIe", (756e12, 378e12)),
    ("H100", (989e12, 494.5e12)),      # SXM (HBM3)
    ("A100", (312e12, 156e12)),
    ("L4", (121e12, 60.5e12)),
    ("TPU v5p", (459e12, 459e12)),
    ("TPU v5 lite", (197e12, 197e12)),
    ("TPU v4", (275e12, 275e12)),
)


def peak_flops(device_kind: str, dtype: str) -> float | None:
  """Dense peak FLOP/s of one device of ``device_kind`` for ``dtype``; None when unknown (CPUs)."""
  for name, (bf16, f32) in PEAK_FLOPS:
    if name.lower() in device_kind.lower():
      return bf16 if dtype == "bfloat16" else f32
  return None


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
  try:
    return metadata.version(package)
  except metadata.PackageNotFoundError:
    return None


def describe(devices: bool = True) -> dict:
  """{'cpu', 'cores', 'memory_gb', 'python', versions, and with ``devices`` 'device' ('<kind> xN')}.

  ``devices=False`` keeps jax uninitialised (the parent of the figure processes).
  """
  out = {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()}
  try:
    out["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
  except (ValueError, OSError, AttributeError):
    pass
  for package in ("jax", "jaxlib", "flax", "optax", "grain", "torch", "torchvision"):
    out[package] = _version(package)
  if devices:
    import jax  # pylint: disable=import-outside-toplevel
    first = jax.devices()[0]
    out["device"] = f"{first.device_kind} x{jax.device_count()}"
    out["platform"] = first.platform
  return out


def one_line(info: dict) -> str:
  """'Intel Xeon (2 cores, 24 GB); jax 0.10.2, flax 0.12.8, torch 2.14.1' for the markdown."""
  versions = ", ".join(f"{k} {info[k]}" for k in ("jax", "flax", "torch") if info.get(k))
  memory = f", {info['memory_gb']} GB" if "memory_gb" in info else ""
  return f"{info['cpu']} ({info['cores']} cores{memory}); {versions}"
