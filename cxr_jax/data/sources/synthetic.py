"""Synthetic phantom chest X-rays: the embedded default dataset.

Every example is rendered on the fly, deterministically from ``(seed, index)``
(``index`` already includes the source's ``offset``), at any square size
from 16 to 1024 px, with vectorised numpy on the pixel grid (support devices with
cv2 line drawing). No global random state: each example draws from
``np.random.default_rng([seed, stream, index])``, so the source is safe in
Grain worker processes and picklable. The anatomy and its scene are drawn by
``phantom_anatomy``, findings, support devices and gaze by ``phantom_findings``;
here are the label model, the pose, the rendering and the source.

Scene (a PA film; the patient's left is the image's RIGHT):
  * anatomy, fixed per patient (``IMAGES_PER_PATIENT`` consecutive indices):
    body outline, two lung fields with vascular markings, heart mostly on the
    image right, mediastinum and aortic knob, spine, posterior ribs,
    clavicles, diaphragm domes (right dome higher), gastric bubble;
  * per image: findings, support devices, pose (rotation +-10 deg, scale
    +-10 %, shift +-8 % of the image), exposure (contrast, brightness, gamma),
    soft-tissue and quantum noise. Everything (anatomy, findings, devices,
    boxes, gaze) is drawn in the patient's canonical frame and mapped through
    the same pose, so it stays aligned.

Labels follow NIH-14 (``schema.NIH14``). ``sample_labels`` draws them from a
model fitted to Data_Entry_2017_v2020.csv (112,120 images): "No Finding" with
its NIH rate, the number of findings from NIH's distribution, then findings
one at a time, each with probability proportional to a calibrated class weight
times NIH's co-occurrence lift with the findings already drawn. Marginals match
``TARGET_PREVALENCE`` within ~2 % (relative).

Ground truth (exact, after the pose):
  * ``finding_masks[c]`` (``render(..., with_masks=True)``) is the set of pixels
    where class ``c`` changed the image: the support of its drawing. Textures
    (infiltration mottling, fibrosis net) count their whole drawn region.
    Cardiomegaly's mask is the enlarged heart; emphysema's the hyperinflated
    lung fields; edema's the perihilar haze in each lung.
  * One box per drawn instance, for all 14 classes: the tight pixel bounding
    box of the instance's mask, normalized as (x0/W, y0/H, (x1+1)/W, (y1+1)/H)
    for pixel columns x0..x1 and rows y0..y1. Diffuse findings get one
    instance per affected lung (effusion, edema, emphysema, fibrosis, pleural
    thickening when bilateral); nodules 1-3, infiltration 1-2, others one.
  * ``device_mask``: pixels of support devices (ECG leads, endotracheal and
    nasogastric tubes, central lines, chest drains). Devices are not findings,
    but are far more frequent in ICU-type images (effusion, edema,
    atelectasis, consolidation, ...): a shortcut a classifier can exploit.
  * Gaze: a simulated radiologist's fixations (x, y, seconds): a systematic
    scan of both lungs' upper/middle/lower zones, heart, costophrenic angles
    (~0.3 s each), plus 2-6 longer fixations (~0.75 s) on pixels of every
    finding instance, inserted into the scan.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any

import numpy as np

from cxr_jax.data import schema, splits
from cxr_jax.data.sources import phantom_anatomy, phantom_findings

IMAGES_PER_PATIENT: int = 2
INFINITE_LEN: int = 2**31 - 1

CLASSES = schema.NIH14.classes
NUM_CLASSES = len(CLASSES)
_C = {name: i for i, name in enumerate(CLASSES)}

# Per-class prevalence in NIH ChestX-ray14 (Data_Entry_2017_v2020.csv).
TARGET_PREVALENCE: dict[str, float] = {
    "Atelectasis": 0.1031, "Cardiomegaly": 0.0248, "Effusion": 0.1188,
    "Infiltration": 0.1774, "Mass": 0.0516, "Nodule": 0.0565,
    "Pneumonia": 0.0128, "Pneumothorax": 0.0473, "Consolidation": 0.0416,
    "Edema": 0.0205, "Emphysema": 0.0224, "Fibrosis": 0.0150,
    "Pleural_Thickening": 0.0302, "Hernia": 0.0020,
}
NO_FINDING_RATE = 0.5384
# P(number of findings = 1..5 | any finding) in NIH (5 includes the rare 6-9).
_NUM_FINDINGS_P = np.array([0.5982, 0.2764, 0.0938, 0.0241, 0.0075])
_NUM_FINDINGS_P = _NUM_FINDINGS_P / _NUM_FINDINGS_P.sum()
# Class weights of the sequential draw, calibrated (Monte Carlo, 4e5 draws
# per step) so that the marginals equal TARGET_PREVALENCE.
_CLASS_WEIGHTS = np.array([0.47687, 0.1062, 0.5367, 1.0, 0.23082, 0.26445, 0.04335,
                           0.22541, 0.16198, 0.07026, 0.09389, 0.07136, 0.12167,
                           0.00976])
# NIH co-occurrence lifts P(a, b) / (P(a) P(b)) of the most associated pairs;
# all other pairs get 1.
_PAIR_LIFTS = {
    ("Atelectasis", "Effusion"): 2.4, ("Atelectasis", "Consolidation"): 2.5,
    ("Atelectasis", "Pneumonia"): 1.8, ("Cardiomegaly", "Effusion"): 3.2,
    ("Cardiomegaly", "Edema"): 2.2, ("Effusion", "Consolidation"): 2.3,
    ("Effusion", "Edema"): 2.2, ("Effusion", "Pleural_Thickening"): 2.1,
    ("Infiltration", "Pneumonia"): 2.4, ("Infiltration", "Edema"): 2.4,
    ("Mass", "Nodule"): 2.8, ("Mass", "Consolidation"): 2.5,
    ("Mass", "Pleural_Thickening"): 2.6, ("Nodule", "Pleural_Thickening"): 2.2,
    ("Pneumonia", "Edema"): 11.6, ("Pneumonia", "Consolidation"): 2.1,
    ("Pneumothorax", "Emphysema"): 6.3, ("Fibrosis", "Pleural_Thickening"): 3.5,
    ("Emphysema", "Pleural_Thickening"): 2.0,
}
_LOG_LIFT = np.zeros((NUM_CLASSES, NUM_CLASSES))
for (_a, _b), _lift in _PAIR_LIFTS.items():
  _LOG_LIFT[_C[_a], _C[_b]] = _LOG_LIFT[_C[_b], _C[_a]] = math.log(_lift)

# Random streams: np.random.default_rng([seed, stream, index]).
_LABELS, _APPEARANCE, _ANATOMY, _POSE = 0, 1, 2, 3


def _rng(seed: int, stream: int, index: int) -> np.random.Generator:
  return np.random.default_rng([seed, stream, index])


def sample_labels(seed: int, index: int) -> np.ndarray:
  """float32 [14] NIH-14 labels of example ``index`` (cheap: no rendering)."""
  rng = _rng(seed, _LABELS, index)
  labels = np.zeros(NUM_CLASSES, np.float32)
  if rng.random() < NO_FINDING_RATE:
    return labels
  num = 1 + rng.choice(len(_NUM_FINDINGS_P), p=_NUM_FINDINGS_P)
  log_affinity = np.zeros(NUM_CLASSES)
  for _ in range(num):
    weights = _CLASS_WEIGHTS * np.exp(log_affinity) * (labels == 0)
    c = rng.choice(NUM_CLASSES, p=weights / weights.sum())
    labels[c] = 1
    log_affinity += _LOG_LIFT[c]
  return labels


@dataclasses.dataclass(frozen=True)
class Pose:
  """Canonical patient frame -> image frame ([-1, 1]^2, y down): X = s R p + t."""
  angle: float = 0.0    # radians
  scale: float = 1.0
  shift: tuple[float, float] = (0.0, 0.0)   # in [-1, 1] units (2 = image size)

  def matrix(self) -> np.ndarray:
    """float64 [2, 3] affine matrix of X = s R p + t."""
    c, s = math.cos(self.angle) * self.scale, math.sin(self.angle) * self.scale
    return np.array([[c, -s, self.shift[0]], [s, c, self.shift[1]]])

  def to_image(self, points: np.ndarray) -> np.ndarray:
    """[N, 2] canonical points -> [N, 2] image-frame points."""
    m = self.matrix()
    return np.asarray(points, np.float64) @ m[:, :2].T + m[:, 2]


def sample_pose(seed: int, index: int) -> Pose:
  """The pose of example ``index``: rotation +-10 deg, scale +-10 %, shift +-8 %."""
  rng = _rng(seed, _POSE, index)
  angle = math.radians(rng.uniform(-10, 10))
  scale = rng.uniform(0.9, 1.1)
  shift = tuple(2 * rng.uniform(-0.08, 0.08, size=2))
  return Pose(angle, scale, shift)


def anatomy_regions(image_size: int) -> dict[str, np.ndarray]:
  """bool [S,S] regions of the mid-range anatomy in the canonical pose (no pose jitter).

  Every anatomy parameter at the middle of its sampling range: 'lung_image_left',
  'lung_image_right' (air fields, outside heart and mediastinum), 'heart', and
  'below_heart' (where hernias are drawn). For templates such as Kim 2022's
  pseudo-disease masks.
  """
  mid = lambda low, high: (low + high) / 2
  dome_right = mid(0.36, 0.44)
  dome_left = dome_right + mid(0.03, 0.08)
  anatomy = phantom_anatomy.Anatomy(
      body_rx=mid(0.86, 0.94), body_ry=mid(1.05, 1.2), body_cy=mid(0.12, 0.2),
      tissue=mid(0.52, 0.6), air=mid(0.28, 0.34), lung_cx=mid(0.39, 0.43),
      lung_rx=mid(0.3, 0.34), apex=mid(-0.72, -0.64), dome=(dome_right, dome_left),
      dome_k=mid(1.4, 2.0),
      heart=(mid(0.1, 0.15), dome_left - mid(0.1, 0.15), mid(0.28, 0.32), mid(0.2, 0.24)),
      rib_spacing=mid(0.13, 0.16), rib_phase=0.5, markings=mid(0.06, 0.09))
  scene = phantom_anatomy.Scene(image_size, Pose(), anatomy, np.random.default_rng(0))
  _, hy, _, hry = anatomy.heart
  radius = mid(0.09, 0.13)
  hernia = phantom_anatomy.ellipse_q(scene.u, scene.v, 0.03, hy + hry * mid(0.55, 0.8),
                                     radius * 1.2, radius)
  return {"lung_image_left": scene.field[0], "lung_image_right": scene.field[1],
          "heart": scene.heart_q < 1, "below_heart": hernia < 1}


# ---------------------------------------------------------------------------
# Rendering.


def _box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
  rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
  if not len(rows):
    return None
  h, w = mask.shape
  return (cols[0] / w, rows[0] / h, (cols[-1] + 1) / w, (rows[-1] + 1) / h)


def render_example(seed: int, index: int, image_size: int = 64,
                   with_masks: bool = False, apply_pose: bool = True) -> dict:
  """Renders example ``index`` (offset included) of phantom set ``seed``.

  Returns an Example (schema.py, NIH-14); with ``with_masks`` also
  'finding_masks' bool [14, H, W] and 'device_mask' bool [H, W].
  ``apply_pose=False`` renders the same scene in the canonical pose.
  """
  if not 16 <= image_size <= 1024:
    raise ValueError(f"synthetic phantoms: image_size={image_size} outside [16, 1024]")
  if seed < 0 or index < 0:
    raise ValueError(f"synthetic phantoms: seed={seed} and index={index} must be >= 0")
  labels = sample_labels(seed, index)
  patient = index // IMAGES_PER_PATIENT
  anatomy = phantom_anatomy.sample_anatomy(_rng(seed, _ANATOMY, patient))
  rng = _rng(seed, _APPEARANCE, index)
  if labels[_C["Cardiomegaly"]]:
    anatomy = phantom_findings.enlarged_heart(rng, anatomy)
  if labels[_C["Emphysema"]]:
    anatomy = phantom_findings.emphysema_anatomy(rng, anatomy)
  pose = sample_pose(seed, index) if apply_pose else Pose()
  scene = phantom_anatomy.Scene(image_size, pose, anatomy, rng)

  finding_masks = np.zeros((NUM_CLASSES, image_size, image_size), bool)
  boxes, box_labels, instances = [], [], []
  for c in np.flatnonzero(labels):
    name = CLASSES[c]
    for mask in phantom_findings.DRAW[name](rng, scene):
      box = _box(mask)
      if box is not None:
        finding_masks[c] |= mask
        boxes.append(box)
        box_labels.append(int(c))
        instances.append(mask)
  if rng.random() < 0.7:   # gastric bubble under the left dome
    scene.density -= 0.12 * (scene.gastric_q < 1)
  device = phantom_findings.devices(rng, scene, labels)
  density = scene.density - scene.air_map + scene.markings * (scene.field[0] | scene.field[1])
  density = density + 0.45 * device

  # Exposure and noise.
  density = density + 0.04 * scene.texture(4) + rng.uniform(0.008, 0.025) * rng.standard_normal(
      density.shape, dtype=np.float32)
  contrast, brightness, gamma = rng.uniform(0.8, 1.2), rng.uniform(-0.08, 0.08), rng.uniform(0.8, 1.25)
  image = np.clip((density - 0.4) * contrast + 0.4 + brightness, 0, 1)**gamma
  image = (image * 255 + 0.5).astype(np.uint8)

  origin = f"phantom{seed}-{index}"
  box_array, box_label_array = schema.pad_boxes(boxes, box_labels, origin)
  example = {
      "image": image,
      "labels": labels,
      "label_mask": np.ones(NUM_CLASSES, np.float32),
      "boxes": box_array,
      "box_labels": box_label_array,
      "gaze": schema.pad_gaze(phantom_findings.gaze(rng, scene, instances), origin),
      "patient_id": f"phantom{seed}-{patient}",
      "image_id": origin,
  }
  if with_masks:
    example["finding_masks"] = finding_masks
    example["device_mask"] = device > 0.25
  return example


class SyntheticPhantoms:
  """Random-access source of phantom CXRs (a grain RandomAccessDataSource).

  Index ``i`` renders example ``offset + i`` of phantom set ``seed``;
  ``num_examples=None`` makes the source effectively infinite
  (``len == INFINITE_LEN``).
  """

  def __init__(self, num_examples: int | None = None, image_size: int = 64,
               seed: int = 0, offset: int = 0):
    if num_examples is not None and num_examples < 0:
      raise ValueError(f"SyntheticPhantoms: num_examples={num_examples} must be >= 0")
    if seed < 0 or offset < 0:
      raise ValueError(f"SyntheticPhantoms: seed={seed} and offset={offset} must be >= 0")
    if not 16 <= image_size <= 1024:
      raise ValueError(f"SyntheticPhantoms: image_size={image_size} outside [16, 1024]")
    self.num_examples, self.image_size = num_examples, image_size
    self.seed, self.offset = seed, offset

  def __len__(self) -> int:
    return INFINITE_LEN if self.num_examples is None else self.num_examples

  def __repr__(self) -> str:
    return (f"SyntheticPhantoms(num_examples={self.num_examples}, "
            f"image_size={self.image_size}, seed={self.seed}, offset={self.offset})")

  def _global_index(self, index) -> int:
    index = operator.index(index)
    if not 0 <= index < len(self):
      raise IndexError(f"{self!r}: index {index} out of range [0, {len(self)})")
    return self.offset + index

  def __getitem__(self, index: int) -> dict:
    return self.render(index)

  def render(self, index: int, with_masks: bool = False) -> dict:
    return render_example(self.seed, self._global_index(index), self.image_size,
                          with_masks=with_masks)

  def labels(self, index: int) -> np.ndarray:
    """float32 [14] labels of ``index`` without rendering."""
    return sample_labels(self.seed, self._global_index(index))

  def pose(self, index: int) -> Pose:
    """The pose ``index`` is rendered in (``sample_pose``), without rendering."""
    return sample_pose(self.seed, self._global_index(index))


def split_source(data_config: Any, split: str) -> splits.SplitSource:
  """The ``splits.SplitSource`` of ``split`` of the phantoms of ``data_config.synthetic``.

  Splits ('train', 'val', 'test', 'annotated_<part>', 'unannotated_<part>',
  cross-validation folds) as ``splits.phantom_split`` cuts them.
  """
  subset, part = splits.parse_split(split, "synthetic")
  start, stop = splits.phantom_range(data_config, part, IMAGES_PER_PATIENT)
  phantoms = SyntheticPhantoms(num_examples=stop - start, image_size=data_config.image_size,
                               seed=data_config.synthetic.seed, offset=start)
  chosen, keep, note = splits.phantom_split(data_config, subset, part, stop - start,
                                            IMAGES_PER_PATIENT)
  if not len(chosen):
    raise splits.EmptySplit(f"split {split!r} of data.name='synthetic' is empty (data.synthetic: "
                     f"num_{part}, annotated_fraction; data.cv)")
  return splits.SplitSource(phantoms, chosen, keep, f"synthetic/{split}{note}: {phantoms!r}")
