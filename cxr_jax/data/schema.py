"""The Example record every data source yields, and the label spaces.

An Example is a plain ``dict`` of numpy arrays and strings (Grain moves dicts
between worker processes cheaply), with the keys, dtypes and shapes of
``EXAMPLE_SPEC``:

  image        uint8   [H, W]            grayscale
  labels       float32 [K]               in {0, 1}
  label_mask   float32 [K]               in {0, 1}; 0 = unknown / uncertain
  boxes        float32 [MAX_BOXES, 4]    (x0, y0, x1, y1), normalized to [0, 1]
  box_labels   int32   [MAX_BOXES]       class index, -1 = padding
  gaze         float32 [MAX_FIXATIONS, 3] (x, y, seconds), x/y normalized to
                                         [0, 1]; padding rows have seconds 0
  patient_id   str
  image_id     str

Coordinates are normalized to the image (x to width, y to height), so they
survive resizing; pixels are recovered as ``x * W``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

MAX_BOXES = 16
MAX_FIXATIONS = 256

Example = dict[str, Any]


class ExampleError(ValueError):
  """An Example that breaks the contract; the message names its origin."""


@dataclasses.dataclass(frozen=True)
class LabelSpace:
  """An ordered set of class names; ``boxed`` lists the ones with box annotations."""
  name: str
  classes: tuple[str, ...]
  boxed: tuple[str, ...] = ()

  def __post_init__(self):
    if len(set(self.classes)) != len(self.classes):
      raise ValueError(f"label space {self.name!r} repeats a class name")
    unknown = set(self.boxed) - set(self.classes)
    if unknown:
      raise ValueError(f"label space {self.name!r}: boxed classes {sorted(unknown)} not in classes")

  def __len__(self) -> int:
    return len(self.classes)

  def index(self, name: str) -> int:
    """Index of class ``name``; raises a KeyError that lists the valid names."""
    try:
      return self.classes.index(name)
    except ValueError:
      raise KeyError(f"{name!r} is not a class of label space {self.name!r}; "
                     f"classes are {list(self.classes)}") from None

  @property
  def boxed_indices(self) -> tuple[int, ...]:
    return tuple(self.index(c) for c in self.boxed)


NIH14 = LabelSpace(
    name="nih14",
    classes=("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass",
             "Nodule", "Pneumonia", "Pneumothorax", "Consolidation", "Edema",
             "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"),
    boxed=("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass",
           "Nodule", "Pneumonia", "Pneumothorax"),
)

# CheXpert has no boxes; ``boxed`` lists the classes whose NIH-14 counterparts are boxed, so
# NIH boxes mapped into this space are scored (Talasila 2023's NIH IoU of a CheXpert model).
CHEXPERT14 = LabelSpace(
    name="chexpert14",
    classes=("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly",
             "Lung Opacity", "Lung Lesion", "Edema", "Consolidation",
             "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
             "Pleural Other", "Fracture", "Support Devices"),
    boxed=("Cardiomegaly", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion"),
)

# REFLACX phase 2-3 labels (certainty >= 3; phase-1 names mapped onto them in
# sources/reflacx.py), boxes from the anomaly ellipses.
REFLACX = LabelSpace(
    name="reflacx",
    classes=("Abnormal mediastinal contour", "Acute fracture", "Atelectasis", "Consolidation",
             "Enlarged cardiac silhouette", "Enlarged hilum", "Groundglass opacity",
             "Hiatal hernia", "High lung volume / emphysema", "Interstitial lung disease",
             "Lung nodule or mass", "Pleural abnormality", "Pneumothorax", "Pulmonary edema",
             "Support devices"),
    boxed=("Abnormal mediastinal contour", "Acute fracture", "Atelectasis", "Consolidation",
           "Enlarged cardiac silhouette", "Enlarged hilum", "Groundglass opacity",
           "Hiatal hernia", "High lung volume / emphysema", "Interstitial lung disease",
           "Lung nodule or mass", "Pleural abnormality", "Pneumothorax", "Pulmonary edema"),
)

# EGD-CXR (Karargyris 2021): the three study classes of master_sheet.csv.
EGD3 = LabelSpace(name="egd3", classes=("Normal", "CHF", "Pneumonia"))

LABEL_SPACES = {s.name: s for s in (NIH14, CHEXPERT14, REFLACX, EGD3)}

# Names that denote the same finding in different label spaces. Only exact
# synonyms: a class with no counterpart is masked out, never approximated
# (e.g. NIH Mass/Nodule are not CheXpert "Lung Lesion", which is broader).
SYNONYMS = (
    frozenset({"Effusion", "Pleural Effusion"}),
    frozenset({"Infiltration", "Infiltrate"}),
)


def get_label_space(name: str) -> LabelSpace:
  try:
    return LABEL_SPACES[name]
  except KeyError:
    raise KeyError(f"unknown label space {name!r}; known: {sorted(LABEL_SPACES)}") from None


def _canonical(name: str) -> str:
  for group in SYNONYMS:
    if name in group:
      return min(group)
  return name


def label_mapping(src: LabelSpace, dst: LabelSpace) -> np.ndarray:
  """int32 [len(dst)]: for each dst class the src index with the same name, or -1."""
  src_index = {_canonical(c): i for i, c in enumerate(src.classes)}
  return np.array([src_index.get(_canonical(c), -1) for c in dst.classes], np.int32)


def map_labels(labels: np.ndarray, label_mask: np.ndarray, src: LabelSpace,
               dst: LabelSpace) -> tuple[np.ndarray, np.ndarray]:
  """Re-expresses labels [..., len(src)] in ``dst``; unmatched dst classes get mask 0."""
  mapping = label_mapping(src, dst)
  safe = np.maximum(mapping, 0)
  known = (mapping >= 0).astype(np.float32)
  new_labels = np.take(labels, safe, axis=-1) * known
  new_mask = np.take(label_mask, safe, axis=-1) * known
  return new_labels.astype(np.float32), new_mask.astype(np.float32)


def empty_boxes() -> tuple[np.ndarray, np.ndarray]:
  return np.zeros((MAX_BOXES, 4), np.float32), np.full((MAX_BOXES,), -1, np.int32)


def empty_gaze() -> np.ndarray:
  return np.zeros((MAX_FIXATIONS, 3), np.float32)


def pad_boxes(boxes: Sequence[Sequence[float]], labels: Sequence[int],
              origin: str = "?") -> tuple[np.ndarray, np.ndarray]:
  """Pads a list of normalized (x0, y0, x1, y1) boxes to MAX_BOXES rows."""
  if len(boxes) != len(labels):
    raise ExampleError(f"{origin}: {len(boxes)} boxes but {len(labels)} box labels")
  if len(boxes) > MAX_BOXES:
    raise ExampleError(f"{origin}: {len(boxes)} boxes, more than MAX_BOXES={MAX_BOXES}")
  out, out_labels = empty_boxes()
  if len(boxes):
    out[:len(boxes)] = np.asarray(boxes, np.float32).reshape(-1, 4)
    out_labels[:len(boxes)] = np.asarray(labels, np.int32)
  return out, out_labels


def pad_gaze(fixations: np.ndarray, origin: str = "?") -> np.ndarray:
  """Pads [F, 3] (x, y, seconds) fixations to MAX_FIXATIONS rows (keeps the longest)."""
  fixations = np.asarray(fixations, np.float32).reshape(-1, 3)
  if len(fixations) > MAX_FIXATIONS:
    keep = np.sort(np.argsort(-fixations[:, 2], kind="stable")[:MAX_FIXATIONS])
    fixations = fixations[keep]
  out = empty_gaze()
  out[:len(fixations)] = fixations
  return out


EXAMPLE_SPEC: Mapping[str, tuple[Any, tuple[Any, ...] | None]] = {
    # key: (dtype, shape); "H", "W", "K" are per-example dimensions.
    "image": (np.uint8, ("H", "W")),
    "labels": (np.float32, ("K",)),
    "label_mask": (np.float32, ("K",)),
    "boxes": (np.float32, (MAX_BOXES, 4)),
    "box_labels": (np.int32, (MAX_BOXES,)),
    "gaze": (np.float32, (MAX_FIXATIONS, 3)),
    "patient_id": (str, None),
    "image_id": (str, None),
}


def validate_example(example: Mapping[str, Any], num_classes: int,
                     origin: str = "?") -> None:
  """Raises ExampleError naming ``origin`` (file/row/index) if ``example`` breaks the contract.

  Extra keys are allowed (e.g. the synthetic source's exact finding masks).
  """
  def fail(msg):
    raise ExampleError(f"{origin}: {msg}")

  missing = [k for k in EXAMPLE_SPEC if k not in example]
  if missing:
    fail(f"missing keys {missing}")
  for key, (dtype, shape) in EXAMPLE_SPEC.items():
    value = example[key]
    if dtype is str:
      if not isinstance(value, str) or not value:
        fail(f"{key} must be a non-empty str, got {value!r}")
      continue
    if not isinstance(value, np.ndarray):
      fail(f"{key} must be a numpy array, got {type(value).__name__}")
    if value.dtype != dtype:
      fail(f"{key} has dtype {value.dtype}, expected {np.dtype(dtype)}")
    want = tuple(num_classes if d == "K" else d for d in shape)
    if len(value.shape) != len(want) or any(
        isinstance(w, int) and w != s for w, s in zip(want, value.shape)):
      fail(f"{key} has shape {value.shape}, expected {want}")
  if min(example["image"].shape) < 1:
    fail(f"image has empty shape {example['image'].shape}")
  for key in ("labels", "label_mask"):
    v = example[key]
    if not np.all((v == 0) | (v == 1)):
      fail(f"{key} must be 0/1, got {v}")
  box_labels = example["box_labels"]
  if np.any((box_labels < -1) | (box_labels >= num_classes)):
    fail(f"box_labels outside [-1, {num_classes}): {box_labels}")
  valid = box_labels >= 0
  if np.any(valid[1:] & ~valid[:-1]):
    fail("padding rows (box_labels == -1) must come after all real boxes")
  boxes = example["boxes"][valid]
  if boxes.size:
    if not np.all(np.isfinite(boxes)) or np.any(boxes < 0) or np.any(boxes > 1):
      fail(f"box outside the image (normalized coordinates must lie in [0, 1]): "
           f"{boxes[np.any((boxes < 0) | (boxes > 1) | ~np.isfinite(boxes), axis=1)].tolist()}")
    if np.any(boxes[:, 2] < boxes[:, 0]) or np.any(boxes[:, 3] < boxes[:, 1]):
      fail(f"box with x1 < x0 or y1 < y0: {boxes.tolist()}")
  gaze = example["gaze"]
  if not np.all(np.isfinite(gaze)):
    fail("gaze has non-finite values")
  seconds = gaze[:, 2]
  if np.any(seconds < 0):
    fail("gaze durations must be >= 0")
  real = seconds > 0
  if np.any((gaze[real, :2] < 0) | (gaze[real, :2] > 1)):
    fail("gaze fixation outside the image (x, y must lie in [0, 1])")
