"""MIMIC-CXR-JPG 2.0.0 (Johnson et al. 2019) from the official download.

``manual_dir`` holds ``files/pXX/pSUBJECT/sSTUDY/<dicom_id>.jpg`` and the
tables ``mimic-cxr-2.0.0-{metadata,chexpert,negbio,split}.csv`` (or ``.csv.gz``).
Every table is read by column name (copies differ in column order and extras).

* Labels: the study-level ``-chexpert`` (default) or ``-negbio`` table, in
  ``schema.CHEXPERT14`` (same 14 names), with the uncertainty policy for -1
  and blank as negative (masked with ``mask_unmentioned=True``). An image whose
  study has no label row is bad input.
* Official split: ``-split`` table by dicom_id, train / validate / test ->
  'train' / 'val' / 'test' ('' when the table is absent or lacks the image).
* Views: ``ViewPosition``; frontal = PA or AP.

``images(mimic_dir)`` is the dicom_id index that REFLACX and EGD-CXR join on.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from cxr_jax.data import schema
from cxr_jax.data.sources import records as rec

LABEL_SPACE = schema.CHEXPERT14.name
PREFIX = "mimic-cxr-2.0.0-"
FRONTAL_VIEWS = ("PA", "AP")
SPLIT_NAMES = {"train": "train", "validate": "val", "test": "test"}


@dataclasses.dataclass(frozen=True)
class Image:
  """One row of the metadata table."""
  dicom_id: str
  path: str
  subject_id: str
  study_id: str
  view: str
  width: int    # Columns
  height: int   # Rows
  file: str     # the metadata table and the image's line in it
  line: int


def table(mimic_dir: str, name: str) -> str | None:
  """Path of ``mimic-cxr-2.0.0-<name>.csv[.gz]`` in ``mimic_dir``, or None."""
  return rec.find_file(mimic_dir, f"{PREFIX}{name}.csv")


def image_path(mimic_dir: str, subject_id: str, study_id: str, dicom_id: str) -> str:
  return os.path.abspath(os.path.join(mimic_dir, "files", f"p{subject_id[:2]}", f"p{subject_id}",
                                      f"s{study_id}", f"{dicom_id}.jpg"))


def images(mimic_dir: str, problems: rec.Problems) -> dict[str, Image]:
  """The metadata table -> {dicom_id: Image}; duplicated ids / bad sizes go to ``problems``."""
  path = table(mimic_dir, "metadata")
  if path is None:
    raise rec.BadInput(f"{mimic_dir}: {PREFIX}metadata.csv(.gz) not found (MIMIC-CXR-JPG dir)")
  names = ("dicom_id", "subject_id", "study_id", "ViewPosition", "Rows", "Columns")
  columns, rows = rec.read_table(path, names, problems)
  c = {k: columns[k] for k in names}
  out: dict[str, Image] = {}
  for line, fields, dicom in rec.unique_rows(path, rows, c["dicom_id"], "dicom_id", problems):
    subject, study = fields[c["subject_id"]].strip(), fields[c["study_id"]].strip()
    try:
      height, width = int(float(fields[c["Rows"]])), int(float(fields[c["Columns"]]))
    except ValueError:
      problems.add(path, line, f"Rows / Columns {fields[c['Rows']]!r}, {fields[c['Columns']]!r} "
                   f"are not numbers")
      continue
    if not subject or not study or height <= 0 or width <= 0:
      problems.add(path, line, "empty subject_id / study_id or non-positive Rows / Columns")
      continue
    out[dicom] = Image(dicom, image_path(mimic_dir, subject, study, dicom), subject, study,
                       fields[c["ViewPosition"]].strip(), width, height, path, line)
  return out


def _study_labels(path: str, problems: rec.Problems) -> dict[str, tuple[np.ndarray, str]]:
  """Study-level label table -> {study_id: (values float [14] in {1, 0, -1, NaN}, where)}."""
  classes = schema.CHEXPERT14.classes
  columns, rows = rec.read_table(path, ("study_id",) + classes, problems)
  out = {}
  for line, fields, study in rec.unique_rows(path, rows, columns["study_id"], "study_id",
                                             problems):
    try:
      values = np.array([rec.parse_label_value(fields[columns[c]]) for c in classes])
    except ValueError as e:
      problems.add(path, line, str(e))
      continue
    out[study] = (values, rec.where(path, line))
  return out


def _splits(path: str | None, problems: rec.Problems) -> dict[str, str]:
  if path is None:
    return {}
  columns, rows = rec.read_table(path, ("dicom_id", "split"), problems)
  out = {}
  for line, fields in rows:
    split = fields[columns["split"]].strip()
    if split not in SPLIT_NAMES:
      problems.add(path, line, f"split {split!r}, expected one of {list(SPLIT_NAMES)}")
      continue
    out[fields[columns["dicom_id"]].strip()] = SPLIT_NAMES[split]
  return out


def read(manual_dir: str, *, uncertainty: str = "zeros", frontal_only: bool = True,
         skip_bad: bool = False, check_images: bool = True, labeler: str = "chexpert",
         mask_unmentioned: bool = False) -> tuple[list[rec.Record], rec.Problems]:
  """Reads MIMIC-CXR-JPG -> (records in metadata order, problems).

  ``labeler``: 'chexpert' | 'negbio' (which study-level label table).
  """
  rec.check_uncertainty(uncertainty)
  if labeler not in ("chexpert", "negbio"):
    raise ValueError(f"labeler={labeler!r}; expected 'chexpert' or 'negbio'")
  problems = rec.Problems(skip_bad)
  label_path = table(manual_dir, labeler)
  if label_path is None:
    raise rec.BadInput(f"{manual_dir}: {PREFIX}{labeler}.csv(.gz) not found")
  metadata = images(manual_dir, problems)
  study_labels = _study_labels(label_path, problems)
  splits = _splits(table(manual_dir, "split"), problems)
  out = []
  for image in metadata.values():
    file, line = image.file, image.line
    if frontal_only and image.view not in FRONTAL_VIEWS:
      problems.filtered(file, line, f"view {image.view!r} is not frontal (frontal_only)")
      continue
    if image.study_id not in study_labels:
      problems.add(file, line, f"study {image.study_id} has no row in {label_path}")
      continue
    if check_images and not os.path.isfile(image.path):
      problems.add(file, line, "image file not found", image=image.path)
      continue
    labels, mask = rec.apply_uncertainty(study_labels[image.study_id][0], uncertainty,
                                         blank_masked=mask_unmentioned)
    boxes, box_labels = rec.no_boxes()
    out.append(rec.Record(id=image.dicom_id, path=image.path, patient_id=image.subject_id,
                          official_split=splits.get(image.dicom_id, ""), labels=labels,
                          label_mask=mask, boxes=boxes, box_labels=box_labels, gaze=rec.no_gaze(),
                          view=image.view, study_id=image.study_id))
  return out, problems
