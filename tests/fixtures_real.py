"""Small trees in the official download layouts of the real datasets, drawn from phantoms.

Each writer renders phantoms (``synthetic.render_example``: image, NIH-14 labels, boxes,
gaze) and lays them out as one dataset's download, with its official split files and
its box / gaze files, so they go through the readers and ``cxr-prepare`` like the real
thing; nothing is copied from the real sets:

  nih_tree       ChestX-ray14 (``phantom_export``), shaped like the full download: images in
                 both official lists, and BBox_List rows (NIH's 8 boxed classes) only for
                 images of test_list.txt, as all 984 real boxes are.
  chexpert_tree  CheXpert-v1.0-small: train.csv / valid.csv (1 / 0 / -1 / blank), JPEGs
                 under train/patientNNNNN/studyN/, a few lateral views.
  mimic_tree     MIMIC-CXR-JPG 2.0.0: files/pXX/pSUBJECT/sSTUDY/<dicom>.jpg and the
                 metadata, chexpert (study labels) and split tables (.csv.gz).
  reflacx_tree   REFLACX on the MIMIC tree: main_data/metadata_phase_3.csv, one reading
                 folder each with anomaly_location_ellipses.csv and fixations.csv.
  egd_tree       EGD-CXR on the MIMIC tree: master_sheet.csv, fixations.csv,
                 bounding_boxes.csv (anatomy).

``prepare_all(root, data_dir)`` writes all five and prepares them with ``cxr-prepare``'s
``main`` at ``PREPARED_SIZE`` px (a few seconds).
"""

from __future__ import annotations

import csv
import gzip
import os

import cv2
import numpy as np

from cxr_jax.data import schema
from cxr_jax.data.sources import phantom_export, synthetic

IMAGE_SIZE = 64      # the phantoms' size on disk (the 'original' images)
PREPARED_SIZE = 64   # cxr-prepare --image_size
NIH14 = schema.NIH14.classes

CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding",
                   "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
                   "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax",
                   "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices"]
MIMIC_META_HEADER = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription",
                     "ViewPosition", "Rows", "Columns", "StudyDate", "StudyTime"]
MIMIC_LABEL_HEADER = ["subject_id", "study_id"] + sorted(schema.CHEXPERT14.classes)
REFLACX_META = ["id", "split", "eye_tracking_data_discarded", "image", "dicom_id", "subject_id",
                "image_size_x", "image_size_y"]
REFLACX_FIXATIONS = ["timestamp_start_fixation", "timestamp_end_fixation", "x_position",
                     "y_position", "pupil_area_normalized"]
EGD_FIXATIONS = ["SESSION_ID", "MEDIA_ID", "DICOM_ID", "CNT", "FPOGX", "FPOGY", "FPOGD", "FPOGID",
                 "X_ORIGINAL", "Y_ORIGINAL"]
# Phantom (NIH-14) findings -> REFLACX classes; the others have no REFLACX box.
TO_REFLACX = {"Atelectasis": "Atelectasis", "Cardiomegaly": "Enlarged cardiac silhouette",
              "Effusion": "Pleural abnormality", "Infiltration": "Groundglass opacity",
              "Mass": "Lung nodule or mass", "Nodule": "Lung nodule or mass",
              "Pneumothorax": "Pneumothorax", "Consolidation": "Consolidation",
              "Edema": "Pulmonary edema", "Emphysema": "High lung volume / emphysema",
              "Fibrosis": "Interstitial lung disease", "Pleural_Thickening": "Pleural abnormality",
              "Hernia": "Hiatal hernia"}


def write_csv(path, header, rows, gz=False):
  """A CSV (gzipped with ``gz``) with ``header`` then ``rows``; folders created."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with (gzip.open(path, "wt", newline="") if gz else open(path, "w", newline="")) as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)


SEED = 7  # the phantom set the trees are drawn from


def _phantom(index: int) -> dict:
  return synthetic.render_example(SEED, index, IMAGE_SIZE)


def _alternating(count: int, start: int) -> list[int]:
  """``count`` phantom indices from ``start`` on, with findings at even positions and none
  at odd ones (so every split of a few patients has positives and normal images)."""
  out, index = [], start
  while len(out) < count:
    if bool(synthetic.sample_labels(SEED, index).any()) == (len(out) % 2 == 0):
      out.append(index)
    index += 1
  return out


def _write_image(path, image):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  assert cv2.imwrite(str(path), image)


def _positive(example) -> list[str]:
  return [NIH14[c] for c in np.flatnonzero(example["labels"])]


def _chexpert_cells(example, rng) -> dict[str, str]:
  """CheXpert-14 cells of a phantom: its findings mapped by name ('1.0'), one of them
  uncertain ('-1.0') now and then, a few explicit negatives, 'No Finding' when none."""
  space = schema.CHEXPERT14
  mapping = schema.label_mapping(schema.NIH14, space)
  cells = {}
  for c, src in enumerate(mapping):
    if src >= 0 and example["labels"][src]:
      cells[space.classes[c]] = "-1.0" if rng.random() < 0.2 else "1.0"
    elif src >= 0 and rng.random() < 0.3:
      cells[space.classes[c]] = "0.0"
  if not _positive(example):
    cells["No Finding"] = "1.0"
  if rng.random() < 0.2:
    cells["Support Devices"] = "1.0"
  return cells


def nih_tree(root, num: int = 80, test_fraction: float = 0.4) -> str:
  """ChestX-ray14 of ``num`` phantoms, shaped like the full download (module docstring)."""
  root = str(root)
  phantom_export.export(root, num, IMAGE_SIZE, seed=3, test_fraction=test_fraction)
  with open(os.path.join(root, phantom_export.TEST_FILE)) as f:
    test = set(f.read().split())
  path = os.path.join(root, phantom_export.BBOX_FILE)
  with open(path) as f:
    header, *rows = f.read().splitlines()
  boxed = set(schema.NIH14.boxed) | {"Infiltrate"}
  kept = [r for r in rows if r.split(",")[0] in test and r.split(",")[1] in boxed]
  with open(path, "w") as f:
    f.write("\n".join([header] + kept) + "\n")
  return root


def chexpert_tree(root, num_train: int = 32, num_valid: int = 8) -> str:
  """CheXpert-v1.0-small with ``num_train`` / ``num_valid`` frontal images (2 per patient)
  and a lateral view for every fourth study."""
  base = os.path.join(str(root), "CheXpert-v1.0-small")
  rng = np.random.default_rng(1)
  rows = {"train": [], "valid": []}
  for index, phantom in enumerate(_alternating(num_train + num_valid, 1000)):
    part = "train" if index < num_train else "valid"
    patient, study = divmod(index, 2)
    example = _phantom(phantom)
    cells = _chexpert_cells(example, rng)
    views = [("view1_frontal.jpg", "Frontal", "PA" if index % 3 else "AP")]
    if index % 4 == 0:
      views.append(("view2_lateral.jpg", "Lateral", ""))
    for name, fl, appa in views:
      rel = f"{part}/patient{patient + 1:05d}/study{study + 1}/{name}"
      _write_image(os.path.join(base, rel), example["image"])
      rows[part].append([f"CheXpert-v1.0-small/{rel}", "Female", "60", fl, appa] +
                        [cells.get(c, "") for c in CHEXPERT_HEADER[5:]])
  for part, name in (("train", "train.csv"), ("valid", "valid.csv")):
    write_csv(os.path.join(base, name), CHEXPERT_HEADER, rows[part])
  return base


def mimic_images(num: int = 60) -> list[dict]:
  """The MIMIC fixture's frontal images: dicom id, subject, study, split, phantom index."""
  out = []
  for index, phantom in enumerate(_alternating(num, 2000)):
    subject = 10000000 + 1000 * (index // 2)
    split = ("test" if (index // 2) % 5 == 0 else "validate" if (index // 2) % 10 == 3
             else "train")
    out.append(dict(dicom=f"dicom-{index:03d}", subject=str(subject),
                    study=str(50000000 + index // 2), split=split, phantom=phantom))
  return out


def mimic_tree(root, num: int = 60) -> str:
  """MIMIC-CXR-JPG with ``num`` frontal images (2 per study, one study per subject) and a
  lateral view for every sixth study; splits by subject."""
  root = str(root)
  rng = np.random.default_rng(2)
  meta, split_rows, studies = [], [], {}
  images = mimic_images(num)
  laterals = [dict(m, dicom=m["dicom"] + "-lat") for m in images[::12]]
  for m in images + laterals:
    example = _phantom(m["phantom"])
    view = "LATERAL" if m["dicom"].endswith("-lat") else "PA"
    meta.append([m["dicom"], m["subject"], m["study"], "CHEST (PA AND LAT)", view, IMAGE_SIZE,
                 IMAGE_SIZE, "21800506", "213014.531"])
    split_rows.append([m["dicom"], m["study"], m["subject"], m["split"]])
    _write_image(os.path.join(root, "files", f"p{m['subject'][:2]}", f"p{m['subject']}",
                              f"s{m['study']}", f"{m['dicom']}.jpg"), example["image"])
    if view == "PA":
      cells = studies.setdefault((m["subject"], m["study"]), {})
      for name, value in _chexpert_cells(example, rng).items():
        cells[name] = value if cells.get(name) != "1.0" else "1.0"
      if any(v != "0.0" for n, v in cells.items() if n not in ("No Finding", "Support Devices")):
        cells.pop("No Finding", None)   # a study with a finding is not 'No Finding'
  write_csv(os.path.join(root, "mimic-cxr-2.0.0-metadata.csv.gz"), MIMIC_META_HEADER, meta, True)
  write_csv(os.path.join(root, "mimic-cxr-2.0.0-split.csv.gz"),
             ["dicom_id", "study_id", "subject_id", "split"], split_rows, True)
  write_csv(os.path.join(root, "mimic-cxr-2.0.0-chexpert.csv.gz"), MIMIC_LABEL_HEADER,
             [[subject, study] + [cells.get(c, "") for c in MIMIC_LABEL_HEADER[2:]]
              for (subject, study), cells in studies.items()], True)
  return root


def _pixels(example) -> tuple[list, list]:
  """(boxes (x0, y0, x1, y1) in pixels, NIH-14 class names) of a phantom."""
  boxes, names = [], []
  for box, c in zip(example["boxes"], example["box_labels"]):
    if c >= 0:
      boxes.append([round(float(v) * IMAGE_SIZE, 2) for v in box])
      names.append(NIH14[c])
  return boxes, names


def _fixations(example) -> np.ndarray:
  """[F, 3] (x px, y px, seconds) of a phantom's gaze."""
  gaze = example["gaze"][example["gaze"][:, 2] > 0]
  return np.column_stack([gaze[:, :2] * IMAGE_SIZE, gaze[:, 2]])


def reflacx_tree(root, num: int = 36) -> str:
  """REFLACX on the first ``num`` MIMIC fixture images: one phase-3 reading each (findings
  at certainty 4, ellipses around the phantom's boxes, its gaze); every fifth reading's eye
  tracking is discarded."""
  main = os.path.join(str(root), "main_data")
  classes = schema.REFLACX.classes
  rows = []
  for i, m in enumerate(mimic_images()[:num]):
    example = _phantom(m["phantom"])
    reading = f"P300R{i:03d}"
    found = {TO_REFLACX[n] for n in _positive(example) if n in TO_REFLACX}
    cells = ["True" if c == "Support devices" and i % 4 == 0 else
             "False" if c == "Support devices" else "4" if c in found else "0" for c in classes]
    discarded = i % 5 == 4
    rows.append([reading, m["split"], str(discarded),
                 f"files/p{m['subject'][:2]}/p{m['subject']}/s{m['study']}/{m['dicom']}.dcm",
                 m["dicom"], m["subject"], IMAGE_SIZE, IMAGE_SIZE] + cells)
    boxes, names = _pixels(example)
    ellipses = [box + [4] + [str(TO_REFLACX.get(n) == c) for c in classes if c != "Support devices"]
                for box, n in zip(boxes, names) if n in TO_REFLACX]
    write_csv(os.path.join(main, reading, "anomaly_location_ellipses.csv"),
               ["xmin", "ymin", "xmax", "ymax", "certainty"] +
               [c for c in classes if c != "Support devices"], ellipses)
    if not discarded:
      t = np.cumsum(np.r_[0.0, _fixations(example)[:, 2]])
      write_csv(os.path.join(main, reading, "fixations.csv"), REFLACX_FIXATIONS,
                 [[t[j], t[j + 1], x, y, 0.5] for j, (x, y, _) in
                  enumerate(_fixations(example))])
  write_csv(os.path.join(main, "metadata_phase_3.csv"), REFLACX_META + list(classes), rows)
  return str(root)


def egd_tree(root, first: int = 20, num: int = 30) -> str:
  """EGD-CXR on MIMIC fixture images ``first`` .. ``first + num - 1`` (overlapping
  REFLACX's): Normal / CHF / pneumonia from the phantom's findings, its gaze, two
  anatomical boxes each."""
  root = str(root)
  sheet, fixations, anatomy = [], [], []
  for m in mimic_images()[first:first + num]:
    example = _phantom(m["phantom"])
    found = set(_positive(example))
    chf = int(bool(found & {"Cardiomegaly", "Edema", "Effusion"}))
    pneumonia = int(bool(found & {"Pneumonia", "Consolidation", "Infiltration"}))
    sheet.append([m["dicom"], f"files/p{m['subject'][:2]}/p{m['subject']}/s{m['study']}/"
                  f"{m['dicom']}.dcm", m["study"], m["subject"], int(not found), chf, pneumonia])
    for j, (x, y, seconds) in enumerate(_fixations(example)):
      fixations.append(["1", "1", m["dicom"], j, x / IMAGE_SIZE, y / IMAGE_SIZE, seconds, j, x, y])
    anatomy += [[m["dicom"], "right lung", 8, 30, 8, 52], [m["dicom"], "left lung", 34, 56, 8, 52]]
  write_csv(os.path.join(root, "master_sheet.csv"),
             ["dicom_id", "path", "study_id", "patient_id", "Normal", "CHF", "pneumonia"], sheet)
  write_csv(os.path.join(root, "fixations.csv"), EGD_FIXATIONS, fixations)
  write_csv(os.path.join(root, "bounding_boxes.csv"),
             ["dicom_id", "bbox_name", "x1", "x2", "y1", "y2"], anatomy)
  return root


def write_all(root) -> dict[str, str]:
  """Every tree under ``root`` -> {dataset: its manual_dir} ('mimic' is also the
  ``--mimic_dir`` of REFLACX and EGD-CXR)."""
  root = str(root)
  return {"nih": nih_tree(os.path.join(root, "nih")),
          "chexpert": chexpert_tree(os.path.join(root, "chexpert")),
          "mimic": mimic_tree(os.path.join(root, "mimic")),
          "reflacx": reflacx_tree(os.path.join(root, "reflacx")),
          "egd": egd_tree(os.path.join(root, "egd"))}


def prepare_all(root, data_dir) -> dict[str, str]:
  """``write_all`` and ``cxr-prepare`` each at ``PREPARED_SIZE`` into ``data_dir``
  -> {dataset: its prepared folder}."""
  from cxr_jax.cli import prepare  # pylint: disable=import-outside-toplevel
  trees = write_all(root)
  out = {}
  for dataset, manual_dir in trees.items():
    argv = [f"--dataset={dataset}", f"--manual_dir={manual_dir}", f"--data_dir={data_dir}",
            f"--image_size={PREPARED_SIZE}", "--no_progress", "--workers=1"]
    if dataset in ("reflacx", "egd"):
      argv.append(f"--mimic_dir={trees['mimic']}")
    out[dataset] = prepare.main(argv)
  return out
