"""What a split holds, counted from the index and the annotations only (no image is decoded).

``split_counts(data_config, split)`` cuts the split as ``pipeline.make_source`` does and
counts its images, patients, positives and labelled images per class, images with
boxes and boxes per class (the boxes the split keeps, in ``data.label_space``) and
images with gaze. ``cxr_jax.train.preflight`` reads them before training.

Where the annotations come from, per source:

* prepared datasets (``prepared.PreparedSource``): ``cxr_index.json``, whose per-image
  annotation columns (``index_columns``: positives, masked classes, box labels,
  fixations) ``cxr-prepare`` writes. An index written before these columns existed is
  read from the stored records (annotations parsed, images not decoded) for at most
  ``max_read`` evenly spaced images: the counts are then 'sampled'.
* official downloads read directly (``prepared.ReaderSource``): its records, in memory.
* joined datasets (``prepared.JoinedSource``): each part, without the annotations it
  drops.
* phantoms (``synthetic.SyntheticPhantoms``): labels from the label model
  (``synthetic.sample_labels``, ~30 us an image: 0.16 s for the default 5,500); every
  positive finding is drawn with at least one box, and every phantom has gaze, so boxes
  per class are counted as the positive findings of images that keep their boxes
  (a lower bound of the drawn boxes; rendering would give them exactly).
* anything else: ``max_read`` examples read in full ('sampled').
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from cxr_jax.data import schema
from cxr_jax.data.layout import INDEX_COLUMNS, index_columns

# Images read at most where the annotations are not in memory or in the index.
MAX_READ = 512


@dataclasses.dataclass(frozen=True)
class SplitCounts:
  """Counts of one split (int arrays [K] are per class of ``classes``).

  positives: images whose label is 1 (and not masked); labelled: images whose label is
  not masked; boxes: boxes the split keeps; boxed_images: images with at least one kept
  box; gaze_images: images with at least one fixation. ``read`` < ``images``: the
  annotation counts are over the first ``read`` of evenly spaced images ('sampled').
  ``problem``: why the split could not be cut (then ``images`` is 0).
  """
  name: str
  images: int
  patients: int
  classes: tuple[str, ...]
  positives: np.ndarray
  labelled: np.ndarray
  boxed_images: int
  boxes: np.ndarray
  gaze_images: int
  read: int
  note: str = ""
  problem: str = ""

  @property
  def sampled(self) -> bool:
    return self.read < self.images


@dataclasses.dataclass
class _Annotations:
  """Per-image annotations of some images, in the target label space."""
  positive: np.ndarray        # bool [M, K]
  labelled: np.ndarray        # bool [M, K]
  box_labels: list            # M int arrays of target class indices
  fixations: np.ndarray       # int [M]

  @staticmethod
  def concat(parts: Sequence["_Annotations"], num_classes: int) -> "_Annotations":
    if not parts:
      empty = np.zeros((0, num_classes), bool)
      return _Annotations(empty, empty, [], np.zeros(0, np.int64))
    return _Annotations(np.concatenate([p.positive for p in parts]),
                        np.concatenate([p.labelled for p in parts]),
                        [b for p in parts for b in p.box_labels],
                        np.concatenate([p.fixations for p in parts]))


def _to_target(stored: schema.LabelSpace, target: schema.LabelSpace):
  """(dst -> src index [K_target] or -1, src -> dst index [K_stored] or -1)."""
  mapping = schema.label_mapping(stored, target)
  back = np.full(len(stored), -1, np.int64)
  back[mapping[mapping >= 0]] = np.flatnonzero(mapping >= 0)
  return mapping, back


def _from_rows(rows: Sequence[tuple], stored: schema.LabelSpace,
               target: schema.LabelSpace) -> _Annotations:
  """Annotations of (labels [K], mask [K], box_labels [B], gaze [F,3]) rows in ``stored``."""
  columns = index_columns(rows)
  return _from_columns(columns, np.arange(len(rows)), stored, target)


def _from_columns(columns: dict, chosen: np.ndarray, stored: schema.LabelSpace,
                  target: schema.LabelSpace) -> _Annotations:
  """Annotations of images ``chosen`` of index columns (``index_columns``) in ``stored``."""
  k = len(stored)
  positive = np.zeros((len(chosen), k), bool)
  labelled = np.ones((len(chosen), k), bool)
  for row, i in enumerate(chosen):
    positive[row, columns["positives"][i]] = True
    labelled[row, columns["masked"][i]] = False
  mapping, back = _to_target(stored, target)
  known = mapping >= 0
  safe = np.maximum(mapping, 0)
  boxes = []
  for i in chosen:
    mapped = back[np.asarray(columns["box_labels"][i], np.int64)]
    boxes.append(mapped[mapped >= 0])
  fixations = np.asarray([columns["fixations"][i] for i in chosen], np.int64)
  return _Annotations(positive[:, safe] & known, labelled[:, safe] & known, boxes, fixations)


def _spaced(indices: np.ndarray, max_read: int) -> np.ndarray:
  """At most ``max_read`` evenly spaced entries of ``indices``."""
  if len(indices) <= max_read:
    return indices
  return indices[np.linspace(0, len(indices) - 1, max_read).round().astype(np.int64)]


def _prepared(source, chosen: np.ndarray, target, max_read: int) -> tuple[_Annotations, np.ndarray]:
  from cxr_jax.data import prepared  # pylint: disable=import-outside-toplevel
  index = prepared.load_index(source.folder)
  splits = [index["splits"][s] for s in source.splits]
  if all(all(c in part for c in INDEX_COLUMNS) for part in splits):
    columns = {c: [v for part in splits for v in part[c]] for c in INDEX_COLUMNS}
    return _from_columns(columns, chosen, source.stored_space, target), chosen
  read = _spaced(chosen, max_read)
  rows = [source.stored[int(i)] for i in read]
  return _from_rows([(r["labels"], r["label_mask"], r["box_labels"], r["gaze"]) for r in rows],
                    source.stored_space, target), read


def _reader(source, chosen: np.ndarray, target) -> tuple[_Annotations, np.ndarray]:
  rows = [(r.labels, r.label_mask, r.box_labels, r.gaze)
          for r in (source.records[int(i)] for i in chosen)]
  return _from_rows(rows, source.stored_space, target), chosen


def _phantoms(source, chosen: np.ndarray, target) -> tuple[_Annotations, np.ndarray]:
  from cxr_jax.data.sources import synthetic  # pylint: disable=import-outside-toplevel
  labels = np.stack([synthetic.sample_labels(source.seed, source.offset + int(i))
                     for i in chosen]) if len(chosen) else np.zeros((0, synthetic.NUM_CLASSES))
  rows = [(l, np.ones_like(l), np.flatnonzero(l), np.ones((1, 3))) for l in labels]
  return _from_rows(rows, schema.NIH14, target), chosen


def _examples(source, chosen: np.ndarray, target, max_read: int) -> tuple[_Annotations, np.ndarray]:
  read = _spaced(chosen, max_read)
  rows = [(e["labels"], e["label_mask"], e["box_labels"], e["gaze"])
          for e in (source[int(i)] for i in read)]
  return _from_rows(rows, target, target), read


def _annotations(source, chosen: np.ndarray, target: schema.LabelSpace,
                 max_read: int) -> tuple[_Annotations, np.ndarray, str]:
  """(annotations of the images of ``source`` read among ``chosen`` (sorted), those images'
  indices, note)."""
  from cxr_jax.data import prepared  # pylint: disable=import-outside-toplevel
  from cxr_jax.data.sources import synthetic  # pylint: disable=import-outside-toplevel
  if isinstance(source, prepared.JoinedSource):
    parts, read, notes = [], [], []
    for part, (source_part, kept) in enumerate(zip(source.sources, source.kept)):
      lo, hi = source.offsets[part], source.offsets[part + 1]
      local = chosen[(chosen >= lo) & (chosen < hi)] - lo
      ann, n, note = _annotations(source_part, local, target, max_read)
      if kept is not None and "boxes" not in kept:
        ann.box_labels = [np.zeros(0, np.int64) for _ in ann.box_labels]
      if kept is not None and "gaze" not in kept:
        ann.fixations = np.zeros_like(ann.fixations)
      parts.append(ann)
      read.append(n + lo)
      notes += [note] if note else []
    return (_Annotations.concat(parts, len(target)), np.concatenate(read),
            "; ".join(dict.fromkeys(notes)))
  if isinstance(source, prepared.PreparedSource):
    ann, read = _prepared(source, chosen, target, max_read)
    return ann, read, "" if len(read) == len(chosen) else (
        f"{prepared.INDEX_FILE} predates the annotation columns: prepare again to count all")
  if isinstance(source, prepared.ReaderSource):
    return (*_reader(source, chosen, target), "")
  if isinstance(source, synthetic.SyntheticPhantoms):
    return (*_phantoms(source, chosen, target),
            "phantoms: labels from the label model; boxes = positive findings of the images "
            "that keep boxes (>= 1 drawn box each); gaze on every image")
  return (*_examples(source, chosen, target, max_read), "")


def _patients(source, chosen: np.ndarray) -> int:
  ids = getattr(source, "patient_ids", None)
  if ids is not None:
    return len(np.unique(np.asarray(ids)[chosen]))
  from cxr_jax.data.sources import synthetic  # pylint: disable=import-outside-toplevel
  if isinstance(source, synthetic.SyntheticPhantoms):
    return len(np.unique((source.offset + chosen) // synthetic.IMAGES_PER_PATIENT))
  return len(np.unique([source[int(i)]["patient_id"] for i in _spaced(chosen, MAX_READ)]))


def empty_counts(name: str, classes: Sequence[str], problem: str = "") -> SplitCounts:
  """The counts of a split with no image (``problem``: why)."""
  zeros = np.zeros(len(classes), np.int64)
  return SplitCounts(name=name, images=0, patients=0, classes=tuple(classes), positives=zeros,
                     labelled=zeros, boxed_images=0, boxes=zeros, gaze_images=0, read=0,
                     problem=problem)


def source_counts(split_source, label_space: schema.LabelSpace,
                  max_read: int = MAX_READ) -> SplitCounts:
  """The counts of a ``splits.SplitSource`` (``pipeline.make_source``'s result), its labels
  and boxes in ``label_space``."""
  source, chosen = split_source.source, np.asarray(split_source.indices, np.int64)
  order = np.argsort(chosen, kind="stable")
  chosen, keep = chosen[order], np.asarray(split_source.keep_boxes, bool)[order]
  ann, read, note = _annotations(source, chosen, label_space, max_read)
  keep = keep[np.searchsorted(chosen, read)]
  k = len(label_space)
  kept_boxes = [b if kb else np.zeros(0, np.int64) for b, kb in zip(ann.box_labels, keep)]
  boxes = np.bincount(np.concatenate(kept_boxes + [np.zeros(0, np.int64)]).astype(np.int64),
                      minlength=k)[:k]
  return SplitCounts(
      name=split_source.name, images=len(chosen), patients=_patients(source, chosen),
      classes=tuple(label_space.classes), positives=ann.positive.sum(0).astype(np.int64),
      labelled=ann.labelled.sum(0).astype(np.int64),
      boxed_images=int(sum(len(b) > 0 for b in kept_boxes)), boxes=boxes.astype(np.int64),
      gaze_images=int(np.sum(ann.fixations > 0)), read=len(read), note=note)


def split_counts(data_config: Any, split: str, max_read: int = MAX_READ) -> SplitCounts:
  """The counts of ``split`` of ``data_config``'s dataset (see the module docstring).

  A split that comes out empty gives counts with 0 images and the reason in ``problem``;
  a dataset that cannot be opened (not prepared, unknown name, bad split name) raises
  what ``pipeline.make_source`` raises.
  """
  from cxr_jax.data import pipeline, splits  # pylint: disable=import-outside-toplevel
  label_space = schema.get_label_space(data_config.label_space)
  try:
    split_source = pipeline.make_source(data_config, split)
  except splits.EmptySplit as e:
    return empty_counts(f"{data_config.name}/{split}", label_space.classes, str(e))
  return source_counts(split_source, label_space, max_read)
