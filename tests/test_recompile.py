"""The hot paths compile once, and a frozen stage prunes its backward pass (issue 11).

Compilations are counted with jax.monitoring's backend-compile event, which fires
once per XLA compilation (never on a jit cache hit) and names the function.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import baseline as baseline_config
from cxr_jax.evaluation import evaluator
from cxr_jax.train.stage import Stage
from cxr_jax.methods.baseline import Baseline, classification_loss
from cxr_jax.train import optim, parallel, trainer
from cxr_jax.train import step as train_step
from cxr_jax.train.state import TrainState

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def compiled_functions():
  """Yields the list of function names XLA compiles inside the block, in order."""
  names = []

  def listener(event, duration, **kwargs):
    del duration
    if event == COMPILE_EVENT:
      names.append(kwargs.get("fun_name", "?"))

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield names
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def tiny_config(**fields):
  config = baseline_config.get_config("runlocal")
  with config.unlocked():
    config.data.synthetic.num_train, config.data.synthetic.num_val = 160, 40
    config.data.synthetic.num_test = 40
    for key, value in fields.items():
      node = config
      *parents, leaf = key.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = value
  return config


def test_trainer_step_compiles_once_over_20_steps(tmp_path):
  """cxr-train's own loop: 20 steps of varying pipeline batches, the step compiles exactly once
  (and metrics are read at the log steps in between)."""
  config = tiny_config(train_steps=20, eval_every=0, log_every=5, checkpoint_every=100)
  evaluate = lambda *args, **kwargs: {"classification": {"auroc": {"mean": 0.5}}}
  with compiled_functions() as names:
    trainer.train_and_evaluate(config, str(tmp_path), method=Baseline(), evaluate=evaluate)
  # train_step.accumulate's jitted function is named 'step'; nothing else the trainer jits is.
  assert names.count("jit(step)") == 1, names


def test_evaluator_compiles_once_including_the_padded_last_batch():
  """40 val + 40 test phantoms in batches of 16: 3 batches each, the last padded with
  valid = 0 rows; predict and the Grad-CAM heat maps compile once each over both splits."""
  config = tiny_config(eval_batch_size=16)
  with config.unlocked():
    config.cam = "gradcam"
  method = Baseline()
  model = method.model(config)
  params, batch_stats = train_step.init_variables(model, method.stages(config)[0], config,
                                               jax.random.key(0))
  with compiled_functions() as names:
    payload = evaluator.evaluate(method, model, {"params": params, "batch_stats": batch_stats},
                                 config, "test", None, stage="train", mesh=parallel.make_mesh())
  assert payload["num_examples"] == 40
  assert payload["localization"], "the test phantoms carry boxes: heat maps must have run"
  assert names.count("jit(predict)") == 1, names
  assert names.count("jit(heatmaps)") == 1, names


# --------------------------------------------------------------------------- frozen leaves


def _stage_step(config, stage):
  method = Baseline()
  model = method.model(config)
  params, batch_stats = train_step.init_variables(model, stage, config, jax.random.key(0))
  labels = optim.param_labels(params, stage.trainable, stage=stage.name)
  bs_labels = optim.batch_stats_labels(batch_stats, labels, stage.trainable)
  tx = optim.make_optimizer(stage.optimizer, params, stage.trainable, stage.steps, stage=stage.name)
  state = TrainState(step=jnp.int32(0), params=params, batch_stats=batch_stats,
                     opt_state=tx.init(params), extras={},
                     rng=np.asarray(jax.random.key_data(jax.random.key(1))))
  return train_step.make_train_step(model, stage, tx, labels, bs_labels), state


def _batch(config, seed):
  rng = np.random.default_rng(seed)
  n, size = 8, config.data.image_size
  return {"image": rng.standard_normal((n, size, size, 1)).astype(np.float32),
          "labels": (rng.random((n, 14)) < 0.3).astype(np.float32),
          "label_mask": np.ones((n, 14), np.float32), "valid": np.ones((n,), np.float32)}


def _count_primitive(jaxpr, name: str) -> int:
  """Occurrences of primitive ``name`` in a closed jaxpr, sub-jaxprs (pjit, custom_vjp) included."""
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name == name
    for param in eqn.params.values():
      subs = param if isinstance(param, (list, tuple)) else [param]
      for sub in subs:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          count += _count_primitive(inner, name)
  return count


@pytest.fixture(scope="module")
def stages():
  config = tiny_config()
  loss = lambda *args: classification_loss("weighted_bce", *args)
  full = Stage(name="full", loss=loss, steps=10, optimizer=config.optimizer)
  frozen = Stage(name="frozen", loss=loss, steps=10, optimizer=config.optimizer,
                 trainable=(r"head/.*",), apply_kwargs={"train_backbone": False})
  return config, full, frozen


def test_frozen_backbone_stays_bit_identical(stages):
  config, _, frozen = stages
  step_fn, state = _stage_step(config, frozen)
  before = jax.device_get(state)
  step = jax.jit(step_fn, donate_argnums=0)
  for seed in range(3):
    state, _ = step(state, _batch(config, seed))
  after = jax.device_get(state)
  for a, b in zip(jax.tree.leaves(before.params["backbone"]), jax.tree.leaves(after.params["backbone"])):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(before.batch_stats), jax.tree.leaves(after.batch_stats)):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(before.params["head"]["kernel"], after.params["head"]["kernel"])


def test_frozen_step_prunes_the_backbone_backward_pass(stages):
  """The full step holds each conv's forward, input-gradient and kernel-gradient convolutions;
  the frozen-backbone step only the forward ones (one per conv layer)."""
  config, full, frozen = stages
  counts = {}
  for stage in (full, frozen):
    step_fn, state = _stage_step(config, stage)
    counts[stage.name] = _count_primitive(
        jax.make_jaxpr(step_fn)(state, _batch(config, 0)).jaxpr, "conv_general_dilated")
  _, state = _stage_step(config, frozen)
  conv_layers = sum(1 for x in jax.tree.leaves(state.params["backbone"]) if x.ndim == 4)
  assert counts["frozen"] == conv_layers, counts
  assert counts["full"] >= 3 * conv_layers - 1, counts  # the stem conv needs no input gradient
