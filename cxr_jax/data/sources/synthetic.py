"""Synthetic phantom chest X-rays: the embedded default dataset.

Every example is rendered on the fly, deterministically from ``(seed, index)``
(``index`` already includes the source's ``offset``), at any square size
from 16 to 1024 px, with vectorised numpy on the pixel grid (support devices with
cv2 line drawing). No global random state: each example draws from
``np.random.default_rng([seed, stream, index])``, so the source is safe in
Grain worker processes and picklable.

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

import cv2
import numpy as np

from cxr_jax.data import schema

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

# Findings typical of ICU films, where support devices are common.
_ICU_FINDINGS = tuple(_C[n] for n in ("Atelectasis", "Cardiomegaly", "Effusion",
                                      "Pneumonia", "Pneumothorax", "Consolidation",
                                      "Edema"))
DEVICE_RATE_ICU = 0.6
DEVICE_RATE_OTHER = 0.08

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


# ---------------------------------------------------------------------------
# Anatomy.


@dataclasses.dataclass
class _Anatomy:
  """Per-patient anatomy in canonical units (x right, y down, body ~[-0.9, 0.9])."""
  body_rx: float
  body_ry: float
  body_cy: float
  tissue: float        # soft-tissue brightness
  air: float           # lung-air darkening (lungs = tissue - air)
  lung_cx: float       # |x| of the lung centres
  lung_rx: float
  apex: float          # y of the lung apices
  dome: tuple[float, float]   # y of the dome tops (image-left, image-right)
  dome_k: float        # dome curvature
  heart: tuple[float, float, float, float]   # cx, cy, rx, ry
  rib_spacing: float
  rib_phase: float
  markings: float      # vascular-marking strength


def _sample_anatomy(rng: np.random.Generator) -> _Anatomy:
  dome_right = rng.uniform(0.36, 0.44)
  dome_left = dome_right + rng.uniform(0.03, 0.08)
  return _Anatomy(
      body_rx=rng.uniform(0.86, 0.94), body_ry=rng.uniform(1.05, 1.2),
      body_cy=rng.uniform(0.12, 0.2), tissue=rng.uniform(0.52, 0.6),
      air=rng.uniform(0.28, 0.34), lung_cx=rng.uniform(0.39, 0.43),
      lung_rx=rng.uniform(0.3, 0.34), apex=rng.uniform(-0.72, -0.64),
      dome=(dome_right, dome_left),
      dome_k=rng.uniform(1.4, 2.0),
      heart=(rng.uniform(0.1, 0.15), dome_left - rng.uniform(0.1, 0.15),
             rng.uniform(0.28, 0.32), rng.uniform(0.2, 0.24)),
      rib_spacing=rng.uniform(0.13, 0.16), rib_phase=rng.uniform(0, 1),
      markings=rng.uniform(0.06, 0.09))


@dataclasses.dataclass(frozen=True)
class _Lung:
  side: int   # -1 image left (patient's right), +1 image right
  cx: float
  cy: float
  rx: float
  ry: float
  dome: float
  dome_k: float
  dome_u: float   # x of the dome top


def _lungs(a: _Anatomy) -> tuple[_Lung, _Lung]:
  lungs = []
  for i, side in enumerate((-1, 1)):
    bottom = a.dome[i] + 0.2
    lungs.append(_Lung(side=side, cx=side * a.lung_cx, cy=(a.apex + bottom) / 2,
                       rx=a.lung_rx, ry=(bottom - a.apex) / 2, dome=a.dome[i],
                       dome_k=a.dome_k, dome_u=side * (a.lung_cx - 0.05)))
  return tuple(lungs)


def _ellipse_q(u, v, cx, cy, rx, ry, angle=0.0):
  """Normalized quadratic form: < 1 inside the (rotated) ellipse."""
  du, dv = u - cx, v - cy
  if angle:
    c, s = math.cos(angle), math.sin(angle)
    du, dv = c * du + s * dv, -s * du + c * dv
  return (du / rx)**2 + (dv / ry)**2


def _lung_q(u, v, cx, cy, rx, ry):
  """Normalized quadratic form of an egg-shaped lung, narrow at the apex: < 1 inside."""
  width = rx * (0.8 + 0.25 * np.clip((v - cy) / ry, -1, 1))
  return ((u - cx) / width)**2 + ((v - cy) / ry)**2


def _soft(q, radius, edge):
  """Anti-aliased inside-ness in [0, 1] of an ellipse with quadratic form q."""
  return np.clip(0.5 + (1 - q) * (radius / (2 * edge)), 0, 1)


def _smooth_noise(rng, cells: int, size: int) -> np.ndarray:
  """float32 [size, size] band-limited noise, ~N(0, 1) on a cells x cells lattice."""
  grid = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
  return cv2.resize(grid, (size, size), interpolation=cv2.INTER_LINEAR)


def _ridges(noise, width):
  """Thin curvy lines along the zero set of ``noise`` (1 on the line)."""
  return np.clip(1 - np.abs(noise) / width, 0, 1)


_HEART_ANGLE = -0.3           # the heart's long axis points down to the image right
_MEDIASTINUM = (0.02, 0.11)   # centre x and half width above the heart


class _Scene:
  """The canonical coordinates (u, v) of every pixel, the lungs and the density map.

  ``field[i]`` is the hard mask of lung i's air (outside heart and mediastinum),
  ``density`` the brightness before the lung air is subtracted (``air_map``).
  """

  def __init__(self, size: int, pose: Pose, anatomy: _Anatomy, rng: np.random.Generator):
    self.size, self.pose, self.anatomy, self.rng = size, pose, anatomy, rng
    m = pose.matrix()
    inv = np.linalg.inv(np.vstack([m, [0, 0, 1]]))[:2]
    axis = ((np.arange(size, dtype=np.float32) + 0.5) * (2 / size) - 1)
    x, y = axis[None, :], axis[:, None]
    self.u = (inv[0, 0] * x + inv[0, 1] * y + inv[0, 2]).astype(np.float32)
    self.v = (inv[1, 0] * x + inv[1, 1] * y + inv[1, 2]).astype(np.float32)
    self.px = 2 / (size * pose.scale)   # canonical units per pixel
    self.lungs = _lungs(anatomy)
    self._build_anatomy()

  def _build_anatomy(self):
    a, u, v, px = self.anatomy, self.u, self.v, self.px
    edge = 1.2 * px
    body_q = np.abs(u / a.body_rx)**2.6 + np.abs((v - a.body_cy) / a.body_ry)**2.6
    body = _soft(body_q, a.body_rx, edge)
    hx, hy, hrx, hry = a.heart
    self.heart_q = _ellipse_q(u, v, hx, hy, hrx, hry, angle=_HEART_ANGLE)
    heart = _soft(self.heart_q, hry, edge)
    medi = (np.clip(0.5 + (_MEDIASTINUM[1] - np.abs(u - _MEDIASTINUM[0])) / edge, 0, 1)
            * np.clip(0.5 + (hy - v) / edge, 0, 1))
    knob = _soft(_ellipse_q(u, v, 0.1, -0.38, 0.07, 0.06), 0.06, edge)
    not_soft_tissue = (1 - heart) * (1 - medi) * (1 - knob)
    soft_fields, self.field, self.lung_q = [], [], []
    for lung in self.lungs:
      q = _lung_q(u, v, lung.cx, lung.cy, lung.rx, lung.ry)
      dome = lung.dome + lung.dome_k * (u - lung.dome_u)**2
      soft = (_soft(q, lung.rx, edge) * np.clip(0.5 + (dome - v) / edge, 0, 1)
              * not_soft_tissue)
      self.lung_q.append(q)
      soft_fields.append(soft)
      self.field.append(soft >= 0.5)
    lung_soft = soft_fields[0] + soft_fields[1]
    au = np.abs(u)
    thorax = body * np.clip((v + 0.85) / 0.05, 0, 1) * np.clip(
        (a.dome[0] + 0.12 - v) / 0.1, 0, 1) * (0.4 + 0.6 * lung_soft)
    rib_r = (v - 0.3 * au**2 - 0.25 * au) / a.rib_spacing - a.rib_phase
    ribs = np.clip((np.cos(2 * np.pi * rib_r) - 0.55) * 3, 0, 1) * (au > 0.08) * thorax
    # Clavicles: segments from (0.08, -0.76) to (0.6, -0.86), mirrored.
    t = np.clip((au - 0.08) / 0.52, 0, 1)
    clav = np.clip(1 - np.abs(v - (-0.76 - 0.1 * t)) / 0.035, 0, 1) * (au < 0.62)
    spine = np.clip(0.5 + (0.06 - au) / edge, 0, 1) * body
    vessels = _ridges(self.texture(18), 0.35) * np.exp(
        -((au - 0.15)**2 + (v + 0.05)**2) / 0.25)
    self.markings = a.markings * vessels
    density = 0.04 + (a.tissue - 0.04) * body
    density = density + 0.05 * heart + 0.04 * medi + 0.05 * knob
    density = density + 0.05 * spine + 0.09 * ribs + 0.1 * clav
    self.air_map = a.air * lung_soft
    self.density = density
    right = self.lungs[1]
    self.gastric_q = _ellipse_q(u, v, right.cx + 0.05, right.dome + 0.11, 0.09, 0.05)

  def texture(self, cells: int) -> np.ndarray:
    """float32 [H, W] band-limited noise with ``cells`` lattice cells across the image."""
    return _smooth_noise(self.rng, cells, self.size)

  def lung_point(self, rng, side: int, v_range: tuple[float, float],
                 margin: float, lateral: tuple[float, float] = (-0.75, 0.75)):
    """A canonical point inside lung ``side`` at least ~``margin`` from its edges."""
    lung = self.lungs[(side + 1) // 2]
    hx, hy, hrx, hry = self.anatomy.heart
    for _ in range(200):
      du = rng.uniform(*lateral) * lung.rx * side
      p_u = lung.cx + du
      p_v = lung.cy + rng.uniform(*v_range) * lung.ry
      inside = _lung_q(p_u, p_v, lung.cx, lung.cy, lung.rx - margin, lung.ry - margin) < 1
      above_dome = p_v < lung.dome + lung.dome_k * (p_u - lung.dome_u)**2 - margin
      off_heart = _ellipse_q(p_u, p_v, hx, hy, hrx + margin, hry + margin, _HEART_ANGLE) > 1
      off_medi = abs(p_u - _MEDIASTINUM[0]) > _MEDIASTINUM[1] + margin
      if inside and above_dome and off_heart and off_medi:
        return p_u, p_v
    return lung.cx, lung.cy - 0.2 * lung.ry


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
  anatomy = _Anatomy(
      body_rx=mid(0.86, 0.94), body_ry=mid(1.05, 1.2), body_cy=mid(0.12, 0.2),
      tissue=mid(0.52, 0.6), air=mid(0.28, 0.34), lung_cx=mid(0.39, 0.43),
      lung_rx=mid(0.3, 0.34), apex=mid(-0.72, -0.64), dome=(dome_right, dome_left),
      dome_k=mid(1.4, 2.0),
      heart=(mid(0.1, 0.15), dome_left - mid(0.1, 0.15), mid(0.28, 0.32), mid(0.2, 0.24)),
      rib_spacing=mid(0.13, 0.16), rib_phase=0.5, markings=mid(0.06, 0.09))
  scene = _Scene(image_size, Pose(), anatomy, np.random.default_rng(0))
  _, hy, _, hry = anatomy.heart
  radius = mid(0.09, 0.13)
  hernia = _ellipse_q(scene.u, scene.v, 0.03, hy + hry * mid(0.55, 0.8), radius * 1.2, radius)
  return {"lung_image_left": scene.field[0], "lung_image_right": scene.field[1],
          "heart": scene.heart_q < 1, "below_heart": hernia < 1}


# ---------------------------------------------------------------------------
# Findings: each adds to scene.density (and may change scene.markings) and
# returns the boolean masks of its drawn instances.


def _side(rng):
  return int(rng.choice((-1, 1)))


def _sides(rng, p_bilateral):
  return (-1, 1) if rng.random() < p_bilateral else (_side(rng),)


def _opacity(scene, shape, fill, side=None):
  """Adds ``fill`` (fraction of the local lung air) of ``shape`` inside the lung field."""
  field = scene.field[(side + 1) // 2] if side is not None else (scene.field[0] | scene.field[1])
  drawn = shape * field
  scene.density += fill * scene.air_map * drawn
  return drawn > 0


def _atelectasis(rng, scene):
  side = _side(rng)
  cu, cv = scene.lung_point(rng, side, (0.0, 0.55), 0.05)
  length = rng.uniform(0.14, 0.24)
  thick = max(rng.uniform(0.025, 0.045), 0.8 * scene.px)
  q = _ellipse_q(scene.u, scene.v, cu, cv, length, thick, angle=rng.uniform(-0.45, 0.45))
  return [_opacity(scene, np.clip(1 - q, 0, 1), rng.uniform(0.35, 0.85), side)]


def _patches(rng, scene, count, size_range, fill_range, texture_weight, profile):
  mottle = np.clip(0.5 + 0.35 * scene.texture(14), 0, 1)
  masks = []
  sides = (-1, 1) if count == 2 and rng.random() < 0.5 else (_side(rng),) * count
  for side in sides:
    cu, cv = scene.lung_point(rng, side, (-0.3, 0.55), 0.05)
    q = _ellipse_q(scene.u, scene.v, cu, cv, rng.uniform(*size_range),
                   rng.uniform(*size_range), angle=rng.uniform(-0.5, 0.5))
    shape = np.clip(1 - q, 0, 1)**profile * (1 - texture_weight + texture_weight * mottle)
    masks.append(_opacity(scene, shape, rng.uniform(*fill_range), side))
  return masks


def _infiltration(rng, scene):
  count = 2 if rng.random() < 0.3 else 1
  return _patches(rng, scene, count, (0.11, 0.18), (0.4, 0.75), 0.55, 1.0)


def _pneumonia(rng, scene):
  return _patches(rng, scene, 1, (0.13, 0.21), (0.4, 0.75), 0.4, 0.7)


def _consolidation(rng, scene):
  side = _side(rng)
  cu, cv = scene.lung_point(rng, side, (0.0, 0.6), 0.05)
  q = _ellipse_q(scene.u, scene.v, cu, cv, rng.uniform(0.12, 0.2), rng.uniform(0.1, 0.16))
  # Sharp upper border along a fissure through the upper part of the patch.
  fissure = scene.v - (cv - 0.04 + rng.uniform(-0.3, 0.3) * (scene.u - cu))
  mottle = np.clip(0.5 + 0.35 * scene.texture(14), 0, 1)
  shape = np.clip(1 - q, 0, 1)**0.3 * (fissure > 0) * (0.85 + 0.15 * mottle)
  return [_opacity(scene, shape, rng.uniform(0.6, 0.95), side)]


def _round_lesion(rng, scene, radius, fill, sharpness):
  """An elliptic lesion; semi-axes of at least 0.8 px so that it covers a pixel centre."""
  side = _side(rng)
  cu, cv = scene.lung_point(rng, side, (-0.7, 0.6), max(0.6 * radius, 1.5 * scene.px))
  aspect = rng.uniform(0.8, 1.2)
  q = _ellipse_q(scene.u, scene.v, cu, cv, max(radius * aspect, 0.8 * scene.px),
                 max(radius / aspect, 0.8 * scene.px), angle=rng.uniform(0, np.pi))
  return _opacity(scene, np.clip((1 - q) * sharpness, 0, 1), fill, side)


def _mass(rng, scene):
  return [_round_lesion(rng, scene, rng.uniform(0.07, 0.12), rng.uniform(0.55, 1.0), 2.5)]


def _nodule(rng, scene):
  count = 1 + rng.choice(3, p=(0.75, 0.18, 0.07))
  return [_round_lesion(rng, scene, rng.uniform(0.035, 0.06), rng.uniform(0.6, 1.05), 3.0)
          for _ in range(count)]


def _effusion(rng, scene):
  masks = []
  for side in _sides(rng, 0.35):
    lung = scene.lungs[(side + 1) // 2]
    level = lung.dome + 0.05 - rng.uniform(0.05, 0.3)
    lateral = np.clip((side * (scene.u - lung.cx) / lung.rx + 1) / 2, 0, 1)
    surface = level - rng.uniform(0.06, 0.14) * lateral**2   # meniscus: higher laterally
    shape = np.clip((scene.v - surface) / 0.05, 0, 1)
    masks.append(_opacity(scene, shape, rng.uniform(0.65, 1.0), side))
  return masks


def _pneumothorax(rng, scene):
  side = _side(rng)
  lung = scene.lungs[(side + 1) // 2]
  collapse = rng.uniform(0.12, 0.35)
  rx, ry = lung.rx * (1 - 0.6 * collapse), lung.ry * (1 - 0.5 * collapse)
  q = _lung_q(scene.u, scene.v, lung.cx - side * 0.5 * collapse * lung.rx,
              lung.cy + 0.5 * collapse * lung.ry, rx, ry)
  upper = (scene.v < lung.cy) & scene.field[(side + 1) // 2]
  gap = upper & (q >= 1)
  line = upper & (q < 1) & (q > (1 - 1.5 * scene.px / rx)**2)
  scene.density -= rng.uniform(0.04, 0.09) * gap
  scene.density += 0.07 * line
  scene.markings = scene.markings * ~gap
  return [gap | line]


def _edema(rng, scene):
  fill = rng.uniform(0.4, 0.7)
  mottle = np.clip(0.5 + 0.3 * scene.texture(14), 0, 1)
  masks = []
  for lung in scene.lungs:
    q = _ellipse_q(scene.u, scene.v, lung.side * 0.22, lung.cy - 0.02, 0.34, 0.4)
    masks.append(_opacity(scene, np.clip(1 - q, 0, 1) * (0.6 + 0.4 * mottle), fill, lung.side))
  return masks


def _enlarged_heart(rng, a: _Anatomy) -> _Anatomy:
  """Cardiomegaly: a heart 30-50 % wider (cardiothoracic ratio above ~0.55)."""
  hx, hy, hrx, hry = a.heart
  return dataclasses.replace(a, heart=(hx + 0.05, hy + 0.02, hrx * rng.uniform(1.3, 1.5),
                                       hry * rng.uniform(1.1, 1.25)))


def _emphysema_anatomy(rng, a: _Anatomy) -> _Anatomy:
  """Hyperinflation: bigger, darker lungs with flat, low domes and fewer markings."""
  drop = rng.uniform(0.1, 0.16)
  return dataclasses.replace(
      a, apex=a.apex - 0.04, dome=(a.dome[0] + drop, a.dome[1] + drop),
      dome_k=a.dome_k * 0.3, lung_rx=a.lung_rx * 1.1, air=a.air * rng.uniform(1.3, 1.5),
      rib_spacing=a.rib_spacing * 1.15, markings=a.markings * 0.3)


def _emphysema(rng, scene):
  masks = [field.copy() for field in scene.field]
  if rng.random() < 0.5:   # an apical bulla
    side = _side(rng)
    cu, cv = scene.lung_point(rng, side, (-0.75, -0.45), 0.08)
    bulla = _ellipse_q(scene.u, scene.v, cu, cv, 0.08, 0.07) < 1
    bulla &= scene.field[(side + 1) // 2]
    scene.density -= 0.05 * bulla
    scene.markings = scene.markings * ~bulla
  return masks


def _fibrosis(rng, scene):
  net = np.maximum(_ridges(scene.texture(22), 0.3), _ridges(scene.texture(22), 0.3))
  fill = rng.uniform(0.35, 0.7)
  lower = rng.random() < 0.7
  masks = []
  for side in _sides(rng, 0.75):
    i = (side + 1) // 2
    lung = scene.lungs[i]
    zone = (scene.lung_q[i] > 0.3) & ((scene.v > lung.cy - 0.05) if lower
                                      else (scene.v < lung.cy - 0.1))
    masks.append(_opacity(scene, (0.2 + 0.8 * net) * zone, fill, side))
  return masks


def _pleural_thickening(rng, scene):
  masks = []
  apical = rng.random() < 0.5
  for side in _sides(rng, 0.3):
    i = (side + 1) // 2
    lung = scene.lungs[i]
    thick = max(rng.uniform(0.035, 0.06), 1.0 * scene.px)
    if apical:
      arc = scene.v < lung.cy - 0.5 * lung.ry
      inner = (1 - thick / lung.ry)**2
    else:
      arc = ((side * (scene.u - lung.cx) > 0.3 * lung.rx)
             & (np.abs(scene.v - lung.cy) < 0.4 * lung.ry))
      inner = (1 - thick / lung.rx)**2
    rim = arc & (scene.lung_q[i] > inner)
    masks.append(_opacity(scene, rim.astype(np.float32), rng.uniform(0.6, 1.0), side))
  return masks


def _cardiomegaly(rng, scene):
  del rng   # the heart was enlarged in the anatomy (_enlarged_heart)
  return [scene.heart_q < 1]


def _hernia(rng, scene):
  hx, hy, _, hry = scene.anatomy.heart
  cu, cv = rng.uniform(-0.02, 0.08), hy + hry * rng.uniform(0.55, 0.8)
  r = max(rng.uniform(0.09, 0.13), scene.px)
  q = _ellipse_q(scene.u, scene.v, cu, cv, r * 1.2, r)
  inside = q < 1
  air = inside & (scene.v < cv + rng.uniform(-0.2, 0.2) * r)   # air-fluid level
  wall = inside & (q > 0.7)
  scene.density += 0.1 * (inside & ~air) - 0.16 * (air & ~wall) + 0.06 * wall
  return [inside]


_DRAW = {
    "Atelectasis": _atelectasis, "Cardiomegaly": _cardiomegaly, "Effusion": _effusion,
    "Infiltration": _infiltration, "Mass": _mass, "Nodule": _nodule,
    "Pneumonia": _pneumonia, "Pneumothorax": _pneumothorax,
    "Consolidation": _consolidation, "Edema": _edema, "Emphysema": _emphysema,
    "Fibrosis": _fibrosis, "Pleural_Thickening": _pleural_thickening,
    "Hernia": _hernia,
}


# ---------------------------------------------------------------------------
# Support devices (cv2 drawing in pixel space after the pose).


def _devices(rng, scene, labels) -> np.ndarray:
  """Draws support devices; returns the float32 [H, W] device coverage in [0, 1]."""
  icu = labels[list(_ICU_FINDINGS)].any()
  canvas = np.zeros((scene.size, scene.size), np.float32)
  if rng.random() >= (DEVICE_RATE_ICU if icu else DEVICE_RATE_OTHER):
    return canvas
  a, lungs = scene.anatomy, scene.lungs
  lines = []
  electrodes = []
  if rng.random() < 0.45:   # endotracheal tube in the trachea
    lines.append([(0.02, -1.4), (0.01, -0.9), (0.0, -0.5 - rng.uniform(0, 0.1))])
  if rng.random() < 0.3:    # nasogastric tube into the stomach
    lines.append([(0.04, -1.4), (0.03, -0.4), (0.05, a.dome[1] + 0.05),
                  (lungs[1].cx, a.dome[1] + rng.uniform(0.1, 0.25))])
  if rng.random() < 0.45:   # central venous catheter
    side = _side(rng)
    lines.append([(side * rng.uniform(0.5, 0.7), -0.95), (side * 0.3, -0.8),
                  (0.02, -0.55), (0.02, -0.3 + rng.uniform(-0.05, 0.05))])
  if labels[_C["Pneumothorax"]] and rng.random() < 0.6:   # chest drain
    side = _side(rng)
    lines.append([(side * 0.95, 0.45), (side * 0.75, 0.2),
                  (side * (a.lung_cx + 0.05), -0.45)])
  if rng.random() < 0.8 or not lines:   # ECG electrodes with leads
    for _ in range(rng.integers(2, 5)):
      side = _side(rng)
      p = (side * rng.uniform(0.3, 0.8), rng.uniform(-0.9, 0.7))
      electrodes.append(p)
      lines.append([p, (p[0] + side * rng.uniform(0.1, 0.3), p[1] + rng.uniform(-0.2, 0.2)),
                    (side * 1.6, p[1] + rng.uniform(-0.4, 0.4))])
  to_px = lambda pts: np.round(((scene.pose.to_image(pts) + 1) * scene.size / 2 - 0.5) * 16
                               ).astype(np.int32)
  thickness = max(1, round(scene.size / 100))
  cv2.polylines(canvas, [to_px(np.array(l)) for l in lines], False, 1.0, thickness,
                cv2.LINE_AA, 4)
  radius = max(1, round(0.03 * scene.size / 2 * scene.pose.scale))
  for p in electrodes:
    cv2.circle(canvas, tuple(int(c) for c in to_px(np.array([p]))[0]), radius * 16, 1.0,
               -1, cv2.LINE_AA, 4)
  return canvas


# ---------------------------------------------------------------------------
# Gaze.


def _gaze(rng, scene, instances) -> np.ndarray:
  """float32 [F, 3] fixations (x, y, seconds), x/y normalized to [0, 1]."""
  a = scene.anatomy
  scan = []
  for lung in (scene.lungs if rng.random() < 0.7 else scene.lungs[::-1]):
    for zone in (-0.6, -0.15, 0.3):
      for _ in range(rng.integers(1, 3)):
        scan.append((lung.cx + rng.normal(0, 0.25) * lung.rx,
                     lung.cy + (zone + rng.normal(0, 0.1)) * lung.ry))
    scan.append((lung.cx + lung.side * 0.8 * lung.rx, lung.dome + 0.12))   # costophrenic angle
  scan.insert(rng.integers(len(scan) + 1), (a.heart[0], a.heart[1]))
  scan.insert(rng.integers(len(scan) + 1), (0.02, -0.3))                 # mediastinum
  points = (scene.pose.to_image(np.array(scan)) + 1) / 2
  points += rng.normal(0, 0.01, points.shape)
  seconds = 0.08 + rng.gamma(4.0, 0.06, len(points))
  fixations = list(np.column_stack([points, seconds]))
  for mask in instances:
    ys, xs = np.nonzero(mask)
    if not len(xs):
      continue
    for k in rng.integers(len(xs), size=rng.integers(2, 7)):
      fixation = ((xs[k] + rng.uniform()) / scene.size, (ys[k] + rng.uniform()) / scene.size,
                  0.15 + rng.gamma(4.0, 0.15))
      fixations.insert(rng.integers(len(fixations) + 1), np.array(fixation))
  fixations = np.array(fixations, np.float32)
  fixations[:, :2] = np.clip(fixations[:, :2], 0, 1)
  return fixations


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
  anatomy = _sample_anatomy(_rng(seed, _ANATOMY, patient))
  rng = _rng(seed, _APPEARANCE, index)
  if labels[_C["Cardiomegaly"]]:
    anatomy = _enlarged_heart(rng, anatomy)
  if labels[_C["Emphysema"]]:
    anatomy = _emphysema_anatomy(rng, anatomy)
  pose = sample_pose(seed, index) if apply_pose else Pose()
  scene = _Scene(image_size, pose, anatomy, rng)

  finding_masks = np.zeros((NUM_CLASSES, image_size, image_size), bool)
  boxes, box_labels, instances = [], [], []
  for c in np.flatnonzero(labels):
    name = CLASSES[c]
    for mask in _DRAW[name](rng, scene):
      box = _box(mask)
      if box is not None:
        finding_masks[c] |= mask
        boxes.append(box)
        box_labels.append(int(c))
        instances.append(mask)
  if rng.random() < 0.7:   # gastric bubble under the left dome
    scene.density -= 0.12 * (scene.gastric_q < 1)
  device = _devices(rng, scene, labels)
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
      "gaze": schema.pad_gaze(_gaze(rng, scene, instances), origin),
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
