"""Grain input pipeline: split source -> process shard -> shuffle -> map -> batch -> mesh.

``make_source(data_config, split)`` gives the random-access source of a split;
``make_iterator(...)`` turns it into batches of global ``jax.Array``s:

  1. shard by JAX process: process p reads the contiguous p-th part of the
     source (sizes differ by at most one; equal when ``drop_remainder``).
     Done here rather than with grain's ``ShardOptions``: grain 0.2.18's
     IndexSampler + DataLoader sharding silently drops examples when the
     source does not divide evenly (5 records, 2 shards -> [0, 1], [3, 4]),
     which evaluation cannot afford;
  2. grain ``MapDataset``: shuffled with ``seed``, a new order every epoch
     (grain's index shuffle keyed by seed + epoch), repeated ``num_epochs``
     times into one stream of examples;
  3. per example: read, decode, validate (``schema.validate_example``),
     augment with a per-example rng (grain's ``random_map``: Philox keyed by
     seed + position in the stream, so it differs per epoch), render the
     requested maps;
  4. batch (per-process batch = batch_size / process count) consecutive
     stream positions, before any multiprocessing: batch i is a pure function
     of (seed, i), so the output does not depend on ``worker_count``. With
     ``data_config.worker_count`` processes, each worker computes whole
     batches (worker w: batches w, w + W, ...), which reach the consuming
     process through shared memory and are read back in order;
  5. ``jax.make_array_from_process_local_data`` on the given sharding, then one
     jitted normalization of the uint8 images on the devices (4x less
     host-to-device traffic than float32), ``data_config.prefetch`` batches
     ahead in a background thread.

Batch (every value a global array, batch axis sharded):
  image       float32 [N, H, W, C]  normalized per data_config.normalization
  labels      float32 [N, K];  label_mask float32 [N, K]
  boxes       float32 [N, MAX_BOXES, 4];  box_labels int32 [N, MAX_BOXES]
  gaze        float32 [N, MAX_FIXATIONS, 3]
  has_boxes   float32 [N]  1 if the image's boxes are annotated (kept), else 0
                           (the source's 'has_boxes'; 1 if it has none)
  index       int32 [N]    index into ``iterator.source`` (-1 on padding rows)
  valid       float32 [N]  1 real example, 0 padding
  gaze_map    float32 [N, H, W, 1]  (if requested)  annotations.gaze_heatmap
  box_map     float32 [N, H, W, 1]  (if requested)  annotations.boxes_to_soft_mask
  box_grid    float32 [N, P, P, K]  (if requested)  annotations.boxes_to_patch_grid
Strings (patient_id, image_id) stay on the host: look them up with
``iterator.source[index]``.

Finite iteration (``num_epochs``) with ``drop_remainder=False`` pads the last
batch with ``valid = 0`` rows, and every process yields the same number of
batches, so a jitted evaluation step sees one shape and never recompiles.
With ``data_config.skip_bad_examples`` an example that fails to read or
validate becomes a padding row (``valid = 0``) of its batch, is logged (by the
process that read it) and counted in ``iterator.num_skipped``.
"""

from __future__ import annotations

import copy
import functools
import json
import queue
import threading
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from absl import flags
from absl import logging
import cv2
import grain.python as gp
import jax
import jax.numpy as jnp
import numpy as np

from cxr_jax.data import annotations, augment as augment_lib, schema, splits

MAPS = ("gaze_map", "box_map", "box_grid")
NUMERIC_KEYS = ("labels", "label_mask", "boxes", "box_labels", "gaze")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SYNTHETIC_PARTS = ("train", "val", "test")
# Batches built at a time, one per thread, by the main process when there are no
# grain workers (grain's default, 16 threads and 500 buffered elements, suits
# remote files; our sources are in-memory or local shards and the work is
# CPU-bound). Each worker process builds one batch at a time: more threads there
# would only delay its first batch and hold more memory.
READ_THREADS = 2


# ----------------------------------------------------------------------------
# Sources.

class SplitSource:
  """Images ``indices`` of ``source``; boxes kept where ``keep_boxes``, else stripped.

  Adds ``has_boxes`` (float32 0/1) to every Example. ``name`` is the repr, which
  grain stores in the iterator state and checks on restore.
  """

  def __init__(self, source: Any, indices: np.ndarray, keep_boxes: np.ndarray, name: str):
    self.source = source
    self.indices = np.asarray(indices, np.int64)
    self.keep_boxes = np.asarray(keep_boxes, bool)
    self.name = name

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> schema.Example:
    example = dict(self.source[int(self.indices[index])])
    keep = bool(self.keep_boxes[index])
    if not keep:
      example["boxes"], example["box_labels"] = schema.empty_boxes()
    example["has_boxes"] = np.float32(keep)
    return example

  def __repr__(self) -> str:
    return f"SplitSource({self.name}, {len(self)} images)"


def synthetic_bounds(num_train: int, num_val: int, num_test: int, images_per_patient: int
                     ) -> np.ndarray:
  """int [4]: train/val/test are [b0, b1), [b1, b2), [b2, b3) of the phantom indices.

  Cumulative sizes rounded up to whole patients, so no patient spans two parts.
  """
  cumulative = np.cumsum([0, num_train, num_val, num_test])
  return -(-cumulative // images_per_patient) * images_per_patient


def _synthetic_source(data_config: Any, split: str) -> SplitSource:
  from cxr_jax.data.sources import synthetic  # pylint: disable=import-outside-toplevel
  cfg = data_config.synthetic
  subset, _, part = split.rpartition("_")
  if part not in SYNTHETIC_PARTS or subset not in ("", "annotated", "unannotated"):
    raise KeyError(f"unknown split {split!r} of data.name='synthetic'; known: "
                   f"{list(SYNTHETIC_PARTS)}, 'annotated_<part>', 'unannotated_<part>'")
  per_patient = synthetic.IMAGES_PER_PATIENT
  bounds = synthetic_bounds(cfg.num_train, cfg.num_val, cfg.num_test, per_patient)
  cv = data_config.get("cv")
  in_cv = cv is not None and cv.num_folds > 0 and part in ("train", "test")
  first = 0 if in_cv else SYNTHETIC_PARTS.index(part)  # cross-validation folds come from train
  start, stop = (int(b) for b in bounds[first:first + 2])
  size = stop - start
  phantoms = synthetic.SyntheticPhantoms(num_examples=size, image_size=data_config.image_size,
                                         seed=cfg.seed, offset=start)
  keep = np.ones(size, bool)
  if first == 0:  # limited annotation: only a fraction of train patients keep boxes
    patients = (np.arange(size) // per_patient).astype(str)
    annotated = splits.select_fraction(np.arange(size), cfg.annotated_fraction, cfg.seed,
                                       patient_ids=patients)
    keep = np.isin(np.arange(size), annotated)
  if in_cv:
    parts = splits.cv_split(patients, keep, cv.num_folds, cv.fold, cv.unannotated_fraction,
                            cfg.seed)
    if part == "test":
      chosen = np.isin(np.arange(size), parts["test"])
    else:
      chosen = np.isin(np.arange(size), np.concatenate(
          [parts[f"{s}_train"] for s in (("annotated", "unannotated") if not subset else (subset,))]))
    name = (f"synthetic/{split} (cv fold {cv.fold} of {cv.num_folds}, unannotated fraction "
            f"{cv.unannotated_fraction}): {phantoms!r}")
  else:
    chosen = {"": np.ones(size, bool), "annotated": keep, "unannotated": ~keep}[subset]
    name = f"synthetic/{split}: {phantoms!r}"
  if not chosen.any():
    raise ValueError(f"split {split!r} of data.name='synthetic' is empty (data.synthetic: "
                     f"num_{part}, annotated_fraction; data.cv)")
  return SplitSource(phantoms, np.flatnonzero(chosen), keep[chosen], name)


def make_source(data_config: Any, split: str) -> SplitSource:
  """The random-access source of ``split`` (grain ``RandomAccessDataSource`` of Examples).

  Synthetic phantoms: train/val/test are disjoint, patient-aligned index ranges
  (``synthetic_bounds``). A patient-level fraction
  ``data.synthetic.annotated_fraction`` of train keeps its boxes; the rest of
  train has them stripped (box_labels -1, has_boxes 0): limited annotation.
  'train' = all train images; 'annotated_train' / 'unannotated_train' = the
  images with / without boxes; val and test keep every box (evaluation needs
  them; 'annotated_val' is then all of val). With ``data.cv.num_folds > 0``,
  'train' / 'test' are a fold of cross-validation over the annotated train
  images (``splits.cv_split``).

  ``data.name`` 'A+B' (e.g. 'egd+reflacx', two gaze sources of van Sonsbeek's
  Table 1) reads prepared datasets as one (``prepared.JoinedSource``); a part
  'A:gaze' or 'A:boxes' keeps only that annotation ('egd:gaze+reflacx:boxes').
  """
  if data_config.name == "synthetic":
    return _synthetic_source(data_config, split)
  from cxr_jax.data import prepared  # pylint: disable=import-outside-toplevel
  name = data_config.name
  if not {prepared.dataset_and_kept(p, name)[0] for p in name.split("+")} <= set(prepared.DATASETS):
    raise KeyError(f"data.name={data_config.name!r}; known: 'synthetic', "
                   f"{list(prepared.DATASETS)}")
  return prepared.make_source(data_config, split)  # real data, prepared by cxr-prepare


class _CheckedSource:
  """Reads ``source[start:stop]``: decodes PNG/JPEG bytes, validates; errors name source and index.

  Adds ``index`` (into ``source``) and a default ``has_boxes`` of 1. With
  ``skip_bad`` a bad example becomes ``{'error': message}``, which ``_Preprocess``
  turns into a padding row.
  """

  def __init__(self, source: Any, start: int, stop: int, num_classes: int, skip_bad: bool):
    self.source = source
    self.start, self.stop = start, stop
    self.num_classes = num_classes
    self.skip_bad = skip_bad

  def __len__(self) -> int:
    return self.stop - self.start

  def __repr__(self) -> str:
    return f"{self.source!r} [{self.start}:{self.stop}]"

  def _read(self, index: int, origin: str) -> schema.Example:
    try:
      example = dict(self.source[index])
    except Exception as e:  # pylint: disable=broad-except
      raise schema.ExampleError(f"{origin}: could not read: {type(e).__name__}: {e}") from e
    if isinstance(example.get("image"), (bytes, np.bytes_)):
      image = cv2.imdecode(np.frombuffer(example["image"], np.uint8), cv2.IMREAD_GRAYSCALE)
      if image is None:
        raise schema.ExampleError(f"{origin}: unreadable image ({len(example['image'])} bytes "
                                  "that are not a PNG/JPEG)")
      example["image"] = image
    schema.validate_example(example, self.num_classes, origin=origin)
    return example

  def __getitem__(self, local_index: int) -> schema.Example:
    index = self.start + local_index
    origin = f"{self.source!r} index {index}"
    try:
      example = self._read(index, origin)
    except schema.ExampleError as e:
      if self.skip_bad:
        return {"error": str(e)}
      raise
    example["index"] = np.int32(index)
    example.setdefault("has_boxes", np.float32(1))
    return example


# ----------------------------------------------------------------------------
# Per-example map (runs in grain workers).

class _Preprocess(gp.RandomMapTransform):
  """Example -> numeric record: augmented (or resized) uint8 image, annotations, maps, valid.

  A skipped bad example (``{'error': message}``) is logged and becomes ``padding``.
  """

  def __init__(self, data_config: Any, maps: Sequence[str], aug: Any | None,
               views: Sequence[Mapping[str, Any]], padding: dict):
    self.image_size = data_config.image_size
    self.maps = tuple(maps)
    self.grid = data_config.grid_size
    self.gaze_sigma = data_config.gaze_sigma_per_second
    self.box_sigma = data_config.box_sigma
    self.num_classes = len(schema.get_label_space(data_config.label_space))
    # A plain namespace: cheap to pickle into the worker processes.
    self.aug = None if aug is None else types.SimpleNamespace(**aug.to_dict())
    self.views = tuple(types.SimpleNamespace(**view) for view in views)
    self.padding = padding

  def random_map(self, example: dict, rng: np.random.Generator) -> dict:
    if "error" in example:
      logging.warning("skipping bad example: %s", example["error"])
      return self.padding
    original = example
    if self.aug is None:
      example = augment_lib.eval_transform(example, self.image_size)
    else:
      example = augment_lib.train_transform(example, rng, self.aug, self.image_size)
    size = self.image_size
    out = {key: example[key] for key in NUMERIC_KEYS}
    out["image"] = example["image"]
    for i, view in enumerate(self.views):
      out[f"view{i}"] = augment_lib.train_transform(original, rng, view, size)["image"]
    out["has_boxes"] = np.float32(example["has_boxes"])
    out["index"] = np.int32(example["index"])
    out["valid"] = np.float32(1)
    if "gaze_map" in self.maps:
      out["gaze_map"] = annotations.gaze_heatmap(example["gaze"], size, size,
                                                 self.gaze_sigma)[..., None]
    if "box_map" in self.maps:
      out["box_map"] = annotations.boxes_to_soft_mask(example["boxes"], example["box_labels"],
                                                      size, size, self.box_sigma)[..., None]
    if "box_grid" in self.maps:
      out["box_grid"] = annotations.boxes_to_patch_grid(example["boxes"], example["box_labels"],
                                                        self.grid, self.num_classes)
    return out


# ----------------------------------------------------------------------------
# Host batching and device transfer.

def padding_record(data_config: Any, maps: Sequence[str], num_views: int = 0) -> dict:
  """The record of a padding row: zeros, box_labels -1, index -1, valid 0."""
  size, grid = data_config.image_size, data_config.grid_size
  num_classes = len(schema.get_label_space(data_config.label_space))
  boxes, box_labels = schema.empty_boxes()
  record = {"labels": np.zeros(num_classes, np.float32),
            "label_mask": np.zeros(num_classes, np.float32),
            "boxes": boxes, "box_labels": box_labels, "gaze": schema.empty_gaze(),
            "image": np.zeros((size, size), np.uint8), "has_boxes": np.float32(0),
            "index": np.int32(-1), "valid": np.float32(0)}
  shapes = {"gaze_map": (size, size, 1), "box_map": (size, size, 1),
            "box_grid": (grid, grid, num_classes)}
  record.update({name: np.zeros(shapes[name], np.float32) for name in maps})
  record.update({f"view{i}": record["image"] for i in range(num_views)})
  return record


def normalize_images(images: jax.Array, normalization: str, channels: int) -> jax.Array:
  """uint8 [N, H, W] -> float32 [N, H, W, channels].

  'minus_one_one': x / 127.5 - 1. 'imagenet': (x / 255 - mean) / std with the
  ImageNet per-channel statistics on the grey value replicated to 3 channels
  (their channel averages when channels == 1).
  """
  x = images.astype(jnp.float32)[..., None] / 255.0
  if normalization == "minus_one_one":
    x = jnp.broadcast_to(x * 2.0 - 1.0, x.shape[:-1] + (channels,))
  elif normalization == "imagenet":
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    if channels == 1:
      mean, std = mean.mean(keepdims=True), std.mean(keepdims=True)
    x = (x - mean.astype(np.float32)) / std.astype(np.float32)
  else:
    raise ValueError(f"data.normalization={normalization!r}; known: 'minus_one_one', 'imagenet'")
  return x


def batch_shards(sharding: jax.sharding.NamedSharding) -> int:
  """How many pieces ``sharding`` cuts the batch (leading) axis into."""
  axes = sharding.spec[0] if len(sharding.spec) else None
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return int(np.prod([sharding.mesh.shape[a] for a in axes]))


def process_shard(num_examples: int, process_index: int, process_count: int,
                  drop_remainder: bool) -> tuple[int, int]:
  """[start, stop) of the source read by one process: contiguous, sizes differ by <= 1.

  With ``drop_remainder`` every process gets num_examples // process_count.
  """
  per_process, extra = divmod(num_examples, process_count)
  if drop_remainder:
    return process_index * per_process, (process_index + 1) * per_process
  start = process_index * per_process + min(process_index, extra)
  return start, start + per_process + (process_index < extra)


_END = object()


class DeviceIterator:
  """Global-array batches from a grain ``IterDataset`` of host batches; prefetch, checkpoints.

  ``get_state()`` describes the batches the caller has *consumed* (prefetched
  ones are replayed after ``set_state``): a JSON-serializable dict
  {'grain': grain iterator state, 'step': batches consumed, 'pipeline':
  ``description``}. ``set_state`` refuses a state of another ``description``
  (source shard, seed, shuffling, epochs, batch, worker count).
  """

  def __init__(self, dataset: gp.IterDataset, source: Any, *, local_batch: int,
               padding: dict, sharding: jax.sharding.NamedSharding, normalization: str,
               channels: int, prefetch: int, total_steps: int | None, drop_remainder: bool,
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
    self._normalize = jax.jit(
        functools.partial(normalize_images, normalization=normalization, channels=channels),
        out_shardings=sharding)
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


def view_augment(base: Any, overrides: Mapping[str, Any]) -> dict:
  """``base`` augmentation fields (config.data.augment) with ``overrides``; unknown keys are errors."""
  fields = base.to_dict() if hasattr(base, "to_dict") else dict(base)
  unknown = sorted(set(overrides) - set(fields))
  if unknown:
    raise KeyError(f"view augmentation fields {unknown} are not in config.data.augment; "
                   f"known: {sorted(fields)}")
  return {**fields, **overrides}


def first_rows(batches: DeviceIterator, to_host: Callable[[dict], dict],
               keep: Callable[[dict], np.ndarray], max_rows: int) -> dict[str, np.ndarray]:
  """The first ``max_rows`` rows, in order, of ``to_host(batch)`` (dicts of numpy [N, ...]
  arrays) whose ``keep(host)`` mask [N] is true and that are real (``host['valid'] > 0``);
  'valid' itself is dropped. Stops reading at ``max_rows`` and closes ``batches``.
  Returns {} when no row is kept."""
  parts: dict[str, list[np.ndarray]] = {}
  kept = 0
  try:
    for batch in batches:
      host = to_host(batch)
      mask = (np.asarray(host["valid"]) > 0) & keep(host)
      mask &= np.cumsum(mask) <= max_rows - kept
      kept += int(mask.sum())
      for k, v in host.items():
        if k != "valid":
          parts.setdefault(k, []).append(np.asarray(v)[mask])
      if kept >= max_rows:
        break
  finally:
    batches.close()
  return {k: np.concatenate(v) for k, v in parts.items()} if kept else {}


def make_iterator(data_config: Any, split: str, *, batch_size: int,
                  sharding: jax.sharding.NamedSharding, seed: int, shuffle: bool = True,
                  num_epochs: int | None = None, drop_remainder: bool = True,
                  maps: Sequence[str] = (), augment: bool = True, aug_config: Any = None,
                  views: Sequence[Mapping[str, Any]] = (), source: Any = None) -> DeviceIterator:
  """Batches of ``split`` as global arrays on ``sharding`` (see the module docstring).

  Args:
    data_config: ``config.data``.
    split: split name for ``make_source``.
    batch_size: global batch, over all processes and devices.
    sharding: NamedSharding whose spec shards the leading (batch) axis.
    seed: shuffling and augmentation seed, in [0, 2**32).
    shuffle: new random order every epoch.
    num_epochs: None = endless.
    drop_remainder: False pads the last batch with valid = 0 rows.
    maps: any of 'gaze_map', 'box_map', 'box_grid'.
    augment: training augmentation (``augment.train_transform``) or a plain resize.
    aug_config: augmentation fields; default ``data_config.augment``.
    views: extra independently augmented copies of each image, as keys 'view0',
      'view1', ... (normalized like 'image'); each is a dict of augmentation
      fields merged over ``data_config.augment`` (e.g. BYOL's two views of
      different strengths). 'image' and the annotations are unaffected.
    source: a random-access source of Examples to use instead of
      ``make_source(data_config, split)``.
  """
  unknown = sorted(set(maps) - set(MAPS))
  if unknown:
    raise KeyError(f"unknown maps {unknown}; known: {list(MAPS)}")
  if data_config.channels not in (1, 3):
    raise ValueError(f"data.channels={data_config.channels}; must be 1 or 3")
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed={seed} must lie in [0, 2**32) (grain's sampler seed)")
  process_count, devices = jax.process_count(), batch_shards(sharding)
  if batch_size % process_count or batch_size % devices:
    raise ValueError(f"batch_size={batch_size} must be divisible by the {process_count} "
                     f"processes and the {devices} devices the batch is sharded over")
  local_batch = batch_size // process_count

  source = make_source(data_config, split) if source is None else source
  num_examples = len(source)
  start, stop = process_shard(num_examples, jax.process_index(), process_count, drop_remainder)
  if stop == start:
    raise ValueError(f"split {split!r} has {num_examples} examples, too few for "
                     f"{process_count} processes")
  num_classes = len(schema.get_label_space(data_config.label_space))
  reader = _CheckedSource(source, start, stop, num_classes,
                          getattr(data_config, "skip_bad_examples", False))
  if data_config.worker_count and not flags.FLAGS.is_parsed():
    # grain 0.2.18 reads an absl flag when starting workers (google/grain#1355);
    # scripts and tests that do not run absl.app have not parsed flags yet.
    flags.FLAGS.mark_as_parsed()
  aug = None if not augment else (data_config.augment if aug_config is None else aug_config)
  views = [view_augment(data_config.augment, view) for view in views]
  padding = padding_record(data_config, maps, len(views))
  dataset = gp.MapDataset.source(reader)
  if shuffle:
    dataset = dataset.shuffle(seed=seed)
  # Batches span epoch boundaries: batch i holds stream positions [i B, (i + 1) B).
  dataset = dataset.repeat(num_epochs)
  dataset = dataset.random_map(_Preprocess(data_config, maps, aug, views, padding), seed=seed)
  dataset = dataset.batch(local_batch, drop_remainder=drop_remainder)
  # Each thread builds a whole batch.
  threads = 1 if data_config.worker_count else READ_THREADS
  dataset = dataset.to_iter_dataset(gp.ReadOptions(num_threads=threads,
                                                   prefetch_buffer_size=threads))
  # Worker w builds batches w, w + W, ... and holds one finished batch in shared
  # memory; the main process reads them back in order.
  dataset = dataset.mp_prefetch(gp.MultiprocessingOptions(num_workers=data_config.worker_count,
                                                          per_worker_buffer_size=1))
  description = (f"{reader!r}, seed {seed}, shuffle {shuffle}, {num_epochs} epochs, "
                 f"batch {local_batch}, {data_config.worker_count} workers")
  # All processes run the same number of steps (shards differ by at most one example).
  largest = -(-num_examples // process_count) if not drop_remainder else len(reader)
  if drop_remainder:
    steps_per_epoch = largest // local_batch
    total_steps = None if num_epochs is None else num_epochs * largest // local_batch
  else:
    steps_per_epoch = -(-largest // local_batch)
    total_steps = None if num_epochs is None else -(-num_epochs * largest // local_batch)
  return DeviceIterator(dataset, source, local_batch=local_batch, padding=padding,
                        sharding=sharding, normalization=data_config.normalization,
                        channels=data_config.channels,
                        prefetch=data_config.prefetch, total_steps=total_steps,
                        drop_remainder=drop_remainder, num_examples=num_examples,
                        steps_per_epoch=steps_per_epoch, num_views=len(views),
                        description=description)
