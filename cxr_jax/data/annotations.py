"""Annotation maps: gaze fixations and boxes rendered as images or patch grids.

All functions are vectorised numpy, take the Example fields of
``cxr_jax.data.schema`` (normalized coordinates) with any leading batch
dimensions ``...``, and return float32 maps in [0, 1].

Pixel convention: pixel (row i, column j) of an H x W map covers
[j, j + 1) x [i, i + 1) in pixel units and its centre is (j + 0.5, i + 0.5);
a normalized point (x, y) lies at (x * W, y * H).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import numpy as np

# Overlaps thinner than this fraction of a patch side are float32 rounding of
# a box edge that sits on a patch edge, not coverage.
_EDGE_TOLERANCE = 1e-6


def _pixel_centres(size: int) -> np.ndarray:
  return np.arange(size, dtype=np.float32) + 0.5


def _check_box_labels(box_labels: np.ndarray, num_classes: int | None) -> None:
  bad = box_labels < -1
  if num_classes is not None:
    bad |= box_labels >= num_classes
  if np.any(bad):
    limit = "" if num_classes is None else f", {num_classes}"
    raise ValueError(f"box_labels must lie in [-1{limit}) (-1 = padding), got "
                     f"{np.unique(box_labels[bad]).tolist()}")


def _selected(box_labels: np.ndarray, classes: Iterable[int] | None) -> np.ndarray:
  """bool [..., B]: real boxes (label >= 0), restricted to ``classes`` if given."""
  keep = box_labels >= 0
  if classes is not None:
    keep &= np.isin(box_labels, np.asarray(list(classes), np.int64))
  return keep


def _box_extents(boxes: np.ndarray, height: int, width: int
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Per box, which rows / columns have their pixel centre inside it.

  Returns (rows bool [..., B, H], cols bool [..., B, W]); the box is half-open,
  x0 * W <= j + 0.5 < x1 * W, so boxes that share an edge do not share pixels.
  """
  boxes = np.asarray(boxes, np.float32)
  if boxes.shape[-1] != 4:
    raise ValueError(f"boxes must have shape [..., B, 4], got {boxes.shape}")
  x0, y0, x1, y1 = (boxes[..., i, None] for i in range(4))
  cols = _pixel_centres(width)
  rows = _pixel_centres(height)
  in_cols = (cols >= x0 * width) & (cols < x1 * width)
  in_rows = (rows >= y0 * height) & (rows < y1 * height)
  return in_rows, in_cols


def _gaussian_profile(distance: np.ndarray, sigma: np.ndarray) -> np.ndarray:
  """exp(-d^2 / 2 sigma^2), with values below exp(-80) set to 0.

  Flushing them avoids float32 subnormals, which slow the matmul tenfold.
  """
  exponent = 0.5 * np.square(distance / sigma)
  return np.where(exponent < 80.0, np.exp(-exponent), 0.0).astype(np.float32)


def gaze_heatmap(gaze: np.ndarray, height: int, width: int,
                 sigma_per_second: float = 10.0, min_sigma: float = 0.5) -> np.ndarray:
  """Gaze fixations -> heat map (van Sonsbeek 2023, Sec. 4: a_sigmaGAZE = 10).

  Each fixation (x, y, seconds) is an unnormalized Gaussian (peak 1) centred at
  (x * width, y * height) with standard deviation
  sigma = max(sigma_per_second * seconds, min_sigma) **in pixels of the
  rendered map** (so the same gaze is wider, relative to the image, on a small
  map); the Gaussians are summed and the map is divided by its maximum.
  ``min_sigma`` keeps a very short fixation from falling between pixel centres.
  Rows with seconds == 0 are padding and contribute nothing.

  Args:
    gaze: float [..., F, 3] (x, y normalized to [0, 1], seconds >= 0).
    height, width: size of the map in pixels.
    sigma_per_second: pixels of standard deviation per second of fixation.
    min_sigma: smallest standard deviation in pixels.
  Returns:
    float32 [..., height, width] in [0, 1]; max 1 if any fixation, else all 0.
  """
  gaze = np.asarray(gaze, np.float32)
  if gaze.ndim < 2 or gaze.shape[-1] != 3:
    raise ValueError(f"gaze must have shape [..., F, 3], got {gaze.shape}")
  x, y, seconds = gaze[..., 0, None], gaze[..., 1, None], gaze[..., 2, None]
  sigma = np.maximum(sigma_per_second * seconds, min_sigma)
  weight = (seconds > 0).astype(np.float32)
  # Separable: exp(-(dx^2 + dy^2) / 2s^2) = gx * gy; [..., F, W] and [..., F, H].
  gx = _gaussian_profile(_pixel_centres(width) - x * width, sigma)
  gy = _gaussian_profile(_pixel_centres(height) - y * height, sigma)
  heat = np.swapaxes(gy * weight, -1, -2) @ gx  # [..., H, F] @ [..., F, W]
  peak = heat.max(axis=(-2, -1), keepdims=True)
  return (heat / np.where(peak > 0, peak, 1)).astype(np.float32)  # all-zero stays 0


def boxes_to_mask(boxes: np.ndarray, box_labels: np.ndarray, height: int, width: int,
                  classes: Iterable[int] | None = None) -> np.ndarray:
  """Filled union of boxes: 1 where a pixel's centre lies inside a box.

  Pixel (i, j) is 1 iff x0 * W <= j + 0.5 < x1 * W and y0 * H <= i + 0.5 < y1 * H
  for some real box (label >= 0, and in ``classes`` if given). A box narrower
  than a pixel may contain no pixel centre and then marks nothing.

  Args:
    boxes: float [..., B, 4] (x0, y0, x1, y1) normalized to [0, 1].
    box_labels: int [..., B], -1 = padding.
    height, width: size of the mask in pixels.
    classes: optional class indices; other boxes are ignored.
  Returns:
    float32 [..., height, width] in {0, 1}.
  """
  box_labels = np.asarray(box_labels)
  _check_box_labels(box_labels, None)
  in_rows, in_cols = _box_extents(boxes, height, width)
  in_rows = in_rows & _selected(box_labels, classes)[..., None]
  hits = np.swapaxes(in_rows, -1, -2).astype(np.float32) @ in_cols.astype(np.float32)
  return (hits > 0).astype(np.float32)


def gaussian_kernel(sigma: float) -> np.ndarray:
  """float64 [2r + 1], r = ceil(4 sigma): normalized 1-D Gaussian taps."""
  radius = int(np.ceil(4 * sigma))
  taps = np.arange(-radius, radius + 1, dtype=np.float64)
  kernel = np.exp(-0.5 * np.square(taps / sigma))
  return kernel / kernel.sum()


@functools.lru_cache(maxsize=32)
def _blur_matrix(size: int, sigma: float) -> np.ndarray:
  """float32 [size, size] B with (B @ v)[i] = sum_t kernel[t] * v[mirror(i + t)]."""
  kernel = gaussian_kernel(sigma)
  radius = len(kernel) // 2
  source = (np.arange(size)[:, None] + np.arange(-radius, radius + 1)) % (2 * size)
  source = np.where(source < size, source, 2 * size - 1 - source)
  matrix = np.zeros((size, size))
  np.add.at(matrix, (np.repeat(np.arange(size), len(kernel)), source.ravel()),
            np.tile(kernel, size))
  matrix = matrix.astype(np.float32)
  matrix.flags.writeable = False
  return matrix


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
  """Separable Gaussian blur of the last two axes, symmetric padding.

  The image is extended by mirroring with the edge pixel repeated
  (``d c b a | a b c d | d c b a``, numpy's 'symmetric' = scipy's 'reflect'),
  so a region touching the image border is not darkened there; the kernel is
  truncated at 4 sigma and normalized. Both 1-D passes are one matmul with a
  banded (mirror-folded) matrix. sigma <= 0 returns the input.

  Args:
    image: float [..., H, W].
    sigma: standard deviation in pixels.
  Returns:
    float32 [..., H, W].
  """
  image = np.asarray(image, np.float32)
  if sigma <= 0:
    return image
  height, width = image.shape[-2:]
  return _blur_matrix(height, float(sigma)) @ image @ _blur_matrix(width, float(sigma)).T


def boxes_to_soft_mask(boxes: np.ndarray, box_labels: np.ndarray, height: int,
                       width: int, sigma: float = 5.0,
                       classes: Iterable[int] | None = None) -> np.ndarray:
  """``boxes_to_mask`` with edges smoothed by a Gaussian (van Sonsbeek sigma_BB = 5).

  The binary mask is blurred by ``gaussian_blur`` (sigma in pixels of the map,
  symmetric padding, so a box reaching the image border stays 1 there).

  Returns:
    float32 [..., height, width] in [0, 1].
  """
  mask = boxes_to_mask(boxes, box_labels, height, width, classes)
  return np.clip(gaussian_blur(mask, sigma), 0.0, 1.0)


def boxes_to_class_masks(boxes: np.ndarray, box_labels: np.ndarray, height: int,
                         width: int, num_classes: int) -> np.ndarray:
  """One binary ``boxes_to_mask`` per class (same pixel-centre rule).

  Args:
    boxes: float [..., B, 4] normalized (x0, y0, x1, y1).
    box_labels: int [..., B] in [-1, num_classes), -1 = padding.
  Returns:
    float32 [..., height, width, num_classes] in {0, 1}.
  """
  box_labels = np.asarray(box_labels)
  _check_box_labels(box_labels, num_classes)
  in_rows, in_cols = _box_extents(boxes, height, width)
  one_hot = box_labels[..., None, :] == np.arange(num_classes)[:, None]  # [..., K, B]
  rows_per_class = one_hot[..., :, None, :] & np.swapaxes(in_rows, -1, -2)[..., None, :, :]
  hits = rows_per_class.astype(np.float32) @ in_cols[..., None, :, :].astype(np.float32)
  return np.moveaxis(hits > 0, -3, -1).astype(np.float32)  # [..., K, H, W] -> [..., H, W, K]


def box_patch_coverage(boxes: np.ndarray, grid: int) -> np.ndarray:
  """Fraction of each patch of a grid x grid partition covered by each box.

  Patch (i, j) spans [j / P, (j + 1) / P) x [i / P, (i + 1) / P) in
  normalized coordinates (row i from the top, column j from the left).

  Args:
    boxes: float [..., B, 4] normalized (x0, y0, x1, y1).
    grid: P.
  Returns:
    float32 [..., B, P, P] in [0, 1].
  """
  boxes = np.asarray(boxes, np.float64)
  if boxes.shape[-1] != 4:
    raise ValueError(f"boxes must have shape [..., B, 4], got {boxes.shape}")
  if grid < 1:
    raise ValueError(f"grid must be >= 1, got {grid}")
  start = np.arange(grid, dtype=np.float64)

  def side_overlap(lo, hi):  # [..., B, P]: covered fraction of each patch side
    span = np.minimum(hi[..., None] * grid, start + 1) - np.maximum(lo[..., None] * grid, start)
    span = np.clip(span, 0.0, 1.0)
    return np.where(span > _EDGE_TOLERANCE, span, 0.0)

  cover_x = side_overlap(boxes[..., 0], boxes[..., 2])
  cover_y = side_overlap(boxes[..., 1], boxes[..., 3])
  return (cover_y[..., :, None] * cover_x[..., None, :]).astype(np.float32)


def boxes_to_patch_grid(boxes: np.ndarray, box_labels: np.ndarray, grid: int,
                        num_classes: int, min_coverage: float = 0.0) -> np.ndarray:
  """Boxes -> P x P x K patch labels (Li et al. 2018; Rozenberg 2020 Eq. 1, 12).

  Rozenberg: "the bounding box b^k is a subset of the P^2 patches", without
  saying which patches. Rule: patch (i, j) of class k is 1 iff a single
  box of class k covers a positive area of it and at least ``min_coverage`` of
  its area (``box_patch_coverage``). The default 0 = any overlap, so every box
  of positive size maps to >= 1 patch (|b^k| > 0 in Eq. 12 even for a nodule
  smaller than a patch); 0.5 = at least half the patch; 1 = patch inside box.
  Box edges lying on patch edges do not spill into the neighbouring patch.

  Args:
    boxes: float [..., B, 4] normalized (x0, y0, x1, y1).
    box_labels: int [..., B] in [-1, num_classes), -1 = padding.
    grid: P.
    num_classes: K.
    min_coverage: fraction of a patch's area in [0, 1].
  Returns:
    float32 [..., P, P, K] in {0, 1}.
  """
  if not 0.0 <= min_coverage <= 1.0:
    raise ValueError(f"min_coverage must lie in [0, 1], got {min_coverage}")
  box_labels = np.asarray(box_labels)
  _check_box_labels(box_labels, num_classes)
  coverage = box_patch_coverage(boxes, grid)
  covered = ((coverage > 0) & (coverage >= min_coverage - _EDGE_TOLERANCE)).astype(np.float32)
  one_hot = (box_labels[..., None] == np.arange(num_classes)).astype(np.float32)
  hits = np.einsum("...bij,...bk->...ijk", covered, one_hot)
  return (hits > 0).astype(np.float32)
