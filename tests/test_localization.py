"""Localization metrics on hand-checkable masks, grids and heat maps."""

import json

import numpy as np
import pytest

from cxr_jax.evaluation import localization as loc

NAMES = ("A", "B", "C")


def _rect(h, w, y0, y1, x0, x1):
  m = np.zeros((h, w), bool)
  m[y0:y1, x0:x1] = True
  return m


def test_binarize_modes():
  heat = np.array([[0.0, 0.2, 0.4], [0.6, 0.8, 1.6]])
  np.testing.assert_array_equal(loc.binarize(heat, 0.6), heat >= 0.6)
  np.testing.assert_array_equal(loc.binarize(heat, 0.5, "fraction_of_max"), heat >= 0.8)
  assert not loc.binarize(-heat, 0.5, "fraction_of_max").any()  # nothing activated
  with pytest.raises(ValueError, match="unknown binarize mode"):
    loc.binarize(heat, 0.5, "otsu")


def test_components_of_drawn_blobs_give_their_bounding_boxes():
  mask = np.zeros((20, 40), bool)
  mask[2:5, 3:9] = True                       # 18 px
  mask[10:18, 20:30] = True                   # 80 px, largest
  mask[10, 30] = mask[9, 31] = True           # 8-connected diagonal tail of the big blob
  mask[15, 2] = True                          # single pixel
  boxes = loc.mask_to_boxes(mask)
  expected = np.array([[20 / 40, 9 / 20, 32 / 40, 18 / 20],
                       [3 / 40, 2 / 20, 9 / 40, 5 / 20],
                       [2 / 40, 15 / 20, 3 / 40, 16 / 20]], np.float32)
  np.testing.assert_allclose(boxes, expected, rtol=1e-6)
  np.testing.assert_allclose(loc.mask_to_boxes(mask, largest_only=True), expected[:1])
  assert loc.mask_to_boxes(np.zeros((5, 5), bool)).shape == (0, 4)
  # Each box rasterizes back to exactly its component's bounding rectangle.
  back = loc.box_masks(boxes, 20, 40)
  np.testing.assert_array_equal(back[1], _rect(20, 40, 2, 5, 3, 9))
  np.testing.assert_array_equal(back[0], _rect(20, 40, 9, 18, 20, 32))


def test_heatmap_to_boxes_thresholds_then_labels():
  heat = np.zeros((16, 16), np.float32)
  heat[1:4, 1:4] = 0.9
  heat[8:14, 6:12] = 0.6
  heat[8:10, 6:8] = 1.0
  boxes = loc.heatmap_to_boxes(heat, 127 / 255)
  np.testing.assert_allclose(boxes, [[6 / 16, 8 / 16, 12 / 16, 14 / 16],
                                     [1 / 16, 1 / 16, 4 / 16, 4 / 16]])
  only_peak = loc.heatmap_to_boxes(heat, 0.95, "fraction_of_max")
  np.testing.assert_allclose(only_peak, [[6 / 16, 8 / 16, 8 / 16, 10 / 16]])


def test_iou_and_ior_on_hand_built_masks():
  gt = _rect(10, 10, 2, 6, 2, 6)                         # 16 px
  assert loc.iou(gt, gt) == 1 and loc.ior(gt, gt) == 1
  far = _rect(10, 10, 7, 9, 7, 9)
  assert loc.iou(far, gt) == 0 and loc.ior(far, gt) == 0
  inner = _rect(10, 10, 3, 5, 3, 5)                      # 4 px, nested in gt
  assert loc.iou(inner, gt) == pytest.approx(4 / 16)
  assert loc.ior(inner, gt) == 1                         # all of the detection is correct
  outer = _rect(10, 10, 0, 8, 0, 8)                      # 64 px, contains gt
  assert loc.iou(outer, gt) == pytest.approx(16 / 64)
  assert loc.ior(outer, gt) == pytest.approx(16 / 64)
  shifted = _rect(10, 10, 2, 6, 4, 8)                    # half overlap: 8 px shared
  assert loc.iou(shifted, gt) == pytest.approx(8 / 24)
  assert loc.ior(shifted, gt) == pytest.approx(8 / 16)
  empty = np.zeros((10, 10), bool)
  assert loc.iou(empty, empty) == 0 and loc.ior(empty, gt) == 0
  np.testing.assert_allclose(loc.iou(np.stack([gt, inner, far]), gt), [1, 0.25, 0])


def _reference_patch_accuracy(z, gt, thresholds, z_threshold):
  """Loop over (image, class), Rozenberg's counting written out."""
  hits = {}
  for i in range(z.shape[0]):
    for k in range(z.shape[-1]):
      g = gt[i, :, :, k] > 0
      if not g.any():
        continue
      d = z[i, :, :, k] >= z_threshold
      inter, union = (d & g).sum(), (d | g).sum()
      iou_, ior_ = inter / union, (inter / d.sum() if d.any() else 0.0)
      for t in thresholds:
        hits.setdefault(("iou", t, k), []).append(iou_ >= t)
        hits.setdefault(("ior", t, k), []).append(ior_ >= t)
  return hits


def test_patch_accuracy_on_hand_built_grids():
  p = 4
  z = np.zeros((2, p, p, 3))
  gt = np.zeros((2, p, p, 3))
  gt[0, 0:2, 0:2, 0] = 1               # class A, image 0: 4 GT patches
  z[0, 0:2, 0:1, 0] = 0.9              # detects 2 of them, nothing else: IoU 0.5, IoR 1
  gt[1, 1:3, 1:3, 0] = 1               # class A, image 1: detects 2 + 6 outside: IoU 2/10, IoR 2/8
  z[1, 2, 0:4, 0] = 0.7
  z[1, 3, 0:4, 0] = 0.5                # exactly z_threshold counts as positive
  z[1, 1, 1, 0] = 0.49                 # just below
  gt[1, 0, 3, 1] = 1                   # class B: nothing detected -> 0, 0
  z[0, :, :, 2] = 1.0                  # class C has no ground truth: no unit
  out = loc.patch_accuracy(z, gt, NAMES)
  assert out["count"] == {"A": 2, "B": 1}
  # IoU: A = [0.5, 0.2], B = [0]; IoR: A = [1, 0.25], B = [0].
  assert out["iou"]["0.1"] == {"A": 1.0, "B": 0.0, "mean": 0.5}
  assert out["iou"]["0.3"] == {"A": 0.5, "B": 0.0, "mean": 0.25}
  assert out["iou"]["0.5"]["A"] == 0.5                 # >= T: 0.5 counts
  assert out["iou"]["0.7"]["A"] == 0.0
  assert out["ior"]["0.3"] == {"A": 0.5, "B": 0.0, "mean": 0.25}
  assert out["ior"]["0.7"]["A"] == 0.5


def test_patch_accuracy_matches_loop_reference_on_random_grids():
  r = np.random.default_rng(0)
  z = r.uniform(size=(6, 5, 5, 3))
  gt = (r.uniform(size=(6, 5, 5, 3)) > 0.7).astype(np.float32)
  thresholds = (0.1, 0.3, 0.5)
  out = loc.patch_accuracy(z, gt, NAMES, thresholds, z_threshold=0.6)
  hits = _reference_patch_accuracy(z, gt, thresholds, 0.6)
  for (metric, t, k), values in hits.items():
    assert out[metric][str(t)][NAMES[k]] == pytest.approx(np.mean(values))


def test_box_accuracy_exact_disjoint_and_nested_boxes():
  h = w = 32
  heat = np.zeros((3, 2, h, w), np.float32)
  boxes = np.zeros((3, 2, 4), np.float32)
  labels = np.full((3, 2), -1)
  # Image 0, class A: the heat map covers the GT box exactly -> IoU 1.
  heat[0, 0, 8:16, 4:20] = 1.0
  boxes[0, 0], labels[0, 0] = (4 / w, 8 / h, 20 / w, 16 / h), 0
  # Image 0, class B: activation far away from its box -> IoU 0.
  heat[0, 1, 0:4, 0:4] = 1.0
  boxes[0, 1], labels[0, 1] = (20 / w, 20 / h, 30 / w, 30 / h), 1
  # Image 1, class A: detection nested in the GT box, a quarter of its area -> IoU 0.25, IoR 1.
  heat[1, 0, 8:12, 8:12] = 1.0
  boxes[1, 0], labels[1, 0] = (8 / w, 8 / h, 16 / w, 16 / h), 0
  # Image 2, class A: two blobs; the small one matches the GT, the large one does not.
  heat[2, 0, 0:10, 0:10] = 1.0
  heat[2, 0, 20:24, 20:24] = 0.8
  boxes[2, 0], labels[2, 0] = (20 / w, 20 / h, 24 / w, 24 / h), 0
  cls, ious, iors = loc.box_scores(heat, boxes, labels, threshold=0.5)
  np.testing.assert_array_equal(cls, [0, 1, 0, 0])
  np.testing.assert_allclose(ious, [1, 0, 0.25, 1])
  np.testing.assert_allclose(iors, [1, 0, 1, 1])
  _, largest_ious, _ = loc.box_scores(heat, boxes, labels, threshold=0.5, largest_only=True)
  np.testing.assert_allclose(largest_ious, [1, 0, 0.25, 0])
  out = loc.box_accuracy(heat, boxes, labels, ("A", "B"), thresholds=(0.25, 0.5))
  assert out["count"] == {"A": 3, "B": 1}
  assert out["iou"]["0.25"] == {"A": pytest.approx(2 / 3), "B": 0.0, "mean": pytest.approx(1 / 3)}
  assert out["ior"]["0.5"]["A"] == 1.0
  # channel_classes: maps for classes (5, 1) only; label 0 boxes are skipped.
  cls, _, _ = loc.box_scores(heat, boxes, np.where(labels == 0, 5, labels), 0.5,
                             channel_classes=(5, 1))
  np.testing.assert_array_equal(cls, [5, 1, 5, 5])
  with pytest.raises(ValueError, match="heatmaps must be"):
    loc.box_scores(heat[0], boxes, labels, 0.5)


def test_resize_normalized_matches_cam_upsample():
  import jax.numpy as jnp
  from cxr_jax import cam
  maps = np.random.default_rng(1).normal(size=(2, 3, 4, 5)).astype(np.float32)
  got = loc.resize_normalized(maps, (32, 40))
  expected = np.asarray(cam.normalize(cam.upsample(jnp.asarray(maps), (32, 40))))
  np.testing.assert_allclose(got, expected, atol=1e-5)


def test_similarity_and_delta_s_on_constructed_maps():
  c = np.zeros((2, 8, 8))
  c[:, 2:6, 2:6] = 1
  base = np.full((2, 8, 8), 0.5)                # MSE 0.25, Dice 2*8 / (16 + 32) = 1/3
  sub = c * 0.9                                  # MSE 0.01 * 16/64, Dice 2*14.4 / (16 + 14.4)
  assert loc.similarity(c, base, "mse") == pytest.approx(0.25)
  assert loc.similarity(c, sub, "mse") == pytest.approx(0.01 * 16 / 64)
  assert loc.similarity(c, base, "dice") == pytest.approx(1 / 3)
  dice_sub = 2 * 14.4 / 30.4
  assert loc.similarity(c, sub, "dice") == pytest.approx(dice_sub)
  assert loc.delta_s(base, sub, c, "mse") == pytest.approx(0.25 / 0.0025 * 100 - 100)
  assert loc.delta_s(base, sub, c, "dice") == pytest.approx(dice_sub * 3 * 100 - 100)
  # Worse stage-2 maps give a negative change for both metrics; equal maps give 0.
  assert loc.delta_s(sub, base, c, "mse") < 0 and loc.delta_s(sub, base, c, "dice") < 0
  assert loc.delta_s(base, base, c, "dice") == pytest.approx(0)
  with pytest.raises(ValueError, match="same shape"):
    loc.similarity(c, base[0], "mse")
  with pytest.raises(ValueError, match="unknown similarity"):
    loc.delta_s(base, sub, c, "ssim")


def test_delta_s_interval_matches_scipy_paired_bootstrap():
  """The Eq. 5 interval against scipy.stats.bootstrap (paired, percentile) on the same maps."""
  from scipy import stats  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  c = (rng.random((60, 6, 6)) < 0.3).astype(np.float64)
  base = rng.random((60, 6, 6))
  sub = np.clip(base + 0.3 * c * rng.random((60, 1, 1)) - 0.1, 0, 1)   # closer to c, unevenly
  for metric in ("mse", "dice"):
    point = loc.delta_s(base, sub, c, metric)
    low, high = loc.delta_s_interval(base, sub, c, metric, num_resamples=20_000)
    per_base = [loc.similarity(c[i], base[i], metric) for i in range(len(c))]
    per_sub = [loc.similarity(c[i], sub[i], metric) for i in range(len(c))]
    def statistic(b, s, axis):   # Eq. 5, positive = stage 2 closer (delta_s's convention)
      b, s = np.mean(b, axis=axis), np.mean(s, axis=axis)
      return (b / s if metric == "mse" else s / b) * 100 - 100
    ref = stats.bootstrap((per_base, per_sub), statistic, paired=True, vectorized=True,
                          n_resamples=20_000, method="percentile", random_state=1)
    width = ref.confidence_interval.high - ref.confidence_interval.low
    assert 0 < low < point < high, (metric, low, point, high)
    np.testing.assert_allclose([low, high], [ref.confidence_interval.low,
                                             ref.confidence_interval.high], atol=0.05 * width)
    # Four copies of each image: the interval narrows by about half.
    tiled = [np.tile(a, (4, 1, 1)) for a in (base, sub, c)]
    low4, high4 = loc.delta_s_interval(*tiled, metric, num_resamples=20_000)
    assert 0.4 < (high4 - low4) / (high - low) < 0.6


def test_evaluate_fills_localization_from_grad_cam(tmp_path):
  """evaluate(): the 'localization' entry equals box_accuracy on the Grad-CAMs of the boxed rows."""
  import jax
  import jax.numpy as jnp
  import ml_collections
  from jax.sharding import Mesh
  from cxr_jax import cam
  from cxr_jax.data import schema
  from cxr_jax.evaluation import evaluator
  from cxr_jax.methods.baseline import Baseline

  config = ml_collections.ConfigDict(dict(
      data=dict(name="synthetic", label_space="nih14"), eval_batch_size=8, seed=0,
      model=dict(backbone="resnet18", width=0.125, dtype="float32", blurpool=0),
      cam="gradcam", cam_threshold=0.5, cam_threshold_mode="absolute", cam_largest_only=False))
  method = Baseline()
  model = method.model(config)
  k = len(schema.NIH14)
  r = np.random.default_rng(3)
  images = r.normal(size=(16, 96, 96, 1)).astype(np.float32)  # 3 x 3 feature maps
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.asarray(images[:1]))
  variables = jax.tree.map(
      lambda s: jnp.asarray(r.normal(size=s.shape) * np.sqrt(2 / np.prod(s.shape[:-1]))
                            if len(s.shape) > 1 else r.uniform(0.5, 1.5, size=s.shape),
                            jnp.float32), shapes)
  boxes = np.zeros((16, 16, 4), np.float32)
  labels = np.full((16, 16), -1, np.int64)
  for row, (label, box) in {1: (0, (0.1, 0.1, 0.6, 0.5)), 2: (4, (0.5, 0.5, 0.9, 0.9)),
                            5: (1, (0.2, 0.3, 0.8, 0.9))}.items():
    boxes[row, 0], labels[row, 0] = box, label
  boxes[2, 1], labels[2, 1] = (0.0, 0.0, 0.3, 0.3), 4        # a second box of the same class
  boxes[6, 0], labels[6, 0] = (0.2, 0.2, 0.4, 0.4), 9        # Edema: not a boxed class, skipped
  boxes[7, 0], labels[7, 0] = (0.2, 0.2, 0.4, 0.4), 0        # padding row (valid = 0)
  valid = np.ones(16, np.int32)
  valid[7] = 0

  def make_iterator(data_config, split, **kwargs):
    for s in (slice(0, 8), slice(8, 16)):  # the second batch carries no box
      yield {"image": images[s], "labels": np.zeros((8, k), np.float32),
             "label_mask": np.ones((8, k), np.float32), "valid": valid[s],
             "index": np.arange(16)[s], "boxes": boxes[s], "box_labels": labels[s]}

  mesh = Mesh(np.array(jax.devices()), ("data",))
  payload = evaluator.evaluate(method, model, variables, config, "test", str(tmp_path),
                               stage="s", mesh=mesh, make_iterator=make_iterator,
                               thresholds=np.full(k, 0.5), write_curves=True)
  features_fn, head_fn = method.cam_target(model, variables)
  maps = np.asarray(jax.jit(lambda x: cam.grad_cam(head_fn, features_fn(x)))(images[:8]))
  rows = [1, 2, 5]
  expected = loc.box_accuracy(loc.resize_normalized(maps[rows], (96, 96)), boxes[rows],
                              labels[rows], schema.NIH14.classes, thresholds=(0.1, 0.3, 0.5, 0.7),
                              threshold=0.5)
  got = payload["localization"]
  assert got["iou@0.1"]["n"] == {"Atelectasis": 1, "Mass": 2, "Cardiomegaly": 1} == expected["count"]
  for metric in ("iou", "ior"):
    for t, row in expected[metric].items():
      entry = got[f"{metric}@{t}"]
      assert {**entry["per_class"], "mean": entry["mean"]} == pytest.approx(row, abs=1e-6), (metric, t)
  assert got["cam"] == "gradcam" and got["binarize_threshold"] == 0.5
  png = tmp_path / "report" / "cam_test.png"
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  saved = json.loads((tmp_path / "eval" / "test.json").read_text())
  assert saved["localization"]["iou@0.3"]["n"] == got["iou@0.3"]["n"]
