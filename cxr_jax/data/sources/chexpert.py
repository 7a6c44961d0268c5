"""CheXpert (Irvin et al., AAAI 2019) from the official download.

``manual_dir`` is the dataset folder (``CheXpert-v1.0/`` or
``CheXpert-v1.0-small/``, holding ``train.csv``, ``valid.csv``, ``train/``,
``valid/``) or the folder that contains it. ``Path`` in the CSVs starts with
the dataset folder's name (``CheXpert-v1.0-small/train/patient00001/...``);
that first component is dropped and the rest joined to the dataset folder,
so a copy renamed or the full-size release read with the -small CSVs still
resolve. Paths that do not start with a ``CheXpert-v1.0*`` name are taken
relative to the dataset folder.

* Labels (``schema.CHEXPERT14``): 1 positive, 0 negative, -1 uncertain, blank
  not mentioned. ``uncertainty``: 'zeros' | 'ones' | 'ignore' (mask) for -1;
  blank is negative, or masked with ``mask_unmentioned=True``.
* Official split: train.csv -> 'train', valid.csv -> 'val'. (The study-level
  test labels are not read.)
* Patient id: the ``patientNNNNN`` path component; study id
  ``patientNNNNN/studyN``. View: the ``AP/PA`` column for frontal images
  ('FRONTAL' when blank), else 'LATERAL' (or the column's LL / RL).
"""

from __future__ import annotations

import os
import re

import numpy as np

from cxr_jax.data import schema
from cxr_jax.data.sources import records as rec

LABEL_SPACE = schema.CHEXPERT14.name
SPLIT_FILES = (("train.csv", "train"), ("valid.csv", "val"))
_PATIENT = re.compile(r"^patient\d+$")
_STUDY = re.compile(r"^study\d+$")


def dataset_dir(manual_dir: str) -> str:
  """The folder holding train.csv / valid.csv: ``manual_dir`` or its CheXpert-v1.0* child."""
  if any(os.path.isfile(os.path.join(manual_dir, f)) for f, _ in SPLIT_FILES):
    return manual_dir
  for name in sorted(os.listdir(manual_dir)) if os.path.isdir(manual_dir) else ():
    child = os.path.join(manual_dir, name)
    if name.startswith("CheXpert-v1.0") and os.path.isfile(os.path.join(child, "train.csv")):
      return child
  raise rec.BadInput(f"{manual_dir}: no train.csv / valid.csv here or in a CheXpert-v1.0*/ "
                     f"folder (CheXpert manual_dir)")


def resolve_path(root: str, csv_path: str) -> str:
  """CSV ``Path`` -> absolute file path under the dataset folder ``root``."""
  parts = csv_path.strip().replace("\\", "/").split("/")
  if parts[0].startswith("CheXpert-v1.0"):
    parts = parts[1:]
  return os.path.abspath(os.path.join(root, *parts))


def read(manual_dir: str, *, uncertainty: str = "zeros", frontal_only: bool = True,
         skip_bad: bool = False, check_images: bool = True,
         mask_unmentioned: bool = False) -> tuple[list[rec.Record], rec.Problems]:
  """Reads train.csv and valid.csv -> (records, problems)."""
  rec.check_uncertainty(uncertainty)
  problems = rec.Problems(skip_bad)
  root = dataset_dir(manual_dir)
  classes = schema.CHEXPERT14.classes
  required = ("Path", "Frontal/Lateral", "AP/PA") + classes
  out = []
  seen: dict[str, str] = {}
  for file_name, split in SPLIT_FILES:
    csv_path = os.path.join(root, file_name)
    if not os.path.isfile(csv_path):
      continue
    columns, rows = rec.read_table(csv_path, required, problems)
    label_columns = [columns[c] for c in classes]
    for line, fields, image_id in rec.unique_rows(csv_path, rows, columns["Path"], "Path",
                                                  problems, seen):
      parts = image_id.replace("\\", "/").split("/")
      patient = next((p for p in parts if _PATIENT.match(p)), None)
      study = next((p for p in parts if _STUDY.match(p)), "")
      if patient is None:
        problems.add(csv_path, line, f"Path {image_id!r} has no patientNNNNN component")
        continue
      try:
        values = np.array([rec.parse_label_value(fields[i]) for i in label_columns])
      except ValueError as e:
        problems.add(csv_path, line, str(e))
        continue
      orientation = fields[columns["Frontal/Lateral"]].strip()
      if orientation not in ("Frontal", "Lateral"):
        problems.add(csv_path, line,
                     f"Frontal/Lateral is {orientation!r}, expected Frontal or Lateral")
        continue
      ap_pa = fields[columns["AP/PA"]].strip()
      if orientation == "Frontal":
        view = ap_pa or "FRONTAL"
      else:
        view = ap_pa if ap_pa in ("LL", "RL") else "LATERAL"
      if frontal_only and orientation != "Frontal":
        problems.filtered(csv_path, line, "lateral view (frontal_only)")
        continue
      path = resolve_path(root, image_id)
      if check_images and not os.path.isfile(path):
        problems.add(csv_path, line, "image file not found", image=path)
        continue
      labels, mask = rec.apply_uncertainty(values, uncertainty, blank_masked=mask_unmentioned)
      boxes, box_labels = rec.no_boxes()
      out.append(rec.Record(id=image_id, path=path, patient_id=patient, official_split=split,
                            labels=labels, label_mask=mask, boxes=boxes, box_labels=box_labels,
                            gaze=rec.no_gaze(), view=view, study_id=f"{patient}/{study}"))
  if not seen and not problems.count:
    raise rec.BadInput(f"{root}: neither train.csv nor valid.csv has rows")
  return out, problems
