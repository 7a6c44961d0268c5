"""van Sonsbeek 2023 (VKD): KL, reparameterisation, stage losses, freezing through the trainer."""

import functools
import json
import os

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import _trainer_worker as w
from configs import vkd as vkd_config
from cxr_jax import losses
from cxr_jax.evaluation import cam_shift, evaluators
from cxr_jax.methods import get_method
from cxr_jax.methods import vkd
from cxr_jax.train.stage import LossContext
from cxr_jax.models import pretrained
from cxr_jax.models.vkd import VKDModel, reparameterize
from cxr_jax.train import optim, parallel, trainer
from cxr_jax.train.checkpoint import RunCheckpoints


def numpy_kl(mu_q, logvar_q, mu_p, logvar_p):
  """Textbook float64 KL of diagonal Gaussians from variances, summed over the last axis."""
  mu_q, logvar_q, mu_p, logvar_p = (np.asarray(a, np.float64) for a in (mu_q, logvar_q, mu_p, logvar_p))
  var_q, var_p = np.exp(logvar_q), np.exp(logvar_p)
  return 0.5 * np.sum(np.log(var_p / var_q) + (var_q + (mu_q - mu_p) ** 2) / var_p - 1.0, axis=-1)


def test_gaussian_kl_matches_float64_formula_and_monte_carlo():
  rng = np.random.default_rng(0)
  shape = (5, 6)
  mu_q, mu_p = rng.normal(size=shape), rng.normal(size=shape)
  logvar_q, logvar_p = rng.uniform(-2, 1.5, size=shape), rng.uniform(-2, 1.5, size=shape)
  kl = np.asarray(losses.gaussian_kl(mu_q, logvar_q, mu_p, logvar_p))
  assert kl.shape == (5,)
  np.testing.assert_allclose(kl, numpy_kl(mu_q, logvar_q, mu_p, logvar_p), rtol=1e-5)

  # Monte Carlo: KL = E_q[log q(z) - log p(z)], z ~ q.
  num = 100_000
  z = mu_q + np.exp(0.5 * logvar_q) * rng.normal(size=(num,) + shape)
  log_density = lambda z, mu, logvar: -0.5 * (np.log(2 * np.pi) + logvar + (z - mu) ** 2 / np.exp(logvar))
  terms = np.sum(log_density(z, mu_q, logvar_q) - log_density(z, mu_p, logvar_p), axis=-1)  # [num, 5]
  stderr = terms.std(axis=0) / np.sqrt(num)
  assert np.all(np.abs(terms.mean(axis=0) - kl) < 5 * stderr + 1e-6)

  # q = p gives 0; N(0, I) prior is the Eq. 3 special case.
  np.testing.assert_allclose(losses.gaussian_kl(mu_q, logvar_q, mu_q, logvar_q), 0.0, atol=1e-6)
  np.testing.assert_allclose(losses.gaussian_kl(mu_q, logvar_q, 0.0, 0.0),
                             numpy_kl(mu_q, logvar_q, np.zeros(shape), np.zeros(shape)), rtol=1e-5)


def test_gaussian_kl_is_accurate_near_zero_and_finite_at_extremes():
  # q within 1e-4 of p in log-variance: float32 exp(d) - 1 - d would cancel to noise.
  logvar_p = np.full((1, 64), 0.3, np.float32)
  logvar_q = logvar_p + np.float32(1e-4)   # float32 inputs: the reference sees the same values
  kl = float(losses.gaussian_kl(np.zeros((1, 64)), logvar_q, np.zeros((1, 64)), logvar_p)[0])
  np.testing.assert_allclose(kl, numpy_kl(np.zeros(64), logvar_q[0], np.zeros(64), logvar_p[0]),
                             rtol=1e-4)
  big = losses.gaussian_kl(jnp.full((2, 4), 30.0), jnp.full((2, 4), 40.0), 0.0, jnp.full((2, 4), -40.0))
  grads = jax.grad(lambda lq: jnp.sum(losses.gaussian_kl(1.0, lq, 0.0, 20.0)))(jnp.full((3,), -60.0))
  assert np.all(np.isfinite(big)) and np.all(np.isfinite(grads))


def test_reparameterisation_gradient_is_finite_and_unbiased():
  # d/dmu E[z^2] = 2 mu, d/dlogvar E[z^2] = exp(logvar) for z ~ N(mu, exp(logvar)).
  mu, logvar = jnp.array([0.5, -1.0, 2.0]), jnp.array([0.0, -1.0, 0.7])
  objective = lambda m, lv: jnp.mean(jnp.square(reparameterize(m, lv, jax.random.key(0), 200_000)))
  g_mu, g_logvar = jax.grad(objective, argnums=(0, 1))(mu, logvar)
  assert np.all(np.isfinite(g_mu)) and np.all(np.isfinite(g_logvar))
  np.testing.assert_allclose(g_mu * 3, 2 * mu, atol=0.05)       # mean over 3 dims divides by 3
  np.testing.assert_allclose(g_logvar * 3, jnp.exp(logvar), atol=0.05)


class TinyVKD(vkd.VKD):
  """VKD with the trainer tests' two-conv backbone (with BatchNorm) for both encoders."""

  def backbone(self, config):
    return w.TinyNet()


def tiny_vkd_config(release="ch2_prior", annotation="gaze+boxes"):
  c = vkd_config.get_config(f"runlocal,release={release},annotation={annotation}")
  c.unlock()
  c.data.image_size = 32
  c.train_steps, c.eval_every, c.log_every, c.checkpoint_every = 6, 6, 3, 100
  c.vkd.stage2.steps, c.vkd.stage2.eval_every, c.vkd.stage2.batch_size = 6, 6, 16
  c.vkd.stage2.optimizer.learning_rate = 1e-2
  c.vkd.train_samples = 2
  c.lock()
  return c


def _init(method, config):
  model = method.model(config)
  x = jnp.zeros((1, config.data.image_size, config.data.image_size, 1))
  return model, model.init({"params": jax.random.key(0)}, x)


def _context(model, variables, **stage_kwargs):
  def apply(params, *args, **kw):
    out, updated = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, *args,
                               train=True, mutable=["batch_stats"], **{**stage_kwargs, **kw})
    return out, updated["batch_stats"]
  return LossContext(apply=apply, extras={}, step=jnp.int32(0))


def _batch(config, n=4, seed=0):
  rng = np.random.default_rng(seed)
  s = config.data.image_size
  return {"image": jnp.asarray(rng.normal(size=(n, s, s, 1)), jnp.float32),
          "labels": jnp.asarray(rng.uniform(size=(n, 14)) < 0.3, jnp.float32),
          "label_mask": jnp.ones((n, 14)), "valid": jnp.ones(n),
          "gaze_map": jnp.asarray(rng.uniform(size=(n, s, s, 1)), jnp.float32),
          "box_map": jnp.asarray(rng.uniform(size=(n, s, s, 1)) > 0.7, jnp.float32)}


def best_variables(workdir, stage):
  """{'params', 'batch_stats'} of WORKDIR/best/<stage> (the trainer's ``stage_variables``)."""
  checkpoints = RunCheckpoints(str(workdir), 1)
  try:
    return checkpoints.best_variables(stage)
  finally:
    checkpoints.close()


def _prior_grad_norm(grads):
  flat = traverse_util.flatten_dict(grads, sep="/")
  return sum(float(jnp.sum(jnp.square(g))) for k, g in flat.items() if k.startswith("prior_"))


def test_prior_network_is_used_only_in_stage_two():
  config = tiny_vkd_config()
  method = TinyVKD()
  base, prior = method.stages(config)
  assert (base.data.split, base.data.maps) == ("train", ())
  assert (prior.data.split, prior.data.maps) == ("annotated_train", ("gaze_map", "box_map"))
  model, variables = _init(method, config)
  batch = _batch(config)
  other = {**batch, "gaze_map": 1.0 - batch["gaze_map"], "box_map": 1.0 - batch["box_map"]}
  rng = jax.random.key(1)

  def loss_and_grads_fn(stage):
    ctx = _context(model, variables, **stage.apply_kwargs)
    f = jax.jit(jax.value_and_grad(lambda p, b: stage.loss(ctx, p, b, rng), has_aux=True))

    def run(b):
      (loss, aux), grads = f(variables["params"], b)
      return float(loss), aux["metrics"], grads
    return run

  base_fn, prior_fn = loss_and_grads_fn(base), loss_and_grads_fn(prior)
  l1, m1, g1 = base_fn(batch)
  l2, _, g2 = base_fn(other)
  assert l1 == l2 and _prior_grad_norm(g1) == 0.0 and _prior_grad_norm(g2) == 0.0
  # Stage 1's KL is to N(0, I).
  out, _ = model.apply(variables, batch["image"], train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(m1["kl"], numpy_kl(out["mu"], out["logvar"], 0.0, 0.0).mean(), rtol=1e-4)

  s1, m_s1, gs1 = prior_fn(batch)
  s2, _, _ = prior_fn(other)
  assert s1 != s2 and _prior_grad_norm(gs1) > 0.0
  # Stage 2's KL is to p(z|c) with c = max(gaze_map, box_map), the encoder on running averages.
  c = jnp.maximum(batch["gaze_map"], batch["box_map"])
  out, _ = model.apply(variables, batch["image"], c, train=True, train_encoder=False,
                       mutable=["batch_stats"])
  np.testing.assert_allclose(
      m_s1["kl"], numpy_kl(out["mu"], out["logvar"], out["prior_mu"], out["prior_logvar"]).mean(),
      rtol=1e-4)


def test_releases_follow_table_4():
  config = tiny_vkd_config()
  model, variables = _init(TinyVKD(), config)
  # Table 4 (encoder, CH1, CH2) released; CH2 includes the classifier, the prior is always trained.
  rows = {"ch1_prior": (0, 1, 0), "ch1_ch2_prior": (0, 1, 1), "all": (1, 1, 1), "ch2_prior": (0, 0, 1)}
  assert set(rows) == set(vkd.RELEASES)
  assert [r["vkd.release"] for r in vkd_config.get_sweep()[:4]] == list(vkd_config.TABLE4_RELEASES)
  for release, (encoder, ch1, ch2) in rows.items():
    labels = traverse_util.flatten_dict(
        optim.param_labels(variables["params"], vkd.trainable_regexes(vkd.RELEASES[release])),
        sep="/")
    expect = {"encoder": encoder, "ch1": ch1, "ch2": ch2, "classifier": ch2,
              "prior_encoder": 1, "prior_head": 1}
    for path, label in labels.items():
      assert (label == "train") == bool(expect[path.split("/")[0]]), (release, path)


def test_frozen_leaves_stay_bit_identical_through_stage_two(tmp_path):
  """Tiny real-pipeline run (synthetic phantoms, 32 px): stage 2 ('ch2_prior') leaves the
  encoder (params and BatchNorm statistics) and CH1 untouched, and trains CH2 + the prior."""
  config = tiny_vkd_config()
  calls = []

  def evaluate(method, model, variables, config, split, workdir, *, stage, mesh, **kw):
    calls.append((stage, split))
    return {"classification": {"auroc": {"mean": 0.5}, "f1": {"mean": 0.1}}}

  final = trainer.train_and_evaluate(config, str(tmp_path), method=TinyVKD(), evaluate=evaluate)
  base = best_variables(tmp_path, "base")
  flat = lambda tree: {k: np.asarray(v) for k, v in
                       traverse_util.flatten_dict(jax.device_get(tree), sep="/").items()}
  before, after = flat(base["params"]), flat(final.params)
  stats_before, stats_after = flat(base["batch_stats"]), flat(final.batch_stats)
  assert set(before) == set(after)
  for path in before:
    part = path.split("/")[0]
    if part in ("encoder", "ch1"):
      assert np.array_equal(before[path], after[path]), path
  for part in ("ch2", "classifier", "prior_encoder", "prior_head"):
    assert any(not np.array_equal(before[p], after[p]) for p in before if p.startswith(part + "/")), part
  for path in stats_before:
    same = np.array_equal(stats_before[path], stats_after[path])
    assert same == path.startswith("encoder/"), path   # the prior encoder's BN trains in stage 2
  assert ("base", "val") in calls and ("prior", "val") in calls

  # The trainer ran the config's 'cam_shift' evaluator: the Eq. 5 report on the annotated
  # test images of the two stages' best states, each stage also evaluated on 'test'.
  with open(tmp_path / "eval" / "test.json") as f:
    written = json.load(f)["cam_shift"]
  assert ("base", "test") in calls and ("prior", "test") in calls
  method = TinyVKD()
  ctx = evaluators.EvalContext(
      config=config, workdir=None, method=method, model=method.model(config),
      mesh=parallel.make_mesh(), make_iterator=evaluators.default_make_iterator,
      evaluate=evaluate, stage_variables=functools.partial(best_variables, tmp_path))
  (declared,) = [d for d in evaluators.build_evals(ctx) if d.name == "cam_shift"]
  assert isinstance(declared.evaluator, cam_shift.CamShiftEval) and declared.when == ("end", None)
  result = declared.evaluator.run(None, stage="prior")["test"]
  assert written == json.loads(json.dumps(result))
  assert result["num_images"] > 0
  assert np.isfinite([result["delta_mse"]["mean"], result["delta_dice"]["mean"]]).all()
  for metric in ("mse", "dice"):   # the interval itself: tests/test_localization.py
    low, high = result[f"delta_{metric}"]["ci95"]
    assert np.isfinite([low, high]).all() and low <= high


def test_registry_config_and_cam_target():
  config = vkd_config.get_config("runlocal,annotation=gaze")
  assert config.vkd.annotation == "gaze" and config.vkd.release == "ch2_prior"
  assert config.model.width == 0.125 and config.data.image_size == 64
  with pytest.raises(KeyError, match="unknown config arg"):
    vkd_config.get_config("bogus=1")
  method = get_method("vkd")
  assert isinstance(method, vkd.VKD)
  phantoms = vkd_config.get_config("width=0.25")   # 96 px: a 3 x 3 map for Grad-CAM
  base, prior = method.stages(phantoms)
  assert phantoms.data.image_size == 96 and phantoms.vkd.beta != phantoms.vkd.stage2.beta
  assert (base.loss.args[0], prior.loss.args[0]) == (phantoms.vkd.beta, phantoms.vkd.stage2.beta)
  bad = vkd_config.get_config("runlocal,release=encoder_only")
  with pytest.raises(ValueError, match="config.vkd.release"):
    method.stages(bad)
  tiny = TinyVKD()
  model, variables = _init(tiny, tiny_vkd_config())
  images = _batch(tiny_vkd_config())["image"]
  features_fn, head_fn = tiny.cam_target(model, variables)
  logits = head_fn(features_fn(images))
  np.testing.assert_allclose(logits, model.apply(variables, images)["logits"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(tiny.predict(model, variables, {"image": images})["probs"],
                             jax.nn.sigmoid(logits), rtol=1e-5, atol=1e-6)


def test_positive_class_cams_match_a_reference_grad_cam():
  """Signed Grad-CAM from jax.grad of each positive logit, cv2 upsampling, min-max, max over positives."""
  config = tiny_vkd_config()
  method = TinyVKD()
  model, variables = _init(method, config)
  batch = _batch(config, n=3, seed=2)
  labels = np.zeros((3, 14), np.float32)
  labels[0, [1, 4]] = 1
  labels[1, 7] = 1                                       # image 2: no positive label -> zeros
  features_fn, head_fn = method.cam_target(model, variables)
  got = np.asarray(cam_shift.positive_class_cams(features_fn, head_fn, batch["image"],
                                                 jnp.asarray(labels), relu=False))
  features = np.asarray(features_fn(batch["image"]), np.float64)
  size = config.data.image_size
  for n in range(3):
    expect = np.zeros((size, size))
    for k in np.flatnonzero(labels[n]):
      grad = np.asarray(jax.grad(lambda f: head_fn(f)[0, k])(jnp.asarray(features[n:n + 1], jnp.float32)))[0]
      m = np.einsum("hwd,d->hw", features[n], grad.mean(axis=(0, 1)))
      m = cv2.resize(m.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
      m = (m - m.min()) / (m.max() - m.min() + 1e-7)
      expect = np.maximum(expect, m)
    np.testing.assert_allclose(got[n], expect, atol=2e-4)


def test_init_from_loads_both_encoders_and_leaves_the_heads(tmp_path):
  """config.model.init_from (ImageNet weights, Sec. 4.2) goes into the image and the annotation encoder."""
  method = TinyVKD()
  model, variables = _init(method, tiny_vkd_config())
  x = jnp.zeros((1, 32, 32, 1))
  converted = jax.tree.map(lambda a: np.asarray(a) + 1.0, w.TinyNet().init(jax.random.key(7), x))
  path = str(tmp_path / "tiny.npz")
  pretrained.save_flax(converted, path)
  params, batch_stats = pretrained.init_from(path, variables["params"], variables["batch_stats"],
                                             method.pretrained_prefixes)
  flat = lambda tree: traverse_util.flatten_dict(jax.device_get(tree), sep="/")
  source = flat(converted["params"])
  for prefix in ("encoder", "prior_encoder"):
    for path_, value in source.items():
      np.testing.assert_array_equal(flat(params)[f"{prefix}/{path_}"], value)
    for path_, value in flat(converted["batch_stats"]).items():
      np.testing.assert_array_equal(flat(batch_stats)[f"{prefix}/{path_}"], value)
  before = flat(variables["params"])
  for path_, value in flat(params).items():
    if path_.split("/")[0] not in ("encoder", "prior_encoder"):
      np.testing.assert_array_equal(value, before[path_])


def test_real_data_presets():
  """NIH: 5-fold CV over the boxed images (Sec. 4.1.1); MIMIC: stage 2 on REFLACX / EGD (Sec. 4.1.2)."""
  nih = vkd_config.get_config("dataset=nih,fold=3,backbone=resnet50")
  assert (nih.data.cv.num_folds, nih.data.cv.fold, nih.data.cv.unannotated_fraction) == (5, 3, 1.0)
  assert (nih.data.image_size, nih.data.normalization) == (224, "imagenet")
  assert vkd_config.get_config("dataset=nih,size=256").data.image_size == 256
  with pytest.raises(ValueError, match="boxes only"):
    vkd_config.get_config("dataset=nih,annotation=gaze")
  rows = vkd_config.get_sweep("dataset=nih")
  assert sorted((r["data.cv.fold"], r["vkd.release"]) for r in rows) == sorted(
      (f, r) for f in range(5) for r in vkd_config.TABLE4_RELEASES)

  mimic = vkd_config.get_config("dataset=mimic,subset=egd,annotation=gaze")
  base, prior = vkd.VKD().stages(mimic)
  assert base.data.overrides == {} and base.data.split == "train"
  assert prior.data.overrides == {"name": "egd"} and prior.data.split == "train"
  assert prior.data.maps == ("gaze_map",)
  assert cam_shift.stage2_data_config(mimic).name == "egd" and mimic.data.name == "mimic"
  with pytest.raises(ValueError, match="provides"):
    vkd_config.get_config("dataset=mimic,subset=egd,annotation=boxes")
  two_gaze = vkd_config.get_config("dataset=mimic,subset=egd+reflacx,annotation=gaze")
  assert vkd.VKD().stages(two_gaze)[1].data.overrides == {"name": "egd+reflacx"}
  # "Gaze EGD-CXR & BB REFLACX": c is the max of both maps, each part keeping one of them
  # (tests/test_prepare.py::test_a_joined_part_keeps_only_the_annotation_it_names).
  gaze_and_boxes = vkd.VKD().stages(vkd_config.get_config(
      "dataset=mimic,subset=egd:gaze+reflacx:boxes,annotation=gaze+boxes"))[1]
  assert gaze_and_boxes.data.overrides == {"name": "egd:gaze+reflacx:boxes"}
  assert gaze_and_boxes.data.maps == ("gaze_map", "box_map")
  with pytest.raises(ValueError, match="provides"):
    vkd_config.get_config("dataset=mimic,subset=egd:gaze+reflacx:boxes,annotation=gaze")
  # Table 1's MIMIC rows: each override row equals the preset of its subset and annotation.
  rows = vkd_config.get_sweep("dataset=mimic,subset=reflacx")
  table1 = [(r["vkd.stage2.dataset"], r["vkd.annotation"]) for r in rows]
  assert table1 == list(vkd_config.TABLE1_MIMIC)
  for row in rows:
    swept = vkd_config.get_config("dataset=mimic,subset=reflacx,annotation=boxes")
    swept.unlock()
    swept.update_from_flattened_dict(row)
    preset = vkd_config.get_config(
        f"dataset=mimic,subset={row['vkd.stage2.dataset']},annotation={row['vkd.annotation']}")
    assert swept.to_dict() == preset.to_dict(), row
  with pytest.raises(KeyError, match="subset"):
    vkd_config.get_config("dataset=mimic")
  with pytest.raises(KeyError, match="needs dataset=mimic"):
    vkd_config.get_config("subset=reflacx")
  synthetic = vkd_config.get_config("runlocal")
  assert vkd.VKD().stages(synthetic)[1].data.overrides == {}
  assert cam_shift.stage2_data_config(synthetic) is synthetic.data


def test_stage_two_flops_relative_to_stage_one():
  """Issue 11's frozen-stage target as model FLOPs (XLA's count of each stage's train step,
  built by the bench's own builder; pooled latent): with the prior encoder on a 1/4-side map, stage 2
  (frozen encoder forward + prior network trained) is <= 0.45x stage 1; at the paper's
  full resolution it is above 1x (the control: the bound can fail)."""
  from cxr_jax.bench import figures  # pylint: disable=import-outside-toplevel
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  ratio = {}
  for scale in (0.25, 1.0):
    flops = {stage: figures.build_train_step(
        {"config": "vkd", "arg": "backbone=resnet18,size=128,width=0.25", "stage": stage,
         "overrides": {"vkd.prior_scale": scale, "vkd.spatial_latent": False,
                       "data.synthetic.num_train": 16}, "batch": 8},
        root).flops for stage in ("base", "prior")}
    ratio[scale] = flops["prior"] / flops["base"]
  assert ratio[0.25] <= 0.45 and ratio[1.0] > 1.0, ratio


def test_prior_reads_the_antialiased_downsampled_map():
  """prior_scale = 0.5: p(z|c) equals the full-resolution model's prior on c downsampled by
  a float64 separable tent filter (antialiased linear resize: the triangle kernel widened
  by the factor 2, weights renormalized at the borders)."""
  config = tiny_vkd_config()
  method = TinyVKD()
  with config.unlocked():
    config.data.image_size = 64
    config.vkd.prior_scale = 0.5
  model = method.model(config)
  variables = model.init({"params": jax.random.key(0)}, jnp.zeros((1, 64, 64, 1)))
  full = model.clone(prior_scale=1.0)
  c = np.random.default_rng(0).uniform(size=(2, 64, 64, 1))
  centers = (np.arange(32) + 0.5) * 2.0
  tent = np.maximum(0.0, 1.0 - np.abs((np.arange(64) + 0.5)[None, :] - centers[:, None]) / 2.0)
  tent /= tent.sum(axis=1, keepdims=True)                           # [32, 64]
  box = np.einsum("ij,njkc,lk->nilc", tent, c, tent)
  got = model.apply(variables, jnp.asarray(c, jnp.float32), method=VKDModel.prior)
  want = full.apply(variables, jnp.asarray(box, jnp.float32), method=VKDModel.prior)
  for g, e in zip(got, want):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="prior_scale"):
    model.clone(prior_scale=0.0).apply(variables, jnp.asarray(c, jnp.float32), method=VKDModel.prior)


def test_spatial_latent_keeps_z_per_cell_and_the_kl_cell_by_cell():
  config = tiny_vkd_config()
  config.unlock()
  config.vkd.spatial_latent, config.vkd.prior_scale = True, 1.0
  method = TinyVKD()
  model, variables = _init(method, config)
  batch = _batch(config)
  c = jnp.maximum(batch["gaze_map"], batch["box_map"])
  out = model.apply(variables, batch["image"], c)
  n, latent = batch["image"].shape[0], config.vkd.latent_dim
  assert out["features"].shape[1:3] == (8, 8)            # TinyNet: stride 4 at 32 px
  assert out["mu"].shape == out["prior_mu"].shape == out["prior_logvar"].shape == (n, 8, 8, latent)
  # The classifier reads z averaged over the cells (posterior mean here).
  dense = variables["params"]["classifier"]
  by_hand = out["mu"].mean(axis=(1, 2)) @ dense["kernel"] + dense["bias"]
  np.testing.assert_allclose(out["logits"], by_hand, rtol=1e-5, atol=1e-6)
  # p(z|c) is local: cell (i, j) sees pixels 4i..4i+6 x 4j..4j+6 (two stride-2 3 x 3 'SAME'
  # convolutions), so c changed in the top-left 4 x 4 px moves the prior in cell (0, 0) only.
  moved = model.apply(variables, batch["image"], c.at[:, :4, :4].set(1.0 - c[:, :4, :4]))
  changed = np.any(np.asarray(moved["prior_mu"] != out["prior_mu"]), axis=(0, 3))
  assert changed[0, 0] and changed.sum() == 1
  # Stage 2's KL: per cell, summed over z's dimensions, averaged over cells and images.
  _, prior = method.stages(config)
  ctx = _context(model, variables, **prior.apply_kwargs)
  _, aux = prior.loss(ctx, variables["params"], batch, jax.random.key(1))
  train_out, _ = model.apply(variables, batch["image"], c, train=True, train_encoder=False,
                             mutable=["batch_stats"])
  np.testing.assert_allclose(
      aux["metrics"]["kl"],
      numpy_kl(train_out["mu"], train_out["logvar"], train_out["prior_mu"],
               train_out["prior_logvar"]).mean(), rtol=1e-4)
  # A prior encoder reading c at half the side has a coarser map, resized onto the posterior's
  # cells.
  config.data.image_size, config.vkd.prior_scale = 64, 0.5
  model, variables = _init(method, config)
  half = _batch(config)
  out = model.apply(variables, half["image"], half["box_map"])
  assert out["mu"].shape == out["prior_mu"].shape == (n, 16, 16, latent)
