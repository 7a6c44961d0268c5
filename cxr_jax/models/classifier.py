"""Backbone + global average pooling + linear head, and the CAMs of such a head.

``Classifier`` is the plain multi-label model of the baseline method;
``linear_head_fn`` and ``class_activation_maps`` read any GAP + Dense head
from its params {'kernel' [D,K], 'bias' [K]}.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class Classifier(nn.Module):
  """features = backbone(x) [N,h,w,D]; logits = Dense_K(mean_hw features) [N,K]."""
  backbone: nn.Module
  num_classes: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False,
               train_backbone: bool = True) -> dict[str, jax.Array]:
    """train_backbone=False: a frozen backbone's BatchNorm runs on its running averages."""
    features = self.backbone(x, train=train and train_backbone)
    pooled = jnp.mean(features.astype(jnp.float32), axis=(1, 2))
    logits = nn.Dense(self.num_classes, dtype=jnp.float32, name="head")(pooled)
    return {"logits": logits, "features": features}


def linear_head_fn(dense: dict):
  """GAP + a Dense layer's params {'kernel' [D,K], 'bias' [K]} as features [N,h,w,D] -> [N,K]."""
  return lambda f: jnp.mean(f.astype(jnp.float32), axis=(1, 2)) @ dense["kernel"] + dense["bias"]


def class_activation_maps(features: jax.Array, head: dict) -> jax.Array:
  """CAM (Zhou 2016): M_k(x, y) = sum_d w_dk f_d(x, y) + b_k, [N,h,w,K].

  With the bias included, the spatial mean of M_k is the logit of class k.
  """
  return jnp.einsum("nhwd,dk->nhwk", features.astype(jnp.float32), head["kernel"]) + head["bias"]
