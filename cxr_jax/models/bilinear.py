"""Two-stream bilinear CNN with per-stream heads (Ge et al. 2018, Sec. 2.2-2.3, Fig. 1).

Two backbones of the same type start from identical weights (``init`` copies
stream 1's variables onto stream 2). Stream 1 feeds a GAP + Dense head trained
with sigmoid BCE (E_CE), stream 2 a GAP + Dense head trained with MSML (or BCE
for the 'R18 + R18-BL' ablation). Their last conv maps, optionally reduced by a
1x1 conv each, are combined by bilinear pooling (Eq. 4, Lin et al. 2015):

  G = 1/L sum_{locations} f1 f2^T            [d1, d2], one batched matmul
  z = l2_normalize(sign(G) sqrt(|G|))        [d1 * d2]

and a Dense layer on z gives the fine-grained (FCE) logits. After pooling the
paper's "1x1 conv" acts on a 1x1 map, i.e. it is that Dense layer.

``OneStream`` is Table 1's single-stream baselines: 'R18' (one backbone, GAP +
Dense, sigmoid BCE) and 'R18-BL' (one backbone whose map is pooled bilinearly
with itself, z = bilinear_features(f, f), then the Dense FCE layer; "self
bilinear pooling"), with the first stream's module names.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cxr_jax.models import layers
from cxr_jax.models.backbones import get_backbone

SQRT_EPS = 1e-10
NORM_EPS = 1e-12


def bilinear_pool(features1: jax.Array, features2: jax.Array) -> jax.Array:
  """Location-averaged outer product: [N,h,w,d1], [N,h,w,d2] -> [N,d1,d2] float32.

  One batched matmul over the L = h*w locations ('nld,nle->nde' / L); no
  [N,L,d1,d2] tensor is formed.
  """
  n, h, w, d1 = features1.shape
  if features2.shape[:3] != (n, h, w):
    raise ValueError(f"bilinear_pool: the two maps must share N,h,w; got {features1.shape} "
                     f"and {features2.shape}")
  a = features1.astype(jnp.float32).reshape(n, h * w, d1)
  b = features2.astype(jnp.float32).reshape(n, h * w, features2.shape[-1])
  return jnp.einsum("nld,nle->nde", a, b) / (h * w)


def signed_sqrt(x: jax.Array, eps: float = SQRT_EPS) -> jax.Array:
  """sign(x) sqrt(|x| + eps): the eps keeps the gradient finite at 0 (the output at 0 is 0)."""
  return jnp.sign(x) * jnp.sqrt(jnp.abs(x) + eps)


def l2_normalize(x: jax.Array, eps: float = NORM_EPS) -> jax.Array:
  """x / sqrt(sum x^2 + eps) over the last axis."""
  return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + eps)


def bilinear_features(features1: jax.Array, features2: jax.Array) -> jax.Array:
  """[N,h,w,d1], [N,h,w,d2] -> z [N, d1*d2]: pooled, signed square root, L2-normalised."""
  pooled = bilinear_pool(features1, features2)
  return l2_normalize(signed_sqrt(pooled.reshape(pooled.shape[0], -1)))


class _Streams(nn.Module):
  """The fields both stream models share: backbone name and size, classes, 1x1 reduction."""
  backbone: str
  num_classes: int
  width: float = 1.0
  dtype: Any = jnp.float32
  blurpool: int = 0
  reduce_dim: int = 0


class TwoStreamBilinear(_Streams):
  """Two backbones, their GAP heads, and the bilinear FCE head.

  backbone: a name of ``cxr_jax.models.backbones.BACKBONES`` (both streams).
  reduce_dim: channels of the 1x1 conv applied to each stream's map before
    pooling (0 = none: z has num_features^2 entries).
  prediction: how ``cxr_jax.methods.msml.MSML.predict`` turns the heads into
    probabilities: 'fce' (sigmoid of the FCE logits) or 'mean' (mean of the
    CE and FCE heads' sigmoids); the module's outputs do not depend on it.
  Returns {'ce_logits', 'msml_logits', 'fce_logits': [N,K] float32,
           'features': stream 1's map [N,h,w,D]}.
  """
  prediction: str = "fce"

  def setup(self):
    make = lambda: get_backbone(self.backbone, width=self.width, dtype=self.dtype,
                                blurpool=self.blurpool)
    self.stream1, self.stream2 = make(), make()
    dense = lambda: nn.Dense(self.num_classes, dtype=jnp.float32)
    self.ce_head, self.msml_head, self.fce_head = dense(), dense(), dense()
    if self.reduce_dim:
      conv = lambda: nn.Conv(self.reduce_dim, (1, 1), dtype=jnp.float32)
      self.reduce1, self.reduce2 = conv(), conv()

  def stream1_features(self, x: jax.Array) -> jax.Array:
    """Stream 1's last conv map [N,h,w,D] in inference mode (for CAMs)."""
    return self.stream1(x, train=False)

  def __call__(self, x: jax.Array, train: bool = False,
               train_streams: bool = True) -> dict[str, jax.Array]:
    """train_streams=False: both backbones' BatchNorm run on their running averages."""
    f1 = self.stream1(x, train=train and train_streams)
    f2 = self.stream2(x, train=train and train_streams)
    f1_32, f2_32 = f1.astype(jnp.float32), f2.astype(jnp.float32)
    g1, g2 = (self.reduce1(f1_32), self.reduce2(f2_32)) if self.reduce_dim else (f1_32, f2_32)
    return {"ce_logits": self.ce_head(layers.global_avg_pool(f1_32)),
            "msml_logits": self.msml_head(layers.global_avg_pool(f2_32)),
            "fce_logits": self.fce_head(bilinear_features(g1, g2)),
            "features": f1}

  def init_with_output(self, rngs, *args, **kwargs):
    """``nn.Module.init_with_output`` (and so ``init``) with stream 2 a copy of stream 1.

    Ge 2018, Sec. 2.3: "Two separate CNNs are initialised with identical
    parameters"; the copy covers every collection (params, batch_stats).
    """
    out, variables = super().init_with_output(rngs, *args, **kwargs)
    variables = {col: ({**tree, "stream2": tree["stream1"]} if "stream1" in tree else tree)
                 for col, tree in variables.items()}
    return out, variables


class OneStream(_Streams):
  """One backbone and one head (Ge 2018 Table 1's 'R18' and 'R18-BL' rows).

  self_bilinear False ('R18'): GAP + Dense 'ce_head' -> 'ce_logits'.
  self_bilinear True ('R18-BL'): the map g (f, or its 1x1 conv 'reduce1' when
    ``reduce_dim``) pooled bilinearly with itself, ``bilinear_features(g, g)``,
    then Dense 'fce_head' -> 'fce_logits'.
  The modules carry the names of TwoStreamBilinear's first stream ('stream1',
  'reduce1', 'ce_head', 'fce_head').
  Returns {'ce_logits' or 'fce_logits': [N,K] float32, 'features': the map [N,h,w,D]}.
  """
  self_bilinear: bool = False

  def setup(self):
    self.stream1 = get_backbone(self.backbone, width=self.width, dtype=self.dtype,
                                blurpool=self.blurpool)
    head = nn.Dense(self.num_classes, dtype=jnp.float32)
    if self.self_bilinear:
      self.fce_head = head
      if self.reduce_dim:
        self.reduce1 = nn.Conv(self.reduce_dim, (1, 1), dtype=jnp.float32)
    else:
      self.ce_head = head

  @property
  def logits_key(self) -> str:
    """The output key of the head's logits."""
    return "fce_logits" if self.self_bilinear else "ce_logits"

  def stream1_features(self, x: jax.Array) -> jax.Array:
    """The backbone's last conv map [N,h,w,D] in inference mode (for CAMs)."""
    return self.stream1(x, train=False)

  def head(self, features: jax.Array) -> jax.Array:
    """The map [N,h,w,D] -> logits [N,K] (GAP + Dense, or self bilinear pooling + Dense)."""
    f = features.astype(jnp.float32)
    if not self.self_bilinear:
      return self.ce_head(layers.global_avg_pool(f))
    g = self.reduce1(f) if self.reduce_dim else f
    return self.fce_head(bilinear_features(g, g))

  def __call__(self, x: jax.Array, train: bool = False,
               train_streams: bool = True) -> dict[str, jax.Array]:
    """train_streams=False: the backbone's BatchNorm runs on its running averages."""
    f = self.stream1(x, train=train and train_streams)
    return {self.logits_key: self.head(f), "features": f}
