"""The anatomy of a synthetic phantom: per-patient parameters and the scene they draw.

``sample_anatomy`` draws a patient's ``Anatomy`` (canonical units: x right,
y down, body ~[-0.9, 0.9]); ``Scene`` maps every pixel of an image through
the pose back to canonical coordinates (u, v) and builds the density map of
body, lungs, heart, mediastinum, spine, ribs and clavicles, which
``phantom_findings`` then draws on. Shapes are given by normalized quadratic
forms (< 1 inside): ``ellipse_q``, ``lung_q``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import cv2
import numpy as np


@dataclasses.dataclass
class Anatomy:
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


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
  dome_right = rng.uniform(0.36, 0.44)
  dome_left = dome_right + rng.uniform(0.03, 0.08)
  return Anatomy(
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


def _lungs(a: Anatomy) -> tuple[_Lung, _Lung]:
  lungs = []
  for i, side in enumerate((-1, 1)):
    bottom = a.dome[i] + 0.2
    lungs.append(_Lung(side=side, cx=side * a.lung_cx, cy=(a.apex + bottom) / 2,
                       rx=a.lung_rx, ry=(bottom - a.apex) / 2, dome=a.dome[i],
                       dome_k=a.dome_k, dome_u=side * (a.lung_cx - 0.05)))
  return tuple(lungs)


def ellipse_q(u, v, cx, cy, rx, ry, angle=0.0):
  """Normalized quadratic form: < 1 inside the (rotated) ellipse."""
  du, dv = u - cx, v - cy
  if angle:
    c, s = math.cos(angle), math.sin(angle)
    du, dv = c * du + s * dv, -s * du + c * dv
  return (du / rx)**2 + (dv / ry)**2


def lung_q(u, v, cx, cy, rx, ry):
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


def ridges(noise, width):
  """Thin curvy lines along the zero set of ``noise`` (1 on the line)."""
  return np.clip(1 - np.abs(noise) / width, 0, 1)


_HEART_ANGLE = -0.3           # the heart's long axis points down to the image right
_MEDIASTINUM = (0.02, 0.11)   # centre x and half width above the heart


class Scene:
  """The canonical coordinates (u, v) of every pixel, the lungs and the density map.

  ``field[i]`` is the hard mask of lung i's air (outside heart and mediastinum),
  ``density`` the brightness before the lung air is subtracted (``air_map``).
  ``pose`` is a ``synthetic.Pose`` (canonical frame -> image frame).
  """

  def __init__(self, size: int, pose: Any, anatomy: Anatomy, rng: np.random.Generator):
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
    self.heart_q = ellipse_q(u, v, hx, hy, hrx, hry, angle=_HEART_ANGLE)
    heart = _soft(self.heart_q, hry, edge)
    medi = (np.clip(0.5 + (_MEDIASTINUM[1] - np.abs(u - _MEDIASTINUM[0])) / edge, 0, 1)
            * np.clip(0.5 + (hy - v) / edge, 0, 1))
    knob = _soft(ellipse_q(u, v, 0.1, -0.38, 0.07, 0.06), 0.06, edge)
    not_soft_tissue = (1 - heart) * (1 - medi) * (1 - knob)
    soft_fields, self.field, self.lung_q = [], [], []
    for lung in self.lungs:
      q = lung_q(u, v, lung.cx, lung.cy, lung.rx, lung.ry)
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
    vessels = ridges(self.texture(18), 0.35) * np.exp(
        -((au - 0.15)**2 + (v + 0.05)**2) / 0.25)
    self.markings = a.markings * vessels
    density = 0.04 + (a.tissue - 0.04) * body
    density = density + 0.05 * heart + 0.04 * medi + 0.05 * knob
    density = density + 0.05 * spine + 0.09 * ribs + 0.1 * clav
    self.air_map = a.air * lung_soft
    self.density = density
    right = self.lungs[1]
    self.gastric_q = ellipse_q(u, v, right.cx + 0.05, right.dome + 0.11, 0.09, 0.05)

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
      inside = lung_q(p_u, p_v, lung.cx, lung.cy, lung.rx - margin, lung.ry - margin) < 1
      above_dome = p_v < lung.dome + lung.dome_k * (p_u - lung.dome_u)**2 - margin
      off_heart = ellipse_q(p_u, p_v, hx, hy, hrx + margin, hry + margin, _HEART_ANGLE) > 1
      off_medi = abs(p_u - _MEDIASTINUM[0]) > _MEDIASTINUM[1] + margin
      if inside and above_dome and off_heart and off_medi:
        return p_u, p_v
    return lung.cx, lung.cy - 0.2 * lung.ry
