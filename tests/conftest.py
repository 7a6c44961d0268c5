"""Test setup: 8 simulated CPU devices, paths to the real NIH sample."""

import contextlib
import os
import pathlib

# Must happen before jax is imported anywhere: tests see 8 CPU devices, so the
# sharded code paths (mesh over ('data',)) are exercised without accelerators.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The XLA:CPU defaults of the console scripts, so in-process references and CLI subprocesses
# compile alike (subprocesses inherit them).
from cxr_jax.cli import flags as cli_flags  # noqa: E402

cli_flags.set_cpu_xla_defaults()

import pytest  # noqa: E402

# The parity tests' torch (CUDA wheels) brings triton, whose native library
# segfaults when loaded after TensorFlow (clu imports it): load it first.
with contextlib.suppress(ImportError):
  import triton  # noqa: E402,F401

REPO = pathlib.Path(__file__).resolve().parents[1]


def _nih_sample_dir() -> pathlib.Path:
  env = os.environ.get("CXR_NIH_SAMPLE")
  return pathlib.Path(env) if env else REPO.parent / "shared" / "data" / "nih14_sample"


@pytest.fixture(scope="session")
def nih_sample_dir() -> pathlib.Path:
  """The real NIH ChestX-ray14 sample (../shared/data/nih14_sample or $CXR_NIH_SAMPLE)."""
  path = _nih_sample_dir()
  if not (path / "Data_Entry_2017_v2020.csv").exists():
    pytest.skip(f"real NIH sample not found at {path} (set CXR_NIH_SAMPLE)")
  return path
