"""Probabilistic integration of object-level annotations (van Sonsbeek et al. 2023).

Model: ``cxr_jax.models.vkd.VKDModel`` (posterior q(z|x) via CH1 -> CH2,
classifier p(y|z,x), prior p(z|c) from a second encoder of the annotation map).

Loss (Eq. 3 / 4): BCE(y, p(y|z,x)) averaged over ``vkd.train_samples``
reparameterised samples of z, plus beta * KL(q(z|x) || prior), the KL in
closed form (``losses.gaussian_kl``; with ``vkd.spatial_latent`` the mean of
the per-cell KLs), averaged over the batch; beta is
``vkd.beta`` in stage 1 (Eq. 3) and ``vkd.stage2.beta`` in stage 2 (Eq. 4).

Stages (Sec. 3.3):
  'base'   on split 'train' (all images, labels only), prior N(0, I), encoder,
           CH1, CH2 and classifier trained (the prior network is unused).
  'prior'  on split ``vkd.stage2.split`` ('annotated_train') of
           ``vkd.stage2.dataset`` ('' = ``data.name``; MIMIC: 'reflacx' or
           'egd') with the annotation map c of ``vkd.annotation``, prior
           p(z|c) (its encoder reads c at ``vkd.prior_scale`` of the image
           side, ``models.vkd.prior_input_size``); the parts ``vkd.release``
           names are trained, the rest frozen (a frozen encoder runs BatchNorm
           on its running averages).
           ``RELEASES`` holds Table 4's four rows. ``vkd.stage2.steps = 0``
           leaves this stage out: the run is the stage-1 model alone (Table 1's
           'Base model' rows).
Both evaluate on 'val' every ``eval_every`` steps, stop early after
``vkd.patience`` evaluations without a 1 % improvement of the mean AUROC, and
end with their best params (WORKDIR/best/<stage>).

Inference uses the posterior mean z = mu (no sampling). The Grad-CAM shift
between the stages (Eq. 5) is the 'vkd_cam_shift' evaluator
(``cxr_jax.evaluation.cam_shift``, declared in ``config.evals``), which also
holds the annotation kinds (``ANNOTATIONS``) and the stage-2 data config.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from cxr_jax import losses
from cxr_jax.data import schema
from cxr_jax.evaluation.cam_shift import ANNOTATIONS, annotation_map, stage2_overrides
from cxr_jax.losses import label_mask
from cxr_jax.train.stage import Batch, DataSpec, EarlyStopping, LossContext, Stage, Validation
from cxr_jax.models.backbones import backbone_from_config
from cxr_jax.models.vkd import VKDModel

# Model parts by param-path regexes. The classifier p(y|z,x) sits at the end of
# the second classifier head, so it is released / frozen together with CH2.
PARTS = {
    "encoder": ("encoder/.*",),
    "ch1": ("ch1/.*",),
    "ch2": ("ch2/.*", "classifier/.*"),
    "prior": ("prior_encoder/.*", "prior_head/.*"),
}
# Table 4: parts released in stage 2 (the rows as printed, top to bottom).
# The prior network only exists in stage 2's objective, so it is always trained.
RELEASES = {
    "ch1_prior": ("ch1", "prior"),                       # encoder x, CH1 v, CH2 x
    "ch1_ch2_prior": ("ch1", "ch2", "prior"),            # encoder x, CH1 v, CH2 v
    "all": ("encoder", "ch1", "ch2", "prior"),           # encoder v, CH1 v, CH2 v
    "ch2_prior": ("ch2", "prior"),                       # encoder x, CH1 x, CH2 v (best)
}


def trainable_regexes(parts) -> tuple[str, ...]:
  return tuple(r for part in parts for r in PARTS[part])


def vkd_loss(beta: float, num_samples: int, maps: tuple[str, ...], ctx: LossContext, params,
             batch: Batch, rng: jax.Array):
  """Eq. 3 (``maps`` empty: prior N(0, I)) or Eq. 4 (prior p(z|c), c from ``maps``).

  loss = mean_s BCE(y, sigmoid(logits(z_s))) + beta * mean_n KL(q(z|x_n) || p_n).
  Padding rows (valid = 0) are masked out of both terms.
  """
  c = annotation_map(batch, maps) if maps else None
  sample_rng, dropout_rng = jax.random.split(rng)
  outputs, batch_stats = ctx.apply(params, batch["image"], c, num_samples=num_samples,
                                   rngs={"sample": sample_rng, "dropout": dropout_rng})
  logits = outputs["sample_logits"]                                  # [S,N,K]
  mask = label_mask(batch)
  tile = lambda a: jnp.broadcast_to(a, logits.shape).reshape(-1, logits.shape[-1])
  bce = losses.bce(logits.reshape(-1, logits.shape[-1]), tile(batch["labels"]), tile(mask))
  if c is None:
    prior_mu = prior_logvar = jnp.zeros_like(outputs["mu"])
  else:
    prior_mu, prior_logvar = outputs["prior_mu"], outputs["prior_logvar"]
  kl = losses.gaussian_kl(outputs["mu"], outputs["logvar"], prior_mu, prior_logvar)  # [N](,h,w)
  kl = jnp.mean(kl, axis=tuple(range(1, kl.ndim)))    # spatial z: the mean over the cells
  valid = batch.get("valid", jnp.ones_like(kl)).astype(jnp.float32)
  kl = jnp.sum(kl * valid) / jnp.maximum(jnp.sum(valid), 1.0)
  return bce + beta * kl, {"metrics": {"bce": bce, "kl": kl}, "batch_stats": batch_stats}


class VKD:
  """Two-stage variational classifier with an annotation-conditioned prior."""
  name = "vkd"
  # config.model.init_from: both the image and the annotation encoder start from
  # the same ImageNet weights (Sec. 4.2).
  pretrained_prefixes = ("encoder", "prior_encoder")

  def backbone(self, config: ml_collections.ConfigDict) -> nn.Module:
    """The image backbone (config.model); subclasses may swap it."""
    return backbone_from_config(config.model)

  def model(self, config: ml_collections.ConfigDict) -> nn.Module:
    v = config.vkd
    return VKDModel(encoder=self.backbone(config), prior_encoder=self.backbone(config),
                    num_classes=len(schema.get_label_space(config.data.label_space)),
                    latent_dim=v.latent_dim, hidden=v.hidden, concat_feature=v.concat_feature,
                    image_channels=config.data.channels, prior_scale=v.prior_scale,
                    spatial_latent=v.spatial_latent)

  def stages(self, config: ml_collections.ConfigDict) -> list[Stage]:
    v = config.vkd
    if v.release not in RELEASES:
      raise ValueError(f"unknown config.vkd.release {v.release!r}; known: {list(RELEASES)}")
    if v.annotation not in ANNOTATIONS:
      raise ValueError(f"unknown config.vkd.annotation {v.annotation!r}; known: {list(ANNOTATIONS)}")
    if v.train_samples < 1:
      raise ValueError(f"config.vkd.train_samples must be >= 1, got {v.train_samples}")
    stop = EarlyStopping(tolerance=0.01, patience=v.patience)
    released = RELEASES[v.release]
    maps = ANNOTATIONS[v.annotation]
    base = Stage(
        name="base", loss=functools.partial(vkd_loss, v.beta, v.train_samples, ()),
        steps=config.train_steps, optimizer=config.optimizer,
        trainable=trainable_regexes(("encoder", "ch1", "ch2")),
        data=DataSpec(split="train"),
        validation=Validation(every=config.eval_every, early_stopping=stop))
    prior = Stage(
        name="prior", loss=functools.partial(vkd_loss, v.stage2.beta, v.train_samples, maps),
        steps=v.stage2.steps, optimizer=v.stage2.optimizer,
        trainable=trainable_regexes(released),
        data=DataSpec(split=v.stage2.split, maps=maps, overrides=stage2_overrides(config)),
        apply_kwargs={"train_encoder": "encoder" in released},
        validation=Validation(every=v.stage2.eval_every, early_stopping=stop),
        batch_size=v.stage2.batch_size)
    return [base, prior] if v.stage2.steps else [base]

  def predict(self, model: nn.Module, variables, batch: Batch) -> dict[str, jax.Array]:
    """Probabilities at the posterior mean z = mu."""
    return {"probs": jax.nn.sigmoid(model.apply(variables, batch["image"])["logits"])}

  def cam_target(self, model: nn.Module, variables):
    features_fn = lambda images: model.apply(variables, images, method=VKDModel.encode)
    head_fn = lambda features: model.apply(variables, features, method=VKDModel.head)
    return features_fn, head_fn
