"""What is drawn over a phantom's anatomy: findings, support devices, and the gaze.

Findings (``DRAW[class name](rng, scene)``): each adds to ``scene.density``
(and may change ``scene.markings``) and returns the boolean masks of its
drawn instances. ``enlarged_heart`` / ``emphysema_anatomy`` change the
anatomy before the scene is built (cardiomegaly, hyperinflation).
``devices``: support devices (cv2 drawing in pixel space after the pose).
``gaze``: a simulated radiologist's fixations over the scene and findings.
"""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np

from cxr_jax.data import schema
from cxr_jax.data.sources.phantom_anatomy import Anatomy, ellipse_q, lung_q, ridges

_C = {name: i for i, name in enumerate(schema.NIH14.classes)}

# Findings typical of ICU films, where support devices are common.
_ICU_FINDINGS = tuple(_C[n] for n in ("Atelectasis", "Cardiomegaly", "Effusion",
                                      "Pneumonia", "Pneumothorax", "Consolidation",
                                      "Edema"))
DEVICE_RATE_ICU = 0.6
DEVICE_RATE_OTHER = 0.08


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
  q = ellipse_q(scene.u, scene.v, cu, cv, length, thick, angle=rng.uniform(-0.45, 0.45))
  return [_opacity(scene, np.clip(1 - q, 0, 1), rng.uniform(0.35, 0.85), side)]


def _patches(rng, scene, count, size_range, fill_range, texture_weight, profile):
  mottle = np.clip(0.5 + 0.35 * scene.texture(14), 0, 1)
  masks = []
  sides = (-1, 1) if count == 2 and rng.random() < 0.5 else (_side(rng),) * count
  for side in sides:
    cu, cv = scene.lung_point(rng, side, (-0.3, 0.55), 0.05)
    q = ellipse_q(scene.u, scene.v, cu, cv, rng.uniform(*size_range),
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
  q = ellipse_q(scene.u, scene.v, cu, cv, rng.uniform(0.12, 0.2), rng.uniform(0.1, 0.16))
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
  q = ellipse_q(scene.u, scene.v, cu, cv, max(radius * aspect, 0.8 * scene.px),
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
  q = lung_q(scene.u, scene.v, lung.cx - side * 0.5 * collapse * lung.rx,
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
    q = ellipse_q(scene.u, scene.v, lung.side * 0.22, lung.cy - 0.02, 0.34, 0.4)
    masks.append(_opacity(scene, np.clip(1 - q, 0, 1) * (0.6 + 0.4 * mottle), fill, lung.side))
  return masks


def enlarged_heart(rng, a: Anatomy) -> Anatomy:
  """Cardiomegaly: a heart 30-50 % wider (cardiothoracic ratio above ~0.55)."""
  hx, hy, hrx, hry = a.heart
  return dataclasses.replace(a, heart=(hx + 0.05, hy + 0.02, hrx * rng.uniform(1.3, 1.5),
                                       hry * rng.uniform(1.1, 1.25)))


def emphysema_anatomy(rng, a: Anatomy) -> Anatomy:
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
    bulla = ellipse_q(scene.u, scene.v, cu, cv, 0.08, 0.07) < 1
    bulla &= scene.field[(side + 1) // 2]
    scene.density -= 0.05 * bulla
    scene.markings = scene.markings * ~bulla
  return masks


def _fibrosis(rng, scene):
  net = np.maximum(ridges(scene.texture(22), 0.3), ridges(scene.texture(22), 0.3))
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
  del rng   # the heart was enlarged in the anatomy (enlarged_heart)
  return [scene.heart_q < 1]


def _hernia(rng, scene):
  hx, hy, _, hry = scene.anatomy.heart
  cu, cv = rng.uniform(-0.02, 0.08), hy + hry * rng.uniform(0.55, 0.8)
  r = max(rng.uniform(0.09, 0.13), scene.px)
  q = ellipse_q(scene.u, scene.v, cu, cv, r * 1.2, r)
  inside = q < 1
  air = inside & (scene.v < cv + rng.uniform(-0.2, 0.2) * r)   # air-fluid level
  wall = inside & (q > 0.7)
  scene.density += 0.1 * (inside & ~air) - 0.16 * (air & ~wall) + 0.06 * wall
  return [inside]


DRAW = {
    "Atelectasis": _atelectasis, "Cardiomegaly": _cardiomegaly, "Effusion": _effusion,
    "Infiltration": _infiltration, "Mass": _mass, "Nodule": _nodule,
    "Pneumonia": _pneumonia, "Pneumothorax": _pneumothorax,
    "Consolidation": _consolidation, "Edema": _edema, "Emphysema": _emphysema,
    "Fibrosis": _fibrosis, "Pleural_Thickening": _pleural_thickening,
    "Hernia": _hernia,
}


# ---------------------------------------------------------------------------
# Support devices (cv2 drawing in pixel space after the pose).


def devices(rng, scene, labels) -> np.ndarray:
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


def gaze(rng, scene, instances) -> np.ndarray:
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
