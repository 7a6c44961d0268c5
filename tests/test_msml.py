"""Ge 2018: MSML loss (Eq. 2/3), bilinear pooling, two-stream init, Table 2 strategies."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import msml as msml_config
from cxr_jax.methods import get_method
from cxr_jax.losses import msml_loss
from cxr_jax.methods.msml import MSML
from cxr_jax.models import bilinear
from cxr_jax.train import parallel, trainer

# --------------------------------------------------------------------------- MSML loss


def msml_reference(x, y, m):
  """Float64 loop over images and positive classes: -log(e^x_l / (e^x_l + sum_neg e^x_k))."""
  x, y, m = (np.asarray(a, np.float64) for a in (x, y, m))
  per_image = []
  for n in range(x.shape[0]):
    pos = [k for k in range(x.shape[1]) if m[n, k] and y[n, k]]
    neg = [k for k in range(x.shape[1]) if m[n, k] and not y[n, k]]
    if not pos:
      continue
    terms = [-np.log(np.exp(x[n, l]) / (np.exp(x[n, l]) + sum(np.exp(x[n, k]) for k in neg)))
             for l in pos]
    per_image.append(np.mean(terms))
  return float(np.mean(per_image)) if per_image else 0.0


def msml_grad_eq3(x, y, m):
  """Closed-form gradient (Eq. 3 of the negative log) of the batch loss, float64."""
  x, y, m = (np.asarray(a, np.float64) for a in (x, y, m))
  grad = np.zeros_like(x)
  pos_rows = (m * y).sum(1) > 0
  for n in np.flatnonzero(pos_rows):
    pos = (m[n] > 0) & (y[n] > 0)
    neg = (m[n] > 0) & (y[n] == 0)
    s = np.exp(x[n, neg]).sum()
    p = np.exp(x[n, pos]) / (np.exp(x[n, pos]) + s)
    grad[n, pos] = -(1.0 - p) / pos.sum()
    grad[n, neg] = np.exp(x[n, neg]) * np.sum(1.0 / (np.exp(x[n, pos]) + s)) / pos.sum()
  return grad / max(pos_rows.sum(), 1)


def random_batch(seed, n=7, k=6):
  rng = np.random.default_rng(seed)
  x = rng.normal(0, 2, (n, k)).astype(np.float32)
  y = (rng.random((n, k)) < 0.4).astype(np.float32)
  m = (rng.random((n, k)) < 0.8).astype(np.float32)
  y[0], m[0] = 0.0, 1.0            # no positive
  y[1], m[1] = 1.0, 1.0            # no negative
  y[2, :2], m[2, :2] = 1.0, 1.0    # positives
  m[2, 2:] = 0.0                   # ... and everything else masked: no negative either
  y[3, 0], m[3, :2] = 1.0, 1.0     # at least one positive and one negative
  y[3, 1] = 0.0
  return x, y, m


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_msml_matches_float64_loop(seed):
  x, y, m = random_batch(seed)
  np.testing.assert_allclose(float(msml_loss(x, y, m)), msml_reference(x, y, m), rtol=1e-5)


def test_msml_gradient_is_eq3_and_finite_differences():
  x, y, m = random_batch(5)
  grad = np.asarray(jax.grad(msml_loss)(jnp.asarray(x), y, m))
  np.testing.assert_allclose(grad, msml_grad_eq3(x, y, m), rtol=1e-4, atol=1e-6)
  fd, h = np.zeros_like(grad, np.float64), 1e-6
  for idx in np.ndindex(*x.shape):
    up, down = x.astype(np.float64), x.astype(np.float64)
    up[idx] += h
    down[idx] -= h
    fd[idx] = (msml_reference(up, y, m) - msml_reference(down, y, m)) / (2 * h)
  np.testing.assert_allclose(grad, fd, rtol=1e-3, atol=1e-5)


def test_msml_images_without_positives_contribute_nothing():
  x, y, m = random_batch(3)
  with_positive = (m * y).sum(1) > 0
  assert not with_positive.all()
  only = msml_loss(x[with_positive], y[with_positive], m[with_positive])
  np.testing.assert_allclose(float(msml_loss(x, y, m)), float(only), rtol=1e-6)
  grad = np.asarray(jax.grad(msml_loss)(jnp.asarray(x), y, m))
  assert np.all(grad[~with_positive] == 0.0)
  none = np.zeros_like(y)
  assert float(msml_loss(x, none, m)) == 0.0
  assert np.all(np.asarray(jax.grad(msml_loss)(jnp.asarray(x), none, m)) == 0.0)


def test_msml_masked_classes_are_neither_positive_nor_negative():
  x, y, m = random_batch(4)
  moved = np.where(m > 0, x, x + 50.0)   # masked logits far out: no effect if ignored
  np.testing.assert_allclose(float(msml_loss(moved, y, m)), float(msml_loss(x, y, m)), rtol=1e-6)
  grad = np.asarray(jax.grad(msml_loss)(jnp.asarray(x), y, m))
  assert np.all(grad[m == 0] == 0.0)
  # Unmasking a masked negative raises the loss of an image with a positive.
  row = 4
  y[row], m[row] = 0.0, 0.0
  y[row, 0], m[row, :2] = 1.0, 1.0
  before = msml_reference(x[row:row + 1], y[row:row + 1], m[row:row + 1])
  m[row, 2] = 1.0
  after = float(msml_loss(x[row:row + 1], y[row:row + 1], m[row:row + 1]))
  assert after > before


def test_msml_extreme_logits_stay_finite():
  x = np.array([[1e4, -1e4, 3e3, -2e3], [-1e4, 1e4, 0.0, 80.0]], np.float32)
  y = np.array([[1, 0, 0, 1], [1, 0, 1, 0]], np.float32)
  m = np.ones_like(y)
  loss, grad = jax.value_and_grad(msml_loss)(jnp.asarray(x), y, m)
  assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grad)))
  # -log softmax ~ max(0, lse(negatives) - x_l): image 1 (negatives -1e4, 3e3): positives 1e4 -> 0,
  # -2e3 -> 5e3; image 2 (negatives 1e4, 80): -1e4 -> 2e4, 0 -> 1e4. Mean of the image means.
  np.testing.assert_allclose(float(loss), (0.5 * (0 + 5e3) + 0.5 * (2e4 + 1e4)) / 2, rtol=1e-6)


# --------------------------------------------------------------------------- bilinear pooling


def bilinear_reference(a, b, eps=bilinear.SQRT_EPS):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  n, h, w, _ = a.shape
  out = []
  for i in range(n):
    g = np.zeros((a.shape[-1], b.shape[-1]))
    for r in range(h):
      for c in range(w):
        g += np.outer(a[i, r, c], b[i, r, c])
    g = (g / (h * w)).ravel()
    z = np.sign(g) * np.sqrt(np.abs(g) + eps)
    out.append(z / np.linalg.norm(z))
  return np.stack(out)


def test_bilinear_features_match_outer_product_loop():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(3, 4, 5, 6)).astype(np.float32)
  b = np.maximum(rng.normal(size=(3, 4, 5, 7)), 0).astype(np.float32)  # ReLU-like: exact zeros
  b[..., 2] = 0.0
  z = bilinear.bilinear_features(a, b)
  assert z.shape == (3, 42)
  np.testing.assert_allclose(np.asarray(z), bilinear_reference(a, b), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(z), axis=1), 1.0, rtol=1e-5)
  grad = jax.grad(lambda a_: jnp.sum(bilinear.bilinear_features(a_, b)[:, :5]))(jnp.asarray(a))
  assert np.all(np.isfinite(np.asarray(grad)))


def test_bilinear_pool_forms_no_per_location_outer_products():
  a = jnp.ones((2, 16, 16, 12))
  b = jnp.ones((2, 16, 16, 10))
  hlo = jax.jit(bilinear.bilinear_pool).lower(a, b).compile().as_text()
  assert "f32[2,256,12,10]" not in hlo and "f32[2,16,16,12,10]" not in hlo
  assert "f32[2,12,10]" in hlo


# --------------------------------------------------------------------------- model and method


def tiny_config(**msml):
  c = msml_config.get_config("runlocal")
  c.unlock()
  c.msml.update(msml)
  c.batch_size, c.train_steps, c.eval_every = 8, 4, 0
  c.data.synthetic.num_train, c.data.synthetic.num_val, c.data.synthetic.num_test = 32, 8, 8
  return c


def flat(tree):
  tree = traverse_util.flatten_dict(jax.device_get(tree), sep="/")
  return {k: np.asarray(v) for k, v in tree.items()}


def test_streams_start_identical_and_cam_target_is_stream1_ce_head():
  config = tiny_config(reduce_dim=8)
  method = get_method("msml")
  model = method.model(config)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 1))
  variables = jax.jit(lambda r: model.init({"params": r}, x, train=False))(jax.random.key(0))
  for col in ("params", "batch_stats"):
    s1, s2 = flat(variables[col]["stream1"]), flat(variables[col]["stream2"])
    assert s1.keys() == s2.keys() and len(s1) > 10
    for path in s1:
      np.testing.assert_array_equal(s1[path], s2[path], err_msg=f"{col}/{path}")
  assert variables["params"]["reduce1"]["kernel"].shape[-1] == 8
  # Make the streams differ, so that the CAM check below tells stream 1 from stream 2.
  params = dict(variables["params"], stream2=jax.tree.map(lambda p: 1.5 * p + 0.1,
                                                           variables["params"]["stream2"]))
  variables = dict(variables, params=params)

  @jax.jit
  def run(variables, x):
    features_fn, head_fn = method.cam_target(model, variables)
    features = features_fn(x)
    return (model.apply(variables, x, train=False), features, head_fn(features),
            method.predict(model, variables, {"image": x})["probs"])

  outputs, features, cam_logits, probs = run(variables, x)
  assert outputs["fce_logits"].shape == (2, 14)
  np.testing.assert_allclose(np.asarray(features), np.asarray(outputs["features"]), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(cam_logits), np.asarray(outputs["ce_logits"]),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(probs), np.asarray(jax.nn.sigmoid(outputs["fce_logits"])),
                             rtol=1e-6)


def test_single_stream_models_r18_and_r18_bl():
  """Table 1's 'R18' (msml.streams='one': one backbone, GAP + CE head) and 'R18-BL'
  ('one_bl': the map pooled bilinearly with itself, then the FCE head): their logits against
  float64 references, their CAM head and predictions, one stage of plain BCE on that head."""
  method = get_method("msml")
  x = jax.random.normal(jax.random.key(1), (2, 64, 64, 1))   # a 2 x 2 map: locations to pool
  for streams, key in (("one", "ce_logits"), ("one_bl", "fce_logits")):
    config = tiny_config(streams=streams)
    model = method.model(config)
    assert isinstance(model, bilinear.OneStream) and method.pretrained_prefixes == ("stream1",)

    def run(rng, x):   # eager: a compiled program costs more than these few ops at 64 px
      variables = model.init({"params": rng}, x, train=False)
      features_fn, head_fn = method.cam_target(model, variables)
      return (variables, model.apply(variables, x, train=False), head_fn(features_fn(x)),
              method.predict(model, variables, {"image": x}))

    variables, outputs, cam_logits, predicted = run(jax.random.key(0), x)
    head = "ce_head" if streams == "one" else "fce_head"
    assert set(variables["params"]) == {"stream1", head}
    assert set(outputs) == {key, "features"} and outputs[key].shape == (2, 14)
    f = np.asarray(outputs["features"], np.float64)
    z = f.mean(axis=(1, 2)) if streams == "one" else bilinear_reference(f, f)
    kernel, bias = (np.asarray(variables["params"][head][k], np.float64)
                    for k in ("kernel", "bias"))
    np.testing.assert_allclose(np.asarray(outputs[key]), z @ kernel + bias, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(cam_logits), np.asarray(outputs[key]), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(predicted["probs"]),
                               np.asarray(jax.nn.sigmoid(outputs[key])), rtol=1e-6)
    assert ("heatmaps" in predicted) == (streams == "one")   # a linear CAM needs a GAP head
    (stage,) = method.stages(config)
    assert stage.name == "train" and stage.steps == config.train_steps
    assert stage.loss.args == ((1.0, 0.0, 0.0) if streams == "one" else (0.0, 0.0, 1.0), "msml")
    with pytest.raises(ValueError, match="strategy must be 'global'"):
      method.stages(tiny_config(streams=streams, strategy="local"))
  assert get_method("msml").pretrained_prefixes == ("stream1", "stream2")


def test_strategies_build_table2_stages():
  method = get_method("msml")
  rows = msml_config.get_sweep()
  assert [r["msml.strategy"] for r in rows] == ["global", "local", "local_fixed"]
  built = {}
  for row in rows:
    c = msml_config.get_config("runlocal,strategy=" + row["msml.strategy"])
    built[c.msml.strategy] = method.stages(c)
  assert [s.name for s in built["global"]] == ["train"]
  local, fixed = built["local"], built["local_fixed"]
  assert [s.name for s in local] == ["streams", "bilinear"] == [s.name for s in fixed]
  assert sum(s.steps for s in local) == msml_config.get_config("runlocal").train_steps
  assert local[1].trainable == (".*",) and not local[1].apply_kwargs
  assert fixed[1].apply_kwargs == {"train_streams": False}
  with pytest.raises(ValueError, match="strategy"):
    method.stages(msml_config.get_config("runlocal,strategy=loco"))


def fake_evaluate(*args, **kwargs):
  return {}


def test_local_fixed_keeps_streams_bit_identical_in_stage_two(tmp_path):
  """The real trainer and pipeline (synthetic phantoms, 32 px, width 0.125)."""
  config = tiny_config(strategy="local_fixed")
  seen = {}

  def capture(name):
    def init_extras(params, extras):
      seen[name] = flat(params)   # the params the stage starts from
      return extras
    return init_extras

  class CapturingMSML(MSML):
    def stages(self, config):
      return [dataclasses.replace(s, hooks=dataclasses.replace(s.hooks, init_extras=capture(s.name))) for s in super().stages(config)]

  state = trainer.train_and_evaluate(config, str(tmp_path), method=CapturingMSML(),
                                     evaluate=fake_evaluate,
                                     mesh=parallel.make_mesh(jax.devices()[:1]))
  initial, start, end = seen["streams"], seen["bilinear"], flat(state.params)
  streams = ("stream1", "stream2", "ce_head", "msml_head")
  stream_paths = [p for p in start if p.split("/")[0] in streams]
  for path in stream_paths:   # the fresh model: stream 2 == stream 1
    if path.startswith("stream2/"):
      np.testing.assert_array_equal(initial[path], initial["stream1/" + path[8:]])
  assert any(not np.array_equal(initial[p], start[p]) for p in stream_paths)   # stage 1 trained
  for path in stream_paths:
    np.testing.assert_array_equal(end[path], start[path], err_msg=path)
  assert not np.array_equal(end["fce_head/kernel"], start["fce_head/kernel"])
  # CE on stream 1 and MSML on stream 2 break the symmetry (Sec. 2.3).
  assert any(not np.array_equal(start[p], start["stream2/" + p[8:]])
             for p in stream_paths if p.startswith("stream1/"))


def test_nih_preset_splits_at_random_as_ge_and_the_eval_header_says_so():
  """Sec. 3: a random patient split 70/10/20 of all NIH images, not the official test list."""
  from configs import common  # pylint: disable=import-outside-toplevel
  from cxr_jax.evaluation import evaluator  # pylint: disable=import-outside-toplevel
  config = msml_config.get_config("dataset=nih")
  assert config.data.split_policy == "random"
  assert (config.data.val_fraction, config.data.test_fraction) == (0.1, 0.2)
  assert evaluator.split_policy_used(config.data) == "random"
  assert common.base_config("dataset=nih").data.split_policy == "official"
  assert evaluator.split_policy_used(msml_config.get_config("runlocal").data) == "phantom"
