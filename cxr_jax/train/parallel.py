"""Device mesh, shardings and multi-process start-up.

One mesh axis, ``'data'``: batches are sharded over it, the train state is
replicated, or with ``fsdp`` its large leaves are split over the same axis
(XLA inserts the all-gathers). The same code runs on one CPU device, one host
with many accelerators, and many hosts after ``maybe_initialize_distributed``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

FSDP_MIN_SIZE = 2**18  # leaves with fewer elements stay replicated under fsdp


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh named ('data',) over ``devices`` (default: all global devices)."""
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(np.asarray(devices), ("data",))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data'."""
  return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def leaf_sharding(shape: tuple[int, ...], mesh: Mesh, fsdp: bool = False) -> NamedSharding:
  """Replicated, or under ``fsdp`` the largest axis divisible by the mesh size split over 'data'."""
  n = mesh.shape["data"]
  if not fsdp or n == 1 or int(np.prod(shape, dtype=np.int64)) < FSDP_MIN_SIZE:
    return replicated(mesh)
  axes = [a for a in np.argsort(shape)[::-1] if shape[a] % n == 0]
  if not axes:
    return replicated(mesh)
  spec = [None] * len(shape)
  spec[axes[0]] = "data"
  return NamedSharding(mesh, P(*spec))


def tree_shardings(tree, mesh: Mesh, fsdp: bool = False):
  """NamedSharding per leaf of ``tree`` (arrays or ShapeDtypeStructs)."""
  return jax.tree.map(lambda x: leaf_sharding(tuple(np.shape(x)), mesh, fsdp), tree)


def maybe_initialize_distributed() -> bool:
  """Calls ``jax.distributed.initialize()`` when launched as several processes.

  Multi-process is recognised from, in order:
    1. ``JAX_COORDINATOR_ADDRESS`` (host:port), with ``JAX_NUM_PROCESSES`` and
       ``JAX_PROCESS_ID`` (explicit launch, e.g. launch/local.sh);
    2. SLURM with more than one task (``SLURM_NTASKS`` > 1): JAX reads the
       coordinator, process count and id from the SLURM environment itself.
  Single-process runs (and TPU VMs launched one process per host by the TPU
  runtime, where JAX initialises itself) are left alone. Returns whether it
  initialised.
  """
  if jax.distributed.is_initialized():
    return False
  address = os.environ.get("JAX_COORDINATOR_ADDRESS")
  if address:
    try:
      num_processes = int(os.environ["JAX_NUM_PROCESSES"])
      process_id = int(os.environ["JAX_PROCESS_ID"])
    except KeyError as e:
      raise KeyError(f"JAX_COORDINATOR_ADDRESS is set but {e.args[0]} is not") from None
    jax.distributed.initialize(coordinator_address=address, num_processes=num_processes,
                               process_id=process_id)
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    jax.distributed.initialize()
  else:
    return False
  logging.info("jax.distributed: process %d of %d, %d global devices",
               jax.process_index(), jax.process_count(), jax.device_count())
  return True
