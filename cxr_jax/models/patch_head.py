"""Patch-grid localization model (Li et al. 2018 base model; Rozenberg 2020 Fig. 3).

  unary:   backbone (pre-act ResNet, optionally BlurPool) -> feature map resized
           to P x P (bilinear) -> conv3x3 + BN + ReLU -> conv1x1 -> K patch logits
           'head' (sigmoid = p_j^k);
  guide:   a second, small conv branch from the image to P x P guide features
           'guide' (PAC-CRF pairwise terms);
  crf:     ``PacCRF`` on (unary logits, guide features) -> z logits 'crf';
  thresholds: per-class tau, rho in (0, 1) and tau_hat, rho_hat in (0, P^2)
           (Rozenberg Eq. 12), stored as logits 'thresholds/*'.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cxr_jax.models import layers
from cxr_jax.models.pac_crf import PacCRF

THRESHOLD_NAMES = ("tau", "rho", "tau_hat", "rho_hat")


class PatchHead(nn.Module):
  """[N,h,w,D] features -> [N,P,P,K] patch logits: resize, conv3x3-BN-ReLU, conv1x1."""
  grid_size: int
  num_classes: int
  hidden: int = 128

  @nn.compact
  def __call__(self, features: jax.Array, train: bool = False) -> jax.Array:
    n, _, _, d = features.shape
    x = jax.image.resize(features.astype(jnp.float32), (n, self.grid_size, self.grid_size, d),
                         "bilinear")
    x = nn.Conv(self.hidden, (3, 3), use_bias=False, name="conv_a")(x)
    x = nn.relu(layers.batch_norm(train, name="bn_a")(x))
    return nn.Conv(self.num_classes, (1, 1), name="conv_b")(x)


class GuideBranch(nn.Module):
  """Image -> [N,P,P,C] guide features: three stride-2 conv-ReLU, resize to P x P, 1x1 conv."""
  grid_size: int
  features: int = 16
  width: int = 16

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    for i, channels in enumerate((self.width, 2 * self.width, 2 * self.width)):
      x = nn.relu(nn.Conv(channels, (3, 3), strides=(2, 2), name=f"conv{i}")(x))
    n, _, _, c = x.shape
    x = jax.image.resize(x, (n, self.grid_size, self.grid_size, c), "bilinear")
    return nn.Conv(self.features, (1, 1), name="proj")(x)


def inverse_sigmoid(value: float) -> float:
  return float(np.log(value) - np.log1p(-value))


class Thresholds(nn.Module):
  """Per-class tau, rho (fractions of |b|, |b_bar|) and tau_hat, rho_hat (patch counts).

  init: initial values (tau, rho, tau_hat, rho_hat); tau_hat and rho_hat in
  patches, so in (0, P^2). Returns {name: [K] float32}.
  """
  num_classes: int
  num_patches: int
  init: tuple[float, float, float, float] = (0.5, 0.05, 2.0, 1.0)

  @nn.compact
  def __call__(self) -> dict[str, jax.Array]:
    out = {}
    for name, value in zip(THRESHOLD_NAMES, self.init):
      scale = self.num_patches if name.endswith("_hat") else 1
      if not 0 < value < scale:
        raise ValueError(f"threshold {name} = {value} must lie in (0, {scale})")
      logit = self.param(name, nn.initializers.constant(inverse_sigmoid(value / scale)),
                         (self.num_classes,))
      out[name] = scale * jax.nn.sigmoid(logit)
    return out


class PatchLocalizer(nn.Module):
  """Unary patch model (+ thresholds, + PAC-CRF with its guide branch).

  __call__(x, train, train_unary=True, use_crf=False) -> {
    'unary_logits': [N,P,P,K], 'logits': [N,P,P,K] (CRF output when use_crf,
    else the unary logits), 'thresholds': {name: [K]} (when ``with_thresholds``)}.
  train_unary=False: the backbone and head run BatchNorm on running averages.
  """
  backbone: nn.Module
  num_classes: int
  grid_size: int
  feature_stage: str = "conv5_x"
  head_hidden: int = 128
  with_thresholds: bool = False
  threshold_init: tuple[float, float, float, float] = (0.5, 0.05, 2.0, 1.0)
  crf_window: int = 19
  crf_iterations: int = 5
  guide_features: int = 16
  image_score: str = "noisy_or"  # read by the method's predict: 'noisy_or' (Eq. 2) | 'mean'

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, train_unary: bool = True,
               use_crf: bool = False) -> dict:
    stages = self.backbone(x, train=train and train_unary, return_stages=True)
    unary = PatchHead(self.grid_size, self.num_classes, self.head_hidden, name="head")(
        stages[self.feature_stage], train=train and train_unary)
    out = {"unary_logits": unary, "logits": unary}
    if self.with_thresholds:
      out["thresholds"] = Thresholds(self.num_classes, self.grid_size ** 2, self.threshold_init,
                                     name="thresholds")()
    if use_crf:
      guide = GuideBranch(self.grid_size, self.guide_features, name="guide")(x)
      out["logits"] = PacCRF(self.num_classes, self.crf_window, self.crf_iterations,
                             name="crf")(unary, guide, train=train)
    return out
