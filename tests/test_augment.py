"""Augmentations move boxes and gaze with the image."""

import numpy as np
import pytest

from configs.common import base_config
from cxr_jax.data import annotations, augment, schema

SIZE = 48
NUM_CLASSES = 14


def rectangle_example(rng, size=64, num_boxes=1):
  """Black image with bright rectangles; each box is exactly its rectangle's pixel edges."""
  image = np.zeros((size, size), np.uint8)
  boxes, labels = [], []
  for k in range(num_boxes):
    w, h = rng.integers(10, 30, size=2)
    x0, y0 = rng.integers(2, size - 2 - w), rng.integers(2, size - 2 - h)
    image[y0:y0 + h, x0:x0 + w] = 255
    boxes.append(np.array([x0, y0, x0 + w, y0 + h]) / size)
    labels.append(k)
  boxes, labels = schema.pad_boxes(boxes, labels)
  return dict(image=image, labels=np.zeros(NUM_CLASSES, np.float32),
              label_mask=np.ones(NUM_CLASSES, np.float32), boxes=boxes, box_labels=labels,
              gaze=schema.empty_gaze(), patient_id="p0", image_id="i0")


def pixel_bbox(image, threshold):
  """Pixel-edge bbox (x0, y0, x1, y1) of the pixels above ``threshold``, or None."""
  ys, xs = np.nonzero(image > threshold)
  if not len(xs):
    return None
  return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)


def assert_tight(box, image, name, tol=0.3):
  """The box holds every clearly bright pixel and no more than the faintly lit ones."""
  box = box * image.shape[0]
  inner, outer = pixel_bbox(image, 200), pixel_bbox(image, 10)
  assert outer is not None, f"{name}: box kept but no bright pixels"
  if inner is not None:
    assert np.all(box[:2] <= inner[:2] + tol) and np.all(box[2:] >= inner[2:] - tol), (
        name, box, inner)
  assert np.all(box[:2] >= outer[:2] - tol) and np.all(box[2:] <= outer[2:] + tol), (
      name, box, outer)


GEOMETRIC = {
    "center_crop": lambda ex, rng: augment.center_crop(ex, rng.uniform(0.6, 1.0), SIZE),
    "random_resized_crop": lambda ex, rng: augment.random_resized_crop(ex, rng, (0.3, 1.0), SIZE),
    "random_affine": lambda ex, rng: augment.random_affine(ex, rng, 30.0, 0.3, 0.15, SIZE),
    "hflip": lambda ex, rng: augment.hflip(ex),
    "train_transform": lambda ex, rng: augment.train_transform(
        ex, rng, _geometric_only(), SIZE),
}


def _geometric_only():
  aug = base_config().data.augment
  aug.random_resized_crop, aug.affine, aug.hflip, aug.blur, aug.intensity = 1.0, 1.0, 0.5, 0.0, 0.0
  aug.rotation, aug.shift, aug.crop_scale = 25.0, 0.1, (0.4, 1.0)
  return aug


@pytest.mark.parametrize("name", sorted(GEOMETRIC))
def test_box_stays_tight_around_bright_pixels(name):
  rng = np.random.default_rng(0)
  kept = 0
  for _ in range(40):
    example = rectangle_example(rng)
    out = GEOMETRIC[name](example, rng)
    schema.validate_example(out, NUM_CLASSES, origin=name)
    size = out["image"].shape[0]
    if out["box_labels"][0] >= 0:
      kept += 1
      assert_tight(out["boxes"][0], out["image"], name)
    else:  # dropped: only when pushed (mostly) out of the image
      found = pixel_bbox(out["image"], 127)
      assert found is None or found[0] <= 1 or found[1] <= 1 or found[2] >= size - 1 or (
          found[3] >= size - 1)
  assert kept >= 25, f"{name}: too few boxes survived ({kept}/40)"


def test_geometric_transforms_really_move_the_image():
  """The property test above must not pass because nothing happened."""
  rng = np.random.default_rng(1)
  example = rectangle_example(rng)
  resized = augment.resize(example, SIZE)["image"]
  moved = augment.random_affine(example, np.random.default_rng(2), 30.0, 0.3, 0.15, SIZE)
  assert np.abs(moved["image"].astype(int) - resized).mean() > 5
  assert not np.allclose(moved["boxes"][0], example["boxes"][0], atol=0.02)


def test_gaze_moves_with_the_image():
  rng = np.random.default_rng(3)
  size = 64
  for trial in range(20):
    image = np.zeros((size, size), np.uint8)
    points = rng.uniform(0.3, 0.7, size=(3, 2))
    for x, y in points:  # a bright 3x3 dot centred on each fixation
      j, i = int(x * size), int(y * size)
      image[i - 1:i + 2, j - 1:j + 2] = 255
    points = (np.floor(points * size) + 0.5) / size  # the dot centres
    gaze = schema.pad_gaze(np.concatenate([points, np.full((3, 1), 0.4)], axis=1))
    example = rectangle_example(rng, size) | {"image": image, "gaze": gaze}
    out = augment.random_affine(example, rng, 20.0, 0.2, 0.05, size)
    moved = out["gaze"][out["gaze"][:, 2] > 0]
    assert len(moved) == 3, trial
    for x, y, seconds in moved:
      j, i = int(x * size), int(y * size)
      window = out["image"][i - 2:i + 3, j - 2:j + 3]
      assert window.max() > 100, (trial, x, y)  # the dot is where the fixation moved
      assert seconds == pytest.approx(0.4)


def test_gaze_leaving_the_image_is_dropped_and_compacted():
  example = rectangle_example(np.random.default_rng(4))
  example["gaze"] = schema.pad_gaze(np.array([[0.1, 0.5, 0.2], [0.5, 0.5, 0.3], [0.95, 0.5, 0.4]]))
  shift_right = augment.translate_matrix(0.3, 0.0)
  out = augment.warp(example, shift_right, SIZE)
  real = out["gaze"][:, 2] > 0
  np.testing.assert_array_equal(real, np.arange(schema.MAX_FIXATIONS) < 2)
  np.testing.assert_allclose(out["gaze"][:2], [[0.4, 0.5, 0.2], [0.8, 0.5, 0.3]], atol=1e-6)


def test_boxes_pushed_out_are_dropped_and_rest_compacted():
  rng = np.random.default_rng(5)
  example = rectangle_example(rng, num_boxes=1)
  boxes, labels = schema.pad_boxes(
      [[0.80, 0.1, 0.95, 0.3], [0.1, 0.1, 0.3, 0.3], [0.85, 0.5, 0.99, 0.7], [0.2, 0.6, 0.4, 0.8]],
      [3, 5, 7, 9])
  example.update(boxes=boxes, box_labels=labels)
  out = augment.warp(example, augment.translate_matrix(0.3, 0.0), SIZE)
  schema.validate_example(out, NUM_CLASSES)
  np.testing.assert_array_equal(out["box_labels"][:3], [5, 9, -1])
  np.testing.assert_allclose(out["boxes"][:2], [[0.4, 0.1, 0.6, 0.3], [0.5, 0.6, 0.7, 0.8]],
                             atol=1e-6)
  assert np.all(out["box_labels"][2:] == -1)


def test_hflip():
  rng = np.random.default_rng(6)
  example = rectangle_example(rng, num_boxes=2)
  example["image"] = rng.integers(0, 256, (40, 64), dtype=np.uint8)
  example["gaze"] = schema.pad_gaze(np.array([[0.2, 0.3, 0.5], [0.9, 0.6, 0.1]]))
  out = augment.hflip(example)
  np.testing.assert_array_equal(out["image"], example["image"][:, ::-1])
  b = example["boxes"][:2]
  mirrored = np.stack([1 - b[:, 2], b[:, 1], 1 - b[:, 0], b[:, 3]], axis=1)
  np.testing.assert_allclose(out["boxes"][:2], mirrored, atol=1e-6)
  np.testing.assert_allclose(out["gaze"][:2], [[0.8, 0.3, 0.5], [0.1, 0.6, 0.1]], atol=1e-6)
  twice = augment.hflip(out)
  np.testing.assert_array_equal(twice["image"], example["image"])
  np.testing.assert_allclose(twice["boxes"], example["boxes"], atol=1e-6)


def test_hflip_off_by_default():
  aug = base_config().data.augment
  assert aug.hflip == 0.0
  aug.random_resized_crop = aug.affine = aug.blur = aug.intensity = 0.0
  example = rectangle_example(np.random.default_rng(7))
  for seed in range(20):
    out = augment.train_transform(example, np.random.default_rng(seed), aug, 64)
    np.testing.assert_array_equal(out["image"], example["image"])


def test_train_transform_deterministic_given_rng():
  aug = base_config().data.augment
  aug.random_resized_crop = aug.blur = 0.5
  example = rectangle_example(np.random.default_rng(8), num_boxes=3)
  example["gaze"] = schema.pad_gaze(np.random.default_rng(9).uniform(0.2, 0.8, (30, 3)))
  outs = [augment.train_transform(example, np.random.default_rng(seed), aug, SIZE)
          for seed in (11, 11, 12)]
  for key in ("image", "boxes", "box_labels", "gaze"):
    np.testing.assert_array_equal(outs[0][key], outs[1][key])
  assert not np.array_equal(outs[0]["image"], outs[2]["image"])
  for out in outs:
    assert out["image"].shape == (SIZE, SIZE) and out["image"].dtype == np.uint8
    schema.validate_example(out, NUM_CLASSES)


def test_eval_transform_resizes_only():
  example = rectangle_example(np.random.default_rng(10))
  out = augment.eval_transform(example, 32)
  assert out["image"].shape == (32, 32)
  # Area averaging of a 64 -> 32 image is the mean of each 2x2 block.
  blocks = example["image"].reshape(32, 2, 32, 2).astype(np.float64).mean(axis=(1, 3))
  np.testing.assert_allclose(out["image"], blocks, atol=1)
  np.testing.assert_array_equal(out["boxes"], example["boxes"])
  assert augment.eval_transform(example, 64)["image"] is example["image"]


def test_intensity_matches_reference():
  rng = np.random.default_rng(11)
  example = rectangle_example(rng)
  example["image"] = rng.integers(0, 256, (64, 64), dtype=np.uint8)
  image = example["image"].astype(np.float64)
  for brightness, contrast in [(0.1, 1.0), (-0.05, 1.3), (0.0, 0.7)]:
    out = augment.adjust_intensity(example, brightness, contrast)["image"]
    want = (image - image.mean()) * contrast + image.mean() + 255 * brightness
    want = np.clip(np.rint(want), 0, 255)
    np.testing.assert_allclose(out, want, atol=1)


def test_blur_matches_reference():
  rng = np.random.default_rng(12)
  example = rectangle_example(rng)
  example["image"] = rng.integers(0, 256, (64, 64), dtype=np.uint8)
  for sigma in (0.8, 1.5):
    out = augment.gaussian_blur(example, sigma)["image"].astype(np.float64)
    want = annotations.gaussian_blur(example["image"].astype(np.float64), sigma)
    np.testing.assert_allclose(out, want, atol=2.0)


def test_crop_window_in_range():
  rng = np.random.default_rng(13)
  for _ in range(200):
    x0, y0, w, h = augment.sample_crop_window(rng, (0.3, 0.9))
    assert 0 <= x0 and x0 + w <= 1 and 0 <= y0 and y0 + h <= 1
    assert 0.3 - 1e-9 <= w * h <= 0.9 + 1e-9
    assert 3 / 4 - 1e-9 <= w / h <= 4 / 3 + 1e-9
