"""Kim 2022 disease masks: attention (Eq. 4-5), masks (Eq. 1-3), anchor pass, original-frame CAMs."""

import functools
import math
import types

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import disease_masks as dm_config
from cxr_jax import cam
from cxr_jax.cli import sweep
from cxr_jax.data import pipeline, schema
from cxr_jax.data.sources import synthetic
from cxr_jax.evaluation import dm_report, evaluator, evaluators
from cxr_jax.methods import disease_masks, get_method
from cxr_jax.models import alignment, dm_attention
from cxr_jax.train import optim, parallel

from test_alignment import pixel_matrix

CLASSES = schema.NIH14.classes

# --------------------------------------------------------------------------- Eq. 4-5


def test_attended_cams_match_per_class_feature_loop():
  rng = np.random.default_rng(0)
  f = rng.normal(size=(2, 3, 4, 5))
  psi = rng.uniform(size=(3, 4, 6))
  kernel, bias = rng.normal(size=(5, 6)), rng.normal(size=6)
  ref = np.zeros((2, 3, 4, 6))
  for c in range(6):
    attended = psi[:, :, c][None, :, :, None] * f + f          # Eq. 4, class c
    ref[..., c] = np.einsum("nhwd,d->nhw", attended, kernel[:, c])   # Eq. 5
  np.testing.assert_allclose(np.asarray(dm_attention.attended_cams(f, psi, kernel)), ref,
                             rtol=1e-5, atol=1e-5)
  head = dm_attention.AttentionHead(6)
  variables = {"params": {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}}
  logits, _ = head.apply(variables, jnp.asarray(f), jnp.asarray(psi))
  np.testing.assert_allclose(np.asarray(logits), ref.mean((1, 2)) + bias, rtol=1e-5, atol=1e-5)
  # psi = 0: the plain GAP + linear classifier.
  plain, _ = head.apply(variables, jnp.asarray(f), jnp.zeros((3, 4, 6)))
  np.testing.assert_allclose(np.asarray(plain), f.mean((1, 2)) @ kernel + bias, rtol=1e-5,
                             atol=1e-5)


# --------------------------------------------------------------------------- Eq. 1-3


def masks_reference(cams, probs, class_names, min_prob, threshold):
  """Float64 loop over classes and images: Eq. 3 with the ``finalize_masks`` rescaling."""
  n, h, w, k = cams.shape
  psi = np.zeros((h, w, k))
  for c in range(k):
    maps = []
    for i in range(n):
      if probs[i, c] < min_prob:
        continue
      m = cams[i, :, :, c]
      m = (m - m.min()) / (m.max() - m.min() + 1e-7)
      if class_names[c] not in ("Cardiomegaly", "Hernia"):
        m = m + m[:, ::-1]
      maps.append(m)
    if maps:
      mean = np.mean(maps, axis=0)
      mean = mean / mean.max()
      psi[..., c] = np.where(mean >= threshold, mean, 0.0)
  return psi


def test_masks_match_eq3_loop_over_batches():
  rng = np.random.default_rng(1)
  names = ("Atelectasis", "Cardiomegaly", "Effusion", "Nodule")
  cams = rng.normal(size=(10, 4, 5, 4))
  probs = rng.uniform(size=(10, 4))
  probs[:, 3] = 0.1                      # no image passes for Nodule: psi = 0
  symmetric = jnp.asarray(dm_attention.symmetric_classes(names))
  assert list(np.asarray(symmetric)) == [True, False, True, True]
  total, count = 0.0, 0.0
  for part in (slice(0, 4), slice(4, 10)):   # two batches, as the mask pass sums them
    t, c = dm_attention.mask_statistics(jnp.asarray(cams[part], jnp.float32),
                                        jnp.asarray(probs[part], jnp.float32),
                                        jnp.ones(len(cams[part]), bool), symmetric, 0.8)
    total, count = total + np.asarray(t), count + np.asarray(c)
  np.testing.assert_array_equal(count, (probs >= 0.8).sum(0))
  psi = dm_attention.finalize_masks(total, count, 0.4)
  np.testing.assert_allclose(psi, masks_reference(cams, probs, names, 0.8, 0.4), atol=1e-5)
  assert np.all(psi[..., 3] == 0) and np.any(psi[..., 1] > 0)
  # Symmetric classes are mirror-symmetric, the asymmetric one in general not.
  np.testing.assert_allclose(psi[..., 0], psi[:, ::-1, 0], atol=1e-6)
  # Rows marked not to keep (padding) do not count.
  _, c = dm_attention.mask_statistics(jnp.asarray(cams, jnp.float32),
                                      jnp.ones((10, 4)), jnp.arange(10) < 3, symmetric, 0.8)
  np.testing.assert_array_equal(np.asarray(c), [3, 3, 3, 3])


# --------------------------------------------------------------------------- anchor pass


class FakeIterator:
  def __init__(self, batches):
    self.batches, self.closed = batches, False

  def __iter__(self):
    return iter(self.batches)

  def close(self):
    self.closed = True


def test_anchor_is_mean_of_the_first_no_finding_images():
  rng = np.random.default_rng(2)
  batches, normal = [], []
  for b in range(3):
    images = rng.normal(size=(4, 8, 8, 1)).astype(np.float32)
    labels = (rng.random((4, 14)) < 0.15).astype(np.float32)
    labels[0] = 0.0
    valid = np.array([1, 1, 1, b != 2], np.float32)   # a padding row in the last batch
    labels[3] = 0.0 if b == 2 else labels[3]
    batches.append({"image": images, "labels": labels, "label_mask": np.ones_like(labels),
                    "valid": valid})
    normal += [images[i] for i in range(4) if valid[i] and not labels[i].any()]
  iterator = FakeIterator(batches)
  config = dm_config.get_config("runlocal")
  config.unlock()
  config.data.image_size = 8
  ctx = types.SimpleNamespace(config=config, batch_sharding=None,
                              make_iterator=lambda *a, **k: iterator)
  want = min(len(normal), 4)
  anchor = disease_masks.compute_anchor(ctx, want)
  np.testing.assert_allclose(anchor, np.mean(normal[:want], axis=0), rtol=1e-5, atol=1e-6)
  assert iterator.closed
  everything = disease_masks.compute_anchor(ctx, 1000)   # fewer than asked: all of them
  np.testing.assert_allclose(everything, np.mean(normal, axis=0), rtol=1e-5, atol=1e-6)
  valid_images = [b["image"][i] for b in batches for i in range(4) if b["valid"][i]]
  any_label = disease_masks.compute_anchor(ctx, 5, labels="any")
  np.testing.assert_allclose(any_label, np.mean(valid_images[:5], axis=0), rtol=1e-5, atol=1e-6)
  for b in batches:
    b["labels"][:] = 1.0
  with pytest.raises(ValueError, match="anchor_labels=any"):
    disease_masks.compute_anchor(ctx, 4)


# --------------------------------------------------------------------------- model, heat maps


@functools.lru_cache(maxsize=1)
def tiny_model():
  config = dm_config.get_config("size=64,width=0.125,backbone=resnet18")
  method = get_method("disease_masks")
  model = method.model(config)
  x = jnp.zeros((1, 64, 64, 1))
  variables = jax.jit(lambda r: model.init({"params": r}, x, train=False))(jax.random.key(0))
  return config, method, model, variables


def test_heatmaps_are_eq5_cams_warped_back_to_the_original_frame():
  config, method, model, variables = tiny_model()
  assert model.feature_grid == (2, 2) and model.heatmap_size == 16
  params = dict(variables["params"])
  transform = np.array([1.1, 0.9, 0.15, -0.1, 0.2], np.float32)   # a non-identity aligner
  params["aligner"] = {**params["aligner"], "transform": {
      **params["aligner"]["transform"], "bias": jnp.asarray(transform)}}
  rng = np.random.default_rng(3)
  params["psi"] = jnp.asarray(rng.uniform(size=params["psi"].shape), jnp.float32)
  variables = {**variables, "params": params}
  x = jax.random.normal(jax.random.key(4), (2, 64, 64, 1))

  @jax.jit
  def run(variables, x):
    out = model.apply(variables, x)
    features_fn, head_fn = method.cam_target(model, variables)
    maps = cam.class_heatmaps("gradcam", features_fn, head_fn, x, classes=np.arange(14))
    return out, method.predict(model, variables, {"image": x}), maps

  out, pred, gradcam = jax.device_get(run(variables, x))
  np.testing.assert_allclose(out["matrices"][0], alignment.affine_matrix(transform), atol=1e-6)
  np.testing.assert_allclose(pred["probs"], jax.nn.sigmoid(out["logits"]), rtol=1e-6)
  # Independent route: aligned-frame CAMs upsampled, then OpenCV maps them forward through M
  # (original(X) = aligned(M^-1 X)), outside filled with the map's minimum.
  aligned_maps = np.asarray(jax.image.resize(out["cams"], (2, 16, 16, 14), "bilinear"))
  forward = pixel_matrix(out["matrices"][0], 16)
  for n in range(2):
    for c in (0, 1, 5):
      m = aligned_maps[n, :, :, c].astype(np.float64)
      ref = cv2.warpAffine(m, forward, (16, 16), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=float(m.min()))
      scale = np.abs(m).max()
      np.testing.assert_allclose(pred["heatmaps"][n, :, :, c], ref, atol=0.02 * scale)
  # Grad-CAM of cam_target is the rectified heat map of predict.
  np.testing.assert_allclose(gradcam, np.moveaxis(np.maximum(pred["heatmaps"], 0), -1, 1) / 256,
                             rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------- pseudo masks


def test_phantom_pseudo_masks_cover_the_findings_of_canonical_phantoms():
  size = 32
  psi = dm_attention.pseudo_disease_masks(synthetic.anatomy_regions(size), CLASSES, (size, size))
  inside, total = np.zeros(14), np.zeros(14)
  for index in range(60):
    example = synthetic.render_example(0, index, size, with_masks=True, apply_pose=False)
    for c in np.flatnonzero(example["labels"]):
      mask = example["finding_masks"][c]
      inside[c] += (mask & (psi[..., c] > 0)).sum()
      total[c] += mask.sum()
  for name in ("Atelectasis", "Infiltration", "Nodule", "Mass", "Pneumothorax"):
    c = CLASSES.index(name)
    if total[c]:
      assert inside[c] / total[c] > 0.7, (name, inside[c] / total[c])
  heart = CLASSES.index("Cardiomegaly")
  assert psi[..., heart].sum() < 0.5 * psi[..., CLASSES.index("Nodule")].sum()
  nih = dm_attention.pseudo_disease_masks(dm_attention.drawn_regions(64), CLASSES, (4, 4))
  assert set(np.unique(psi)) == {0.0, 1.0}   # full resolution: the binary regions
  assert nih.shape == (4, 4, 14) and nih.min() >= 0 and nih.max() <= 1
  # Coarse grid: the area fraction of each cell (cell (1, 0) = template rows 16..31, cols 0..15).
  lungs = dm_attention.drawn_regions(64)
  lung_area = (lungs["lung_image_left"] | lungs["lung_image_right"])[16:32, 0:16].mean()
  np.testing.assert_allclose(nih[1, 0, CLASSES.index("Nodule")], lung_area, rtol=1e-6)
  np.testing.assert_array_equal(nih[..., CLASSES.index("Nodule")],
                                nih[:, ::-1, CLASSES.index("Nodule")])


# --------------------------------------------------------------------------- stages


def test_sweep_rows_build_their_stages_and_anchor_psi_stay_frozen():
  method = get_method("disease_masks")
  names = []
  for row in dm_config.get_sweep():
    config = sweep.apply_overrides(dm_config.get_config("runlocal"), row, "row")
    names.append([s.name for s in method.stages(config)])
    evaluators.build_evals(evaluators.EvalContext(  # every declared stage evaluator has its stage
        config=config, workdir=None, method=method, model=None, mesh=None, make_iterator=None,
        evaluate=None), names[-1])
  assert names[0] == ["classify", "dm_classify"]
  assert names[1:] == [["perceptual", "align", "classify", "dm_classify"]] * 3
  _, _, _, variables = tiny_model()
  config = dm_config.get_config("runlocal")
  for stage in method.stages(config):
    labels = optim.param_labels(variables["params"], stage.trainable, stage=stage.name)
    assert labels["anchor"] == "frozen" and labels["psi"] == "frozen"
    trained = {k for k, v in labels.items() if isinstance(v, dict)
               and "train" in jax.tree.leaves(v)}
    assert trained == ({"aligner"} if stage.name == "align" else {"backbone", "head"})
  with pytest.raises(KeyError, match="masks"):
    dm_config.get_config("masks=dmm")


def test_sweep_rows_train_the_classifier_equally_long_unless_told_otherwise():
  """Table 1's rows: 'perceptual', 'classify' and 'dm_classify' all train the classifier, so with
  dm.equal_budget every row trains it the same number of steps; False keeps the paper's stages."""
  method = get_method("disease_masks")
  classifier_stages = ("perceptual", "classify", "dm_classify")
  for arg in ("runlocal", "dataset=nih"):
    for equal in (True, False):
      budgets = []
      for row in dm_config.get_sweep():
        config = sweep.apply_overrides(dm_config.get_config(arg), row, "row")
        config.dm.equal_budget = equal
        budgets.append(sum(s.steps for s in method.stages(config) if s.name in classifier_stages))
      d = dm_config.get_config(arg).dm
      if equal:
        assert budgets == [budgets[1]] * 4, (arg, budgets)
      else:
        assert budgets == [budgets[1] - d.perceptual_steps] + [budgets[1]] * 3, (arg, budgets)
  assert dm_config.get_config("dataset=nih").cam_threshold == pytest.approx(180 / 255)
  assert dm_config.get_config("runlocal").cam_threshold == pytest.approx(127 / 255)


# --------------------------------------------------------------------------- reports


def report_context(workdir, **dm):
  """The tiny model's EvalContext on 64 px phantoms with a 32-image 'val' split."""
  config, method, model, variables = tiny_model()
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data.synthetic.num_val, config.eval_batch_size = 32, 16
    config.dm.update(dm)
  ctx = evaluators.EvalContext(
      config=config, workdir=str(workdir), method=method, model=model,
      mesh=parallel.make_mesh(), make_iterator=evaluators.default_make_iterator,
      evaluate=evaluator.evaluate)
  return ctx, variables


def stage_names(ctx):
  return [s.name for s in ctx.method.stages(ctx.config)]


def test_alignment_eval_writes_examples_and_the_phantoms_pose_residuals(tmp_path):
  ctx, variables = report_context(tmp_path)
  declared = [d for d in evaluators.build_evals(ctx, stage_names(ctx)) if d.name == "alignment"]
  assert declared[0].when == ("stage", "align")
  declared[0].evaluator.pose_images = 20
  out = evaluators.run_evals(ctx, declared, variables, stage="align")["alignment"]["val"]
  assert out["num_images"] == 20
  assert (tmp_path / "report" / "alignment_val.png").read_bytes()[:4] == b"\x89PNG"
  # The aligner starts at the identity: 'after' is 'before', whose rotation is the phantoms' own.
  for key, value in out["before"].items():
    np.testing.assert_allclose(out["after"][key], value, rtol=1e-4, atol=1e-4)
  split = pipeline.make_source(ctx.config.data, "val")
  angles = [synthetic.sample_pose(ctx.config.data.synthetic.seed,
                                  split.source.offset + int(i)).angle for i in split.indices[:20]]
  np.testing.assert_allclose(out["before"]["rotation_deg_mean_abs"],
                             np.mean(np.abs(np.degrees(angles))), rtol=1e-6)
  # A turned aligner moves the residual.
  params = dict(variables["params"])
  params["aligner"] = {**params["aligner"], "transform": {
      **params["aligner"]["transform"],
      "bias": jnp.asarray([1.0, 1.0, 0.0, 0.0, math.radians(20)], jnp.float32)}}
  turned = declared[0].evaluator.run({**variables, "params": params}, stage="align")["val"]
  assert turned["after"]["rotation_deg_mean_abs"] > out["before"]["rotation_deg_mean_abs"] + 5


def test_masks_eval_writes_psi_and_its_panel(tmp_path):
  ctx, variables = report_context(tmp_path, masks="pdm")
  params = dict(variables["params"])
  params["psi"] = jnp.asarray(np.random.default_rng(5).uniform(size=params["psi"].shape),
                              jnp.float32)
  declared = [d for d in evaluators.build_evals(ctx, stage_names(ctx)) if d.name == "masks"]
  assert declared[0].when == ("stage", "dm_classify")
  assert evaluators.run_evals(ctx, declared, {**variables, "params": params},
                              stage="dm_classify") == {"masks": {}}
  with np.load(tmp_path / "eval" / "disease_masks_pdm.npz") as f:
    np.testing.assert_array_equal(f["psi"], np.asarray(params["psi"]))
    assert list(f["class_names"]) == list(CLASSES)
  assert (tmp_path / "report" / "disease_masks_pdm.png").read_bytes()[:4] == b"\x89PNG"
  none, _ = report_context(tmp_path / "none", masks="none")
  assert dm_report.MasksEval(none, "masks").run(variables, stage="dm_classify") == {}
  assert not (tmp_path / "none").exists()
