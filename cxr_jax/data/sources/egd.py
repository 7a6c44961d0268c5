"""EGD-CXR (Karargyris et al., Sci. Data 2021): eye gaze on MIMIC-CXR images.

``manual_dir`` holds ``master_sheet.csv``, ``fixations.csv`` and
``bounding_boxes.csv``; the images come from MIMIC-CXR-JPG in ``mimic_dir``,
joined by ``dicom_id`` through its metadata table (which also gives the
image size, ``Columns`` x ``Rows``, that gaze and boxes are normalized by).

* Labels: ``EGD3`` from the ``Normal`` / ``CHF`` / ``pneumonia`` columns (0/1),
  or with ``chexpert_labels=True`` ``schema.CHEXPERT14`` from the
  ``<name>__chx`` columns (1 / 0 / -1 / blank, ``uncertainty`` policy for -1,
  blank negative). Column names are matched ignoring case and '_' vs ' '.
* Gaze: ``fixations.csv`` rows of the image, (X_ORIGINAL, Y_ORIGINAL, FPOGD)
  with x / y normalized by the image size; off-image points (-1, or beyond the
  image) and zero durations are skipped. A fixation repeated over several rows
  (same SESSION_ID and FPOGID, as the Gazepoint log grows it) counts once, with
  its longest FPOGD.
* Anatomical boxes: ``bounding_boxes.csv`` (``x1, x2, y1, y2``: note the
  order) in ``Record.anatomy_boxes`` / ``anatomy_names``, clipped to the image.
  There are no finding boxes.
* No official split (``official_split`` is ''): split by patient downstream.
"""

from __future__ import annotations

import collections
import os

import numpy as np

from cxr_jax.data import schema
from cxr_jax.data.sources import mimic
from cxr_jax.data.sources import records as rec

EGD3 = schema.EGD3
LABEL_SPACE = EGD3.name
CHEXPERT_LABEL_SPACE = schema.CHEXPERT14.name
CHEXPERT_SUFFIX = "__chx"
FIXATION_COLUMNS = ("DICOM_ID", "FPOGD", "X_ORIGINAL", "Y_ORIGINAL")
BOX_COLUMNS = ("dicom_id", "bbox_name", "x1", "x2", "y1", "y2")


def _key(name: str) -> str:
  return " ".join(name.strip().lower().replace("_", " ").split())


def _find_columns(path: str, columns: dict[str, int], names, suffix: str = "") -> list[int]:
  """Indices of the columns named ``names`` (+ ``suffix``), matched by ``_key``."""
  by_key = {_key(c[:-len(suffix)] if suffix and c.endswith(suffix) else c): i
            for c, i in columns.items() if not suffix or c.endswith(suffix)}
  missing = [n + suffix for n in names if _key(n) not in by_key]
  if missing:
    raise rec.BadInput(f"{rec.where(path, 1)}: missing column(s) {missing}")
  return [by_key[_key(n)] for n in names]


def _fixations(path: str, sizes: dict[str, tuple[int, int]], problems: rec.Problems
               ) -> dict[str, np.ndarray]:
  """fixations.csv -> {dicom_id: float32 [F, 3] (x, y normalized, seconds)}."""
  columns, rows = rec.read_table(path, FIXATION_COLUMNS, problems)
  c_dicom, c_dur, c_x, c_y = (columns[k] for k in FIXATION_COLUMNS)
  c_id, c_session = columns.get("FPOGID"), columns.get("SESSION_ID")
  fixations: dict[str, dict] = collections.defaultdict(dict)
  for line, fields in rows:
    dicom = fields[c_dicom].strip()
    if dicom not in sizes:
      continue
    try:
      duration, x, y = float(fields[c_dur]), float(fields[c_x]), float(fields[c_y])
    except ValueError:
      problems.add(path, line, "non-numeric FPOGD / X_ORIGINAL / Y_ORIGINAL")
      continue
    width, height = sizes[dicom]
    if not (0 <= x <= width and 0 <= y <= height and duration > 0):
      continue
    key = (fields[c_session].strip() if c_session is not None else "",
           fields[c_id].strip() if c_id is not None else line)
    old = fixations[dicom].get(key)
    if old is None or duration > old[2]:
      fixations[dicom][key] = (x / width, y / height, duration)
  return {d: np.asarray(list(f.values()), np.float32).reshape(-1, 3) for d, f in fixations.items()}


def _anatomy(path: str, sizes: dict[str, tuple[int, int]], problems: rec.Problems
             ) -> dict[str, tuple[list, list]]:
  """bounding_boxes.csv -> {dicom_id: (normalized boxes, names)}."""
  columns, rows = rec.read_table(path, BOX_COLUMNS, problems)
  out: dict[str, tuple[list, list]] = collections.defaultdict(lambda: ([], []))
  for line, fields in rows:
    dicom = fields[columns["dicom_id"]].strip()
    if dicom not in sizes:
      continue
    try:
      x1, x2, y1, y2 = (float(fields[columns[k]]) for k in ("x1", "x2", "y1", "y2"))
    except ValueError:
      problems.add(path, line, "non-numeric x1 / x2 / y1 / y2")
      continue
    width, height = sizes[dicom]
    box = rec.to_box(max(x1, 0.0), max(y1, 0.0), min(x2, width), min(y2, height), width, height)
    if box is None:
      problems.add(path, line, f"box x1={x1}, x2={x2}, y1={y1}, y2={y2} is empty or outside the "
                   f"{width} x {height} image")
      continue
    out[dicom][0].append(box)
    out[dicom][1].append(fields[columns["bbox_name"]].strip())
  return out


def read(manual_dir: str, *, mimic_dir: str, uncertainty: str = "zeros",
         frontal_only: bool = True, skip_bad: bool = False, check_images: bool = True,
         chexpert_labels: bool = False) -> tuple[list[rec.Record], rec.Problems]:
  """Reads EGD-CXR (images from ``mimic_dir``) -> (records in master_sheet order, problems)."""
  rec.check_uncertainty(uncertainty)
  problems = rec.Problems(skip_bad)
  sheet, fixation_path, box_path = (os.path.join(manual_dir, f) for f in (
      "master_sheet.csv", "fixations.csv", "bounding_boxes.csv"))
  for path in (sheet, fixation_path, box_path):
    if not os.path.isfile(path):
      raise rec.BadInput(f"{path}: not found (EGD-CXR manual_dir)")
  mimic_images = mimic.images(mimic_dir, problems)
  columns, rows = rec.read_table(sheet, ("dicom_id", "patient_id"), problems)
  if chexpert_labels:
    label_columns = _find_columns(sheet, columns, schema.CHEXPERT14.classes, CHEXPERT_SUFFIX)
  else:
    label_columns = _find_columns(sheet, columns, ("Normal", "CHF", "pneumonia"))

  kept = []
  for line, fields, dicom in rec.unique_rows(sheet, rows, columns["dicom_id"], "dicom_id",
                                             problems):
    try:
      values = np.array([rec.parse_label_value(fields[i]) for i in label_columns])
      if not chexpert_labels and not np.all((values == 0) | (values == 1)):
        raise ValueError(f"Normal / CHF / pneumonia must be 0 or 1, got {values.tolist()}")
    except ValueError as e:
      problems.add(sheet, line, str(e))
      continue
    image = mimic_images.get(dicom)
    if image is None:
      problems.add(sheet, line,
                   f"dicom_id {dicom!r} is not in the MIMIC-CXR metadata of {mimic_dir}")
      continue
    if frontal_only and image.view not in mimic.FRONTAL_VIEWS:
      problems.filtered(sheet, line, f"view {image.view!r} is not frontal (frontal_only)")
      continue
    if check_images and not os.path.isfile(image.path):
      problems.add(sheet, line, "image file not found", image=image.path,
                   annotations=("gaze",))  # every master_sheet image was read with eye tracking
      continue
    labels, mask = rec.apply_uncertainty(values, uncertainty)
    kept.append((image, fields[columns["patient_id"]].strip(), labels, mask))

  sizes = {image.dicom_id: (image.width, image.height) for image, *_ in kept}
  gaze = _fixations(fixation_path, sizes, problems)
  anatomy = _anatomy(box_path, sizes, problems)
  out = []
  for image, patient, labels, mask in kept:
    boxes, box_labels = rec.no_boxes()
    names = anatomy.get(image.dicom_id, ([], []))
    out.append(rec.Record(
        id=image.dicom_id, path=image.path, patient_id=patient, official_split="",
        labels=labels, label_mask=mask, boxes=boxes, box_labels=box_labels,
        gaze=gaze.get(image.dicom_id, rec.no_gaze()), view=image.view, study_id=image.study_id,
        anatomy_boxes=rec.as_boxes(names[0]), anatomy_names=tuple(names[1])))
  return out, problems
