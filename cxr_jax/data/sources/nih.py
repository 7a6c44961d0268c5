"""NIH ChestX-ray14 (Wang et al., CVPR 2017) from the official download.

Layout (``manual_dir``): ``Data_Entry_2017_v2020.csv`` or ``Data_Entry_2017.csv``
(the v2020 file is preferred when both are there), ``BBox_List_2017.csv``,
``train_val_list.txt`` / ``test_list.txt``, and the PNGs in ``images/`` or
split over ``images_001/images/ ... images_012/images/`` (``images_0XX/``
without the inner folder is accepted as well).

* Labels: ``Finding Labels`` ``A|B|...`` or ``No Finding`` in ``schema.NIH14``;
  the label mask is all ones (NIH has no uncertain labels, so ``uncertainty``
  has no effect here).
* Boxes: ``BBox_List_2017.csv`` gives x, y, w, h in pixels of the 1024 x 1024
  release, whatever the size of the stored files (and not in the original
  scan's ``OriginalImage[Width,Height]``), so they are normalized by 1024.
  ``Infiltrate`` there is ``Infiltration``.
* Official split: ``train_val_list.txt`` -> 'train', ``test_list.txt`` ->
  'test'; '' when the lists are absent or do not list the image.
* ``only_present=True`` keeps only the rows whose image file exists (e.g. a
  partial download such as the 880-image sample); the others are recorded in
  ``Problems`` as 'missing image (skipped by only_present)'. Without it a
  missing image is bad input (with ``check_images=True``). Either way a missing
  image that ``BBox_List_2017.csv`` boxes is marked (``annotations=['boxes']``),
  so that ``Problems.annotated_missing`` names every box lost with its image.
"""

from __future__ import annotations

import csv
import os

import numpy as np

from cxr_jax.data import schema
from cxr_jax.data.sources import records as rec

LABEL_SPACE = schema.NIH14.name
RELEASE_SIZE = 1024.0   # BBox_List coordinates are pixels of the 1024 x 1024 release
DATA_ENTRY_FILES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
BBOX_FILE = "BBox_List_2017.csv"
FRONTAL_VIEWS = ("PA", "AP")
SKIPPED_BY_ONLY_PRESENT = "missing image (skipped by only_present)"
NOT_FOUND = "image not found in images/ or images_*/images/"

# NIH14 class names and their synonyms (BBox_List's 'Infiltrate') -> class index.
_CLASS_INDEX = {name: i for i, name in enumerate(schema.NIH14.classes)}
for _group in schema.SYNONYMS:
  for _member in _group & set(schema.NIH14.classes):
    for _alias in _group:
      _CLASS_INDEX.setdefault(_alias, _CLASS_INDEX[_member])


def image_index(manual_dir: str) -> dict[str, str]:
  """{file name: absolute path} of the PNGs in images/ and images_*/[images/]."""
  folders = [os.path.join(manual_dir, "images")]
  with os.scandir(manual_dir) as it:
    for entry in sorted(it, key=lambda e: e.name):
      if entry.is_dir() and entry.name.startswith("images_"):
        inner = os.path.join(entry.path, "images")
        folders.append(inner if os.path.isdir(inner) else entry.path)
  index = {}
  for folder in folders:
    if os.path.isdir(folder):
      with os.scandir(folder) as it:
        for entry in it:
          if entry.name.endswith(".png"):
            index.setdefault(entry.name, os.path.abspath(entry.path))
  return index


def parse_finding_labels(text: str) -> list[int]:
  """'A|B' -> NIH14 class indices; 'No Finding' -> []. Raises KeyError on an unknown name."""
  names = [n.strip() for n in text.split("|")]
  if names == ["No Finding"]:
    return []
  return [_CLASS_INDEX[n] if n in _CLASS_INDEX else schema.NIH14.index(n) for n in names]


def _read_list(path: str) -> set[str]:
  if not os.path.isfile(path):
    return set()
  with open(path) as f:
    return {line.strip() for line in f if line.strip()}


def _find_data_entry(manual_dir: str, data_entry: str | None) -> str:
  if data_entry:
    path = data_entry if os.path.isabs(data_entry) else os.path.join(manual_dir, data_entry)
    if not os.path.isfile(path):
      raise rec.BadInput(f"{path}: Data_Entry file not found")
    return path
  path = rec.find_file(manual_dir, *DATA_ENTRY_FILES)
  if path is None:
    raise rec.BadInput(f"{manual_dir}: none of {list(DATA_ENTRY_FILES)} found (NIH manual_dir)")
  return path


def _read_boxes(path: str, known: set[str], problems: rec.Problems
                ) -> dict[str, tuple[list[tuple[float, ...]], list[int]]]:
  """BBox_List rows -> {image: (normalized boxes, class indices)}."""
  boxes: dict[str, tuple[list, list]] = {}
  with open(path, newline="") as f:
    reader = csv.reader(f)
    next(reader, None)   # 'Image Index,Finding Label,Bbox [x,y,w,h],,,': broken by its commas
    for fields in reader:
      line = reader.line_num
      if not fields:
        continue
      if len(fields) < 6:
        problems.add(path, line, f"expected image,label,x,y,w,h, got {fields}")
        continue
      name, label = fields[0].strip(), fields[1].strip()
      if name not in known:
        problems.add(path, line, f"box for image {name!r}, which Data_Entry does not list")
        continue
      if label not in _CLASS_INDEX:
        problems.add(path, line, f"unknown box label {label!r}; classes are "
                     f"{list(schema.NIH14.classes)}")
        continue
      try:
        x, y, w, h = (float(v) for v in fields[2:6])
      except ValueError:
        problems.add(path, line, f"box x,y,w,h {fields[2:6]} are not numbers")
        continue
      box = rec.to_box(x, y, x + w, y + h, RELEASE_SIZE, RELEASE_SIZE)
      if box is None:
        problems.add(path, line, f"box x={x}, y={y}, w={w}, h={h} is empty or outside the "
                     f"{RELEASE_SIZE:.0f} x {RELEASE_SIZE:.0f} image")
        continue
      entry = boxes.setdefault(name, ([], []))
      entry[0].append(box)
      entry[1].append(_CLASS_INDEX[label])
  return boxes


def read(manual_dir: str, *, uncertainty: str = "zeros", frontal_only: bool = True,
         skip_bad: bool = False, check_images: bool = True, only_present: bool = False,
         data_entry: str | None = None) -> tuple[list[rec.Record], rec.Problems]:
  """Reads the NIH download in ``manual_dir`` -> (records in Data_Entry order, problems).

  ``data_entry``: a file name in ``manual_dir`` (or a path) to force the 2017
  or v2020 metadata; by default v2020 when present.
  """
  rec.check_uncertainty(uncertainty)
  problems = rec.Problems(skip_bad)
  entry_path = _find_data_entry(manual_dir, data_entry)
  columns, rows = rec.read_table(
      entry_path, ("Image Index", "Finding Labels", "Patient ID", "View Position"), problems)
  c_image, c_labels, c_patient, c_view = (columns[k] for k in (
      "Image Index", "Finding Labels", "Patient ID", "View Position"))
  present = image_index(manual_dir)
  train_val = _read_list(os.path.join(manual_dir, "train_val_list.txt"))
  test = _read_list(os.path.join(manual_dir, "test_list.txt"))
  default_folder = os.path.abspath(os.path.join(manual_dir, "images"))

  kept = []   # (name, path, patient, split, view, class indices)
  seen: dict[str, str] = {}
  for line, fields, name in rec.unique_rows(entry_path, rows, c_image, "Image Index", problems,
                                            seen):
    try:
      classes = parse_finding_labels(fields[c_labels])
    except KeyError:
      problems.add(entry_path, line, f"unknown label in Finding Labels {fields[c_labels]!r}; "
                   f"classes are {list(schema.NIH14.classes)} or 'No Finding'")
      continue
    view = fields[c_view].strip()
    if frontal_only and view not in FRONTAL_VIEWS:
      problems.filtered(entry_path, line, f"view {view!r} is not frontal")
      continue
    path = present.get(name)
    if path is None:
      if only_present:
        problems.filtered(entry_path, line, SKIPPED_BY_ONLY_PRESENT, image=name)
        continue
      if check_images:
        problems.add(entry_path, line, NOT_FOUND, image=name)
        continue
      path = os.path.join(default_folder, name)
    if name in train_val and name in test:
      problems.add(entry_path, line, f"{name!r} is in both train_val_list.txt and test_list.txt")
      continue
    split = "test" if name in test else "train" if name in train_val else ""
    kept.append((name, path, fields[c_patient].strip(), split, view, classes))

  bbox_path = os.path.join(manual_dir, BBOX_FILE)
  boxes = _read_boxes(bbox_path, set(seen), problems) if os.path.isfile(bbox_path) else {}
  for entry in problems.entries:
    if entry["reason"] in (SKIPPED_BY_ONLY_PRESENT, NOT_FOUND) and entry.get("image") in boxes:
      entry["annotations"] = ["boxes"]
  labels = np.zeros((len(kept), len(schema.NIH14)), np.float32)
  for i, item in enumerate(kept):
    labels[i, item[5]] = 1
  labels.flags.writeable = False
  mask = np.ones(len(schema.NIH14), np.float32)
  mask.flags.writeable = False
  out = []
  for i, (name, path, patient, split, view, _) in enumerate(kept):
    if name in boxes:
      box_array, box_labels = rec.as_boxes(boxes[name][0]), np.asarray(boxes[name][1], np.int32)
    else:
      box_array, box_labels = rec.no_boxes()
    out.append(rec.Record(id=name, path=path, patient_id=patient, official_split=split,
                          labels=labels[i], label_mask=mask, boxes=box_array,
                          box_labels=box_labels, gaze=rec.no_gaze(), view=view))
  return out, problems
