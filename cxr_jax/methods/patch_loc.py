"""Localization with limited box annotation on a patch grid (Li 2018; Rozenberg 2020).

Model (``cxr_jax.models.patch_head.PatchLocalizer``): pre-act ResNet (BlurPool
with ``config.model.blurpool``) -> P x P grid -> K patch logits l, p = sigmoid(l);
optional PAC-CRF (``cxr_jax.models.pac_crf``) -> z. Training uses all K
classes of the label space; only boxes of ``config.patch_loc.box_classes``
('boxed': the label space's boxed classes, NIH's 8; 'all') are annotations
(a^k = 1 for a class with a box in an image whose boxes are kept).

Losses (``config.patch_loc.loss``), per image summed over classes (Eq. 3),
averaged over the batch:
  li         Li et al. Eq. 1-3 (``losses.li_loss``), all in log space.
  rozenberg  Eq. 12 (``losses.rozenberg_loss``; ``form = 'sigmoid'``: Eq. 5 and 8)
             with per-class thresholds tau, rho, tau_hat, rho_hat.

Stages:
  li:        'network' (backbone + head).
  rozenberg, ``fixed_thresholds``: 'network' (backbone + head), the thresholds
             fixed hyperparameters (Sec. 3.2).
  rozenberg: alternation (Sec. 4, "Training Details"): 'network0', then
             ``alternations`` times ('thresholds<i>' = only the thresholds,
             network BatchNorm on running averages; 'network<i+1>' = only the
             network, thresholds frozen): two optimizers (param groups), one
             per kind of stage. ``alternations = 0`` trains both jointly in one
             stage 'joint' (the degenerate tau, tau_hat -> 0, rho -> 1 route).
  + 'crf' (``config.patch_loc.crf``): PAC-CRF and its guide branch only, the
             unary model and the thresholds frozen.

Evaluation (Rozenberg Table 1): the 'patch_grid' evaluator
(``cxr_jax.evaluation.patch_grid``, declared in ``config.evals``). ``predict``
gives 'heatmaps' = z [N,P,P,K] and image-level 'probs': 1 - prod_j (1 - z_j)
(Eq. 2, noisy-OR, log space) for 'li', the mean patch probability 1^T z / P^2
(the quantity Eq. 12 thresholds) for 'rozenberg'.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cxr_jax.data import schema
from cxr_jax.losses import (ROZENBERG_FORMS, annotation_weights, label_mask, li_loss, log_noisy_or,
                            positive_negative_ratio, rozenberg_loss)
from cxr_jax.train.stage import Batch, DataSpec, LossContext, Stage
from cxr_jax.models.backbones import backbone_from_config
from cxr_jax.models.patch_head import PatchLocalizer

LOSSES = ("li", "rozenberg")
FORMS = ROZENBERG_FORMS
BOX_CLASSES = ("boxed", "all")
NETWORK_PARAMS = ("backbone/.*", "head/.*")
CRF_PARAMS = ("crf/.*", "guide/.*")

# --------------------------------------------------------------------------- losses


def patch_loss(settings: ml_collections.ConfigDict, box_classes: np.ndarray, ctx: LossContext,
               params, batch: Batch, rng: jax.Array):
  """(batch-mean loss, aux) of ``settings.loss`` on the model's final logits (CRF output if on)."""
  del rng
  outputs, batch_stats = ctx.apply(params, batch["image"])
  logits, grid = outputs["logits"], batch["box_grid"].astype(jnp.float32)
  mask = label_mask(batch)
  labels = batch["labels"].astype(jnp.float32)
  annotated, unannotated = annotation_weights(grid, batch["has_boxes"], mask,
                                              jnp.asarray(box_classes, jnp.float32))
  if settings.loss == "li":
    per_image, parts = li_loss(logits, grid, labels, annotated, unannotated, settings.lambda_ann)
  else:
    gamma = (settings.gamma if settings.gamma > 0
             else positive_negative_ratio(labels, unannotated))
    per_image, parts = rozenberg_loss(jax.nn.sigmoid(logits), grid, labels, annotated,
                                      unannotated, outputs["thresholds"], settings.lambda_ann,
                                      gamma, settings.form)
  rows = (jnp.sum(mask, axis=1) > 0).astype(jnp.float32)
  count = jnp.maximum(jnp.sum(rows), 1.0)
  metrics = {f"loss_{k}": jnp.sum(v * rows) / count for k, v in parts.items()}
  if "thresholds" in outputs:
    metrics.update({f"{k}_mean": jnp.mean(v) for k, v in outputs["thresholds"].items()})
  return jnp.sum(per_image * rows) / count, {"metrics": metrics, "batch_stats": batch_stats}


# --------------------------------------------------------------------------- annotations


def boxed_classes(label_space: schema.LabelSpace, which: str) -> np.ndarray:
  """[K] {0,1}: the classes whose boxes are annotations ('boxed' or 'all')."""
  if which not in BOX_CLASSES:
    raise ValueError(f"unknown config.patch_loc.box_classes {which!r}; known: {list(BOX_CLASSES)}")
  out = np.zeros(len(label_space), np.float32)
  out[list(label_space.boxed_indices) if which == "boxed" else slice(None)] = 1.0
  return out


# --------------------------------------------------------------------------- the method


class PatchLoc:
  """Li 2018 / Rozenberg 2020 patch-grid localization (module docstring)."""
  name = "patch_loc"
  pretrained_prefixes = ("backbone",)  # config.model.init_from loads here

  def model(self, config: ml_collections.ConfigDict) -> nn.Module:
    c = config.patch_loc
    return PatchLocalizer(
        backbone=backbone_from_config(config.model),
        num_classes=len(schema.get_label_space(config.data.label_space)),
        grid_size=config.data.grid_size, feature_stage=c.feature_stage, head_hidden=c.head_hidden,
        with_thresholds=c.loss == "rozenberg",
        threshold_init=(c.tau, c.rho, c.tau_hat, c.rho_hat),
        crf_window=c.crf_window, crf_iterations=c.crf_iterations,
        guide_features=c.guide_features,
        image_score="noisy_or" if c.loss == "li" else "mean")

  def stages(self, config: ml_collections.ConfigDict) -> list[Stage]:
    c = config.patch_loc
    for key, value, known in (("loss", c.loss, LOSSES), ("form", c.form, FORMS)):
      if value not in known:
        raise ValueError(f"unknown config.patch_loc.{key} {value!r}; known: {list(known)}")
    label_space = schema.get_label_space(config.data.label_space)
    loss = functools.partial(patch_loss, c, boxed_classes(label_space, c.box_classes))
    data = DataSpec(split="train", maps=("box_grid",))
    stage = functools.partial(Stage, loss=loss, data=data, optimizer=config.optimizer)
    if c.loss == "li" or c.fixed_thresholds:
      stages = [stage(name="network", steps=config.train_steps, trainable=NETWORK_PARAMS)]
    elif c.alternations == 0:
      stages = [stage(name="joint", steps=config.train_steps)]
    else:
      steps = config.train_steps // (c.alternations + 1)
      if steps < 1:
        raise ValueError(f"config.train_steps={config.train_steps} is too few for "
                         f"{c.alternations + 1} network stages (config.patch_loc.alternations)")
      threshold_optimizer = ml_collections.ConfigDict(config.optimizer.to_dict())
      threshold_optimizer.update(learning_rate=c.threshold_lr, weight_decay=0.0,
                                 schedule="constant")
      stages = [stage(name="network0", steps=steps, trainable=NETWORK_PARAMS)]
      for i in range(c.alternations):
        stages += [stage(name=f"thresholds{i}", steps=c.threshold_steps,
                         trainable=("thresholds/.*",), optimizer=threshold_optimizer,
                         apply_kwargs={"train_unary": False}),
                   stage(name=f"network{i + 1}", steps=steps, trainable=NETWORK_PARAMS)]
    if c.crf:
      stages.append(stage(name="crf", steps=c.crf_steps, trainable=CRF_PARAMS,
                          apply_kwargs={"train_unary": False, "use_crf": True}))
    return stages

  def predict(self, model: nn.Module, variables, batch: Batch) -> dict[str, jax.Array]:
    use_crf = "crf" in variables["params"]
    logits = model.apply(variables, batch["image"], train=False, use_crf=use_crf)["logits"]
    z = jax.nn.sigmoid(logits.astype(jnp.float32))
    if model.image_score == "noisy_or":
      probs = jnp.exp(log_noisy_or(logits)[0])
    else:
      probs = jnp.mean(z, axis=(1, 2))
    return {"probs": probs, "heatmaps": z}
