"""The trainer: devices, kill/resume, NaN, stages, and the baseline method."""

import functools
import os
import pathlib
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import _trainer_worker as w
from cxr_jax.methods import get_method
from cxr_jax.train.stage import Stage, Validation
from cxr_jax.methods.baseline import Baseline, classification_loss
from cxr_jax.models.classifier import Classifier
from cxr_jax.train import optim, parallel, trainer
from cxr_jax.train import step as train_step
from cxr_jax.train.checkpoint import RunCheckpoints

WORKER = pathlib.Path(__file__).with_name("_trainer_worker.py")


def _train(workdir, config, method=None, mesh=None, delay=0.0):
  return trainer.train_and_evaluate(config, str(workdir), method=method or w.TinyBaseline(),
                                    make_iterator=w.make_iterator_factory(delay),
                                    evaluate=w.fake_evaluate, mesh=mesh)


def test_eight_devices_match_one(tmp_path):
  assert jax.device_count() == 8
  config = w.tiny_config(steps=4)
  one = w.flat_params(_train(tmp_path / "one", config, mesh=parallel.make_mesh(jax.devices()[:1])))
  eight = w.flat_params(_train(tmp_path / "eight", config, mesh=parallel.make_mesh()))
  for path in one:
    np.testing.assert_allclose(eight[path], one[path], rtol=2e-4, atol=2e-6, err_msg=path)
  assert (tmp_path / "eight" / "eval" / "test.json").exists()


def test_killed_run_resumes_to_the_same_params(tmp_path):
  steps = 24
  # A persistent compilation cache lets the resumed process skip the killed one's compiles.
  env = dict(os.environ, PYTHONPATH=str(WORKER.parents[1]),
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  killed = tmp_path / "killed"
  proc = subprocess.Popen([sys.executable, str(WORKER), str(killed), str(steps), "0.2"], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 120
  try:
    while not (killed / "checkpoints" / "10").is_dir():  # finalized checkpoint (orbax renames tmp dirs)
      assert proc.poll() is None, "worker exited before its first checkpoint"
      assert time.time() < deadline, "no checkpoint within 120 s"
      time.sleep(0.2)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert not (killed / "final_params.npz").exists()
  subprocess.run([sys.executable, str(WORKER), str(killed), str(steps)], env=env, check=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=240)
  resumed = dict(np.load(killed / "final_params.npz"))
  straight = w.flat_params(_train(tmp_path / "straight", w.tiny_config(steps)))
  for path, value in straight.items():
    np.testing.assert_allclose(resumed[path], value, rtol=1e-6, atol=1e-7, err_msg=path)


def _nan_from(step):
  def loss(ctx, params, batch, rng):
    value, aux = classification_loss("bce", ctx, params, batch, rng)
    return jnp.where(ctx.step + 1 >= step, jnp.nan, value), aux
  return loss


class NanAfter(w.TinyBaseline):
  def stages(self, config):
    return [Stage(name="pretrain", loss=_nan_from(7), steps=12, optimizer=config.optimizer)]


def test_nan_loss_stops_with_step_and_stage_and_keeps_checkpoint(tmp_path, caplog):
  config = w.tiny_config(steps=12)  # checkpoint at step 5, log every 4: NaN at 7 is seen at 8
  with pytest.raises(FloatingPointError, match=r"step 7 \(stage 'pretrain', its step 7\); the "
                     r"last checkpoint before it, step 5, is kept in .*/checkpoints$"):
    _train(tmp_path, config, method=NanAfter())
  ckpt = RunCheckpoints(str(tmp_path), keep=2)
  step, meta = ckpt.latest_progress()
  assert step == 5 and meta.stage_name == "pretrain" and meta.stage_step == 5
  like = _train_state_like(config)
  caplog.set_level("WARNING")
  state = ckpt.restore(step, like)
  assert int(ckpt.restore_replicated(step, like.step.sharding)["step"]) == 5
  ckpt.close()
  assert int(state.step) == 5
  assert not [r for r in caplog.records if "_CHECKPOINT_METADATA" in r.getMessage()]
  for leaf in jax.tree.leaves(state.params):
    assert np.all(np.isfinite(np.asarray(leaf)))


def _latest_step(workdir):
  checkpoints = RunCheckpoints(str(workdir), keep=2)
  try:
    return checkpoints.latest.latest_step()
  finally:
    checkpoints.close()


def test_nan_loss_before_any_checkpoint_says_there_is_none(tmp_path):
  config = w.tiny_config(steps=12, checkpoint_every=100)
  with pytest.raises(FloatingPointError, match=r"step 7 .*; no checkpoint was written before it"):
    _train(tmp_path, config, method=NanAfter())
  assert _latest_step(tmp_path) is None


def _blow_up_from(step):
  def loss(ctx, params, batch, rng):
    value, aux = classification_loss("bce", ctx, params, batch, rng)
    return jnp.where(ctx.step + 1 >= step, 1e6 * value, value), aux
  return loss


class BlowUpAfter(w.TinyBaseline):
  def stages(self, config):
    return [Stage(name="pretrain", loss=_blow_up_from(7), steps=12, optimizer=config.optimizer)]


def test_divergence_stops_after_the_last_checkpoint_and_says_which(tmp_path):
  config = w.tiny_config(steps=12)  # checkpoint at step 5, log every 4: the loss x1e6 from 7
  with pytest.raises(trainer.progress.Diverged,
                     match=r"training diverged at step 8 \(stage 'pretrain', its step 8\): mean "
                           r"loss .* above divergence.factor=100 x .*; the last checkpoint "
                           r"before it, step 5, is kept in .*/checkpoints\."):
    _train(tmp_path, config, method=BlowUpAfter())
  assert _latest_step(tmp_path) == 5
  assert not (tmp_path / "eval").exists()
  off = w.tiny_config(steps=12, **{"divergence.factor": 0.0})
  _train(tmp_path / "off", off, method=BlowUpAfter())  # factor 0: no guard
  assert (tmp_path / "off" / "eval" / "test.json").exists()


def test_a_huge_learning_rate_stops_the_run_with_no_checkpoint(tmp_path):
  config = w.tiny_config(steps=12, checkpoint_every=100, **{"optimizer.learning_rate": 1e6})
  with pytest.raises(trainer.progress.Diverged,
                     match=r"above divergence.factor=100 x .*; no checkpoint was written before "
                           r"it, so there is none to resume from\."):
    _train(tmp_path, config)
  assert not (tmp_path / "eval").exists()


def _train_state_like(config):
  from cxr_jax.train.state import TrainState
  method = NanAfter()
  stage = method.stages(config)[0]
  params, stats = train_step.init_variables(method.model(config), stage, config, jax.random.key(0))
  tx = optim.make_optimizer(stage.optimizer, params, stage.trainable, stage.steps)
  state = TrainState(step=jnp.int32(0), params=params, batch_stats=stats, opt_state=tx.init(params),
                     extras={}, rng=jax.random.key_data(jax.random.key(0)))
  return jax.device_put(state, parallel.replicated(parallel.make_mesh()))


class TwoHeads(w.TinyBaseline):
  """Stage 1 trains backbone + head; stage 2 adds 'head2' and trains only it."""

  def model(self, config):
    return TwoHeadModel(backbone=w.TinyNet(name="backbone"), num_classes=w.NUM_CLASSES)

  def stages(self, config):
    loss = functools.partial(classification_loss, "weighted_bce")
    return [Stage(name="base", loss=loss, steps=5, optimizer=config.optimizer),
            Stage(name="second_head", loss=loss, steps=5, optimizer=config.optimizer,
                  trainable=(r"head2/.*",), apply_kwargs={"second": True},
                  validation=Validation(every=5))]


class TwoHeadModel(Classifier):
  """The baseline Classifier, plus (second=True) a 'head2' on the pooled features."""

  @nn.compact
  def __call__(self, x, train=False, second=False):
    out = Classifier.__call__(self, x, train=train)
    if second:
      pooled = jnp.mean(out["features"], axis=(1, 2))
      out = dict(out, logits=nn.Dense(self.num_classes, name="head2")(pooled))
    return out


def test_two_stages_carry_params_and_freeze(tmp_path):
  calls = []
  state = trainer.train_and_evaluate(
      w.tiny_config(), str(tmp_path), method=TwoHeads(),
      make_iterator=w.make_iterator_factory(calls=calls), evaluate=w.fake_evaluate,
      mesh=parallel.make_mesh())
  assert [c["split"] for c in calls] == ["train", "train"] and calls[0]["seed"] != calls[1]["seed"]
  final = w.flat_params(state)
  assert "head2/kernel" in final and "head/kernel" in final
  # The end of stage 'base' is the checkpoint at step 5 (its structure: no head2, base optimizer).
  ckpt = RunCheckpoints(str(tmp_path), keep=2)
  assert ckpt.latest_progress()[1].stage_name == "second_head"
  config = w.tiny_config()
  stage = TwoHeads().stages(config)[0]
  params = {k: v for k, v in state.params.items() if k != "head2"}
  tx = optim.make_optimizer(stage.optimizer, params, stage.trainable, stage.steps)
  base_state = ckpt.restore(5, state.replace(params=params, opt_state=tx.init(params)))
  ckpt.close()
  base = w.flat_params(base_state)
  assert set(final) - set(base) == {"head2/kernel", "head2/bias"}
  for path, value in base.items():
    assert np.array_equal(final[path], value), f"{path} changed in the frozen stage"
  for a, b in zip(jax.tree.leaves(jax.device_get(base_state.batch_stats)),
                  jax.tree.leaves(jax.device_get(state.batch_stats))):
    assert np.array_equal(a, b)


# Loss per step: three flat evaluation intervals (means 1, 2, 3: two evaluations without
# improvement, patience 2 -> the rate drops), then a falling one (mean 0.875 / 3).
STEP_LOSSES = (1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 3.0, 3.0, 3.0, 0.5, 0.25, 0.125)


def _loss_from_table(ctx, params, batch, rng):
  value, aux = classification_loss("bce", ctx, params, batch, rng)
  return 0.0 * value + jnp.asarray(STEP_LOSSES)[ctx.step], aux


class PlateauOnTrainingLoss(w.TinyBaseline):
  def __init__(self, signal="train_loss"):
    self.signal = signal

  def stages(self, config):
    opt = ml_collections.ConfigDict(dict(config.optimizer.to_dict(), schedule="plateau",
                                         plateau_patience=2, decay_rate=0.1))
    return [Stage(name="finetune", loss=_loss_from_table, steps=len(STEP_LOSSES), optimizer=opt,
                  validation=Validation(every=3, plateau_signal=self.signal))]


def _plateau_state(state):
  is_plateau = lambda x: isinstance(x, optax.contrib.ReduceLROnPlateauState)
  (found,) = [s for s in jax.tree.leaves(state.opt_state, is_leaf=is_plateau) if is_plateau(s)]
  return jax.device_get(found)


def test_plateau_fed_the_mean_training_loss_since_the_last_eval_and_resumes(tmp_path, monkeypatch):
  # log_every 4 and checkpoint_every 5 cut the evaluation intervals (every 3 steps) apart.
  config = w.tiny_config(steps=len(STEP_LOSSES))
  straight = _plateau_state(_train(tmp_path / "straight", config, method=PlateauOnTrainingLoss()))
  assert float(straight.scale) == pytest.approx(0.1)  # means 2 and 3 did not improve on 1
  assert float(straight.best_value) == pytest.approx(0.875 / 3)
  assert int(straight.plateau_count) == 0

  # Preempted at step 11 (checkpoint 11 holds steps 10-11 of the last interval), then resumed.
  monkeypatch.setattr(parallel, "preemption_requested", lambda step: step == 11)
  with pytest.raises(parallel.Preempted):
    _train(tmp_path / "resumed", config, method=PlateauOnTrainingLoss())
  monkeypatch.undo()
  resumed = _plateau_state(_train(tmp_path / "resumed", config, method=PlateauOnTrainingLoss()))
  for field in ("scale", "best_value", "plateau_count"):
    assert getattr(resumed, field) == getattr(straight, field), field

  with pytest.raises(ValueError, match="stage 'finetune' has plateau_signal 'val_loss'"):
    _train(tmp_path / "bad", config, method=PlateauOnTrainingLoss("val_loss"))


def test_init_compiled_with_the_cpu_options_matches_xla_defaults():
  """``init_variables`` compiles at XLA:CPU optimization level 0 (``INIT_COMPILER_OPTIONS``):
  same random bits, same initializers, so the params and batch_stats equal those of
  ``jax.jit(model.init)`` under XLA's default options up to float rounding."""
  assert train_step.INIT_COMPILER_OPTIONS["cpu"] == {"xla_backend_optimization_level": 0}
  config = w.tiny_config()
  method = w.TinyBaseline()
  model = method.model(config)
  rng = jax.random.key(3)
  got = train_step.init_variables(model, method.stages(config)[0], config, rng)
  zeros = jnp.zeros((1, config.data.image_size, config.data.image_size, config.data.channels))
  reference = jax.jit(lambda r: model.init({"params": r, "dropout": r}, zeros, train=False))(rng)
  want = (reference["params"], reference.get("batch_stats", {}))
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
  assert any(np.std(np.asarray(leaf)) > 0 for leaf in jax.tree.leaves(got[0]))


def test_baseline_cam_averages_to_logits_and_registry():
  assert isinstance(get_method("baseline"), Baseline)
  with pytest.raises(KeyError, match="baseline"):
    get_method("nope")
  config = w.tiny_config()
  method = w.TinyBaseline()
  model = method.model(config)
  params, stats = train_step.init_variables(model, method.stages(config)[0], config, jax.random.key(0))
  variables = {"params": params, "batch_stats": stats}
  images = jnp.asarray(w.SPLITS["val"]["image"][:4])
  out = method.predict(model, variables, {"image": images})
  logits = model.apply(variables, images, train=False)["logits"]
  assert out["heatmaps"].shape == (4, 4, 4, w.NUM_CLASSES)
  np.testing.assert_allclose(out["heatmaps"].mean(axis=(1, 2)), logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["probs"], jax.nn.sigmoid(logits), rtol=1e-6)


@pytest.mark.slow
def test_baseline_end_to_end_with_real_pipeline_and_evaluator(tmp_path):
  """Synthetic phantoms -> grain pipeline -> resnet18 (width 0.125, 32 px) -> evaluator JSON."""
  import json

  from configs import baseline
  config = baseline.get_config("dataset=synthetic,backbone=resnet18,size=32,width=0.125,runlocal")
  with config.unlocked():
    config.train_steps, config.eval_every, config.checkpoint_every, config.log_every = 4, 4, 2, 2
    config.data.synthetic.num_train, config.data.synthetic.num_val, config.data.synthetic.num_test = 64, 32, 32
  state = trainer.train_and_evaluate(config, str(tmp_path), method=get_method(config.method))
  assert int(state.step) == 4
  for split in ("val", "test"):
    payload = json.loads((tmp_path / "eval" / f"{split}.json").read_text())
    assert payload["num_examples"] == 32 and 0.0 <= payload["classification"]["auroc"]["mean"] <= 1.0
  assert (tmp_path / "checkpoints" / "4").is_dir()
