"""Plain multi-label classifier: backbone + global average pooling + linear head.

The smallest ``Method``: one stage, every parameter trainable, weighted BCE
(Wang 2017 / Kim 2022 Eq. 10) or BCE, CAM heat maps (Zhou 2016) for
localization.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import ml_collections

from cxr_jax import losses
from cxr_jax.data import schema
from cxr_jax.losses import label_mask
from cxr_jax.train.stage import Batch, LossContext, Stage, Validation
from cxr_jax.models.backbones import backbone_from_config
from cxr_jax.models.classifier import Classifier, class_activation_maps, linear_head_fn

LOSSES = ("weighted_bce", "bce")


def classification_loss(kind: str, ctx: LossContext, params, batch: Batch, rng: jax.Array, *,
                        weighting: str = "per_class"):
  """(loss, aux) of the Classifier on ``batch`` with ``losses.<kind>`` (weighted_bce counting
  |P|, |N| by ``weighting``, config.loss_weighting)."""
  del rng
  outputs, batch_stats = ctx.apply(params, batch["image"])
  logits = outputs["logits"]
  if kind == "weighted_bce":
    loss = losses.weighted_bce(logits, batch["labels"], label_mask(batch), counts=weighting)
  else:
    loss = losses.bce(logits, batch["labels"], label_mask(batch))
  return loss, {"metrics": {}, "batch_stats": batch_stats}


class Baseline:
  """Backbone (config.model) + GAP + Dense(K) 'head', one stage 'train'."""
  name = "baseline"
  pretrained_prefixes = ("backbone",)  # config.model.init_from loads here

  def backbone(self, config: ml_collections.ConfigDict) -> nn.Module:
    """The image backbone (config.model); subclasses may swap it."""
    return backbone_from_config(config.model)

  def model(self, config: ml_collections.ConfigDict) -> nn.Module:
    num_classes = len(schema.get_label_space(config.data.label_space))
    return Classifier(backbone=self.backbone(config), num_classes=num_classes)

  def stages(self, config: ml_collections.ConfigDict) -> list[Stage]:
    if config.loss not in LOSSES:
      raise ValueError(f"unknown config.loss {config.loss!r}; known: {list(LOSSES)}")
    return [Stage(name="train", loss=functools.partial(classification_loss, config.loss,
                                                       weighting=config.loss_weighting),
                  steps=config.train_steps, optimizer=config.optimizer,
                  validation=Validation(every=config.eval_every))]

  def predict(self, model: nn.Module, variables, batch: Batch) -> dict[str, jax.Array]:
    outputs = model.apply(variables, batch["image"], train=False)
    return {"probs": jax.nn.sigmoid(outputs["logits"]),
            "heatmaps": class_activation_maps(outputs["features"], variables["params"]["head"])}

  def cam_target(self, model: nn.Module, variables):
    features_fn = lambda images: model.apply(variables, images, train=False)["features"]
    return features_fn, linear_head_fn(variables["params"]["head"])
