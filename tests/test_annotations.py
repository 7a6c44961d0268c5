"""Annotation maps against slow float64 reference loops, and their properties."""

import math

import numpy as np
import pytest

from cxr_jax.data import annotations as ann

H, W = 32, 40  # non-square, so swapped axes are caught


def random_boxes(rng, num_boxes, num_classes, num_padding=0, lattice=None):
  """[B, 4] valid normalized boxes (padding rows zero) and [B] labels (-1 = padding)."""
  if lattice is None:
    corners = rng.uniform(0, 1, size=(num_boxes, 2, 2))
  else:
    corners = rng.integers(0, lattice + 1, size=(num_boxes, 2, 2)) / lattice
  lo, hi = corners.min(axis=1), corners.max(axis=1)
  boxes = np.concatenate([lo, hi], axis=1)
  labels = rng.integers(0, num_classes, size=num_boxes)
  boxes = np.concatenate([boxes, np.zeros((num_padding, 4))])
  labels = np.concatenate([labels, -np.ones(num_padding, int)])
  return boxes.astype(np.float32), labels.astype(np.int32)


def random_gaze(rng, num_fixations, num_padding=0):
  gaze = np.stack([rng.uniform(0, 1, num_fixations), rng.uniform(0, 1, num_fixations),
                   rng.uniform(0.05, 1.0, num_fixations)], axis=1)
  padding = np.concatenate([rng.uniform(0, 1, (num_padding, 2)), np.zeros((num_padding, 1))],
                           axis=1)
  return np.concatenate([gaze, padding]).astype(np.float32)


# ---------------------------------------------------------------- references

def reference_gaze(gaze, height, width, a=10.0, min_sigma=0.5):
  heat = np.zeros((height, width))
  for x, y, seconds in gaze.astype(np.float64):
    if seconds <= 0:
      continue
    sigma = max(a * seconds, min_sigma)
    for i in range(height):
      for j in range(width):
        d2 = (j + 0.5 - x * width) ** 2 + (i + 0.5 - y * height) ** 2
        heat[i, j] += math.exp(-d2 / (2 * sigma ** 2))
  return heat / heat.max() if heat.max() > 0 else heat


def reference_masks(boxes, labels, height, width, num_classes):
  """[H, W, K]: pixel centre inside the half-open box."""
  out = np.zeros((height, width, num_classes))
  for (x0, y0, x1, y1), k in zip(boxes.astype(np.float64), labels):
    if k < 0:
      continue
    for i in range(height):
      for j in range(width):
        if x0 * width <= j + 0.5 < x1 * width and y0 * height <= i + 0.5 < y1 * height:
          out[i, j, k] = 1
  return out


def reference_blur(image, sigma):
  """Direct 2-D convolution, window radius ceil(4 sigma), mirrored with edge repeat."""
  height, width = image.shape
  radius = int(math.ceil(4 * sigma))

  def mirror(i, n):  # ... 1 0 | 0 1 ... n-1 | n-1 n-2 ...
    i = i % (2 * n)
    return i if i < n else 2 * n - 1 - i

  offsets = range(-radius, radius + 1)
  kernel = np.array([[math.exp(-(dy * dy + dx * dx) / (2 * sigma * sigma)) for dx in offsets]
                     for dy in offsets])
  kernel /= kernel.sum()
  out = np.zeros((height, width))
  for a, dy in enumerate(offsets):
    rows = [mirror(i + dy, height) for i in range(height)]
    for b, dx in enumerate(offsets):
      cols = [mirror(j + dx, width) for j in range(width)]
      out += kernel[a, b] * image.astype(np.float64)[np.ix_(rows, cols)]
  return out


def reference_patch_grid(box_units, labels, grid, subdiv, num_classes, min_coverage):
  """Boxes in integer units of 1/(grid*subdiv); coverage counted exactly on subcells."""
  out = np.zeros((grid, grid, num_classes))
  for (x0, y0, x1, y1), k in zip(box_units, labels):
    if k < 0:
      continue
    for i in range(grid):
      for j in range(grid):
        count = 0
        for u in range(i * subdiv, (i + 1) * subdiv):
          for v in range(j * subdiv, (j + 1) * subdiv):
            count += (x0 <= v < x1) and (y0 <= u < y1)
        coverage = count / subdiv ** 2
        if coverage > 0 and coverage >= min_coverage:
          out[i, j, k] = 1
  return out


# ---------------------------------------------------------------- gaze

def test_gaze_matches_reference():
  rng = np.random.default_rng(0)
  gaze = random_gaze(rng, 12, num_padding=5)
  got = ann.gaze_heatmap(gaze, H, W)
  assert got.dtype == np.float32 and got.shape == (H, W)
  np.testing.assert_allclose(got, reference_gaze(gaze, H, W), atol=2e-6)


def test_gaze_sigma_is_in_pixels_of_the_map():
  # One 0.3 s fixation on a pixel centre: sigma = 3 px, so one sigma away is exp(-1/2).
  gaze = np.array([[10.5 / W, 7.5 / H, 0.3]], np.float32)
  heat = ann.gaze_heatmap(gaze, H, W)
  assert heat[7, 10] == pytest.approx(1.0)
  assert heat[7, 13] == pytest.approx(math.exp(-0.5), rel=1e-5)
  assert heat[10, 10] == pytest.approx(math.exp(-0.5), rel=1e-5)
  wide = ann.gaze_heatmap(gaze, H, W, sigma_per_second=20.0)
  assert wide[7, 16] == pytest.approx(math.exp(-0.5), rel=1e-5)


def test_gaze_properties():
  rng = np.random.default_rng(1)
  gaze = random_gaze(rng, 20)
  heat = ann.gaze_heatmap(gaze, H, W)
  assert heat.min() >= 0 and heat.max() == pytest.approx(1.0)
  # Padding rows (seconds 0, any position) change nothing; order does not matter.
  padded = np.concatenate([gaze, random_gaze(rng, 0, num_padding=30)])
  # (Equal up to float32 rounding: BLAS may sum the F products in another order.)
  np.testing.assert_allclose(ann.gaze_heatmap(padded, H, W), heat, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(ann.gaze_heatmap(gaze[::-1], H, W), heat, atol=1e-6)
  # No fixation at all: an all-zero map, not NaN.
  empty = ann.gaze_heatmap(np.zeros((8, 3), np.float32), H, W)
  assert np.all(empty == 0)
  # Tiny fixation between pixel centres still shows up.
  tiny = ann.gaze_heatmap(np.array([[0.5, 0.5, 1e-4]], np.float32), H, W)
  assert tiny.max() == pytest.approx(1.0)


def test_gaze_batch():
  rng = np.random.default_rng(2)
  batch = np.stack([random_gaze(rng, 6, num_padding=2) for _ in range(6)]).reshape(2, 3, 8, 3)
  batch[1, 2, :, 2] = 0  # one example without gaze
  got = ann.gaze_heatmap(batch, H, W)
  assert got.shape == (2, 3, H, W)
  for a in range(2):
    for b in range(3):
      np.testing.assert_allclose(got[a, b], ann.gaze_heatmap(batch[a, b], H, W), atol=1e-6)
  assert np.all(got[1, 2] == 0)


def test_gaze_rejects_bad_shape():
  with pytest.raises(ValueError, match="gaze must have shape"):
    ann.gaze_heatmap(np.zeros((4, 2), np.float32), H, W)


# ---------------------------------------------------------------- box masks

def test_masks_match_reference():
  rng = np.random.default_rng(3)
  num_classes = 5
  boxes, labels = random_boxes(rng, 6, num_classes, num_padding=3)
  ref = reference_masks(boxes, labels, H, W, num_classes)
  class_masks = ann.boxes_to_class_masks(boxes, labels, H, W, num_classes)
  assert class_masks.dtype == np.float32 and class_masks.shape == (H, W, num_classes)
  np.testing.assert_array_equal(class_masks, ref)
  mask = ann.boxes_to_mask(boxes, labels, H, W)
  assert mask.dtype == np.float32 and mask.shape == (H, W)
  np.testing.assert_array_equal(mask, ref.max(axis=-1))
  chosen = [int(labels[0]), num_classes - 1]
  np.testing.assert_array_equal(ann.boxes_to_mask(boxes, labels, H, W, classes=chosen),
                                ref[..., sorted(set(chosen))].max(axis=-1))


def test_mask_pixel_centre_rule_by_hand():
  # x from 0.25 to 0.5 of W=40 -> [10, 20): columns 10..19; y from 0 to 0.1 of 32 -> [0, 3.2).
  mask = ann.boxes_to_mask(np.array([[0.25, 0.0, 0.5, 0.1]], np.float32),
                           np.array([0], np.int32), H, W)
  rows, cols = np.nonzero(mask)
  assert set(cols) == set(range(10, 20)) and set(rows) == {0, 1, 2}
  # Edges exactly on pixel centres (H = 32, exact in float32): [5.5, 10.5) holds rows 5..9.
  mask = ann.boxes_to_mask(np.array([[0.0, 5.5 / H, 1.0, 10.5 / H]], np.float32),
                           np.array([0], np.int32), H, W)
  assert set(np.nonzero(mask)[0]) == set(range(5, 10))
  # Two boxes sharing an edge cover disjoint pixels that tile the union.
  pair = np.array([[0.0, 0.0, 0.5, 1.0], [0.5, 0.0, 1.0, 1.0]], np.float32)
  halves = ann.boxes_to_class_masks(pair, np.array([0, 1], np.int32), H, W, 2)
  np.testing.assert_array_equal(halves.sum(-1), np.ones((H, W)))


def test_masks_batch_and_padding():
  rng = np.random.default_rng(4)
  items = [random_boxes(rng, 3, 4, num_padding=2) for _ in range(4)]
  boxes = np.stack([b for b, _ in items]).reshape(2, 2, 5, 4)
  labels = np.stack([l for _, l in items]).reshape(2, 2, 5)
  labels[0, 1] = -1  # no boxes at all
  masks = ann.boxes_to_mask(boxes, labels, H, W)
  class_masks = ann.boxes_to_class_masks(boxes, labels, H, W, 4)
  soft = ann.boxes_to_soft_mask(boxes, labels, H, W, sigma=2.0)
  grid = ann.boxes_to_patch_grid(boxes, labels, 5, 4)
  assert masks.shape == (2, 2, H, W) and class_masks.shape == (2, 2, H, W, 4)
  assert soft.shape == (2, 2, H, W) and grid.shape == (2, 2, 5, 5, 4)
  for a in range(2):
    for b in range(2):
      args = boxes[a, b], labels[a, b]
      np.testing.assert_array_equal(masks[a, b], ann.boxes_to_mask(*args, H, W))
      np.testing.assert_array_equal(class_masks[a, b], ann.boxes_to_class_masks(*args, H, W, 4))
      np.testing.assert_allclose(soft[a, b], ann.boxes_to_soft_mask(*args, H, W, sigma=2.0),
                                 atol=1e-6)
      np.testing.assert_array_equal(grid[a, b], ann.boxes_to_patch_grid(*args, 5, 4))
  assert not masks[0, 1].any() and not soft[0, 1].any() and not grid[0, 1].any()


def test_bad_box_labels_raise():
  boxes = np.array([[0.1, 0.1, 0.5, 0.5]], np.float32)
  with pytest.raises(ValueError, match="box_labels"):
    ann.boxes_to_class_masks(boxes, np.array([3], np.int32), H, W, 3)
  with pytest.raises(ValueError, match="box_labels"):
    ann.boxes_to_mask(boxes, np.array([-2], np.int32), H, W)
  with pytest.raises(ValueError, match="box_labels"):
    ann.boxes_to_patch_grid(boxes, np.array([7], np.int32), 4, 3)


# ---------------------------------------------------------------- soft masks

@pytest.mark.parametrize("sigma", [1.5, 5.0, 9.0])  # 9: kernel wider than the image
def test_soft_mask_matches_reference_convolution(sigma):
  rng = np.random.default_rng(5)
  boxes, labels = random_boxes(rng, 3, 2, num_padding=1)
  boxes[0] = [0.0, 0.6, 0.3, 1.0]  # touches two image borders
  soft = ann.boxes_to_soft_mask(boxes, labels, H, W, sigma=sigma)
  ref = reference_blur(reference_masks(boxes, labels, H, W, 2).max(-1), sigma)
  assert soft.dtype == np.float32 and soft.shape == (H, W)
  np.testing.assert_allclose(soft, np.clip(ref, 0, 1), atol=1e-5)
  assert soft.min() >= 0 and soft.max() <= 1


def test_soft_mask_edges():
  # A large box whose right half reaches the image border.
  box = np.array([[0.2, 0.0, 1.0, 1.0]], np.float32)
  soft = ann.boxes_to_soft_mask(box, np.array([0], np.int32), 64, 64, sigma=2.0)
  assert np.all(soft[:, 30:] > 0.999)      # inside, incl. at the image border (mirrored)
  assert np.all(soft[:, :3] < 1e-3)        # far outside
  edge = soft[32, 8:18]                    # the edge at x = 12.8 px is smooth
  assert np.all(np.diff(edge) > 0) and 0.3 < soft[32, 12] < 0.7
  hard = ann.boxes_to_soft_mask(box, np.array([0], np.int32), 64, 64, sigma=0.0)
  np.testing.assert_array_equal(hard, ann.boxes_to_mask(box, np.array([0]), 64, 64))


# ---------------------------------------------------------------- patch grid

@pytest.mark.parametrize("grid", [8, 7])
@pytest.mark.parametrize("min_coverage", [0.0, 0.5, 1.0])
def test_patch_grid_matches_supersampled_reference(grid, min_coverage):
  subdiv = 8
  rng = np.random.default_rng(6 + grid)
  num_classes = 3
  units = grid * subdiv
  corners = rng.integers(0, units + 1, size=(8, 2, 2))
  box_units = np.concatenate([corners.min(1), corners.max(1)], axis=1)
  labels = rng.integers(0, num_classes, size=8).astype(np.int32)
  labels[-1] = -1
  boxes = (box_units / units).astype(np.float32)  # 1/56 is inexact in float32
  got = ann.boxes_to_patch_grid(boxes, labels, grid, num_classes, min_coverage=min_coverage)
  assert got.dtype == np.float32 and got.shape == (grid, grid, num_classes)
  ref = reference_patch_grid(box_units, labels, grid, subdiv, num_classes, min_coverage)
  np.testing.assert_array_equal(got, ref)


def test_patch_grid_rule_by_hand():
  labels = np.array([1], np.int32)

  def cols(box, min_coverage):
    got = ann.boxes_to_patch_grid(np.array([box], np.float32), labels, 4, 2,
                                  min_coverage=min_coverage)
    assert not got[..., 0].any()
    return {tuple(ij) for ij in np.argwhere(got[..., 1])}

  exact = [0.25, 0.25, 0.5, 0.5]  # exactly patch (1, 1): no spill into neighbours
  for rule in (0.0, 0.5, 1.0):
    assert cols(exact, rule) == {(1, 1)}
  small = [0.3, 0.05, 0.35, 0.1]  # a nodule inside patch (0, 1), 4% of its area
  assert cols(small, 0.0) == {(0, 1)} and cols(small, 0.5) == set()
  # Columns covered 60%, 100%, 40% of patch width; rows 0 fully.
  wide = [0.1, 0.0, 0.6, 0.25]
  assert cols(wide, 0.0) == {(0, 0), (0, 1), (0, 2)}
  assert cols(wide, 0.5) == {(0, 0), (0, 1)}
  assert cols(wide, 1.0) == {(0, 1)}
  with pytest.raises(ValueError, match="min_coverage"):
    cols(wide, 1.5)


def test_patch_grid_agrees_with_pixel_mask_when_aligned():
  # When the map is an integer multiple of the grid, "any overlap" patches are
  # exactly the patches that contain a masked pixel, for boxes on pixel edges.
  rng = np.random.default_rng(7)
  boxes, labels = random_boxes(rng, 6, 4, lattice=40)
  grid = ann.boxes_to_patch_grid(boxes, labels, 5, 4)
  masks = ann.boxes_to_class_masks(boxes, labels, 40, 40, 4)
  pooled = masks.reshape(5, 8, 5, 8, 4).max(axis=(1, 3))
  np.testing.assert_array_equal(grid, pooled)
