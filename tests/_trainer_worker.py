"""Tiny model, in-memory data and a stand-in evaluator for the trainer tests.

Also a script: ``python tests/_trainer_worker.py WORKDIR STEPS [DELAY]`` trains
the tiny baseline (the kill/resume test runs it in a subprocess).
"""

from __future__ import annotations

import os
import pathlib
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from cxr_jax.cli import flags as cli_flags  # noqa: E402  (the console scripts' XLA:CPU defaults)

cli_flags.set_cpu_xla_defaults()

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

from configs import common  # noqa: E402
from cxr_jax import files  # noqa: E402
from cxr_jax.methods.baseline import Baseline  # noqa: E402

NUM_CLASSES = 14
SIZE = 16


class TinyNet(nn.Module):
  """conv(8, stride 2) -> BN -> relu -> conv(16, stride 2) -> BN -> relu: [N,S/4,S/4,16]."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i, features in enumerate((8, 16)):
      x = nn.Conv(features, (3, 3), strides=2, use_bias=False, name=f"conv{i}")(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name=f"bn{i}")(x)
      x = nn.relu(x)
    return x


class TinyBaseline(Baseline):
  def backbone(self, config):
    return TinyNet(name="backbone")


BUSY_SIDE = 128  # side of the matrices SlowBaseline's busy loop multiplies


def _busy_loss(ctx, params, batch, rng):
  """weighted BCE after batch['spin'][0] products of BUSY_SIDE^2 matrices on the device."""
  from cxr_jax.methods.baseline import classification_loss
  value, aux = classification_loss("weighted_bce", ctx, params, batch, rng)
  m = jnp.full((BUSY_SIDE, BUSY_SIDE), 1.0 / BUSY_SIDE)
  m = jax.lax.stop_gradient(jax.lax.fori_loop(0, batch["spin"][0], lambda i, m: jnp.tanh(m @ m), m))
  return value + 0.0 * m[0, 0], aux


class SlowBaseline(TinyBaseline):
  """The tiny baseline whose step is slow on the device by batch['spin'] (``make_iterator_factory``
  ``spin``): one program at any count, so slow and fast runs compute the same numbers."""

  def stages(self, config):
    from cxr_jax.train.stage import Stage
    return [Stage(name="train", loss=_busy_loss, steps=config.train_steps,
                  optimizer=config.optimizer)]


def tiny_config(steps: int = 12, **overrides):
  c = common.base_config("runlocal")
  c.loss = "weighted_bce"
  c.data.image_size, c.batch_size = SIZE, 16
  c.train_steps, c.log_every, c.eval_every, c.checkpoint_every = steps, 4, 0, 5
  c.optimizer.learning_rate = 3e-3
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def make_data(num: int, seed: int) -> dict[str, np.ndarray]:
  """Images [num,S,S,1]; class k is positive when a fixed random projection of the image is > 0."""
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(num, SIZE, SIZE, 1)).astype(np.float32)
  projection = np.random.default_rng(123).normal(size=(SIZE * SIZE, NUM_CLASSES))
  labels = (images.reshape(num, -1) @ projection > 0).astype(np.float32)
  mask = (rng.uniform(size=labels.shape) > 0.1).astype(np.float32)
  return {"image": images, "labels": labels, "label_mask": mask,
          "valid": np.ones(num, np.float32), "index": np.arange(num, dtype=np.int32)}


class ArrayIterator:
  """Shuffled batches of an in-memory split (new permutation per epoch) as global arrays."""

  def __init__(self, data, *, batch_size, sharding, seed, delay=0.0):
    self.data, self.batch_size, self.sharding, self.seed, self.delay = data, batch_size, sharding, seed, delay
    self.num_examples = len(data["index"])
    self.steps_per_epoch = self.num_examples // batch_size
    self.position = 0

  def __iter__(self):
    return self

  def __next__(self):
    epoch, offset = divmod(self.position, self.steps_per_epoch)
    order = np.random.default_rng((self.seed, epoch)).permutation(self.num_examples)
    rows = order[offset * self.batch_size:(offset + 1) * self.batch_size]
    self.position += 1
    if self.delay:
      time.sleep(self.delay)
    return jax.device_put({k: v[rows] for k, v in self.data.items()}, self.sharding)

  def get_state(self):
    return {"position": self.position}

  def set_state(self, state):
    self.position = int(state["position"])

  def close(self):
    pass


SPLITS = {"train": make_data(128, 0), "val": make_data(64, 1), "test": make_data(64, 2)}


def make_iterator_factory(delay: float = 0.0, calls: list | None = None, spin: int | None = None):
  """``make_iterator`` over ``SPLITS``; ``delay``: seconds per batch on the host; ``spin``: every
  example's 'spin' (SlowBaseline's device work per step), None: no 'spin'."""
  def make_iterator(data_config, split, *, batch_size, sharding, seed, shuffle=True, num_epochs=None,
                    drop_remainder=True, maps=(), augment=True, views=()):
    if calls is not None:
      calls.append(dict(split=split, batch_size=batch_size, seed=seed, maps=maps, augment=augment,
                        views=views, data_config=data_config))
    data = SPLITS[split]
    if spin is not None:
      data = dict(data, spin=np.full(len(data["index"]), spin, np.int32))
    return ArrayIterator(data, batch_size=batch_size, sharding=sharding, seed=seed, delay=delay)
  return make_iterator


def fake_evaluate(method, model, variables, config, split, workdir, *, stage, mesh, **unused):
  """Mean AUROC (sklearn) of ``method.predict`` on the in-memory split."""
  data = SPLITS[split]
  probs = np.asarray(method.predict(model, variables, {"image": data["image"]})["probs"])
  aurocs = [skm.roc_auc_score(data["labels"][:, k], probs[:, k]) for k in range(NUM_CLASSES)]
  payload = {"method": method.name, "stage": stage, "num_examples": len(probs),
             "classification": {"auroc": {"mean": float(np.mean(aurocs))}}}
  if workdir:
    files.update_json_atomic(os.path.join(workdir, "eval", f"{split}.json"), payload)
  return payload


def flat_params(state) -> dict[str, np.ndarray]:
  from flax import traverse_util
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(
      jax.device_get(state.params), sep="/").items()}


def main(argv):
  from cxr_jax.train import trainer
  workdir, steps = argv[1], int(argv[2])
  delay = float(argv[3]) if len(argv) > 3 else 0.0
  state = trainer.train_and_evaluate(tiny_config(steps), workdir, method=TinyBaseline(),
                                     make_iterator=make_iterator_factory(delay),
                                     evaluate=fake_evaluate)
  np.savez(os.path.join(workdir, "final_params.npz"), **flat_params(state))


if __name__ == "__main__":
  main(sys.argv)
