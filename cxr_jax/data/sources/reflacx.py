"""REFLACX (Bigolin Lanfredi et al., Sci. Data 2022): reports, gaze and ellipses on MIMIC-CXR.

``manual_dir`` holds ``main_data/metadata_phase_{1,2,3}.csv`` and one folder
``main_data/<id>/`` per reading with ``fixations.csv`` and
``anomaly_location_ellipses.csv``. Images come from MIMIC-CXR-JPG in
``mimic_dir``, joined by ``dicom_id`` through its metadata table.

* One record per image: the readings of an image (phases 1-2 had several
  radiologists per image) are merged. Per reading a label is positive when
  its certainty (0-5) is >= ``certainty_threshold`` (3, "possibly" or
  higher), negative at 0, uncertain in between (``uncertainty`` policy);
  booleans (``Support devices``) are positive when True. Merged: positive if
  any reading is positive, else uncertain if any is, else negative.
* Labels live in ``REFLACX`` (the phase 2-3 list without 'Other' / 'Quality
  issue'); phase-1 names map onto it (``PHASE1_NAMES``); ``UNUSED`` columns are
  ignored; any other column after ``image_size_y`` is an unknown label.
* Boxes: each ellipse with certainty >= the threshold becomes its bounding box
  (xmin, ymin, xmax, ymax) for every label it is marked with, clipped to the
  image and normalized by (image_size_x, image_size_y). When the readings'
  boxes exceed ``schema.MAX_BOXES`` the later readings' boxes are left out
  (recorded in ``Problems`` as filtered).
* Gaze: fixations (x, y, end - start seconds) of all readings whose eye
  tracking was not discarded, x / y normalized by the image size; fixations
  off the image (negative or beyond its size) or with no duration are skipped.
* Official split: the ``split`` column (MIMIC's train / validate / test).
"""

from __future__ import annotations

import collections
import functools
import os

import numpy as np

from cxr_jax.data import schema
from cxr_jax.data.sources import mimic
from cxr_jax.data.sources import records as rec

REFLACX = schema.REFLACX
LABEL_SPACE = REFLACX.name

# Phase-1 label names -> the phase 2-3 class they were revised into.
PHASE1_NAMES = {
    "Emphysema": "High lung volume / emphysema", "Fibrosis": "Interstitial lung disease",
    "Fracture": "Acute fracture", "Mass": "Lung nodule or mass", "Nodule": "Lung nodule or mass",
    "Pleural effusion": "Pleural abnormality", "Pleural thickening": "Pleural abnormality",
    "Wide mediastinum": "Abnormal mediastinal contour",
}
UNUSED = ("Other", "Quality issue", "Airway wall thickening")
METADATA_COLUMNS = ("id", "split", "eye_tracking_data_discarded", "image", "dicom_id",
                    "subject_id", "image_size_x", "image_size_y")
ELLIPSE_COLUMNS = ("xmin", "ymin", "xmax", "ymax", "certainty")
# The split column follows MIMIC-CXR (train / validate / test); 'val' accepted too.
SPLIT_NAMES = dict(mimic.SPLIT_NAMES, val="val")
FIXATION_COLUMNS = ("timestamp_start_fixation", "timestamp_end_fixation", "x_position",
                    "y_position")


def class_of(name: str) -> int | None:
  """REFLACX class index of a label column name; None for ``UNUSED``; KeyError if unknown."""
  name = name.strip()
  if name in UNUSED:
    return None
  return REFLACX.index(PHASE1_NAMES.get(name, name))


def _truth(text: str) -> bool | None:
  return {"true": True, "false": False, "1": True, "0": False}.get(text.strip().lower())


def _label_columns(path: str, columns: dict[str, int], first: str) -> list[tuple[int, int]]:
  """(column index, class index) of the label columns after ``first``; unknown names raise."""
  start = columns[first] + 1
  out = []
  for name, i in columns.items():
    if i < start or not name:
      continue
    try:
      c = class_of(name)
    except KeyError:
      raise rec.BadInput(f"{rec.where(path, 1)}: unknown label column {name!r}; known: "
                         f"{list(REFLACX.classes)}, phase-1 names {list(PHASE1_NAMES)}, "
                         f"unused {list(UNUSED)}") from None
    if c is not None:
      out.append((i, c))
  return out


def _combine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Positive if either is, else uncertain (-1) if either is, else negative."""
  return np.where((a == 1) | (b == 1), 1.0, np.where((a == -1) | (b == -1), -1.0, 0.0))


def _reading_labels(fields: list[str], label_columns, threshold: int) -> np.ndarray:
  """One reading -> values float [K] in {1, 0, -1} (positive, negative, uncertain)."""
  values = np.zeros(len(REFLACX), np.float64)
  for i, c in label_columns:
    text = fields[i].strip()
    value = np.zeros(len(REFLACX))
    if text.lower() in ("true", "false"):
      value[c] = 1.0 if text.lower() == "true" else 0.0
    else:
      certainty = int(float(text)) if text else 0
      if not 0 <= certainty <= 5:
        raise ValueError(f"certainty {text!r} outside 0-5")
      value[c] = 1.0 if certainty >= threshold else -1.0 if certainty > 0 else 0.0
    values = _combine(values, value)
  return values


def _ellipses(path: str, width: float, height: float, threshold: int,
              problems: rec.Problems) -> tuple[list, list]:
  columns, rows = rec.read_table(path, ELLIPSE_COLUMNS, problems)
  label_columns = _label_columns(path, columns, "certainty")
  boxes, labels = [], []
  for line, fields in rows:
    try:
      x0, y0, x1, y1, certainty = (float(fields[columns[k]]) for k in ELLIPSE_COLUMNS)
    except ValueError:
      problems.add(path, line,
                   f"non-numeric ellipse {[fields[columns[k]] for k in ELLIPSE_COLUMNS]}")
      continue
    if certainty < threshold:
      continue
    box = rec.to_box(max(x0, 0.0), max(y0, 0.0), min(x1, width), min(y1, height), width, height)
    if box is None:
      problems.add(path, line, f"ellipse box ({x0}, {y0}, {x1}, {y1}) is empty or outside the "
                   f"{width:.0f} x {height:.0f} image")
      continue
    for i, c in label_columns:
      if _truth(fields[i]):
        boxes.append(box)
        labels.append(c)
  return boxes, labels


def _fixations(path: str, width: float, height: float, problems: rec.Problems) -> np.ndarray:
  columns, rows = rec.read_table(path, FIXATION_COLUMNS, problems)
  out = []
  for line, fields in rows:
    try:
      start, end, x, y = (float(fields[columns[k]]) for k in FIXATION_COLUMNS)
    except ValueError:
      problems.add(path, line, "non-numeric fixation")
      continue
    if 0 <= x <= width and 0 <= y <= height and end > start:
      out.append((x / width, y / height, end - start))
  return np.asarray(out, np.float32).reshape(-1, 3)


def read(manual_dir: str, *, mimic_dir: str, uncertainty: str = "zeros",
         frontal_only: bool = True, skip_bad: bool = False, check_images: bool = True,
         certainty_threshold: int = 3, phases: tuple[int, ...] = (1, 2, 3)
         ) -> tuple[list[rec.Record], rec.Problems]:
  """Reads REFLACX (images from ``mimic_dir``) -> (records, one per dicom_id; problems)."""
  rec.check_uncertainty(uncertainty)
  problems = rec.Problems(skip_bad)
  main = os.path.join(manual_dir, "main_data")
  files = [p for p in (os.path.join(main, f"metadata_phase_{k}.csv") for k in phases)
           if os.path.isfile(p)]
  if not files:
    raise rec.BadInput(f"{main}: no metadata_phase_{{{','.join(map(str, phases))}}}.csv (REFLACX)")
  mimic_images = mimic.images(mimic_dir, problems)

  readings = collections.defaultdict(list)   # dicom_id -> [reading dicts]
  seen_ids: dict[str, str] = {}
  for path in files:
    columns, rows = rec.read_table(path, METADATA_COLUMNS, problems)
    label_columns = _label_columns(path, columns, "image_size_y")
    for line, fields, reading in rec.unique_rows(path, rows, columns["id"], "id", problems,
                                                 seen_ids):
      try:
        values = _reading_labels(fields, label_columns, certainty_threshold)
        width = float(fields[columns["image_size_x"]])
        height = float(fields[columns["image_size_y"]])
      except ValueError as e:
        problems.add(path, line, f"bad label or image size: {e}")
        continue
      split = fields[columns["split"]].strip()
      if split not in SPLIT_NAMES:
        problems.add(path, line, f"split {split!r}, expected one of {list(SPLIT_NAMES)}")
        continue
      discarded = _truth(fields[columns["eye_tracking_data_discarded"]])
      if discarded is None:
        problems.add(path, line, f"eye_tracking_data_discarded is "
                     f"{fields[columns['eye_tracking_data_discarded']]!r}, expected True / False")
        continue
      dicom = fields[columns["dicom_id"]].strip()
      image = mimic_images.get(dicom)
      if image is None:
        problems.add(path, line,
                     f"dicom_id {dicom!r} is not in the MIMIC-CXR metadata of {mimic_dir}")
        continue
      if (image.width, image.height) != (width, height):
        problems.add(path, line, f"image size {width:.0f} x {height:.0f} differs from MIMIC-CXR's "
                     f"{image.width} x {image.height} for {dicom}")
        continue
      readings[dicom].append(dict(file=path, line=line, id=reading, values=values,
                                  split=SPLIT_NAMES[split], discarded=discarded,
                                  subject=fields[columns["subject_id"]].strip()))

  out = []
  for dicom, group in readings.items():
    image = mimic_images[dicom]
    first = group[0]
    if frontal_only and image.view not in mimic.FRONTAL_VIEWS:
      problems.filtered(first["file"], first["line"],
                        f"view {image.view!r} is not frontal (frontal_only)")
      continue
    if len({g["split"] for g in group}) > 1:
      problems.add(first["file"], first["line"], f"readings of {dicom} disagree on the split")
      continue
    if check_images and not os.path.isfile(image.path):
      gazed = ["gaze"] if any(not g["discarded"] for g in group) else []
      problems.add(first["file"], first["line"], "image file not found", image=image.path,
                   annotations=["ellipses", *gazed])
      continue
    boxes, box_labels, gaze = [], [], []
    ok = True
    for g in group:
      folder = os.path.join(main, g["id"])
      ellipses = os.path.join(folder, "anomaly_location_ellipses.csv")
      fixations = os.path.join(folder, "fixations.csv")
      needed = [ellipses] + ([] if g["discarded"] else [fixations])
      missing = [p for p in needed if not os.path.isfile(p)]
      if missing:
        problems.add(g["file"], g["line"], f"reading {g['id']}: missing {missing}")
        ok = False
        break
      b, l = _ellipses(ellipses, image.width, image.height, certainty_threshold, problems)
      if len(boxes) + len(b) > schema.MAX_BOXES:
        problems.filtered(ellipses, None, f"{len(b)} boxes of reading {g['id']} left out: image "
                          f"{dicom} already has {len(boxes)} (MAX_BOXES={schema.MAX_BOXES})")
      else:
        boxes += b
        box_labels += l
      if not g["discarded"]:
        gaze.append(_fixations(fixations, image.width, image.height, problems))
    if not ok:
      continue
    merged = functools.reduce(_combine, [g["values"] for g in group])
    labels, mask = rec.apply_uncertainty(merged, uncertainty)
    out.append(rec.Record(
        id=dicom, path=image.path, patient_id=first["subject"], official_split=first["split"],
        labels=labels, label_mask=mask, boxes=rec.as_boxes(boxes),
        box_labels=np.asarray(box_labels, np.int32), view=image.view, study_id=image.study_id,
        gaze=np.concatenate(gaze) if gaze else rec.no_gaze()))
  return out, problems
