"""Host batches -> global ``jax.Array`` batches on the devices, prefetched, checkpointable.

``DeviceIterator`` takes a grain ``IterDataset`` of host batches, pads a
short last batch (finite iteration), puts each batch on the mesh
(``jax.make_array_from_process_local_data``), normalizes its uint8 images
there with one jitted function, keeps ``prefetch`` batches ahead in a
background thread, and saves / restores its position (``get_state`` /
``set_state``).
"""

from __future__ import annotations

import copy
import json
import queue
import threading
from collections.abc import Callable, Mapping
from typing import Any

from absl import logging
import grain.python as gp
import jax
import numpy as np

_END = object()


class DeviceIterator:
  """Global-array batches from a grain ``IterDataset`` of host batches; prefetch, checkpoints.

  ``get_state()`` describes the batches the caller has *consumed* (prefetched
  ones are replayed after ``set_state``): a JSON-serializable dict
  {'grain': grain iterator state, 'step': batches consumed, 'pipeline':
  ``description``}. ``set_state`` refuses a state of another ``description``
  (source shard, seed, shuffling, epochs, batch, worker count). ``normalize``
  maps a uint8 image batch [N, H, W] to the float32 model input on the devices.
  """

  def __init__(self, dataset: gp.IterDataset, source: Any, *, local_batch: int,
               padding: dict, sharding: jax.sharding.NamedSharding,
               normalize: Callable[[jax.Array], jax.Array], prefetch: int,
               total_steps: int | None, drop_remainder: bool,
               num_examples: int, steps_per_epoch: int, description: str,
               num_views: int = 0):
    self.source = source
    self.description = description
    self._image_keys = ("image",) + tuple(f"view{i}" for i in range(num_views))
    self.num_examples = num_examples
    self.steps_per_epoch = steps_per_epoch
    self.num_skipped = 0
    self._grain = iter(dataset)
    self._local_batch = local_batch
    self._sharding = sharding
    self._normalize = jax.jit(normalize, out_shardings=sharding)
    self._prefetch = prefetch
    self._total_steps = total_steps
    self._drop_remainder = drop_remainder
    self._step = 0                      # batches produced
    self._exhausted = False             # grain has no more batches
    self._padding = padding
    self._state = self._snapshot()      # after the last consumed batch
    self._grain.start_prefetch()        # all workers now, not each at its first batch
    self._queue: queue.Queue = queue.Queue(maxsize=max(prefetch, 1))
    self._thread: threading.Thread | None = None
    self._stop = threading.Event()
    self._finished = False

  # -- host side ---------------------------------------------------------------
  def _snapshot(self) -> dict:
    # The JSON round trip copies the state and keeps it checkpointable.
    return {"grain": json.loads(json.dumps(self._grain.get_state())), "step": self._step,
            "pipeline": self.description}

  def _padded(self, batch: dict | None, rows: int) -> dict:
    """``batch`` (``rows`` rows, or None) completed to ``local_batch`` rows with padding."""
    missing = self._local_batch - rows
    pad = {key: np.repeat(value[None], missing, axis=0) for key, value in self._padding.items()}
    if batch is None:
      return pad
    return {key: np.concatenate([batch[key], pad[key]]) for key in batch}

  def _next_host_batch(self) -> tuple[dict, dict]:
    if self._total_steps is not None and self._step >= self._total_steps:
      raise StopIteration
    batch, rows = None, 0
    if not self._exhausted:
      try:
        batch = next(self._grain)
        rows = len(batch["valid"])
      except StopIteration:
        self._exhausted = True
    skipped = rows - int(np.count_nonzero(batch["valid"])) if rows else 0
    if skipped:
      self.num_skipped += skipped
      logging.warning("batch %d: skipped %d bad examples (%d so far)", self._step, skipped,
                      self.num_skipped)
    if rows < self._local_batch:
      # Out of data: a partial (or, on a process with a smaller shard, empty)
      # batch is padded unless dropped; finite iteration stops at total_steps.
      if self._drop_remainder or self._total_steps is None:
        raise StopIteration
      batch = self._padded(batch, rows)
    self._step += 1
    return batch, self._snapshot()

  def _to_device(self, batch: dict) -> dict:
    out = {key: jax.make_array_from_process_local_data(self._sharding, value)
           for key, value in batch.items()}
    for key in self._image_keys:
      out[key] = self._normalize(out[key])
    return out

  # -- prefetch thread -----------------------------------------------------------
  def _produce(self):
    try:
      while not self._stop.is_set():
        batch, state = self._next_host_batch()
        item = (self._to_device(batch), state)
        while not self._stop.is_set():
          try:
            self._queue.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
    except StopIteration:
      self._queue.put(_END)
    except BaseException as e:  # pylint: disable=broad-except
      self._queue.put(e)

  def _stop_thread(self):
    if self._thread is None:
      return
    self._stop.set()
    while self._thread.is_alive():
      try:
        self._queue.get(timeout=0.1)
      except queue.Empty:
        pass
    self._thread.join()
    self._thread = None
    self._queue = queue.Queue(maxsize=max(self._prefetch, 1))
    self._stop.clear()

  # -- public --------------------------------------------------------------------
  def __iter__(self) -> DeviceIterator:
    return self

  def __next__(self) -> dict[str, jax.Array]:
    if self._finished:
      raise StopIteration
    if self._prefetch == 0:
      try:
        batch, state = self._next_host_batch()
      except StopIteration:
        self._finished = True
        self._log_skipped()
        raise
      self._state = state
      return self._to_device(batch)
    if self._thread is None:
      self._thread = threading.Thread(target=self._produce, daemon=True,
                                      name="cxr_jax-device-prefetch")
      self._thread.start()
    item = self._queue.get()
    if item is _END:
      self._finished = True
      self._log_skipped()
      raise StopIteration
    if isinstance(item, BaseException):
      self._finished = True
      raise item
    batch, self._state = item
    return batch

  def get_state(self) -> dict:
    return copy.deepcopy(self._state)

  def set_state(self, state: Mapping[str, Any]):
    """Resumes after the batches described by ``state`` (from ``get_state``)."""
    if state.get("pipeline") != self.description:
      raise ValueError(f"the iterator state is of another pipeline: {state.get('pipeline')!r}; "
                       f"this iterator: {self.description!r}")
    self._stop_thread()
    self._grain.set_state(copy.deepcopy(state["grain"]))
    self._step = int(state["step"])
    self._state = copy.deepcopy(dict(state))
    self._exhausted = self._finished = False

  def _log_skipped(self):
    if self.num_skipped:
      logging.warning("%s: skipped %d bad examples in total", self.source, self.num_skipped)

  def close(self):
    """Stops the prefetch thread and the grain worker processes."""
    self._stop_thread()
    if self._grain is not None:
      self._grain.close()
      self._grain = None
      self._log_skipped()

  def __enter__(self) -> DeviceIterator:
    return self

  def __exit__(self, *exc):
    self.close()
