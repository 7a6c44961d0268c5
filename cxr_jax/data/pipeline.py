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
  3. per example (``examples``): read, decode, validate (``schema.validate_example``),
     augment with a per-example rng (grain's ``random_map``: Philox keyed by
     seed + position in the stream, so it differs per epoch), render the
     requested maps;
  4. batch (per-process batch = batch_size / process count) consecutive
     stream positions, before any multiprocessing: batch i is a pure function
     of (seed, i), so the output does not depend on ``worker_count``. With
     ``data_config.worker_count`` processes, each worker computes whole
     batches (worker w: batches w, w + W, ...), which reach the consuming
     process through shared memory and are read back in order;
  5. (``device_iterator``) ``jax.make_array_from_process_local_data`` on the
     given sharding, then one jitted normalization of the uint8 images on the
     devices (4x less host-to-device traffic than float32),
     ``data_config.prefetch`` batches ahead in a background thread.

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

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from absl import flags
import grain.python as gp
import jax
import jax.numpy as jnp
import numpy as np

from cxr_jax.data import prepared, schema
from cxr_jax.data.device_iterator import DeviceIterator
from cxr_jax.data.examples import MAPS, CheckedSource, Preprocess, padding_record
from cxr_jax.data.layout import check_data_name
from cxr_jax.data.sources import synthetic
from cxr_jax.data.splits import SplitSource

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Batches built at a time, one per thread, by the main process when there are no
# grain workers (grain's default, 16 threads and 500 buffered elements, suits
# remote files; our sources are in-memory or local shards and the work is
# CPU-bound). Each worker process builds one batch at a time: more threads there
# would only delay its first batch and hold more memory.
READ_THREADS = 2


def make_source(data_config: Any, split: str) -> SplitSource:
  """The random-access source of ``split`` (grain ``RandomAccessDataSource`` of Examples).

  Synthetic phantoms (``synthetic.split_source``) or a prepared real dataset
  (``prepared.make_source``), each cut into splits as ``cxr_jax.data.splits``
  describes: 'train', 'val', 'test', 'annotated_<part>', 'unannotated_<part>'.

  ``data.name`` 'A+B' (e.g. 'egd+reflacx', two gaze sources of van Sonsbeek's
  Table 1) reads prepared datasets as one (``prepared.JoinedSource``); a part
  'A:gaze' or 'A:boxes' keeps only that annotation ('egd:gaze+reflacx:boxes').
  """
  if data_config.name == "synthetic":
    return synthetic.split_source(data_config, split)
  check_data_name(data_config.name)
  return prepared.make_source(data_config, split)  # real data, prepared by cxr-prepare


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
  reader = CheckedSource(source, start, stop, num_classes,
                          data_config.skip_bad_examples)
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
  dataset = dataset.random_map(Preprocess(data_config, maps, aug, views, padding), seed=seed)
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
  normalize = functools.partial(normalize_images, normalization=data_config.normalization,
                                channels=data_config.channels)
  return DeviceIterator(dataset, source, local_batch=local_batch, padding=padding,
                        sharding=sharding, normalize=normalize,
                        prefetch=data_config.prefetch, total_steps=total_steps,
                        drop_remainder=drop_remainder, num_examples=num_examples,
                        steps_per_epoch=steps_per_epoch, num_views=len(views),
                        description=description)
