"""BYOL network with a linear probe and a fine-tuning head (Talasila 2023, Fig. 1-2).

One Flax module holds every part, each a named submodule created only when
its ``mode`` calls it (so the trainer's per-stage ``init`` + carry-over gives
the fine-tuning stage a fresh 'head' on the pretrained 'backbone'):

  backbone   f: image [N,H,W,C] -> feature map A [N,h,w,D]; y = GAP(A) [N,D]
  projector  g: MLP D -> hidden -> projection (BatchNorm + ReLU between)
  predictor  q: MLP projection -> hidden -> projection (online network only)
  probe      linear D -> K on y: the class score y^c that Grad-CAM explains
             during self-supervised pretraining (trained on the image labels)
  head       linear D -> K on y: the fine-tuned classifier

The target network (Eq. 5) has the architecture of backbone + projector; its
weights live outside the module (``TrainState.extras``) and are applied with
``mode='target'``; ``tau_at`` is the decay rate of its moving average.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cxr_jax.models.layers import MLP, global_avg_pool

MODES = ("classify", "byol", "target")
TAU_SCHEDULES = ("constant", "cosine")


class BYOLNetwork(nn.Module):
  """Online BYOL network + probe + head over a conv ``backbone``.

  Attributes:
    backbone: a registry backbone, ``backbone(x, train=)`` -> [N,h,w,D].
    num_classes: K of the head (the fine-tuning label space).
    probe_classes: classes of the probe (the pretraining label space; None = K).
    hidden_dim: hidden size of projector and predictor (paper: 512).
    projection_dim: output size of projector and predictor (paper: 256).
  """
  backbone: nn.Module
  num_classes: int
  probe_classes: int | None = None
  hidden_dim: int = 512
  projection_dim: int = 256

  def setup(self):
    self.projector = MLP((self.hidden_dim, self.projection_dim), batch_norm=True)
    self.predictor = MLP((self.hidden_dim, self.projection_dim), batch_norm=True)
    self.probe = nn.Dense(self.probe_classes or self.num_classes, dtype=jnp.float32)
    self.head = nn.Dense(self.num_classes, dtype=jnp.float32)

  def __call__(self, x: jax.Array, train: bool = False, mode: str = "classify",
               view_rows: int | None = None) -> dict[str, jax.Array]:
    """x [N,H,W,C] ->

    'classify': {'features' [N,h,w,D], 'logits' [N,K]} (backbone + head).
    'byol':     {'features', 'pooled' [N,D], 'probe_logits' [N,K_probe],
                 'prediction' [V,P]}: q(g(y)) of the first ``view_rows`` rows
                 (V; None = all), the rest of the batch only feeds the probe.
    'target':   {'projection' [N,P]}: g(y) (the target network's output).
    """
    if mode not in MODES:
      raise ValueError(f"unknown BYOLNetwork mode {mode!r}; known: {list(MODES)}")
    features = self.backbone(x, train=train)
    pooled = global_avg_pool(features.astype(jnp.float32))
    if mode == "classify":
      return {"features": features, "logits": self.head(pooled)}
    if mode == "target":
      return {"projection": self.projector(pooled, train=train)}
    views = pooled if view_rows is None else pooled[:view_rows]
    prediction = self.predictor(self.projector(views, train=train), train=train)
    return {"features": features, "pooled": pooled, "probe_logits": self.probe(pooled),
            "prediction": prediction}


def tau_at(step: jax.Array, base_tau: float, schedule: str, total_steps: int) -> jax.Array:
  """Target decay rate (Eq. 5) at EMA step k: ``base_tau`` ('constant') or BYOL's cosine schedule
  tau_k = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2, rising from tau_base to 1 over K steps."""
  if schedule == "constant":
    return jnp.asarray(base_tau, jnp.float32)
  if schedule == "cosine":
    progress = jnp.minimum(step.astype(jnp.float32) / max(total_steps, 1), 1.0)
    return 1.0 - (1.0 - base_tau) * (jnp.cos(jnp.pi * progress) + 1.0) / 2.0
  raise ValueError(f"unknown byol.tau_schedule {schedule!r}; known: {list(TAU_SCHEDULES)}")


# The target network of Eq. 5 (Talasila 2023, after Grill et al. 2020): an exponential moving
# average of the online backbone + projector, kept in the train state's extras.
TARGET_PARTS = ("backbone", "projector")


def online_parts(params) -> dict:
  """The online parameters the target network mirrors: backbone and projector."""
  return {k: params[k] for k in TARGET_PARTS}


def init_target(params, extras) -> dict:
  """Stage start: target = a copy of the online backbone + projector, EMA step 0."""
  del extras
  return {"target": jax.tree.map(jnp.array, online_parts(params)),
          "ema_step": jnp.zeros((), jnp.int32)}


def ema_update(base_tau: float, schedule: str, total_steps: int, state):
  """Eq. 5 after each optimizer step: delta <- tau delta + (1 - tau) theta."""
  extras = state.extras
  tau = tau_at(extras["ema_step"], base_tau, schedule, total_steps)
  target = jax.tree.map(lambda d, t: tau * d + (1.0 - tau) * t, extras["target"],
                        online_parts(state.params))
  return state.replace(extras={"target": target, "ema_step": extras["ema_step"] + 1})
