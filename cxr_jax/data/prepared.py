"""Prepared real datasets: resized images + annotations in TFDS ArrayRecord shards.

``prepare(dataset, manual_dir, data_dir, image_size)`` (the ``cxr-prepare``
command) reads an official download with its reader
(``cxr_jax.data.sources.<dataset>``), resizes every image once to
``image_size`` x ``image_size`` uint8 gray, PNG-encodes it and writes it with
its annotations as ``tfds.features`` examples into ArrayRecord shards, in
parallel over CPU cores. ``make_source(data_config, split)`` reads it back
with ``StoredExamples`` (array_record and the pure-Python Example parser of
``example_proto``: neither TensorFlow nor TFDS is imported at training time;
``tfds.builder_from_directory(...).as_data_source`` reads the same folder) and
cuts our patient-level splits on top of the official ones.

Layout (TFDS's, so ``tfds.builder_from_directory`` and the builders of
``cxr_jax.data.tfds`` agree)::

  DATA_DIR/cxr_<dataset>/<config>/<VERSION>/
    cxr_<dataset>-<split>.array_record-00000-of-000NN   shards per official split
    dataset_info.json, features.json                    TFDS metadata
    cxr_index.json      per split: image_id, patient_id, num_boxes (no image reading
                        is needed to cut splits)
    prepare_report.json rows the reader left out and images skipped (--skip_bad),
                        with counts per reason (``records.Problems`` format)

``<config>`` is ``config_name(image_size, uncertainty, frontal_only)``: the
size, e.g. ``256``, with ``_u<policy>`` / ``_allviews`` appended when the
uncertainty policy is not 'zeros' or lateral views are kept. Official splits
are stored as 'train', 'val', 'test' where the dataset has them (NIH:
train_val -> 'train', test; CheXpert: train, valid -> 'val'; MIMIC: train,
validate -> 'val', test); a dataset without any (EGD) is stored whole as 'train'.

Building is resumable and atomic: shards go to
``<config>/.incomplete-<VERSION>/`` (each written to a ``.tmp`` name, then
renamed, with a sidecar listing the ids it holds), a restarted build skips
the shards already there, and only when every shard is verified against the
records are the index, report and TFDS metadata written and the folder
renamed to ``<VERSION>``: a dataset that looks complete is complete.

Reading (``open_prepared``): DATA_DIR is ``data.data_dir``; the stored size
is ``data.prepared_size``, or by default ``data.image_size`` when prepared,
else the smallest larger prepared size (the pipeline resizes). Without a
data_dir but with ``data.manual_dir``, the official download is read directly
(``ReaderSource``: every access decodes the original file; for small data).

Splits at read time (``split_indices``): when no image of the official train
split is present (the NIH sample), all images are split by patient
(data.val_fraction / data.test_fraction); otherwise 'test' = the official test split
(else the official validation split, else a patient-level
``data.test_fraction``); 'val' = the official validation split when an official
test split exists too, else a patient-level ``data.val_fraction`` of the
official train patients; 'train' = the rest of official train. With
``data.cv.num_folds > 0``, 'train' / 'test' become one fold of
``splits.cv_split`` over the boxed images (of any official split) plus the
unboxed official-train images, 'val' unchanged and excluded from the folds
(when it is empty, as on the NIH sample whose images are all in the official
test split, 'val' is a patient-level ``data.val_fraction`` of the fold's train).
'annotated_<part>' / 'unannotated_<part>' are the images of a part with /
without boxes. Every split is cut by patient, never by image.

Label spaces: a dataset is stored in its reader's label space (class names in
``cxr_index.json``); when ``data.label_space`` differs, labels and box labels
are mapped by class name (``schema.map_labels``: classes without a
counterpart are masked out, boxes of such classes dropped). NIH-14 vs
CheXpert-14 (``schema.label_mapping``):

  NIH-14              CheXpert-14
  Atelectasis         Atelectasis
  Cardiomegaly        Cardiomegaly
  Effusion            Pleural Effusion
  Pneumonia           Pneumonia
  Pneumothorax        Pneumothorax
  Consolidation       Consolidation
  Edema               Edema
  Infiltration, Mass, Nodule, Emphysema, Fibrosis, Pleural_Thickening, Hernia:
                      no CheXpert counterpart (masked)
  -                   No Finding, Enlarged Cardiomediastinum, Lung Opacity,
                      Lung Lesion, Pleural Other, Fracture, Support Devices:
                      no NIH counterpart (masked)
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import json
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from cxr_jax.data import example_proto, schema, splits
from cxr_jax.data.sources import records as records_lib

VERSION = "1.0.0"
SPLITS = ("train", "val", "test")
DATASETS = ("nih", "chexpert", "mimic", "reflacx", "egd")
# The annotation fields a part of a joined data.name can keep ("egd:gaze+reflacx:boxes").
ANNOTATION_FIELDS = ("gaze", "boxes")
INDEX_FILE = "cxr_index.json"
REPORT_FILE = "prepare_report.json"
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
# Official split names of the readers -> stored split names.
_OFFICIAL = {"train": "train", "val": "val", "test": "test", "": "train"}


def tfds_name(dataset: str) -> str:
  return f"cxr_{dataset}"


def config_name(image_size: int, uncertainty: str = "zeros", frontal_only: bool = True) -> str:
  """'256', '256_uones', '512_uignore_allviews', ...: one folder per reader option set."""
  name = str(int(image_size))
  if uncertainty != "zeros":
    name += f"_u{uncertainty}"
  if not frontal_only:
    name += "_allviews"
  return name


def dataset_dir(data_dir: str, dataset: str, image_size: int, uncertainty: str = "zeros",
                frontal_only: bool = True) -> str:
  """The finished dataset's folder DATA_DIR/cxr_<dataset>/<config>/<VERSION>."""
  return os.path.join(data_dir, tfds_name(dataset),
                      config_name(image_size, uncertainty, frontal_only), VERSION)


def prepare_command(dataset: str, image_size: int, data_dir: str = "DATA_DIR",
                    uncertainty: str = "zeros", frontal_only: bool = True) -> str:
  """The cxr-prepare command line that builds ``dataset_dir(...)``."""
  command = (f"cxr-prepare --dataset={dataset} --manual_dir=<official download> "
             f"--data_dir={data_dir} --image_size={image_size}")
  if uncertainty != "zeros":
    command += f" --uncertainty={uncertainty}"
  if not frontal_only:
    command += " --all_views"
  if dataset in ("reflacx", "egd"):
    command += " --mimic_dir=<MIMIC-CXR-JPG download>"
  return command


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


def reader_module(dataset: str):
  if dataset not in DATASETS:
    raise KeyError(f"unknown dataset {dataset!r}; known: {list(DATASETS)}")
  return importlib.import_module(f"cxr_jax.data.sources.{dataset}")


def stored_split(record: records_lib.Record) -> str:
  try:
    return _OFFICIAL[record.official_split]
  except KeyError:
    raise records_lib.BadInput(f"record {record.id!r} ({record.path}): unknown official split "
                               f"{record.official_split!r}") from None


# ----------------------------------------------------------------------------
# Writing.

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
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".json")
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(payload, f)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


@functools.lru_cache(maxsize=4)
def _features_cached(num_classes: int, image_size: int):
  return features(num_classes, image_size)


def write_shard(task: tuple) -> dict:
  """Writes one shard (runs in a worker process): temp file, sidecar, then rename.

  Args:
    task: (work_dir, shard, records of the shard, image_size, num_classes, skip_bad,
      png_compression).
  Returns:
    {'name', 'split', 'ids': written ids, 'skipped': [problem entries]}.
  """
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  work_dir, shard, recs, image_size, num_classes, skip_bad, png_compression = task
  feats = _features_cached(num_classes, image_size)
  final = os.path.join(work_dir, shard.name)
  tmp = os.path.join(work_dir, f".tmp-{shard.name}-{os.getpid()}")
  ids, skipped = [], []
  writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
  try:
    for r in recs:
      try:
        encoded = encode_record(r, image_size, png_compression)
      except records_lib.BadInput as e:
        if not skip_bad:
          raise records_lib.BadInput(f"{e}; split {shard.split!r}, shard {shard.name}") from None
        skipped.append(dict(kind="bad", file=r.path, row=None, reason=str(e), id=r.id))
        continue
      writer.write(feats.serialize_example(encoded))
      ids.append(r.id)
    writer.close()
    writer = None
    result = dict(name=shard.name, split=shard.split, ids=ids, skipped=skipped)
    _atomic_json(os.path.join(work_dir, SIDECARS, shard.name + ".json"), result)
    os.replace(tmp, final)
  finally:
    if writer is not None:
      writer.close()
    if os.path.exists(tmp):
      os.remove(tmp)
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
  for name in os.listdir(work_dir):  # leftovers of a killed build
    if name.startswith(".tmp-"):
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
                        num_boxes=[int(len(r.box_labels)) for r in kept])
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


# ----------------------------------------------------------------------------
# Reading.

def assemble_example(image: np.ndarray, fields: dict, stored: schema.LabelSpace,
                     target: schema.LabelSpace, origin: str) -> schema.Example:
  """A stored example's fields -> ``schema.Example`` in label space ``target``.

  Args:
    image: uint8 [H, W].
    fields: labels / label_mask float32 [K_stored], boxes float32 [B, 4],
      box_labels int32 [B], gaze float32 [F, 3], patient_id, image_id (str).
    stored, target: label spaces; classes are matched by name
      (``schema.label_mapping``), boxes of classes without a counterpart dropped.
  """
  labels, mask = fields["labels"], fields["label_mask"]
  boxes = np.asarray(fields["boxes"], np.float32).reshape(-1, 4)
  box_labels = np.asarray(fields["box_labels"], np.int64).reshape(-1)
  if stored.classes != target.classes:
    mapping = schema.label_mapping(stored, target)
    labels, mask = schema.map_labels(labels, mask, stored, target)
    to_target = np.full(len(stored), -1, np.int64)
    to_target[mapping[mapping >= 0]] = np.flatnonzero(mapping >= 0)
    box_labels = to_target[box_labels]
    boxes, box_labels = boxes[box_labels >= 0], box_labels[box_labels >= 0]
  boxes, box_labels = schema.pad_boxes(boxes, box_labels.astype(np.int32), origin)
  return {
      "image": image,
      "labels": np.asarray(labels, np.float32),
      "label_mask": np.asarray(mask, np.float32),
      "boxes": boxes,
      "box_labels": box_labels,
      "gaze": schema.pad_gaze(fields["gaze"], origin),
      "patient_id": fields["patient_id"],
      "image_id": fields["image_id"],
  }


class StoredExamples:
  """The raw examples of a prepared folder, read from its ArrayRecord shards without TFDS.

  ``stored[i]`` (i over the stored splits in ``SPLITS`` order, each split's
  shards in order: TFDS' numbering) is what
  ``tfds.builder_from_directory(folder).as_data_source(split,
  decoders={'image': tfds.decode.SkipDecoding()})[local]`` returns: Tensor
  features as numpy arrays, Text and the encoded image as bytes
  (``example_proto``). Shard names and lengths come from ``dataset_info.json``,
  the features from ``features.json``. Shards open lazily (also after
  pickling into Grain workers); a missing, truncated or corrupt shard or
  record raises ``schema.ExampleError`` naming the shard file and record.
  """

  def __init__(self, folder: str):
    self.folder = folder
    info_path = os.path.join(folder, "dataset_info.json")
    with open(info_path) as f:
      info = json.load(f)
    if info.get("fileFormat", "tfrecord") != "array_record":
      raise ValueError(f"{info_path}: shards are {info.get('fileFormat', 'tfrecord')!r}, this "
                       f"reader reads 'array_record' (cxr-prepare, or tfds build "
                       f"--file_format=array_record)")
    self.name = info["name"]
    self.fields = example_proto.read_features(os.path.join(folder, "features.json"))
    by_name = {s["name"]: s for s in info.get("splits", ())}
    self.splits = [s for s in SPLITS if s in by_name]
    self.paths, lengths, self.split_lengths = [], [], {}
    for split in self.splits:
      shard_lengths = [int(n) for n in by_name[split].get("shardLengths", ())]
      self.split_lengths[split] = sum(shard_lengths)
      template = by_name[split].get("filepathTemplate",
                                    "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}")
      for i, length in enumerate(shard_lengths):
        name = (template.replace("{DATASET}", self.name).replace("{SPLIT}", split)
                .replace("{FILEFORMAT}", "array_record")
                .replace("{SHARD_X_OF_Y}", f"{i:05d}-of-{len(shard_lengths):05d}"))
        if "{" in name:
          raise ValueError(f"{info_path}: split {split!r} has file template {template!r}; "
                           f"readable: {{DATASET}} {{SPLIT}} {{FILEFORMAT}} {{SHARD_X_OF_Y}}")
        self.paths.append(os.path.join(folder, name))
        lengths.append(length)
    self.starts = np.cumsum([0] + lengths)   # first example of each shard; the total last
    self._readers = {}

  def __getstate__(self):
    return {**self.__dict__, "_readers": {}}

  def __len__(self) -> int:
    return int(self.starts[-1])

  def _reader(self, shard: int):
    from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
    path = self.paths[shard]
    if not os.path.isfile(path):
      raise schema.ExampleError(f"{path}: shard file missing (listed in {self.folder}/"
                                f"dataset_info.json; prepare again)")
    reader = array_record_module.ArrayRecordReader(path, "readahead_buffer_size:0",
                                                   file_reader_buffer_size=32768)
    expected = int(self.starts[shard + 1] - self.starts[shard])
    if not reader.ok() or reader.num_records() != expected:
      state = "unreadable" if not reader.ok() else f"holds {reader.num_records()} records"
      raise schema.ExampleError(f"{path}: {state}, dataset_info.json says {expected} "
                                f"(truncated or corrupt shard: prepare again)")
    self._readers[shard] = reader
    return reader

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range [0, {len(self)}) of {self.folder}")
    shard = int(np.searchsorted(self.starts, index, side="right") - 1)
    record = index - int(self.starts[shard])
    reader = self._readers.get(shard) or self._reader(shard)
    try:
      data = reader.read([record])[0]
      return example_proto.decode_features(example_proto.parse_example(data), self.fields)
    except (RuntimeError, ValueError) as e:
      raise schema.ExampleError(f"{self.paths[shard]} record {record}: {e}") from e


def locate(offsets: np.ndarray, index: int, source: Any) -> tuple[int, int]:
  """(part, index within it) of ``index`` over parts starting at ``offsets`` (cumulative
  sizes, leading 0); IndexError naming ``source`` outside [0, offsets[-1])."""
  if not 0 <= index < offsets[-1]:
    raise IndexError(f"index {index} out of range [0, {offsets[-1]}) of {source!r}")
  part = int(np.searchsorted(offsets, index, side="right") - 1)
  return part, index - int(offsets[part])


class PreparedSource:
  """Random access over all stored splits of a prepared dataset (train, then val, then test).

  ``source[i]`` is a ``schema.Example`` (image decoded to uint8 [S, S], boxes
  and gaze padded) in the label space ``label_space`` (mapped by name from the
  stored one). Attributes from the index, no image read: ``patient_ids``,
  ``official_splits``, ``image_ids`` (str [N]), ``num_boxes`` (int [N]).
  Examples are read by ``StoredExamples`` (no TensorFlow / TFDS import).
  """

  def __init__(self, folder: str, label_space: schema.LabelSpace | None = None):
    self.folder = folder
    index = load_index(folder)
    self.dataset = index["dataset"]
    self.image_size = index["image_size"]
    self.stored_space = schema.LabelSpace(index["label_space"], tuple(index["classes"]))
    self.label_space = label_space or self.stored_space
    self.splits = [s for s in SPLITS if s in index["splits"]]
    parts = [index["splits"][s] for s in self.splits]
    self.image_ids = np.array([i for p in parts for i in p["image_id"]], dtype=str)
    self.patient_ids = np.array([i for p in parts for i in p["patient_id"]], dtype=str)
    self.num_boxes = np.array([n for p in parts for n in p["num_boxes"]], dtype=np.int64)
    self.official_splits = np.repeat(self.splits, [len(p["image_id"]) for p in parts])
    self.offsets = np.cumsum([0] + [len(p["image_id"]) for p in parts])
    self.stored = StoredExamples(folder)
    indexed = {s: len(p["image_id"]) for s, p in zip(self.splits, parts)}
    if indexed != self.stored.split_lengths:
      raise ValueError(f"{folder}: {INDEX_FILE} lists {indexed} images per split, "
                       f"dataset_info.json {self.stored.split_lengths} (prepare again)")

  def __len__(self) -> int:
    return len(self.image_ids)

  def __repr__(self) -> str:
    return f"PreparedSource({self.folder}, {len(self)} images)"

  def __getitem__(self, index: int) -> schema.Example:
    index = int(index)
    part, local = locate(self.offsets, index, self)
    split = self.splits[part]
    raw = self.stored[index]
    origin = f"{self.folder} split {split!r} example {local}"
    fields = dict(raw, image_id=raw["image_id"].decode(), patient_id=raw["patient_id"].decode())
    if fields["image_id"] != self.image_ids[index]:
      raise schema.ExampleError(f"{origin}: holds image {fields['image_id']!r}, the index says "
                                f"{self.image_ids[index]!r} (a corrupted dataset: prepare again)")
    image = cv2.imdecode(np.frombuffer(raw["image"], np.uint8), cv2.IMREAD_GRAYSCALE)
    if image is None:
      raise schema.ExampleError(f"{origin}: undecodable PNG image")
    return assemble_example(image, fields, self.stored_space, self.label_space, origin)


class JoinedSource:
  """Several datasets as one (data.name 'A+B'): their images one after the other, with the
  index attributes of ``PreparedSource`` concatenated. ``make_source`` then splits the union
  by patient, so a patient in two of the datasets lands in one split.

  ``kept``: per part, the annotation fields ('gaze', 'boxes') its examples keep (None: all);
  the others are emptied, e.g. 'egd:gaze+reflacx:boxes' (van Sonsbeek Table 1: EGD-CXR gaze
  and REFLACX boxes, not REFLACX's gaze). A part without boxes counts 0 boxes in ``num_boxes``.
  """

  def __init__(self, sources: Sequence[PreparedSource | ReaderSource],
               kept: Sequence[frozenset[str] | None] | None = None):
    self.sources = list(sources)
    self.kept = list(kept) if kept is not None else [None] * len(self.sources)
    self.offsets = np.cumsum([0] + [len(s) for s in self.sources])
    joined = lambda attr: np.concatenate([getattr(s, attr) for s in self.sources])
    self.image_ids, self.patient_ids = joined("image_ids"), joined("patient_ids")
    self.official_splits = joined("official_splits")
    self.num_boxes = np.concatenate([
        s.num_boxes if k is None or "boxes" in k else np.zeros_like(s.num_boxes)
        for s, k in zip(self.sources, self.kept)])
    self.splits = [s for s in SPLITS if s in set(self.official_splits.tolist())]

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def __repr__(self) -> str:
    names = [repr(s) if k is None else f"{s!r} keeping {'+'.join(sorted(k)) or 'no annotations'}"
             for s, k in zip(self.sources, self.kept)]
    return f"JoinedSource({' + '.join(names)})"

  def __getitem__(self, index: int) -> schema.Example:
    part, local = locate(self.offsets, int(index), self)
    example, kept = self.sources[part][local], self.kept[part]
    if kept is None:
      return example
    example = dict(example)
    if "gaze" not in kept:
      example["gaze"] = schema.empty_gaze()
    if "boxes" not in kept:
      example["boxes"], example["box_labels"] = schema.empty_boxes()
    return example


class ReaderSource:
  """The official download read directly (no cxr-prepare): every access decodes the original file.

  Same interface as ``PreparedSource``; for small data (e.g. the NIH sample)
  and quick checks. NIH rows whose image is absent are left out
  (``only_present``) and counted in ``problems``.
  """

  def __init__(self, dataset: str, manual_dir: str, image_size: int,
               label_space: schema.LabelSpace, **reader_kwargs):
    reader = reader_module(dataset)
    if dataset == "nih":
      reader_kwargs["only_present"] = True
    self.records, self.problems = reader.read(manual_dir, **reader_kwargs)
    if not self.records:
      raise ValueError(f"{dataset} reader found no images in {manual_dir} ({self.problems!r})")
    self.records.sort(key=lambda r: SPLITS.index(stored_split(r)))   # stable: train, val, test
    self.dataset, self.manual_dir, self.image_size = dataset, manual_dir, image_size
    self.stored_space = schema.get_label_space(reader.LABEL_SPACE)
    self.label_space = label_space
    self.image_ids = np.array([r.id for r in self.records], dtype=str)
    self.patient_ids = np.array([r.patient_id for r in self.records], dtype=str)
    self.num_boxes = np.array([len(r.box_labels) for r in self.records], np.int64)
    self.official_splits = np.array([stored_split(r) for r in self.records], dtype=str)

  def __len__(self) -> int:
    return len(self.records)

  def __repr__(self) -> str:
    return f"ReaderSource({self.dataset}: {self.manual_dir}, {len(self)} images)"

  def __getitem__(self, index: int) -> schema.Example:
    r = self.records[int(index)]
    fields = dict(labels=r.labels, label_mask=r.label_mask, boxes=r.boxes,
                  box_labels=r.box_labels, gaze=r.gaze, patient_id=r.patient_id, image_id=r.id)
    origin = f"{r.path} (record {r.id!r})"
    return assemble_example(records_lib.load_gray(r.path, self.image_size), fields,
                            self.stored_space, self.label_space, origin)


@functools.lru_cache(maxsize=4)
def load_index(folder: str) -> dict:
  """``cxr_index.json`` of a prepared folder (``scan_index`` when absent); cached per folder."""
  path = os.path.join(folder, INDEX_FILE)
  if not os.path.isfile(path):
    return scan_index(folder)
  with open(path) as f:
    return json.load(f)


def scan_index(folder: str) -> dict:
  """The ``cxr_index.json`` payload of a dataset built by ``tfds build`` (which writes none).

  Reads every example's annotations (``StoredExamples``: images are not
  decoded, but are read from disk): cxr-prepare's index makes this unnecessary.
  """
  stored = StoredExamples(folder)
  dataset = stored.name.removeprefix("cxr_")
  space = reader_module(dataset).LABEL_SPACE
  space = schema.get_label_space(space) if isinstance(space, str) else space
  index, start = {}, 0
  for split in stored.splits:
    rows = [stored[i] for i in range(start, start + stored.split_lengths[split])]
    start += len(rows)
    index[split] = dict(image_id=[r["image_id"].decode() for r in rows],
                        patient_id=[r["patient_id"].decode() for r in rows],
                        num_boxes=[int(len(r["box_labels"])) for r in rows])
  return dict(dataset=dataset, label_space=space.name, classes=list(space.classes),
              image_size=stored.fields["image"].shape[0], splits=index)


def split_indices(patient_ids: np.ndarray, official_splits: np.ndarray, has_boxes: np.ndarray,
                  data_config: Any) -> dict[str, np.ndarray]:
  """Patient-level 'train', 'val', 'test' (int64 indices) on top of the official splits.

  See the module docstring. Uses data.val_fraction, data.test_fraction,
  data.split_seed and data.cv (num_folds, fold, unannotated_fraction).
  Raises ValueError if two parts share a patient.
  """
  ids = np.asarray(patient_ids, dtype=str)
  official = np.asarray(official_splits, dtype=str)
  has_boxes = np.asarray(has_boxes, bool)
  seed = data_config.get("split_seed", 0)
  present = set(official.tolist())
  everything = np.arange(len(ids))
  train_pool = np.flatnonzero(official == "train")
  val_frac, test_frac = data_config.val_fraction, data_config.test_fraction
  if not len(train_pool):
    # No image of the official train split is here (e.g. the NIH sample: every image is in
    # the official test list): patient-level train / val / test over all of them.
    from absl import logging  # pylint: disable=import-outside-toplevel
    logging.warning("no image of the official train split is present: splitting all %d images "
                    "by patient (data.val_fraction, data.test_fraction)", len(ids))
    train_pool, present = everything, set()
  if "test" in present and "val" in present:
    test, val, train = (np.flatnonzero(official == s) for s in ("test", "val", "train"))
  elif present & {"test", "val"}:
    test = np.flatnonzero(official == ("test" if "test" in present else "val"))
    cut = splits.patient_split(ids[train_pool], {"train": 1 - val_frac, "val": val_frac}, seed)
    val, train = train_pool[cut["val"]], train_pool[cut["train"]]
  else:
    cut = splits.patient_split(ids[train_pool], {"train": 1 - val_frac - test_frac,
                                                 "val": val_frac, "test": test_frac}, seed)
    train, val, test = (train_pool[cut[s]] for s in ("train", "val", "test"))
  parts = {"train": train, "val": val, "test": test}
  cv = data_config.get("cv")
  if cv is not None and cv.num_folds > 0:
    val_patients = np.isin(ids, ids[val])
    subset = everything[~val_patients & (has_boxes | np.isin(everything, train))]
    fold = splits.cv_split(ids[subset], has_boxes[subset], cv.num_folds, cv.fold,
                           cv.unannotated_fraction, seed)
    train = np.sort(subset[np.concatenate([fold["annotated_train"], fold["unannotated_train"]])])
    if not len(val):  # e.g. the NIH sample: every image is boxed and in the official test
      cut = splits.patient_split(ids[train], {"train": 1 - val_frac, "val": val_frac}, seed)
      val, train = train[cut["val"]], train[cut["train"]]
    parts = {"train": train, "val": val, "test": subset[fold["test"]]}
  splits.assert_patient_disjoint(parts, ids)
  return parts


def prepared_sizes(data_dir: str, dataset: str, uncertainty: str = "zeros",
                   frontal_only: bool = True) -> list[int]:
  """Sorted image sizes of the finished prepared datasets with these reader options."""
  root = os.path.join(data_dir, tfds_name(dataset))
  sizes = []
  for name in os.listdir(root) if os.path.isdir(root) else ():
    size = name.split("_")[0]
    if (size.isdigit() and name == config_name(int(size), uncertainty, frontal_only)
        and os.path.isfile(os.path.join(root, name, VERSION, "dataset_info.json"))):
      sizes.append(int(size))
  return sorted(sizes)


def _read_directly(dataset: str, manual_dir: str, image_size: int, label_space: str,
                   uncertainty: str, frontal_only: bool, mimic_dir: str) -> ReaderSource:
  from absl import logging  # pylint: disable=import-outside-toplevel
  kwargs = dict(mimic_dir=mimic_dir) if dataset in ("reflacx", "egd") else {}
  source = ReaderSource(dataset, manual_dir, image_size, schema.get_label_space(label_space),
                        uncertainty=uncertainty, frontal_only=frontal_only, **kwargs)
  logging.warning("%r: reading the original files at every access (data.data_dir is not set; "
                  "cxr-prepare is much faster); rows left out: %s", source,
                  source.problems.counts())
  return source


_read_directly_cached = functools.lru_cache(maxsize=2)(_read_directly)


def dataset_and_kept(part: str, name: str = "") -> tuple[str, frozenset[str] | None]:
  """One '+'-separated part of data.name ``name``: 'DATASET' (every annotation it has) or
  'DATASET:KIND', KIND 'gaze' | 'boxes' (the annotation its examples keep). KeyError naming
  data.name for an empty part or an unknown KIND."""
  dataset, colon, kind = part.partition(":")
  if not dataset or (colon and kind not in ANNOTATION_FIELDS):
    raise KeyError(f"data.name={name or part!r}: join distinct prepared datasets with '+', each "
                   f"'DATASET' or 'DATASET:KIND', KIND one of {list(ANNOTATION_FIELDS)}")
  return dataset, frozenset({kind}) if kind else None


def open_prepared(data_config: Any) -> PreparedSource | ReaderSource | JoinedSource:
  """The dataset named by ``data_config`` (data.name, data_dir, image_size, ...); a name
  'A+B' opens each dataset with the same fields and joins them (``JoinedSource``), a part
  'A:KIND' keeping only annotation KIND ('gaze' | 'boxes').

  Reads DATA_DIR = ``data.data_dir``: the stored size is ``data.prepared_size``,
  or when 0 ``data.image_size`` if prepared, else the smallest larger prepared
  size. With no data_dir but ``data.manual_dir`` set, reads the official
  download directly (``ReaderSource``, slow). Neither set raises ValueError, a
  missing or unfinished dataset FileNotFoundError, both naming data.data_dir
  and the cxr-prepare command.
  """
  for key in ("data_dir", "uncertainty", "frontal_only"):
    if key not in data_config:
      raise KeyError(f"config.data.{key} is missing (configs/common.py base_config sets it)")
  name = data_config.name
  if "+" in name or ":" in name:
    names_kept = [dataset_and_kept(part, name) for part in name.split("+")]
    names = [n for n, _ in names_kept]
    if len(set(names)) != len(names):
      raise KeyError(f"data.name={name!r}: join distinct prepared datasets with '+'")
    parts = []
    for part_name in names:
      part = data_config.copy_and_resolve_references()
      with part.unlocked():
        part.name = part_name
      parts.append(open_prepared(part))
    return JoinedSource(parts, [kept for _, kept in names_kept])
  reader_module(name)  # registers the dataset's own label space (e.g. 'reflacx') in schema
  options = dict(uncertainty=data_config.uncertainty, frontal_only=data_config.frontal_only)
  data_dir, manual_dir = data_config.data_dir, data_config.get("manual_dir", "")
  size = data_config.get("prepared_size", 0)
  if not size:
    larger = [s for s in (prepared_sizes(data_dir, name, **options) if data_dir else ())
              if s >= data_config.image_size]
    size = larger[0] if larger else data_config.image_size
  command = prepare_command(name, size, data_dir or "DATA_DIR", **options)
  if not data_dir:
    if manual_dir:
      return _read_directly_cached(name, manual_dir, data_config.image_size,
                                   data_config.label_space, data_config.uncertainty,
                                   data_config.frontal_only, data_config.get("mimic_dir", ""))
    raise ValueError(
        f"data.name={name!r} reads a prepared dataset from config.data.data_dir, which is not "
        f"set (nor data.manual_dir): prepare it once with\n  {command}\nthen pass "
        f"--config.data.data_dir=DATA_DIR")
  folder = dataset_dir(data_dir, name, size, **options)
  if not os.path.isfile(os.path.join(folder, "dataset_info.json")):
    unfinished = os.path.isdir(os.path.join(os.path.dirname(folder), f".incomplete-{VERSION}"))
    state = "an unfinished build (run the command again to resume it)" if unfinished else "nothing"
    raise FileNotFoundError(
        f"config.data.data_dir={data_dir!r} holds no prepared {name!r} dataset at {folder} "
        f"({state}; image size from data.prepared_size or data.image_size, options from "
        f"data.uncertainty / data.frontal_only); build it with\n  {command}")
  return PreparedSource(folder, schema.get_label_space(data_config.label_space))


def make_source(data_config: Any, split: str):
  """The ``pipeline.SplitSource`` of ``split`` of a prepared real dataset.

  Splits: 'train', 'val', 'test' (``split_indices``) and 'annotated_<part>' /
  'unannotated_<part>' (the images of the part with / without boxes). Boxes
  are kept wherever an image has them (has_boxes 1).
  """
  from cxr_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  subset, _, part = split.rpartition("_")
  if part not in SPLITS or subset not in ("", "annotated", "unannotated"):
    raise KeyError(f"unknown split {split!r} of data.name={data_config.name!r}; known: "
                   f"{list(SPLITS)}, 'annotated_<part>', 'unannotated_<part>'")
  source = open_prepared(data_config)
  has_boxes = source.num_boxes > 0
  chosen = split_indices(source.patient_ids, source.official_splits, has_boxes,
                         data_config)[part]
  if subset:
    chosen = chosen[has_boxes[chosen] == (subset == "annotated")]
  if not len(chosen):
    raise ValueError(
        f"split {split!r} of {source!r} is empty (official splits "
        f"{ {s: int((source.official_splits == s).sum()) for s in source.splits} }, "
        f"{int(has_boxes.sum())} images with boxes; see data.val_fraction, data.test_fraction, "
        f"data.cv)")
  return pipeline.SplitSource(source, chosen, has_boxes[chosen],
                              f"{data_config.name}/{split}: {source!r}")
