"""Optimizer, schedules and freeze masks."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

import _trainer_worker as w
from cxr_jax.train.stage import Stage
from cxr_jax.methods.baseline import classification_loss
from cxr_jax.train import optim
from cxr_jax.train import step as train_step
from cxr_jax.train.state import TrainState


def opt_config(**kw):
  base = dict(name="adam", learning_rate=0.1, b1=0.9, b2=0.999, weight_decay=0.0, schedule="constant",
              warmup_steps=0, decay_rate=0.5, decay_steps=10, grad_clip=0.0)
  base.update(kw)
  return ml_collections.ConfigDict(base)


PARAMS = {"backbone": {"conv0": {"kernel": jnp.ones((3, 3, 1, 4)), "bias": jnp.ones(4)},
                       "bn0": {"scale": jnp.ones(4), "bias": jnp.zeros(4)}},
          "head": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)}}


def test_param_labels_from_regexes():
  labels = traverse_util.flatten_dict(optim.param_labels(PARAMS, (r"head/.*", r".*/conv0/kernel")), sep="/")
  assert labels == {"backbone/conv0/kernel": "train", "backbone/conv0/bias": "frozen",
                    "backbone/bn0/scale": "frozen", "backbone/bn0/bias": "frozen",
                    "head/kernel": "train", "head/bias": "train"}
  # Full match: 'head' alone matches no leaf path.
  with pytest.raises(ValueError, match="stage 'finetune'.*'head'"):
    optim.param_labels(PARAMS, ("head",), stage="finetune")


def test_unknown_names_are_errors_naming_the_key():
  with pytest.raises(ValueError, match="optimizer.name"):
    optim.make_optimizer(opt_config(name="adamx"), PARAMS, (".*",), 10)
  with pytest.raises(ValueError, match="optimizer.schedule"):
    optim.make_optimizer(opt_config(schedule="linear"), PARAMS, (".*",), 10)


@pytest.mark.parametrize("name,steps,expected", [
    ("constant", [0, 50], lambda t: 0.1),
    ("step", [0, 9, 10, 25], lambda t: 0.1 * 0.5 ** (t // 10)),
    ("exponential", [0, 5, 15], lambda t: 0.1 * 0.5 ** (t / 10)),
    ("cosine", [0, 25, 50, 100], lambda t: 0.1 * 0.5 * (1 + np.cos(np.pi * min(t, 100) / 100))),
])
def test_schedules(name, steps, expected):
  schedule = optim.make_schedule(opt_config(schedule=name), total_steps=100)
  for t in steps:
    np.testing.assert_allclose(float(schedule(t)), expected(t), rtol=1e-5)


def test_warmup_then_cosine():
  schedule = optim.make_schedule(opt_config(schedule="cosine", warmup_steps=10), total_steps=110)
  for t, want in [(0, 0.0), (5, 0.05), (10, 0.1), (60, 0.05), (110, 0.0)]:
    np.testing.assert_allclose(float(schedule(t)), want, atol=1e-7)


def test_weight_decay_skips_1d_params_and_frozen_get_zero_updates():
  tx = optim.make_optimizer(opt_config(name="sgd", momentum=0.0, weight_decay=0.1, learning_rate=1.0),
                            PARAMS, (r"backbone/.*",), 10)
  zero_grads = jax.tree.map(jnp.zeros_like, PARAMS)
  updates, _ = tx.update(zero_grads, tx.init(PARAMS), PARAMS)
  flat = traverse_util.flatten_dict(updates, sep="/")
  np.testing.assert_allclose(flat["backbone/conv0/kernel"], -0.1)   # coupled L2: -lr * wd * p
  for path in ("backbone/conv0/bias", "backbone/bn0/scale", "head/kernel", "head/bias"):
    assert np.all(np.asarray(flat[path]) == 0), path


def test_plateau_scale_drops_after_patience_evals():
  cfg = opt_config(name="sgd", momentum=0.0, schedule="plateau", plateau_patience=2, decay_rate=0.1)
  tx = optim.make_optimizer(cfg, PARAMS, (".*",), 10)
  state = tx.init(PARAMS)
  grads = jax.tree.map(jnp.ones_like, PARAMS)
  head_update = lambda s: float(tx.update(grads, s, PARAMS)[0]["head"]["bias"][0])
  assert head_update(state) == pytest.approx(-0.1)
  for value in (1.0, 0.5, 0.6, 0.7):  # improvement, then two evals without one
    state = optim.feed_plateau(cfg, state, jnp.float32(value))
  assert head_update(state) == pytest.approx(-0.01)


def _run_steps(trainable, steps=4):
  config = w.tiny_config()
  method = w.TinyBaseline()
  model = method.model(config)
  stage = Stage(name="probe", loss=functools.partial(classification_loss, "bce"), steps=steps,
                optimizer=config.optimizer, trainable=trainable)
  params, batch_stats = train_step.init_variables(model, stage, config, jax.random.key(0))
  labels = optim.param_labels(params, trainable, stage=stage.name)
  bs_labels = optim.batch_stats_labels(batch_stats, labels, trainable)
  tx = optim.make_optimizer(config.optimizer, params, trainable, steps, stage=stage.name)
  state = TrainState(step=jnp.int32(0), params=params, batch_stats=batch_stats, opt_state=tx.init(params),
                     extras={}, rng=jax.random.key_data(jax.random.key(1)))
  before = jax.device_get(state)
  step = jax.jit(train_step.make_train_step(model, stage, tx, labels, bs_labels), donate_argnums=0)
  iterator = w.ArrayIterator(w.SPLITS["train"], batch_size=16, sharding=jax.devices()[0], seed=0)
  for _ in range(steps):
    state, _ = step(state, next(iterator))
  return before, jax.device_get(state)


def test_frozen_params_and_their_batch_stats_stay_bit_identical():
  before, after = _run_steps((r"head/.*",))
  flat = lambda t: traverse_util.flatten_dict(t, sep="/")
  for path, value in flat(before.params).items():
    if path.startswith("backbone/"):
      assert np.array_equal(value, flat(after.params)[path]), path
    else:
      assert not np.allclose(value, flat(after.params)[path]), path
  for path, value in flat(before.batch_stats).items():
    assert np.array_equal(value, flat(after.batch_stats)[path]), path
  # With the backbone trainable the same run moves both its params and statistics.
  before, after = _run_steps((r".*",))
  assert not np.allclose(before.params["backbone"]["conv0"]["kernel"], after.params["backbone"]["conv0"]["kernel"])
  assert not np.allclose(before.batch_stats["backbone"]["bn0"]["mean"], after.batch_stats["backbone"]["bn0"]["mean"])
