"""Reading prepared real datasets: the ArrayRecord shards of ``cxr-prepare`` (``shards``).

``make_source(data_config, split)`` reads a prepared dataset back with
``StoredExamples`` (array_record and the pure-Python Example parser of
``example_proto``: neither TensorFlow nor TFDS is imported at training time;
``tfds.builder_from_directory(...).as_data_source`` reads the same folder) and
cuts our patient-level splits on top of the official ones
(``splits.split_indices``; every split is cut by patient, never by image).
The folder layout is ``cxr_jax.data.layout``'s.

Reading (``open_prepared``): DATA_DIR is ``data.data_dir``; the stored size
is ``data.prepared_size``, or by default ``data.image_size`` when prepared,
else the smallest larger prepared size (the pipeline resizes). Without a
data_dir but with ``data.manual_dir``, the official download is read directly
(``ReaderSource``: every access decodes the original file; for small data).

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

import functools
import json
import os
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from cxr_jax.data import example_proto, layout, schema
from cxr_jax.data.layout import (INDEX_FILE, VERSION, WITHOUT_OFFICIAL_SPLITS, dataset_and_kept,
                                 dataset_dir, prepare_command, prepared_sizes, reader_module,
                                 stored_split)
from cxr_jax.data.sources import records as records_lib
from cxr_jax.data.splits import (SPLITS, EmptySplit, SplitSource, parse_split, split_indices,
                                 split_subset)


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
  by patient, so a patient in two of the datasets lands in one split: ``parts`` (str [N]) names
  each image's dataset, and ``official_splits`` is '' for the images of a dataset without
  official splits (``layout.WITHOUT_OFFICIAL_SPLITS``: EGD-CXR), which then follow their
  patient's official split in another part (``splits.follow_official_splits``).

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
    self.parts = np.repeat([s.dataset for s in self.sources], [len(s) for s in self.sources])
    self.official_splits = np.concatenate([
        np.full(len(s), "") if s.dataset in WITHOUT_OFFICIAL_SPLITS else s.official_splits
        for s in self.sources]).astype(str)
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
                        num_boxes=[int(len(r["box_labels"])) for r in rows],
                        **layout.index_columns((r["labels"], r["label_mask"], r["box_labels"],
                                                r["gaze"]) for r in rows))
  return dict(dataset=dataset, label_space=space.name, classes=list(space.classes),
              image_size=stored.fields["image"].shape[0], splits=index)


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
  data_dir, manual_dir = data_config.data_dir, data_config.manual_dir
  size = data_config.prepared_size
  if not size:
    larger = [s for s in (prepared_sizes(data_dir, name, **options) if data_dir else ())
              if s >= data_config.image_size]
    size = larger[0] if larger else data_config.image_size
  command = prepare_command(name, size, data_dir or "DATA_DIR", **options)
  if not data_dir:
    if manual_dir:
      return _read_directly_cached(name, manual_dir, data_config.image_size,
                                   data_config.label_space, data_config.uncertainty,
                                   data_config.frontal_only, data_config.mimic_dir)
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


def make_source(data_config: Any, split: str) -> SplitSource:
  """The ``splits.SplitSource`` of ``split`` of a prepared real dataset.

  Splits: 'train', 'val', 'test' (``splits.split_indices``) and 'annotated_<part>' /
  'unannotated_<part>' (the images of the part with / without boxes). Boxes
  are kept wherever an image has them (has_boxes 1).
  """
  subset, part = parse_split(split, data_config.name)
  source = open_prepared(data_config)
  has_boxes = source.num_boxes > 0
  parts = source.parts if isinstance(source, JoinedSource) else None
  chosen = split_indices(source.patient_ids, source.official_splits, has_boxes, data_config,
                         parts=parts)[part]
  chosen = split_subset(chosen, has_boxes, subset)
  if not len(chosen):
    raise EmptySplit(
        f"split {split!r} of {source!r} is empty (official splits "
        f"{ {s: int((source.official_splits == s).sum()) for s in source.splits} }, "
        f"{int(has_boxes.sum())} images with boxes; see data.val_fraction, data.test_fraction, "
        f"data.cv)")
  return SplitSource(source, chosen, has_boxes[chosen],
                     f"{data_config.name}/{split}: {source!r}")
