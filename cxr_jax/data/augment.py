"""Image transforms that move the annotations with the image.

Every transform takes an Example (``cxr_jax.data.schema``) and returns a new
one with ``image``, ``boxes``, ``box_labels`` and ``gaze`` changed together;
other keys are copied unchanged.

Geometric transforms are 3 x 3 homogeneous matrices acting on *normalized*
coordinates (x, y in [0, 1], x to the right, y down), mapping a point of the
input to the output. ``train_transform`` composes crop, affine and flip into one
matrix and resamples the image once (``warp``). Pixel convention (as in
``cxr_jax.data.annotations``): pixel column j covers [j, j + 1) in pixel units
and a normalized x lies at x * W.

After a warp a box becomes the axis-aligned bounding box of the part of its
transformed rectangle that lies inside the image: the tightest box around the
visible lesion, also under rotation. A box whose visible part is less than
``MIN_VISIBLE_FRACTION`` of its transformed area is dropped; the remaining
boxes are compacted so padding (label -1) stays at the end. Gaze fixations
are moved; those that leave the image are dropped and compacted likewise.

Horizontal flip is off by default (``aug.hflip = 0``): anatomy is not
left/right symmetric (the heart lies on the image's right).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import cv2
import numpy as np

from cxr_jax.data import schema

# Images are small and parallelism comes from grain's worker processes; cv2's
# own thread pool only adds wake-up latency (a 32 px warp took ~6 ms instead of
# ~20 us on a loaded 2-core machine).
cv2.setNumThreads(1)

MIN_VISIBLE_FRACTION = 0.25
HFLIP = np.array([[-1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])


def translate_matrix(dx: float, dy: float) -> np.ndarray:
  return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])


def scale_matrix(sx: float, sy: float) -> np.ndarray:
  return np.diag([sx, sy, 1.0])


def crop_matrix(x0: float, y0: float, width: float, height: float) -> np.ndarray:
  """Maps the normalized window [x0, x0 + width] x [y0, y0 + height] onto [0, 1]^2."""
  return scale_matrix(1.0 / width, 1.0 / height) @ translate_matrix(-x0, -y0)


def affine_matrix(rotation: float, scale: float, shift_x: float, shift_y: float) -> np.ndarray:
  """Rotation (degrees, counter-clockwise on screen) and scale about the centre, then shift.

  Isotropic on a square image; shifts are fractions of the image side.
  """
  theta = np.deg2rad(rotation)
  cos, sin = np.cos(theta) * scale, np.sin(theta) * scale
  # y points down, so a counter-clockwise turn on screen is [[c, s], [-s, c]].
  rotate = np.array([[cos, sin, 0.0], [-sin, cos, 0.0], [0.0, 0.0, 1.0]])
  return translate_matrix(0.5 + shift_x, 0.5 + shift_y) @ rotate @ translate_matrix(-0.5, -0.5)


def sample_crop_window(rng: np.random.Generator, scale: tuple[float, float],
                       ratio: tuple[float, float] = (3 / 4, 4 / 3),
                       attempts: int = 10) -> tuple[float, float, float, float]:
  """A random window (x0, y0, width, height) for random resized crop.

  Area (fraction of the image) uniform in ``scale``, aspect ratio
  (width / height) log-uniform in ``ratio``, position uniform; falls back to the
  centred window of area ``scale[1]`` if no draw fits in ``attempts`` tries.
  """
  for _ in range(attempts):
    area = rng.uniform(*scale)
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
    width, height = np.sqrt(area * aspect), np.sqrt(area / aspect)
    if width <= 1 and height <= 1:
      return rng.uniform(0, 1 - width), rng.uniform(0, 1 - height), width, height
  side = np.sqrt(scale[1])
  return (1 - side) / 2, (1 - side) / 2, side, side


def sample_affine_matrix(rng: np.random.Generator, rotation: float, scale: float,
                         shift: float) -> np.ndarray:
  """``affine_matrix`` with angle in +-rotation deg, scale in 1 +- scale, shifts in +-shift."""
  return affine_matrix(rng.uniform(-rotation, rotation), rng.uniform(1 - scale, 1 + scale),
                       rng.uniform(-shift, shift), rng.uniform(-shift, shift))


def _warp_image(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
  """Resamples uint8 [H, W] through a normalized ``matrix`` to uint8 [size, size]."""
  height, width = image.shape
  pixels = scale_matrix(size, size) @ matrix @ scale_matrix(1.0 / width, 1.0 / height)
  # Shrinking: area-average first (no aliasing), then warp the smaller image.
  stretch = np.linalg.norm(pixels[:2, :2], axis=0)  # output pixels per input pixel, x and y
  new_width = max(1, round(width * min(stretch[0], 1.0)))
  new_height = max(1, round(height * min(stretch[1], 1.0)))
  if (new_width, new_height) != (width, height):
    image = cv2.resize(image, (new_width, new_height), interpolation=cv2.INTER_AREA)
    pixels = pixels @ scale_matrix(width / new_width, height / new_height)
  # cv2 puts pixel centres at integers; ours are at +0.5.
  centred = translate_matrix(-0.5, -0.5) @ pixels @ translate_matrix(0.5, 0.5)
  return cv2.warpAffine(image, centred[:2], (size, size), flags=cv2.INTER_LINEAR,
                        borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def _apply_matrix(matrix: np.ndarray, xy: np.ndarray) -> np.ndarray:
  """float [..., 2] points -> transformed float [..., 2]."""
  return xy @ matrix[:2, :2].T + matrix[:2, 2]


def _clip_to_image(polygon: np.ndarray) -> np.ndarray:
  """Convex polygon [V, 2] clipped to the unit square (Sutherland-Hodgman) -> [V', 2]."""
  for axis in (0, 1):
    for bound, sign in ((0.0, 1.0), (1.0, -1.0)):
      inside = sign * (polygon[:, axis] - bound)  # >= 0 inside this edge of the square
      clipped = []
      for v in range(len(polygon)):
        w = (v + 1) % len(polygon)
        if inside[v] >= 0:
          clipped.append(polygon[v])
        if inside[v] * inside[w] < 0:
          t = inside[v] / (inside[v] - inside[w])
          clipped.append(polygon[v] + t * (polygon[w] - polygon[v]))
      polygon = np.array(clipped).reshape(-1, 2)
      if not len(polygon):
        return polygon
  return polygon


def _polygon_area(polygon: np.ndarray) -> float:
  x, y = polygon[:, 0], polygon[:, 1]
  return 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def _warp_boxes(boxes: np.ndarray, box_labels: np.ndarray, matrix: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
  """Transformed boxes [MAX_BOXES, 4], labels [MAX_BOXES]; dropped ones removed, rest compacted.

  A box's corners are transformed, the quadrilateral clipped to the image, and
  the box becomes the bounding box of what is left; it is dropped if that is
  less than MIN_VISIBLE_FRACTION of the quadrilateral's area (or has no extent).
  """
  kept, kept_labels = [], []
  for (x0, y0, x1, y1), label in zip(boxes.astype(np.float64), box_labels):
    if label < 0:
      continue
    quad = _apply_matrix(matrix, np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]))
    visible = quad if np.all((quad >= 0) & (quad <= 1)) else _clip_to_image(quad)
    if not len(visible):
      continue
    lo, hi = visible.min(axis=0), visible.max(axis=0)
    if np.any(hi <= lo) or _polygon_area(visible) < MIN_VISIBLE_FRACTION * _polygon_area(quad):
      continue
    kept.append(np.concatenate([lo, hi]))
    kept_labels.append(label)
  return schema.pad_boxes(np.clip(np.array(kept, np.float32).reshape(-1, 4), 0, 1), kept_labels)


def _warp_gaze(gaze: np.ndarray, matrix: np.ndarray) -> np.ndarray:
  """Moved fixations [MAX_FIXATIONS, 3]; those now outside the image are dropped."""
  xy = _apply_matrix(matrix, gaze[:, :2].astype(np.float64))
  keep = (gaze[:, 2] > 0) & np.all((xy >= 0) & (xy <= 1), axis=-1)
  moved = np.concatenate([xy, gaze[:, 2:]], axis=-1)[keep]
  return schema.pad_gaze(moved)


def warp(example: Mapping[str, Any], matrix: np.ndarray, size: int) -> dict:
  """Applies a normalized 3x3 ``matrix`` to the image (-> uint8 [size, size]), boxes and gaze."""
  out = dict(example)
  out["image"] = _warp_image(example["image"], matrix, size)
  out["boxes"], out["box_labels"] = _warp_boxes(example["boxes"], example["box_labels"], matrix)
  out["gaze"] = _warp_gaze(example["gaze"], matrix)
  return out


def resize(example: Mapping[str, Any], size: int) -> dict:
  """Image -> uint8 [size, size] (area-averaged when shrinking); annotations unchanged.

  Normalized coordinates survive resizing, so boxes and gaze need no change.
  """
  image = example["image"]
  out = dict(example)
  if image.shape != (size, size):
    shrink = size < min(image.shape)
    out["image"] = cv2.resize(image, (size, size),
                              interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
  return out


def center_crop(example: Mapping[str, Any], fraction: float, size: int) -> dict:
  """The central window of side ``fraction`` (of each image side), resized to [size, size]."""
  start = (1 - fraction) / 2
  return warp(example, crop_matrix(start, start, fraction, fraction), size)


def random_resized_crop(example: Mapping[str, Any], rng: np.random.Generator,
                        scale: tuple[float, float], size: int) -> dict:
  """A ``sample_crop_window`` window resized to [size, size]."""
  return warp(example, crop_matrix(*sample_crop_window(rng, scale)), size)


def random_affine(example: Mapping[str, Any], rng: np.random.Generator, rotation: float,
                  scale: float, shift: float, size: int) -> dict:
  """``sample_affine_matrix`` applied to the image resized to [size, size]."""
  return warp(example, sample_affine_matrix(rng, rotation, scale, shift), size)


def hflip(example: Mapping[str, Any]) -> dict:
  """Mirrors left/right, keeping the size (swaps the patient's sides: off by default)."""
  out = dict(example)
  out["image"] = np.ascontiguousarray(example["image"][:, ::-1])
  out["boxes"], out["box_labels"] = _warp_boxes(example["boxes"], example["box_labels"], HFLIP)
  out["gaze"] = _warp_gaze(example["gaze"], HFLIP)
  return out


def gaussian_blur(example: Mapping[str, Any], sigma: float) -> dict:
  """Gaussian blur of the image, ``sigma`` in pixels."""
  out = dict(example)
  out["image"] = cv2.GaussianBlur(example["image"], (0, 0), sigma, borderType=cv2.BORDER_REFLECT)
  return out


def adjust_intensity(example: Mapping[str, Any], brightness: float, contrast: float) -> dict:
  """image -> (image - mean) * contrast + mean + 255 * brightness, clipped to uint8."""
  image = example["image"].astype(np.float32)
  mean = image.mean()
  out = dict(example)
  out["image"] = np.clip(np.rint((image - mean) * contrast + mean + 255.0 * brightness),
                         0, 255).astype(np.uint8)
  return out


def train_transform(example: Mapping[str, Any], rng: np.random.Generator, aug: Any,
                    image_size: int) -> dict:
  """Random training augmentation -> uint8 [image_size, image_size] and moved annotations.

  ``aug`` is ``config.data.augment``: each transform runs with its probability
  (random_resized_crop, affine, hflip, blur, intensity). The geometric ones are
  composed (crop, then affine, then flip) and the image is resampled once.
  """
  matrix = np.eye(3)
  if rng.random() < aug.random_resized_crop:
    matrix = crop_matrix(*sample_crop_window(rng, tuple(aug.crop_scale)))
  if rng.random() < aug.affine:
    matrix = sample_affine_matrix(rng, aug.rotation, aug.scale, aug.shift) @ matrix
  if rng.random() < aug.hflip:
    matrix = HFLIP @ matrix
  if np.array_equal(matrix, np.eye(3)):
    out = resize(example, image_size)
  else:
    out = warp(example, matrix, image_size)
  if rng.random() < aug.blur:
    out = gaussian_blur(out, rng.uniform(*aug.blur_sigma))
  if rng.random() < aug.intensity:
    out = adjust_intensity(out, rng.uniform(-aug.brightness, aug.brightness),
                           rng.uniform(1 - aug.contrast, 1 + aug.contrast))
  return out


def eval_transform(example: Mapping[str, Any], image_size: int) -> dict:
  """Deterministic: ``resize`` to [image_size, image_size]."""
  return resize(example, image_size)
