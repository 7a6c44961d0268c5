"""Device mesh, shardings and multi-process start-up.

One mesh axis, ``'data'``: batches are sharded over it, the train state is
replicated, or with ``fsdp`` its large leaves are split over the same axis
(XLA inserts the all-gathers). The same code runs on one CPU device, one host
with many accelerators, and many hosts after ``maybe_initialize_distributed``.

Also the multi-process pieces of a run: per-process state gathered into one
checkpoint (``gather_process_states`` / ``process_state``), stopping on
SIGTERM at a step boundary (``install_preemption_handler``,
``preemption_requested``, ``Preempted``), and a bound on the steps the host
dispatches ahead of the devices (``StepsInFlight``), which bounds how long that
stop waits.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import signal
import threading
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
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


def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None) -> bool:
  """Calls ``jax.distributed.initialize`` when launched as several processes.

  Multi-process is recognised from, in order:
    1. the arguments (cxr-train's ``--coordinator_address``, ``--num_processes``,
       ``--process_id``), all three or none;
    2. ``JAX_COORDINATOR_ADDRESS`` (host:port), with ``JAX_NUM_PROCESSES`` and
       ``JAX_PROCESS_ID`` (explicit launch, e.g. launch/local.sh);
    3. SLURM with more than one task (``SLURM_NTASKS`` > 1), or
       ``CXR_DISTRIBUTED_AUTO=1`` (TPU VM pods, Open MPI; launch/tpu_vm.sh sets
       it): JAX detects the coordinator, process count and id itself.
  Other runs are single-process and left alone. Cross-process
  collectives on CPU use gloo (jax's default ``jax_cpu_collectives_implementation``).
  Returns whether it initialised.
  """
  if jax.distributed.is_initialized():
    return False
  given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
           "process_id": process_id}
  if any(v is not None for v in given.values()):
    missing = [k for k, v in given.items() if v is None]
    if missing:
      raise ValueError(f"multi-process launch needs --coordinator_address, --num_processes and "
                       f"--process_id together; missing {missing}")
    jax.distributed.initialize(**given)
  elif os.environ.get("JAX_COORDINATOR_ADDRESS"):
    try:
      num_processes = int(os.environ["JAX_NUM_PROCESSES"])
      process_id = int(os.environ["JAX_PROCESS_ID"])
    except KeyError as e:
      raise KeyError(f"JAX_COORDINATOR_ADDRESS is set but {e.args[0]} is not") from None
    jax.distributed.initialize(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                               num_processes=num_processes, process_id=process_id)
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or os.environ.get("CXR_DISTRIBUTED_AUTO") == "1":
    jax.distributed.initialize()
  else:
    return False
  logging.info("jax.distributed: process %d of %d, %d global devices",
               jax.process_index(), jax.process_count(), jax.device_count())
  return True


# --------------------------------------------------------------------------- per-process state


def gather_process_states(state: Any) -> list[Any]:
  """Every process's JSON-serializable ``state``, in process order.

  A collective: all processes call it at the same point (a checkpoint step).
  The data iterators' positions differ per process (each reads its own shard),
  so a checkpoint keeps all of them; process 0 writes the list.
  """
  if jax.process_count() == 1:
    return [state]
  data = np.frombuffer(json.dumps(state).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.int32(data.size))
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:data.size] = data
  rows = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, lengths)]


def process_state(states: Sequence[Any]) -> Any:
  """This process's entry of a ``gather_process_states`` list (a checkpoint's)."""
  if len(states) != jax.process_count():
    raise ValueError(f"the checkpoint holds the data state of {len(states)} processes; this run has "
                     f"{jax.process_count()}: resume with the process count it was saved with")
  return states[jax.process_index()]


# --------------------------------------------------------------------------- preemption

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: what a shell reports for a job stopped by SIGTERM

_stop = threading.Event()  # set once a stop on SIGTERM is due; never cleared in a process


class Preempted(Exception):
  """Training stopped on SIGTERM after writing a checkpoint; relaunch to resume."""

  def __init__(self, step: int, workdir: str):
    super().__init__(f"preempted (SIGTERM): stopped at step {step} after checkpointing to "
                     f"{workdir}/checkpoints; run the same command again to resume")
    self.step = step


def install_preemption_handler() -> None:
  """SIGTERM sets a flag that ``preemption_requested`` reads at step boundaries.

  Single-process only: with several processes JAX's coordination service
  catches SIGTERM itself and agrees on a common step to stop at (the handler
  would override it), so this is a no-op there. Call from the main thread.
  """
  if jax.process_count() > 1:
    return
  signal.signal(signal.SIGTERM, lambda signum, frame: _stop.set())


def preemption_requested(step: int) -> bool:
  """Whether to checkpoint and stop after global ``step``; call at every step.

  One process: SIGTERM was received. Several: all processes reached the
  step JAX's preemption sync chose after any of them got SIGTERM (every
  process returns True at the same step). Once True, stays True.
  """
  if (not _stop.is_set() and jax.process_count() > 1
      and multihost_utils.reached_preemption_sync_point(step)):
    _stop.set()
  return _stop.is_set()


def stop_due() -> bool:
  """Whether ``preemption_requested`` has returned True in this process (no sync)."""
  return _stop.is_set()


# --------------------------------------------------------------------------- steps in flight


class StepsInFlight:
  """The dispatched steps not yet known to be finished, oldest first.

  JAX dispatches asynchronously: unbounded, the host runs ahead of the devices by as many
  steps as it can feed, and whatever reads a result (a log, a checkpoint, the stop on
  SIGTERM) first waits for all of them. With ``limit`` k > 0, ``finished(room=True)``
  before dispatching step i blocks until step i-k has finished, so at most k steps are
  ever in flight (0: no bound). Each step is tracked by a marker: a copy of a scalar it
  computed (the step itself is donated to the next one, the copy is not).
  """

  def __init__(self, limit: int):
    self.limit = int(limit)
    self.pending: collections.deque = collections.deque()  # (global step, marker)

  def add(self, step: int, value: jax.Array) -> None:
    """Tracks global step ``step``, which computes ``value``; call right after dispatching it."""
    self.pending.append((step, jnp.copy(value)))

  def finished(self, *, room: bool = False) -> int | None:
    """Forgets the steps that have finished; with ``room``, first waits until fewer than
    ``limit`` are left. Returns the newest step seen finished now, or None."""
    newest = None
    while self.pending:
      step, marker = self.pending[0]
      if room and self.limit and len(self.pending) >= self.limit:
        marker.block_until_ready()
      elif not marker.is_ready():
        break
      self.pending.popleft()
      newest = step
    return newest
