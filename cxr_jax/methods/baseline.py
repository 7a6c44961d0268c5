"""Plain multi-label classifier: backbone + global average pooling + linear head.

The smallest ``Method``: one stage, every parameter trainable, weighted BCE
(Wang 2017 / Kim 2022 Eq. 10) or BCE, CAM heat maps (Zhou 2016) for
localization.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from cxr_jax import losses
from cxr_jax.data import schema
from cxr_jax.methods.base import Batch, LossContext, Stage
from cxr_jax.models.backbones import backbone_from_config

LOSSES = ("weighted_bce", "bce")


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


def label_mask(batch: Batch) -> jax.Array:
  """The batch's label mask [N,K] with padding rows (valid = 0) masked out."""
  mask = batch["label_mask"].astype(jnp.float32)
  if "valid" in batch:
    mask = mask * batch["valid"].astype(jnp.float32)[:, None]
  return mask


def classification_loss(kind: str, ctx: LossContext, params, batch: Batch, rng: jax.Array):
  """(loss, aux) of the Classifier on ``batch`` with ``losses.<kind>``."""
  del rng
  outputs, batch_stats = ctx.apply(params, batch["image"])
  logits = outputs["logits"]
  if kind == "weighted_bce":
    loss = losses.weighted_bce(logits, batch["labels"], label_mask(batch))
  else:
    loss = losses.bce(logits, batch["labels"], label_mask(batch))
  return loss, {"metrics": {}, "batch_stats": batch_stats}


def class_activation_maps(features: jax.Array, head: dict) -> jax.Array:
  """CAM (Zhou 2016): M_k(x, y) = sum_d w_dk f_d(x, y) + b_k, [N,h,w,K].

  With the bias included, the spatial mean of M_k is the logit of class k.
  """
  return jnp.einsum("nhwd,dk->nhwk", features.astype(jnp.float32), head["kernel"]) + head["bias"]


class Baseline:
  """Backbone (config.model) + GAP + Dense(K) 'head', one stage 'train'."""
  name = "baseline"

  def backbone(self, config: ml_collections.ConfigDict) -> nn.Module:
    """The image backbone (config.model); subclasses may swap it."""
    return backbone_from_config(config.model)

  def model(self, config: ml_collections.ConfigDict) -> nn.Module:
    num_classes = len(schema.get_label_space(config.data.label_space))
    return Classifier(backbone=self.backbone(config), num_classes=num_classes)

  def stages(self, config: ml_collections.ConfigDict) -> list[Stage]:
    if config.loss not in LOSSES:
      raise ValueError(f"unknown config.loss {config.loss!r}; known: {list(LOSSES)}")
    return [Stage(name="train", loss=functools.partial(classification_loss, config.loss),
                  steps=config.train_steps, optimizer=config.optimizer,
                  eval_every=config.eval_every)]

  def predict(self, model: nn.Module, variables, batch: Batch) -> dict[str, jax.Array]:
    outputs = model.apply(variables, batch["image"], train=False)
    return {"probs": jax.nn.sigmoid(outputs["logits"]),
            "heatmaps": class_activation_maps(outputs["features"], variables["params"]["head"])}

  def cam_target(self, model: nn.Module, variables):
    head = variables["params"]["head"]
    features_fn = lambda images: model.apply(variables, images, train=False)["features"]
    head_fn = lambda f: jnp.mean(f.astype(jnp.float32), axis=(1, 2)) @ head["kernel"] + head["bias"]
    return features_fn, head_fn
