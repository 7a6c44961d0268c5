"""Train-step throughput of the baseline classifier: all trainable vs frozen backbone.

  python benchmarks/train_step.py --backbone=resnet18 --width=0.25 --size=64 --batch=64

Times the trainer's own jitted step (state donated, batch sharded over the
mesh) on synthetic arrays, so the figure is compute only (no input pipeline).
The frozen-backbone stage trains only 'head/.*': its params enter the loss under
stop_gradient, so XLA prunes the backbone's backward pass, and its BatchNorm
runs on running averages (apply_kwargs train_backbone=False).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from cxr_jax.methods.base import Stage
from cxr_jax.methods.baseline import Baseline, classification_loss
from cxr_jax.train import optim, parallel, trainer
from cxr_jax.train.state import TrainState

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import baseline as baseline_config  # noqa: E402  (configs/ lives at the repo root)


def time_stage(config, stage: Stage, batch_size: int, steps: int) -> float:
  """Images/s of ``steps`` jitted steps of ``stage`` after one warm-up step."""
  mesh = parallel.make_mesh()
  method = Baseline()
  model = method.model(config)
  params, batch_stats = trainer.init_variables(model, stage, config, jax.random.key(0))
  labels = optim.param_labels(params, stage.trainable, stage=stage.name)
  bs_labels = optim.batch_stats_labels(batch_stats, labels, stage.trainable)
  tx = optim.make_optimizer(stage.optimizer, params, stage.trainable, stage.steps, stage=stage.name)
  state = TrainState(step=jnp.int32(0), params=params, batch_stats=batch_stats,
                     opt_state=tx.init(params), extras={},
                     rng=np.asarray(jax.random.key_data(jax.random.key(1))))
  state = jax.device_put(state, parallel.replicated(mesh))
  step = jax.jit(trainer.make_train_step(model, stage, tx, labels, bs_labels), donate_argnums=0)
  size, k = config.data.image_size, 14
  rng = np.random.default_rng(0)
  batch = jax.device_put({
      "image": rng.standard_normal((batch_size, size, size, config.data.channels), np.float32),
      "labels": (rng.random((batch_size, k)) < 0.2).astype(np.float32),
      "label_mask": np.ones((batch_size, k), np.float32),
      "valid": np.ones((batch_size,), np.float32)}, parallel.data_sharding(mesh))
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch)
  jax.block_until_ready((state.params, metrics))
  return steps * batch_size / (time.perf_counter() - start)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--backbone", default="resnet18")
  p.add_argument("--width", type=float, default=0.25)
  p.add_argument("--size", type=int, default=64)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--json", default="", help="also write the figures to this JSON file")
  a = p.parse_args()
  config = baseline_config.get_config(f"backbone={a.backbone},size={a.size},width={a.width}")
  with config.unlocked():
    config.model.dtype = a.dtype
  loss = lambda *args: classification_loss("weighted_bce", *args)
  full = Stage(name="full", loss=loss, steps=a.steps, optimizer=config.optimizer)
  frozen = Stage(name="frozen_backbone", loss=loss, steps=a.steps, optimizer=config.optimizer,
                 trainable=(r"head/.*",), apply_kwargs={"train_backbone": False})
  results = {
      "device": f"{jax.devices()[0].device_kind} x{jax.device_count()}",
      "host": f"{platform.processor() or platform.machine()}",
      "backbone": a.backbone, "width": a.width, "size": a.size, "batch": a.batch, "dtype": a.dtype,
      "full_img_per_s": time_stage(config, full, a.batch, a.steps),
      "frozen_backbone_img_per_s": time_stage(config, frozen, a.batch, a.steps),
  }
  results["frozen_speedup"] = results["frozen_backbone_img_per_s"] / results["full_img_per_s"]
  if a.json:
    with open(a.json, "w") as f:
      json.dump(results, f, indent=1)
  print(f"{'backbone':>10} {'size':>5} {'batch':>5} {'full img/s':>11} {'frozen img/s':>13} {'speedup':>8}")
  print(f"{a.backbone:>10} {a.size:>5} {a.batch:>5} {results['full_img_per_s']:>11.1f} "
        f"{results['frozen_backbone_img_per_s']:>13.1f} {results['frozen_speedup']:>8.2f}")


if __name__ == "__main__":
  main()
