"""Common ground of the real-dataset readers: records, bad-input reports, decoding.

A reader (``nih``, ``chexpert``, ``mimic``, ``reflacx``, ``egd``) turns an
official download folder into a list of ``Record`` (one per image, nothing
decoded yet) and a ``Problems`` report. ``to_example`` decodes one record into
a ``schema.Example``; ``RecordSource`` gives Grain-style random access over a
list of records.

Every reader has the signature

  read(manual_dir, *, uncertainty='zeros', frontal_only=True, skip_bad=False,
       check_images=True, ...) -> (list[Record], Problems)

Rows are named by their line in the file (the header is line 1). Bad input (a
missing image, an unknown label, a box outside the image, a duplicated id)
raises ``BadInput`` naming the file and line, or with ``skip_bad=True`` is
skipped and recorded in ``Problems``. Rows left out on purpose (a lateral view
under ``frontal_only``, an absent image under NIH's ``only_present``) are
recorded too, as ``filtered``: nothing is dropped silently.

Module constants name each reader's label space (``nih.LABEL_SPACE`` ...);
REFLACX and EGD-CXR have their own (``schema.REFLACX``, ``schema.EGD3``).
REFLACX / EGD ``read`` also
take ``mimic_dir`` (the MIMIC-CXR-JPG folder their images come from).

API beyond the issue's contract (additions only): ``Problems(skip_bad)``,
``Problems.filtered`` / ``bad_count`` / ``counts()``, and
``RecordSource(name, records, image_size)``.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import gzip
import os
from collections.abc import Iterator, Sequence

import cv2
import numpy as np

from cxr_jax import files
from cxr_jax.data import schema

UNCERTAINTY_POLICIES = ("zeros", "ones", "ignore")


@dataclasses.dataclass(frozen=True, eq=False)
class Record:
  """One image of a real dataset, before decoding.

  Shapes: labels / label_mask float32 [K] (the reader's label space), boxes
  float32 [B, 4] normalized (x0, y0, x1, y1), box_labels int32 [B], gaze
  float32 [F, 3] (x, y normalized to the image, seconds), anatomy_boxes
  float32 [A, 4] normalized (EGD only).
  """
  id: str
  path: str
  patient_id: str
  official_split: str
  labels: np.ndarray
  label_mask: np.ndarray
  boxes: np.ndarray
  box_labels: np.ndarray
  gaze: np.ndarray
  view: str
  study_id: str = ""
  anatomy_boxes: np.ndarray | None = None
  anatomy_names: tuple[str, ...] = ()


class BadInput(ValueError):
  """Input files that break the documented format; the message names file and line."""


def where(file: str, row: int | None) -> str:
  return f"{file}, line {row}" if row is not None else str(file)


ANNOTATION_KINDS = ("boxes", "ellipses", "gaze")


def annotations_of(record: Record) -> list[str]:
  """What ``record`` carries of ``ANNOTATION_KINDS`` ('boxes', 'gaze'), in that order."""
  return [name for name, values in (("boxes", record.box_labels), ("gaze", record.gaze))
          if len(values)]


def _entry(kind: str, file: str, row: int | None, reason: str, image: str | None,
           annotations: Sequence[str]) -> dict:
  entry = dict(kind=kind, file=str(file), row=row, reason=reason)
  if image is not None:
    entry["image"] = image
  if annotations:
    entry["annotations"] = list(annotations)
  return entry


class Problems:
  """Bad rows (``add``) and rows filtered on purpose (``filtered``) of one read.

  With ``skip_bad=False`` ``add`` raises ``BadInput`` at once; otherwise the
  row is recorded and the reader skips it. ``write`` saves the report as JSON.
  An entry names its image (``image``) where the reader knows it; a row whose
  image file is missing or unreadable also lists what annotations were lost
  with it (``annotations``, of ``ANNOTATION_KINDS``): ``annotated_missing``.
  """

  def __init__(self, skip_bad: bool = False):
    self.skip_bad = skip_bad
    self.entries: list[dict] = []

  def add(self, file: str, row: int | None, reason: str, *, image: str | None = None,
          annotations: Sequence[str] = ()) -> None:
    if not self.skip_bad:
      named = f"{image}: " if image is not None else ""
      raise BadInput(f"{where(file, row)}: {named}{reason}")
    self.entries.append(_entry("bad", file, row, reason, image, annotations))

  def filtered(self, file: str, row: int | None, reason: str, *, image: str | None = None,
               annotations: Sequence[str] = ()) -> None:
    self.entries.append(_entry("filtered", file, row, reason, image, annotations))

  @property
  def annotated_missing(self) -> list[dict]:
    """The entries of images left out with their boxes / gaze (file missing or unreadable)."""
    return [e for e in self.entries if e.get("annotations")]

  @property
  def count(self) -> int:
    """Rows left out, bad or filtered."""
    return len(self.entries)

  @property
  def bad_count(self) -> int:
    return sum(e["kind"] == "bad" for e in self.entries)

  def counts(self) -> dict[str, int]:
    """Number of rows left out per reason."""
    return dict(collections.Counter(e["reason"] for e in self.entries))

  def write(self, path: str, max_filtered_listed: int = 100) -> None:
    """Writes {count, bad_count, counts, entries, annotated_missing} as JSON, atomically.

    ``entries`` lists every bad row, and the first ``max_filtered_listed``
    filtered rows of each reason (``counts`` has them all); ``annotated_missing``
    lists every image left out with its annotations (``annotated_missing``), uncapped.
    """
    listed: collections.Counter = collections.Counter()
    entries = []
    for e in self.entries:
      if e["kind"] == "filtered":
        listed[e["reason"]] += 1
        if listed[e["reason"]] > max_filtered_listed:
          continue
      entries.append(e)
    payload = dict(count=self.count, bad_count=self.bad_count, counts=self.counts(),
                   entries=entries, annotated_missing=self.annotated_missing)
    files.write_json_atomic(path, payload, indent=1)

  def summary(self, names: int = 3, max_reasons: int = 10) -> list[str]:
    """Console lines: the rows left out per reason (most frequent first, at most
    ``max_reasons``) with the first ``names`` images (or file:line) of each, then the
    count and first names of ``annotated_missing``. [] when nothing was left out."""
    if not self.entries:
      return []
    by_reason: dict[str, list[dict]] = {}
    for e in self.entries:
      by_reason.setdefault(e["reason"], []).append(e)
    ranked = sorted(by_reason.items(), key=lambda item: -len(item[1]))
    lines = [f"left out {self.count} rows ({self.bad_count} bad, "
             f"{self.count - self.bad_count} filtered):"]
    for reason, group in ranked[:max_reasons]:
      lines.append(f"  {len(group):>7}  {reason}: {_names(group, names)}")
    if len(ranked) > max_reasons:
      rest = sum(len(g) for _, g in ranked[max_reasons:])
      lines.append(f"  {rest:>7}  rows of {len(ranked) - max_reasons} more reasons")
    annotated = self.annotated_missing
    if annotated:
      lines.append(f"{len(annotated)} images with boxes or gaze are missing or unreadable and "
                   f"left out: {_names(annotated, 5)}")
    return lines

  def __repr__(self) -> str:
    return f"Problems(count={self.count}, bad={self.bad_count}, counts={self.counts()})"


def _names(entries: Sequence[dict], limit: int) -> str:
  """'a.png, b.png, c.png, ... (+N)': the images (or file:line) of the first ``limit`` entries."""
  shown = [e.get("image") or (f"{os.path.basename(e['file'])}:{e['row']}" if e["row"] is not None
                              else os.path.basename(e["file"])) for e in entries[:limit]]
  more = len(entries) - len(shown)
  return ", ".join(shown) + (f", ... (+{more})" if more else "")


def find_file(folder: str, *names: str) -> str | None:
  """The first of ``names`` (or its ``.gz``) that exists in ``folder``, else None."""
  for name in names:
    for candidate in (name, name + ".gz"):
      path = os.path.join(folder, candidate)
      if os.path.isfile(path):
        return path
  return None


def read_table(path: str, required: Sequence[str] = (), problems: Problems | None = None
               ) -> tuple[dict[str, int], list[tuple[int, list[str]]]]:
  """Reads a CSV (optionally .gz) -> ({column name: index}, [(line, fields)]).

  Column names are stripped of surrounding spaces; ``line`` is the row's line in
  the file (header = 1). Missing ``required`` columns or a row shorter than the
  last required column raise ``BadInput`` naming the file and line (a short
  row goes to ``problems`` instead when given, and is left out).
  """
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", newline="", encoding="utf-8-sig") as f:
    reader = csv.reader(f, skipinitialspace=True)
    header = next(reader, None)
    if header is None:
      raise BadInput(f"{path}: empty file, expected a CSV header")
    columns: dict[str, int] = {}
    for i, name in enumerate(header):
      columns.setdefault(name.strip(), i)
    missing = [c for c in required if c not in columns]
    if missing:
      raise BadInput(f"{where(path, 1)}: missing column(s) {missing}; header is {header}")
    need = max((columns[c] for c in required), default=-1) + 1
    rows = []
    for fields in reader:
      if not fields:
        continue
      if len(fields) < need:
        reason = f"{len(fields)} fields, expected at least {need} (header {header})"
        if problems is None:
          raise BadInput(f"{where(path, reader.line_num)}: {reason}")
        problems.add(path, reader.line_num, reason)
        continue
      rows.append((reader.line_num, fields))
  return columns, rows



def unique_rows(path: str, rows: Sequence[tuple[int, list[str]]], column: int, name: str,
                problems: Problems, seen: dict[str, str] | None = None
                ) -> Iterator[tuple[int, list[str], str]]:
  """(line, fields, key) of the rows of ``read_table`` whose key ``fields[column].strip()``
  has not come before; a repeat goes to ``problems`` as "duplicated NAME 'key' (first at
  FILE, line N)". Pass one ``seen`` ({key: where}) to share the keys across files."""
  seen = {} if seen is None else seen
  for line, fields in rows:
    key = fields[column].strip()
    if key in seen:
      problems.add(path, line, f"duplicated {name} {key!r} (first at {seen[key]})")
      continue
    seen[key] = where(path, line)
    yield line, fields, key

def check_uncertainty(uncertainty: str) -> None:
  if uncertainty not in UNCERTAINTY_POLICIES:
    raise ValueError(f"uncertainty={uncertainty!r}; expected one of {UNCERTAINTY_POLICIES}")


def apply_uncertainty(values: np.ndarray, uncertainty: str,
                      blank_masked: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """CheXpert-style values -> (labels, label_mask), float32 [..., K].

  ``values`` float [..., K] holds 1 (positive), 0 (negative), -1 (uncertain)
  or NaN (blank = not mentioned). Uncertain becomes 0 ('zeros'), 1 ('ones') or
  masked ('ignore'). Blank counts as negative, or masked with ``blank_masked``.
  """
  check_uncertainty(uncertainty)
  values = np.asarray(values, np.float64)
  blank = np.isnan(values)
  uncertain = values == -1
  labels = (values == 1).astype(np.float32)
  mask = np.ones_like(labels)
  if uncertainty == "ones":
    labels[uncertain] = 1
  elif uncertainty == "ignore":
    mask[uncertain] = 0
  if blank_masked:
    mask[blank] = 0
  return labels, mask


def parse_label_value(text: str) -> float:
  """'1.0' / '1' / '0' / '-1.0' / '' -> 1, 0, -1, NaN; other text raises ValueError."""
  text = text.strip()
  if not text:
    return float("nan")
  value = float(text)
  if value not in (1.0, 0.0, -1.0):
    raise ValueError(f"label value {text!r} is not one of 1, 0, -1 or blank")
  return value


def to_box(x0: float, y0: float, x1: float, y1: float, width: float,
           height: float) -> tuple[float, float, float, float] | None:
  """Pixel corners -> normalized (x0, y0, x1, y1), or None when outside the image or empty."""
  box = (x0 / width, y0 / height, x1 / width, y1 / height)
  if (not all(np.isfinite(box)) or min(box) < 0 or max(box) > 1
      or box[2] <= box[0] or box[3] <= box[1]):
    return None
  return box


def as_boxes(boxes: Sequence[Sequence[float]]) -> np.ndarray:
  return np.asarray(boxes, np.float32).reshape(-1, 4)


def no_boxes() -> tuple[np.ndarray, np.ndarray]:
  return np.zeros((0, 4), np.float32), np.zeros((0,), np.int32)


def no_gaze() -> np.ndarray:
  return np.zeros((0, 3), np.float32)


def load_gray(path: str, image_size: int | None = None) -> np.ndarray:
  """Decodes a PNG / JPEG file to uint8 [H, W] gray ([S, S] with ``image_size=S``).

  RGB / RGBA are converted with the luma weights (alpha is dropped); 16-bit
  images are scaled by 255 / 65535. Resizing uses cv2.INTER_AREA. A missing
  or undecodable file raises ``BadInput`` naming it.
  """
  if not os.path.isfile(path):
    raise BadInput(f"{path}: image file not found")
  image = cv2.imread(path, cv2.IMREAD_UNCHANGED)
  if image is None or image.size == 0:
    raise BadInput(f"{path}: cannot decode the image (not a readable PNG/JPEG)")
  if image.ndim == 3:
    if image.shape[2] == 4:
      image = cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY)
    elif image.shape[2] == 3:
      image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    elif image.shape[2] == 1:
      image = image[:, :, 0]
    else:
      raise BadInput(f"{path}: unsupported number of channels {image.shape[2]}")
  if image.dtype == np.uint16:
    image = np.round(image.astype(np.float32) * (255.0 / 65535.0)).astype(np.uint8)
  elif image.dtype != np.uint8:
    raise BadInput(f"{path}: unsupported pixel type {image.dtype}")
  if image_size is not None and image.shape != (image_size, image_size):
    image = cv2.resize(image, (image_size, image_size), interpolation=cv2.INTER_AREA)
  return np.ascontiguousarray(image)


def to_example(record: Record, image_size: int | None) -> schema.Example:
  """Decodes ``record`` into a validated ``schema.Example`` (boxes / gaze padded)."""
  origin = f"{record.path} (id {record.id})"
  boxes, box_labels = schema.pad_boxes(record.boxes, record.box_labels, origin)
  example = {
      "image": load_gray(record.path, image_size),
      "labels": np.array(record.labels, np.float32),
      "label_mask": np.array(record.label_mask, np.float32),
      "boxes": boxes,
      "box_labels": box_labels,
      "gaze": schema.pad_gaze(record.gaze, origin),
      "patient_id": record.patient_id,
      "image_id": record.id,
  }
  schema.validate_example(example, len(record.labels), origin)
  return example


class RecordSource:
  """Random access over decoded records: ``source[i]`` is ``to_example(records[i])``.

  Attributes: ``records``, ``patient_ids`` (str array [N]), ``official_splits``
  (str array [N]). Picklable (Grain worker processes).
  """

  def __init__(self, name: str, records: Sequence[Record], image_size: int | None = None):
    self.name = name
    self.records = list(records)
    self.image_size = image_size
    self.patient_ids = np.array([r.patient_id for r in self.records], dtype=str)
    self.official_splits = np.array([r.official_split for r in self.records], dtype=str)

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> schema.Example:
    return to_example(self.records[int(index)], self.image_size)

  def __repr__(self) -> str:
    return (f"RecordSource({self.name!r}, {len(self)} images, "
            f"{len(set(self.patient_ids.tolist()))} patients, image_size={self.image_size})")
