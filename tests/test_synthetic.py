"""Tests of the synthetic phantom source (cxr_jax/data/sources/synthetic.py)."""

import math
import pickle

import cv2
import grain.python as gp
import numpy as np
import pytest

from cxr_jax.data import schema
from cxr_jax.data.sources import synthetic

NIH = schema.NIH14


def _box_pixels(box, size):
  """Normalized (x0, y0, x1, y1) -> inclusive pixel columns/rows (c0, r0, c1, r1)."""
  x0, y0, x1, y1 = np.asarray(box, np.float64) * size
  return round(x0), round(y0), round(x1) - 1, round(y1) - 1


def _indices_with(seed, name, count, start=0):
  c = NIH.index(name)
  found, i = [], start
  while len(found) < count:
    if synthetic.sample_labels(seed, i)[c]:
      found.append(i)
    i += 1
  return found


def test_deterministic_and_seed_dependent():
  a = synthetic.render_example(3, 17, 48, with_masks=True)
  b = synthetic.render_example(3, 17, 48, with_masks=True)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  other_seed = synthetic.render_example(4, 17, 48)
  other_index = synthetic.render_example(3, 18, 48)
  assert not np.array_equal(a["image"], other_seed["image"])
  assert not np.array_equal(a["image"], other_index["image"])
  labels = np.stack([synthetic.sample_labels(s, i) for s in (0, 1) for i in range(200)])
  assert not np.array_equal(labels[:200], labels[200:])


@pytest.mark.parametrize("size", [32, 64])
def test_examples_are_valid(size):
  source = synthetic.SyntheticPhantoms(num_examples=150, image_size=size, seed=1, offset=5)
  for i in range(len(source)):
    example = source.render(i, with_masks=True)
    schema.validate_example(example, len(NIH), origin=f"phantom {i}")
    assert example["image"].shape == (size, size)
    np.testing.assert_array_equal(example["labels"], synthetic.sample_labels(1, 5 + i))
    # Even tiny lesions cover a pixel at 32 px.
    np.testing.assert_array_equal(example["finding_masks"].any(axis=(1, 2)), example["labels"] > 0)
    assert example["image"].std() > 10   # an image, not a flat field


def test_boxes_tight_around_masks_and_labels_match_drawing():
  size = 64
  source = synthetic.SyntheticPhantoms(num_examples=250, image_size=size, seed=7)
  boxes_seen = np.zeros(len(NIH), int)
  for i in range(len(source)):
    ex = source.render(i, with_masks=True)
    masks, labels = ex["finding_masks"], ex["labels"]
    assert masks.shape == (len(NIH), size, size) and masks.dtype == bool
    # A class is labelled iff it was drawn, and iff it has a box.
    np.testing.assert_array_equal(masks.any(axis=(1, 2)), labels.astype(bool), err_msg=f"{i}")
    box_labels = ex["box_labels"][ex["box_labels"] >= 0]
    np.testing.assert_array_equal(np.isin(np.arange(len(NIH)), box_labels), labels.astype(bool))
    for c in np.flatnonzero(labels):
      covered = np.zeros((size, size), bool)
      for box in ex["boxes"][ex["box_labels"] == c]:
        c0, r0, c1, r1 = _box_pixels(box, size)
        covered[r0:r1 + 1, c0:c1 + 1] = True
        inside = masks[c, r0:r1 + 1, c0:c1 + 1]
        # Tight: mask pixels on (or within 1 px of) every edge of the box.
        assert inside[:2].any() and inside[-2:].any(), (i, NIH.classes[c], box)
        assert inside[:, :2].any() and inside[:, -2:].any(), (i, NIH.classes[c], box)
        boxes_seen[c] += 1
      assert not (masks[c] & ~covered).any(), (i, NIH.classes[c])
  for name in NIH.boxed:
    assert boxes_seen[NIH.index(name)] > 0, f"no {name} box in 250 examples"


def test_prevalence_and_cooccurrence_close_to_nih():
  n = 10000
  labels = np.stack([synthetic.sample_labels(11, i) for i in range(n)])
  for c, name in enumerate(NIH.classes):
    p = synthetic.TARGET_PREVALENCE[name]
    tolerance = 3.5 * math.sqrt(p * (1 - p) / n) + 0.002
    assert abs(labels[:, c].mean() - p) < tolerance, (name, labels[:, c].mean(), p)
  no_finding = (labels.sum(1) == 0).mean()
  assert abs(no_finding - 0.538) < 0.03
  # Associations of NIH (lift > 2): effusion with atelectasis and cardiomegaly.
  effusion = labels[:, NIH.index("Effusion")].astype(bool)
  for name in ("Atelectasis", "Cardiomegaly"):
    given = labels[:, NIH.index(name)].astype(bool)
    assert effusion[given].mean() > 1.6 * effusion.mean(), name


def test_target_prevalence_matches_nih_csv(nih_sample_dir):
  import csv
  with open(nih_sample_dir / "Data_Entry_2017_v2020.csv", newline="") as f:
    findings = [row["Finding Labels"].split("|") for row in csv.DictReader(f)]
  for name, p in synthetic.TARGET_PREVALENCE.items():
    real = sum(name in f for f in findings) / len(findings)
    assert abs(real - p) < 0.0005, (name, real, p)
  real_no_finding = sum(f == ["No Finding"] for f in findings) / len(findings)
  assert abs(real_no_finding - synthetic.NO_FINDING_RATE) < 0.0005


def _pixel_affine(pose, size):
  """[2, 3] map from pixel (col, row) of the canonical render to the posed render."""
  to_unit = np.array([[2 / size, 0, 1 / size - 1], [0, 2 / size, 1 / size - 1], [0, 0, 1]])
  to_pixel = np.array([[size / 2, 0, size / 2 - 0.5], [0, size / 2, size / 2 - 0.5], [0, 0, 1]])
  c, s = math.cos(pose.angle) * pose.scale, math.sin(pose.angle) * pose.scale
  posing = np.array([[c, -s, pose.shift[0]], [s, c, pose.shift[1]], [0, 0, 1]])
  return (to_pixel @ posing @ to_unit)[:2]


def test_pose_moves_anatomy_findings_and_boxes_together():
  size = 128
  indices = (_indices_with(0, "Cardiomegaly", 2) + _indices_with(0, "Effusion", 2)
             + _indices_with(0, "Mass", 2))
  for index in indices:
    pose = synthetic.sample_pose(0, index)
    assert abs(pose.angle) > 1e-3 or pose.scale != 1
    posed = synthetic.render_example(0, index, size, with_masks=True)
    canonical = synthetic.render_example(0, index, size, with_masks=True, apply_pose=False)
    np.testing.assert_array_equal(posed["labels"], canonical["labels"])
    affine = _pixel_affine(pose, size)
    for c in np.flatnonzero(posed["labels"]):
      if canonical["finding_masks"][c].sum() < 60:
        continue
      warped = cv2.warpAffine(canonical["finding_masks"][c].astype(np.uint8), affine,
                              (size, size), flags=cv2.INTER_NEAREST) > 0
      mask = posed["finding_masks"][c]
      iou = (warped & mask).sum() / (warped | mask).sum()
      assert iou > 0.8, (index, NIH.classes[c], iou)
      # The posed boxes span what the pose did to the canonical lesion.
      rows, cols = np.nonzero(warped)
      posed_boxes = posed["boxes"][posed["box_labels"] == c] * size
      span = (posed_boxes[:, 0].min(), posed_boxes[:, 1].min(),
              posed_boxes[:, 2].max(), posed_boxes[:, 3].max())
      np.testing.assert_allclose(span, (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1),
                                 atol=2.5, err_msg=f"{index} {NIH.classes[c]}")
    canonical_boxes = canonical["boxes"][canonical["box_labels"] >= 0]
    assert not np.allclose(posed["boxes"][posed["box_labels"] >= 0], canonical_boxes, atol=0.02)


def test_support_devices_are_a_shortcut_for_effusion():
  effusion = _indices_with(2, "Effusion", 120)
  no_finding = [i for i in range(600) if not synthetic.sample_labels(2, i).any()][:120]
  rate = lambda idx: np.mean([
      synthetic.render_example(2, i, 32, with_masks=True)["device_mask"].any() for i in idx])
  with_effusion, healthy = rate(effusion), rate(no_finding)
  assert with_effusion > 0.4 and healthy < 0.2 and with_effusion > 3 * healthy, (
      with_effusion, healthy)


def test_gaze_scans_both_lungs_and_dwells_on_findings():
  inside, outside, left, right = [], [], 0, 0
  for index in _indices_with(5, "Nodule", 15) + _indices_with(5, "Mass", 15):
    ex = synthetic.render_example(5, index, 64)
    gaze = ex["gaze"][ex["gaze"][:, 2] > 0]
    assert len(gaze) >= 10
    left += (gaze[:, 0] < 0.45).sum()
    right += (gaze[:, 0] > 0.55).sum()
    boxes = ex["boxes"][ex["box_labels"] >= 0]
    in_box = ((gaze[:, None, 0] >= boxes[:, 0]) & (gaze[:, None, 0] <= boxes[:, 2])
              & (gaze[:, None, 1] >= boxes[:, 1]) & (gaze[:, None, 1] <= boxes[:, 3])).any(1)
    assert in_box.sum() >= 2, index
    inside.extend(gaze[in_box, 2])
    outside.extend(gaze[~in_box, 2])
  assert np.mean(inside) > 1.8 * np.mean(outside)
  assert left > 100 and right > 100


def test_source_api_patients_and_pickling():
  source = synthetic.SyntheticPhantoms(num_examples=10, image_size=32, seed=3, offset=7)
  assert isinstance(source, gp.RandomAccessDataSource)
  assert len(source) == 10
  assert len(synthetic.SyntheticPhantoms()) == synthetic.INFINITE_LEN
  for i in range(10):
    ex = source[i]
    assert ex["image_id"] == f"phantom3-{7 + i}"
    assert ex["patient_id"] == f"phantom3-{(7 + i) // synthetic.IMAGES_PER_PATIENT}"
  np.testing.assert_array_equal(source[4]["image"],
                                synthetic.render_example(3, 11, 32)["image"])
  clone = pickle.loads(pickle.dumps(source))
  np.testing.assert_array_equal(clone[2]["image"], source[2]["image"])
  with pytest.raises(IndexError, match="index 10"):
    source[10]
  with pytest.raises(ValueError, match="image_size"):
    synthetic.SyntheticPhantoms(image_size=8)


def test_same_patient_shares_anatomy():
  """Without pose and findings, two images of one patient differ only in exposure/noise."""
  def image(index):
    return synthetic.render_example(9, index, 48, apply_pose=False)["image"].ravel()

  def rank_correlation(a, b):
    return np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1]

  assert synthetic.IMAGES_PER_PATIENT == 2
  healthy = [p for p in range(200) if not (synthetic.sample_labels(9, 2 * p).any()
                                           or synthetic.sample_labels(9, 2 * p + 1).any())][:12]
  same = [rank_correlation(image(2 * p), image(2 * p + 1)) for p in healthy]
  other = [rank_correlation(image(2 * p), image(2 * q + 1)) for p, q in zip(healthy, healthy[1:])]
  assert np.mean(same) > np.mean(other) + 0.05, (same, other)


def test_cli_writes_a_png_grid(tmp_path):
  from cxr_jax.cli import phantoms
  out = tmp_path / "grid.png"
  phantoms.run([f"--out={out}", "--size=32", "--num=3", "--columns=2", "--dpi=40"])
  image = cv2.imread(str(out))
  assert image is not None and image.shape[0] > 40 and image.shape[1] > 40
  assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]   # no temp file left
