"""benchmarks/cam_attribution.py: the scores that say whether a Grad-CAM localizes."""

import importlib.util
import os

import numpy as np
import pytest

spec = importlib.util.spec_from_file_location(
    "cam_attribution",
    os.path.join(os.path.dirname(__file__), "..", "benchmarks", "cam_attribution.py"))
attr = importlib.util.module_from_spec(spec)
spec.loader.exec_module(attr)


def _masks(rng, num=6, size=32):
  masks = np.zeros((num, size, size), bool)
  for m in masks:
    y, x = rng.integers(0, size - 8, 2)
    h, w = rng.integers(2, 8, 2)
    m[y:y + h, x:x + w] = True
  return masks


def test_a_map_equal_to_the_mask_scores_all_mass_and_every_point():
  rng = np.random.default_rng(0)
  masks = _masks(rng)
  devices = np.zeros_like(masks)
  devices[:, :2] = True
  s = attr.attribution(masks.astype(np.float64), masks, devices)
  np.testing.assert_allclose(s["mass"], 1.0)
  np.testing.assert_array_equal(s["pointing"], 1.0)
  np.testing.assert_allclose(s["area"], masks.mean(axis=(1, 2)))
  # The masks never reach the top rows, where the devices are.
  np.testing.assert_allclose(s["device_mass"], 0.0)


def test_a_constant_map_scores_the_area_and_an_empty_map_is_counted_not_scored():
  rng = np.random.default_rng(1)
  masks = _masks(rng)
  devices = rng.random(masks.shape) < 0.1
  maps = np.full(masks.shape, 0.3)
  maps[0] = 0.0
  s = attr.attribution(maps, masks, devices)
  np.testing.assert_allclose(s["mass"][1:], masks[1:].mean(axis=(1, 2)))
  np.testing.assert_allclose(s["device_mass"][1:], devices[1:].mean(axis=(1, 2)))
  assert np.isnan(s["mass"][0]) and np.isnan(s["pointing"][0])
  np.testing.assert_array_equal(s["empty"], [True] + [False] * 5)


def test_the_grid_ceiling_averages_each_cell_and_peaks_in_the_masks_cell():
  mask = np.zeros((1, 32, 32), bool)
  mask[0, 8:16, 16:24] = True                      # one quarter of cell (0, 1) of a 2 x 2 grid
  ceiling = attr.grid_ceiling(mask, 2)
  assert ceiling.shape == (1, 32, 32)
  # Bilinear upsampling of a 2 x 2 map holds the cell values at the cell centres.
  assert ceiling[0, 7:9, 23:25].mean() == pytest.approx(0.25, abs=0.02)
  assert ceiling[0, 23:25, 7:9].mean() == pytest.approx(0.0, abs=0.02)
  y, x = np.unravel_index(ceiling[0].argmax(), (32, 32))
  assert y < 16 and x >= 16
  s = attr.attribution(ceiling, mask, np.zeros_like(mask))
  assert s["mass"][0] > 2 * s["area"][0]
