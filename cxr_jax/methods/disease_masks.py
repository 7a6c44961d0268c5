"""Disease masks and alignment (Kim, Jung & Lee 2022), as stages of one method.

Model (``cxr_jax.models.disease_masks.DiseaseMaskModel``): aligner (ResNet-18
-> (s_x, s_y, t_x, t_y, theta), identity at init, ``cxr_jax.models.alignment``)
-> affine warp of the image -> classifier backbone (ResNet-50) -> CAM head
with disease-mask attention (``cxr_jax.models.dm_attention``: f' = psi f + f,
Eq. 4; CAMs from f', Eq. 5). Two params leaves no stage trains: 'anchor'
[H,W,C] (Sec. 3.2) and 'psi' [h,w,K] (Eq. 3); both are set by ``Stage.prepare``
passes and so live in checkpoints, ``predict`` and ``cam_target``.

Stages (``config.dm``):
  perceptual   (align, perceptual_steps > 0) classifier on raw images with
               weighted BCE: the CXR network whose features give the
               perceptual loss (or none, and ``model.init_from`` weights).
  align        prepare: anchor = mean of ``anchor_images`` random No-Finding
               training images. Trains the aligner only: Euclidean (Eq. 8)
               + perceptual (Eq. 7, conv2_x..conv5_x of the frozen
               classifier, BatchNorm on running averages) loss between the
               anchor and B(G(phi(I))); SGD, its own batch size.
  classify     classifier on aligned images, weighted BCE (Eq. 10); aligner
               frozen.
  dm_classify  prepare: psi by ``masks``: 'dm' (Eq. 1-3 from CAMs of the
               aligned training images), 'pdm' (pseudo-disease masks, Table 2),
               'none' (psi = 0: f' = f, the same budget without attention).
               Retrains the classifier with the attention.
Without alignment (``dm.align = False``, the 'base' row) the model has no
aligner and the stages are classify, dm_classify; with ``dm.equal_budget``
'classify' then runs ``perceptual_steps`` more steps, so the classifier trains
as long as in the aligned rows.

Reports (``cxr_jax.evaluation.dm_report``, declared in ``config.evals``): the
aligned examples (their Fig. 4) and the phantoms' pose residuals when 'align'
ends ('dm_alignment'); the masks psi (npz + PNG like their Fig. 3) when
'dm_classify' ends ('dm_masks').

Heat maps (``predict``, ``cam_target``): the attended CAMs S'_c of the
aligned image, upsampled to ``heatmap_size`` and warped back into the
ORIGINAL image frame with the inverse transform, so that boxes are scored
against the ground truth of the input image.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cxr_jax import losses
from cxr_jax.data import anatomy, schema
from cxr_jax.losses import label_mask
from cxr_jax.train.stage import Batch, Hooks, LossContext, PrepareContext, Stage, Validation
from cxr_jax.models import alignment, dm_attention
from cxr_jax.models.backbones import backbone_from_config, get_backbone
from cxr_jax.models.disease_masks import DiseaseMaskModel

MASKS = ("dm", "pdm", "none")
CLASSIFIER = "(backbone|head)/.*"
ALIGNER = "aligner/.*"


# --------------------------------------------------------------------------- losses


def classification_loss(ctx: LossContext, params, batch: Batch, rng: jax.Array, *, align: bool,
                        weighting: str = "per_class"):
  """Weighted BCE (Eq. 10; |P|, |N| counted by ``weighting``, config.loss_weighting) of the
  classifier on aligned (or raw) images."""
  del rng
  outputs, batch_stats = ctx.apply(params, batch["image"], align=align)
  loss = losses.weighted_bce(outputs["logits"], batch["labels"], label_mask(batch),
                             counts=weighting)
  return loss, {"metrics": {}, "batch_stats": batch_stats}


def alignment_loss(ctx: LossContext, params, batch: Batch, rng: jax.Array):
  """Eq. 9: L_e (Eq. 8) + L_p (Eq. 7) between the anchor and B(G(phi(I)))."""
  del rng
  out, batch_stats = ctx.apply(params, batch["image"], method="align_outputs")
  euclidean = alignment.euclidean_loss(out["anchor"], out["smoothed"])
  perceptual = alignment.perceptual_loss(out["anchor_features"], out["features"])
  return euclidean + perceptual, {"metrics": {"euclidean": euclidean, "perceptual": perceptual},
                                  "batch_stats": batch_stats}


def classify_steps(d: ml_collections.ConfigDict) -> int:
  """Steps of stage 'classify': ``classify_steps``, plus ``perceptual_steps`` without alignment
  when ``equal_budget`` (the aligned rows' 'perceptual' stage trains the same classifier)."""
  extra = d.perceptual_steps if d.equal_budget and not d.align else 0
  return d.classify_steps + extra


# --------------------------------------------------------------------------- host passes


def _with_leaf(params, name: str, value) -> Any:
  """``params`` with the top-level leaf ``name`` replaced (shape-checked)."""
  if np.shape(params[name]) != np.shape(value):
    raise ValueError(f"params[{name!r}] has shape {np.shape(params[name])}, new value "
                     f"{np.shape(value)}")
  return {**params, name: jnp.asarray(value, jnp.float32)}


@functools.partial(jax.jit, static_argnames="no_finding_only")
def _anchor_sum(total, count, images, labels, mask, valid, remaining, no_finding_only=True):
  """Adds up to ``remaining`` images (in batch order) to total [H,W,C]: those with no positive
  label, or any valid image when not ``no_finding_only``."""
  normal = valid > 0
  if no_finding_only:
    normal &= jnp.sum(labels * mask, axis=1) == 0
  take = normal & (jnp.cumsum(normal) <= remaining)
  weights = take.astype(jnp.float32)
  return total + jnp.einsum("n,nhwc->hwc", weights, images), count + jnp.sum(weights)


def compute_anchor(ctx: PrepareContext, num_images: int, labels: str = "no_finding") -> np.ndarray:
  """Mean of ``num_images`` random training images [H,W,C] (Sec. 3.2).

  labels: 'no_finding' (the paper: images without a positive label) or 'any'
    (datasets without No-Finding images, e.g. NIH's boxed subset).
  """
  if labels not in ("no_finding", "any"):
    raise ValueError(f"dm.anchor_labels={labels!r}; known: 'no_finding', 'any'")
  config = ctx.config
  iterator = ctx.make_iterator(config.data, "train", batch_size=config.eval_batch_size,
                               sharding=ctx.batch_sharding, seed=config.seed, shuffle=True,
                               num_epochs=1, drop_remainder=False, augment=False)
  h, w, c = config.data.image_size, config.data.image_size, config.data.channels
  total, count = jnp.zeros((h, w, c), jnp.float32), jnp.zeros((), jnp.float32)
  try:
    for batch in iterator:
      total, count = _anchor_sum(total, count, batch["image"], batch["labels"],
                                 batch["label_mask"], batch["valid"], num_images - count,
                                 no_finding_only=labels == "no_finding")
      if int(count) >= num_images:
        break
  finally:
    iterator.close()
  if int(count) == 0:
    raise ValueError("dm anchor: the 'train' split has no No-Finding image (all labels 0); "
                     "set --config.dm.anchor_labels=any to average images of any label")
  return np.asarray(total / count)


def mask_pass(ctx: PrepareContext, params, batch_stats, class_names: Sequence[str],
              min_prob: float, max_images: int) -> tuple[np.ndarray, np.ndarray]:
  """Eq. 1-3 sums over the aligned training images: (sum L-bar [h,w,K], count [K]).

  CAMs of the classifier without attention (psi = 0); ``max_images`` > 0 caps the pass.
  """
  config, model = ctx.config, ctx.model
  variables = {"params": {**params, "psi": jnp.zeros_like(params["psi"])},
               "batch_stats": batch_stats}
  symmetric = jnp.asarray(dm_attention.symmetric_classes(class_names))

  @jax.jit
  def step(variables, total, count, images, valid):
    out = model.apply(variables, images, train=False)
    t, c = dm_attention.mask_statistics(out["cams"], jax.nn.sigmoid(out["logits"]),
                                        valid > 0, symmetric, min_prob)
    return total + t, count + c

  k = len(class_names)
  total = jnp.zeros(tuple(params["psi"].shape[:2]) + (k,), jnp.float32)
  count = jnp.zeros((k,), jnp.float32)
  iterator = ctx.make_iterator(config.data, "train", batch_size=config.eval_batch_size,
                               sharding=ctx.batch_sharding, seed=config.seed, shuffle=True,
                               num_epochs=1, drop_remainder=False, augment=False)
  seen = 0
  try:
    for batch in iterator:
      total, count = step(variables, total, count, batch["image"], batch["valid"])
      seen += config.eval_batch_size
      if 0 < max_images <= seen:
        break
  finally:
    iterator.close()
  return np.asarray(total), np.asarray(count)


# --------------------------------------------------------------------------- the method


class DiseaseMasks:
  """Kim 2022: alignment module, weighted BCE, disease-mask spatial attention."""
  name = "disease_masks"
  pretrained_prefixes = ("backbone",)

  def model(self, config: ml_collections.ConfigDict) -> DiseaseMaskModel:
    d, size, channels = config.dm, config.data.image_size, config.data.channels
    backbone = backbone_from_config(config.model)
    probe = jnp.zeros((1, size, size, channels), jnp.float32)
    shape = jax.eval_shape(lambda x: backbone.init_with_output(jax.random.key(0), x)[0], probe)
    grid = (int(shape.shape[1]), int(shape.shape[2]))
    aligner = None
    if d.align:
      aligner = alignment.Aligner(get_backbone(d.aligner_backbone, width=d.aligner_width,
                                               dtype=jnp.dtype(config.model.dtype)))
    return DiseaseMaskModel(
        backbone=backbone, aligner=aligner,
        num_classes=len(schema.get_label_space(config.data.label_space)),
        image_shape=(size, size, channels), feature_grid=grid,
        heatmap_size=min(size, d.heatmap_factor * grid[0]), grid_cell=d.grid_cell or size // 32)

  def stages(self, config: ml_collections.ConfigDict) -> list[Stage]:
    d = config.dm
    if d.masks not in MASKS:
      raise ValueError(f"unknown config.dm.masks {d.masks!r}; known: {list(MASKS)}")
    classify = lambda align: functools.partial(classification_loss, align=align,
                                               weighting=config.loss_weighting)
    stages = []
    if d.align:
      if d.perceptual_steps:
        stages.append(Stage(name="perceptual", loss=classify(False), steps=d.perceptual_steps,
                            optimizer=config.optimizer, trainable=(CLASSIFIER,),
                            apply_kwargs={"align": False}))
      stages.append(Stage(name="align", loss=alignment_loss, steps=d.align_steps,
                          optimizer=d.align_optimizer, trainable=(ALIGNER,),
                          batch_size=d.align_batch_size,
                          hooks=Hooks(prepare=functools.partial(self.prepare_anchor, d))))
    stages.append(Stage(name="classify", loss=classify(True), steps=classify_steps(d),
                        optimizer=config.optimizer, trainable=(CLASSIFIER,)))
    stages.append(Stage(name="dm_classify", loss=classify(True), steps=d.dm_steps,
                        optimizer=config.optimizer, trainable=(CLASSIFIER,),
                        validation=Validation(every=config.eval_every),
                        hooks=Hooks(prepare=functools.partial(self.prepare_masks, d))))
    return stages

  # -- Stage.prepare passes ------------------------------------------------------------

  def prepare_anchor(self, d, ctx: PrepareContext):
    """Before 'align': params['anchor'] = mean of ``d.anchor_images`` No-Finding images."""
    anchor = compute_anchor(ctx, d.anchor_images, d.anchor_labels)
    return _with_leaf(ctx.params, "anchor", anchor), ctx.extras

  def prepare_masks(self, d, ctx: PrepareContext):
    """Before 'dm_classify': params['psi'] from ``d.masks`` (see the module docstring)."""
    config, params = ctx.config, ctx.params
    class_names = schema.get_label_space(config.data.label_space).classes
    grid = tuple(params["psi"].shape[:2])
    if d.masks == "none":
      psi = np.zeros(params["psi"].shape, np.float32)
    elif d.masks == "pdm":
      side = grid[0] * max(1, 64 // grid[0])
      regions = anatomy.anatomy_regions(config.data, side)
      if regions is None:   # no known anatomy: the drawn NIH template
        regions = dm_attention.drawn_regions(side)
      psi = dm_attention.pseudo_disease_masks(regions, class_names, grid)
    else:
      total, counts = mask_pass(ctx, params, ctx.batch_stats, class_names, d.min_prob,
                                d.mask_images)
      psi = dm_attention.finalize_masks(total, counts, d.threshold)
    return _with_leaf(params, "psi", psi), ctx.extras

  # -- inference ------------------------------------------------------------------------

  def predict(self, model: DiseaseMaskModel, variables, batch: Batch) -> dict[str, jax.Array]:
    """'probs' [N,K]; 'heatmaps' [N,S,S,K]: Eq. 5 CAMs in the original image frame."""
    logits, maps = model.apply(variables, batch["image"], method="original_frame_cams")
    return {"probs": jax.nn.sigmoid(logits), "heatmaps": maps}

  def cam_target(self, model: DiseaseMaskModel, variables):
    """features_fn: images -> the original-frame attended CAMs [N,S,S,K] (no bias);
    head_fn: their spatial mean + bias.

    Grad-CAM of this pair for class c is ReLU of channel c (the gradient of
    logit c is 1/S^2 on channel c and 0 elsewhere): the inverse-warped Eq. 5
    CAM. head_fn(features_fn(x)) is the model's logit where the aligned
    image covers the whole original frame (exactly so at the identity).
    """
    bias = variables["params"]["head"]["bias"]
    features_fn = lambda images: model.apply(variables, images, method="original_frame_cams")[1]
    head_fn = lambda maps: jnp.mean(maps.astype(jnp.float32), axis=(1, 2)) + bias
    return features_fn, head_fn
