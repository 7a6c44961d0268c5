"""Writing prepared datasets (``cxr-prepare``): resized images + annotations in ArrayRecord shards.

``prepare(dataset, manual_dir, data_dir, image_size)`` reads an official
download with its reader (``cxr_jax.data.sources.<dataset>``), resizes every
image once to ``image_size`` x ``image_size`` uint8 gray, PNG-encodes it and
writes it with its annotations as ``tfds.features`` examples into ArrayRecord
shards, in parallel over CPU cores, in the folder layout of
``cxr_jax.data.layout``. ``cxr_jax.data.prepared`` reads them back.

Building is resumable and atomic: shards go to
``<config>/.incomplete-<VERSION>/`` (each written to a ``.tmp`` name, then
renamed, with a sidecar listing the ids it holds), a restarted build skips
the shards already there, and only when every shard is verified against the
records are the index, report and TFDS metadata written and the folder
renamed to ``<VERSION>``: a dataset that looks complete is complete.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import multiprocessing
import os
import shutil
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from cxr_jax import files
from cxr_jax.data import layout, schema
from cxr_jax.data.layout import (INDEX_FILE, REPORT_FILE, VERSION, dataset_dir, reader_module,
                                 stored_split, tfds_name)
from cxr_jax.data.sources import records as records_lib
from cxr_jax.data.splits import SPLITS

PLAN_FILE = "plan.json"
SIDECARS = ".shards"
# zlib level of the stored PNGs. 0 (stored deflate blocks) decodes in ~0.38 ms instead of
# ~0.63 ms at 256 px (record read included), the cost that sets how many images a training
# worker delivers; ArrayRecord's own zstd then compresses the pixels, so a shard is no
# larger than with compressed PNGs (39.7 vs 41.0 KB per 256 px phantom).
PNG_COMPRESSION = 0
# Records per shard, and at least MIN_SHARDS shards per split (parallelism on
# small splits): ~1000 images per shard keeps the open files of a shuffled
# read of MIMIC (~250 shards per split) well under common file-handle limits.
DEFAULT_SHARD_SIZE = 1024
MIN_SHARDS = 16


def features(num_classes: int, image_size: int):
  """The tfds FeaturesDict of one stored example (shared with the TFDS builders)."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  f = tfds.features
  return f.FeaturesDict({
      "image": f.Image(shape=(image_size, image_size, 1), encoding_format="png"),
      "labels": f.Tensor(shape=(num_classes,), dtype=np.float32),
      "label_mask": f.Tensor(shape=(num_classes,), dtype=np.float32),
      "boxes": f.Tensor(shape=(None, 4), dtype=np.float32),
      "box_labels": f.Tensor(shape=(None,), dtype=np.int32),
      "gaze": f.Tensor(shape=(None, 3), dtype=np.float32),
      "anatomy_boxes": f.Tensor(shape=(None, 4), dtype=np.float32),
      "anatomy_names": f.Text(),
      "image_id": f.Text(),
      "patient_id": f.Text(),
      "study_id": f.Text(),
      "view": f.Text(),
  })


def encode_record(record: records_lib.Record, image_size: int,
                  png_compression: int = PNG_COMPRESSION) -> dict:
  """Decodes, resizes and PNG-encodes one record's image -> the feature dict to serialize.

  ``png_compression``: the PNG's zlib level (``PNG_COMPRESSION``). Raises
  ``records.BadInput`` naming the image file and record id.
  """
  try:
    image = records_lib.load_gray(record.path, image_size)
  except records_lib.BadInput as e:
    raise records_lib.BadInput(f"{e} (record {record.id!r})") from None
  ok, png = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, png_compression])
  if not ok:
    raise records_lib.BadInput(f"{record.path} (record {record.id!r}): PNG encoding failed")
  anatomy = record.anatomy_boxes if record.anatomy_boxes is not None else np.zeros((0, 4))
  return {
      "image": png.tobytes(),
      "labels": np.asarray(record.labels, np.float32),
      "label_mask": np.asarray(record.label_mask, np.float32),
      "boxes": np.asarray(record.boxes, np.float32).reshape(-1, 4),
      "box_labels": np.asarray(record.box_labels, np.int32).reshape(-1),
      "gaze": np.asarray(record.gaze, np.float32).reshape(-1, 3),
      "anatomy_boxes": np.asarray(anatomy, np.float32).reshape(-1, 4),
      "anatomy_names": "|".join(record.anatomy_names),
      "image_id": record.id,
      "patient_id": record.patient_id,
      "study_id": record.study_id,
      "view": record.view,
  }


@dataclasses.dataclass(frozen=True)
class Shard:
  """Records [start, stop) of ``split``'s records, written to file ``name``."""
  split: str
  index: int
  count: int
  start: int
  stop: int
  name: str


def plan_shards(split_sizes: dict[str, int], dataset: str, shard_size: int,
                min_shards: int = MIN_SHARDS) -> list[Shard]:
  """Cuts each split into max(ceil(size / shard_size), min(min_shards, size)) near-equal shards."""
  shards = []
  for split, size in split_sizes.items():
    count = max(1, -(-size // shard_size), min(min_shards, size))
    bounds = np.linspace(0, size, count + 1).round().astype(int)
    for i in range(count):
      name = f"{tfds_name(dataset)}-{split}.array_record-{i:05d}-of-{count:05d}"
      shards.append(Shard(split, i, count, int(bounds[i]), int(bounds[i + 1]), name))
  return shards


def fingerprint(by_split: dict[str, list[records_lib.Record]], image_size: int,
                num_classes: int) -> str:
  """sha256 over what a build writes (ids, paths, annotations, size): a resume must match it."""
  h = hashlib.sha256(f"{VERSION}|{image_size}|{num_classes}".encode())
  for split, recs in by_split.items():
    h.update(split.encode())
    for r in recs:
      h.update(f"|{r.id}|{r.path}|{r.patient_id}|{r.view}|{r.study_id}".encode())
      for a in (r.labels, r.label_mask, r.boxes, r.box_labels, r.gaze):
        h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def _atomic_json(path: str, payload: Any) -> None:
  """``payload`` as one-line JSON (the index lists every image id), atomically."""
  files.write_json_atomic(path, payload, indent=None)


@functools.lru_cache(maxsize=4)
def _features_cached(num_classes: int, image_size: int):
  return features(num_classes, image_size)


def write_shard(task: tuple) -> dict:
  """Writes one shard (runs in a worker process): temp file, sidecar, then rename
  (``files.atomic_path``).

  Args:
    task: (work_dir, shard, records of the shard, image_size, num_classes, skip_bad,
      png_compression).
  Returns:
    {'name', 'split', 'ids': written ids, 'skipped': [problem entries]}.
  """
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  work_dir, shard, recs, image_size, num_classes, skip_bad, png_compression = task
  feats = _features_cached(num_classes, image_size)
  ids, skipped = [], []
  with files.atomic_path(os.path.join(work_dir, shard.name)) as tmp:
    writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
    try:
      for r in recs:
        try:
          encoded = encode_record(r, image_size, png_compression)
        except records_lib.BadInput as e:
          if not skip_bad:
            raise records_lib.BadInput(f"{e}; split {shard.split!r}, shard {shard.name}") from None
          entry = dict(kind="bad", file=r.path, row=None, reason=str(e), id=r.id, image=r.id)
          lost = records_lib.annotations_of(r)   # -> the report's annotated_missing
          if lost:
            entry["annotations"] = lost
          skipped.append(entry)
          continue
        writer.write(feats.serialize_example(encoded))
        ids.append(r.id)
    finally:
      writer.close()
    result = dict(name=shard.name, split=shard.split, ids=ids, skipped=skipped)
    # The sidecar lands before the shard is renamed: a present shard always has one.
    _atomic_json(os.path.join(work_dir, SIDECARS, shard.name + ".json"), result)
  return result


def _progress(total: int, desc: str, enabled: bool):
  if not enabled:
    return None
  import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm.tqdm(total=total, desc=desc, unit="img", smoothing=0.1)


def prepare_records(dataset: str, recs: Sequence[records_lib.Record],
                    problems: records_lib.Problems, label_space: schema.LabelSpace, data_dir: str,
                    image_size: int, *, uncertainty: str = "zeros", frontal_only: bool = True,
                    workers: int = 1, skip_bad: bool = False,
                    shard_size: int = DEFAULT_SHARD_SIZE, min_shards: int = MIN_SHARDS,
                    png_compression: int = PNG_COMPRESSION, progress: bool = True) -> str:
  """Writes ``recs`` as a prepared dataset; returns its folder (see the module docstring).

  Args:
    dataset: one of ``DATASETS`` (names the folder and the shard files).
    recs: the reader's records (every official split).
    problems: the reader's report (rows left out); written next to the dataset.
    label_space: the records' label space (K = len(label_space) labels).
    data_dir: root folder of prepared datasets.
    image_size: stored images are image_size x image_size uint8 gray PNGs.
    uncertainty, frontal_only: the reader options used (name the config folder).
    workers: processes encoding shards in parallel (1 = in this process).
    skip_bad: an undecodable image is skipped and reported instead of raising.
    shard_size, min_shards: records per shard at most, and at least min_shards
      shards per split (fewer only when the split has fewer records).
    png_compression: zlib level 0-9 of the stored PNGs (``PNG_COMPRESSION``).
    progress: show a progress bar (tqdm) over images.
  Returns:
    The finished folder DATA_DIR/cxr_<dataset>/<config>/<VERSION>.
  """
  if png_compression not in range(10):
    raise ValueError(f"png_compression={png_compression}: a zlib level 0-9")
  final_dir = dataset_dir(data_dir, dataset, image_size, uncertainty, frontal_only)
  if os.path.isfile(os.path.join(final_dir, "dataset_info.json")):
    return final_dir
  classes = label_space.classes
  by_split: dict[str, list[records_lib.Record]] = {s: [] for s in SPLITS}
  seen: dict[str, str] = {}
  for r in recs:
    if r.id in seen:
      raise records_lib.BadInput(f"duplicated record id {r.id!r}: {seen[r.id]} and {r.path}")
    seen[r.id] = r.path
    if len(r.labels) != len(classes):
      raise records_lib.BadInput(f"record {r.id!r} ({r.path}) has {len(r.labels)} labels, "
                                 f"the label space has {len(classes)}")
    by_split[stored_split(r)].append(r)
  by_split = {s: v for s, v in by_split.items() if v}
  if not by_split:
    raise ValueError(f"dataset {dataset!r}: the reader returned no records ({problems!r})")
  num_classes = len(classes)
  work_dir = os.path.join(os.path.dirname(final_dir), f".incomplete-{VERSION}")
  os.makedirs(os.path.join(work_dir, SIDECARS), exist_ok=True)
  # skip_bad is not part of the plan: a build stopped by a bad image resumes with --skip_bad.
  plan = dict(dataset=dataset, image_size=image_size, uncertainty=uncertainty,
              frontal_only=frontal_only, shard_size=shard_size, min_shards=min_shards,
              png_compression=png_compression,
              fingerprint=fingerprint(by_split, image_size, num_classes))
  plan_path = os.path.join(work_dir, PLAN_FILE)
  if os.path.exists(plan_path):
    with open(plan_path) as f:
      previous = json.load(f)
    if previous != plan:
      raise ValueError(f"{work_dir} holds an unfinished build of different records or options "
                       f"({previous} vs now {plan}); delete that folder to start over")
  else:
    _atomic_json(plan_path, plan)
  for name in os.listdir(work_dir):  # leftovers of a killed build (files.TEMP_PREFIX)
    if name.startswith(files.TEMP_PREFIX):
      os.remove(os.path.join(work_dir, name))

  shards = plan_shards({s: len(v) for s, v in by_split.items()}, dataset, shard_size,
                       min_shards)
  todo = [s for s in shards if not os.path.exists(os.path.join(work_dir, s.name))]
  tasks = [(work_dir, s, by_split[s.split][s.start:s.stop], image_size, num_classes, skip_bad,
            png_compression) for s in todo]
  bar = _progress(sum(s.stop - s.start for s in shards), f"cxr-prepare {dataset} {image_size}px",
                  progress)
  if bar is not None:
    bar.update(sum(s.stop - s.start for s in shards) - sum(len(t[2]) for t in tasks))
  try:
    if workers <= 1 or len(tasks) <= 1:
      for task in tasks:
        write_shard(task)
        if bar is not None:
          bar.update(len(task[2]))
    else:
      # spawn: the caller may hold JAX / threads that must not be forked.
      context = multiprocessing.get_context("spawn")
      with context.Pool(min(workers, len(tasks))) as pool:
        for result in pool.imap_unordered(write_shard, tasks):
          if bar is not None:
            bar.update(len(result["ids"]) + len(result["skipped"]))
  finally:
    if bar is not None:
      bar.close()
  return _finish(dataset, by_split, shards, problems, label_space, work_dir, final_dir,
                 image_size, dict(plan, skip_bad=skip_bad))


def _finish(dataset, by_split, shards, problems, label_space, work_dir, final_dir, image_size,
            plan) -> str:
  """Verifies every shard against the records, writes index, report, metadata; renames."""
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  index: dict[str, dict[str, list]] = {}
  report = records_lib.Problems(skip_bad=True)
  report.entries = list(problems.entries)
  split_infos = []
  for split, recs in by_split.items():
    lengths, ids, skipped = [], [], []
    for shard in (s for s in shards if s.split == split):
      with open(os.path.join(work_dir, SIDECARS, shard.name + ".json")) as f:
        side = json.load(f)
      reader = array_record_module.ArrayRecordReader(os.path.join(work_dir, shard.name))
      stored = reader.num_records()
      reader.close()
      skipped_ids = {e["id"] for e in side["skipped"]}
      expected = [r.id for r in recs[shard.start:shard.stop] if r.id not in skipped_ids]
      if stored != len(side["ids"]) or side["ids"] != expected:
        raise RuntimeError(f"{shard.name}: holds {stored} examples, its sidecar lists "
                           f"{len(side['ids'])} (+{len(skipped_ids)} skipped), the plan "
                           f"{len(expected)} others: delete {work_dir} and prepare again")
      lengths.append(stored)
      ids += side["ids"]
      skipped += side["skipped"]
    if skipped and not plan["skip_bad"]:
      raise records_lib.BadInput(
          f"{skipped[0]['reason']}: skipped by an earlier --skip_bad run of this build; run "
          f"with --skip_bad again, or delete {work_dir} to start over")
    report.entries += skipped
    by_id = {r.id: r for r in recs}
    kept = [by_id[i] for i in ids]
    index[split] = dict(image_id=ids, patient_id=[r.patient_id for r in kept],
                        num_boxes=[int(len(r.box_labels)) for r in kept],
                        **layout.index_columns((r.labels, r.label_mask, r.box_labels, r.gaze)
                                               for r in kept))
    split_infos.append(tfds.core.SplitInfo(name=split, shard_lengths=lengths, num_bytes=sum(
        os.path.getsize(os.path.join(work_dir, s.name)) for s in shards if s.split == split)))
  classes = label_space.classes
  payload = dict(dataset=dataset, label_space=label_space.name, classes=list(classes),
                 image_size=image_size,
                 options={k: plan[k] for k in ("uncertainty", "frontal_only", "skip_bad")},
                 splits=index)
  _atomic_json(os.path.join(work_dir, INDEX_FILE), payload)
  report.write(os.path.join(work_dir, REPORT_FILE))
  template = tfds.core.ShardedFileTemplate(
      data_dir=work_dir, template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
      dataset_name=tfds_name(dataset), filetype_suffix="array_record")
  tfds.folder_dataset.write_metadata(
      data_dir=work_dir, features=features(len(classes), image_size), split_infos=split_infos,
      version=VERSION, filename_template=template, check_data=False,
      description=f"cxr_jax prepared {dataset} at {image_size}px ({plan['uncertainty']} "
                  f"uncertainty, frontal_only={plan['frontal_only']})")
  os.replace(work_dir, final_dir)   # the dataset appears complete, at once
  shutil.rmtree(os.path.join(final_dir, SIDECARS))
  os.remove(os.path.join(final_dir, PLAN_FILE))
  return final_dir


def read_records(dataset: str, manual_dir: str, *, uncertainty: str = "zeros",
                 frontal_only: bool = True, skip_bad: bool = False, **reader_kwargs
                 ) -> tuple[list[records_lib.Record], records_lib.Problems, schema.LabelSpace]:
  """The dataset's reader on ``manual_dir`` -> (records, problems, label space).

  The reader checks the files (missing image, bad row, unknown label, box
  outside the image, duplicated id): with ``skip_bad`` such rows are skipped
  and listed in ``problems``, else the first raises naming file and row.
  """
  reader = reader_module(dataset)
  recs, problems = reader.read(manual_dir, uncertainty=uncertainty, frontal_only=frontal_only,
                               skip_bad=skip_bad, **reader_kwargs)
  return recs, problems, schema.get_label_space(reader.LABEL_SPACE)


def prepare(dataset: str, manual_dir: str, data_dir: str, image_size: int, *,
            uncertainty: str = "zeros", frontal_only: bool = True, workers: int = 1,
            skip_bad: bool = False, shard_size: int = DEFAULT_SHARD_SIZE,
            png_compression: int = PNG_COMPRESSION, progress: bool = True, **reader_kwargs) -> str:
  """``read_records`` then ``prepare_records``: returns the finished folder (``dataset_dir``)."""
  recs, problems, space = read_records(dataset, manual_dir, uncertainty=uncertainty,
                                       frontal_only=frontal_only, skip_bad=skip_bad,
                                       **reader_kwargs)
  return prepare_records(dataset, recs, problems, space, data_dir, image_size,
                         uncertainty=uncertainty, frontal_only=frontal_only, workers=workers,
                         skip_bad=skip_bad, shard_size=shard_size,
                         png_compression=png_compression, progress=progress)
