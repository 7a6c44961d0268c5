"""Disease masks and alignment (Kim, Jung & Lee 2022), as stages of one method.

Model (``DiseaseMaskModel``): aligner (ResNet-18 -> (s_x, s_y, t_x, t_y,
theta), identity at init, ``cxr_jax.models.alignment``) -> affine warp of the
image -> classifier backbone (ResNet-50) -> CAM head with disease-mask
attention (``cxr_jax.models.dm_attention``: f' = psi f + f, Eq. 4; CAMs from
f', Eq. 5). Two params leaves no stage trains: 'anchor' [H,W,C] (Sec. 3.2)
and 'psi' [h,w,K] (Eq. 3); both are set by ``Stage.prepare`` passes and so
live in checkpoints, ``predict`` and ``cam_target``.

Stages (``config.dm``):
  perceptual   (align, perceptual_steps > 0) classifier on raw images with
               weighted BCE: the CXR network whose features give the
               perceptual loss (or none, and ``model.init_from`` weights).
  align        prepare: anchor = mean of ``anchor_images`` random No-Finding
               training images. Trains the aligner only: Euclidean (Eq. 8)
               + perceptual (Eq. 7, conv2_x..conv5_x of the frozen
               classifier, BatchNorm on running averages) loss between the
               anchor and B(G(phi(I))); SGD, its own batch size.
  classify     prepare: aligned examples (their Fig. 4) and, on the
               phantoms, the pose residuals (WORKDIR/alignment/). Classifier
               on aligned images, weighted BCE (Eq. 10); aligner frozen.
  dm_classify  prepare: psi by ``masks``: 'dm' (Eq. 1-3 from CAMs of the
               aligned training images, WORKDIR/disease_masks/ npz + PNG like
               their Fig. 3), 'pdm' (pseudo-disease masks, Table 2), 'none'
               (psi = 0: f' = f, the same budget without attention). Retrains
               the classifier with the attention.
Without alignment (``dm.align = False``, the 'base' row) the model has no
aligner and the stages are classify, dm_classify.

Heat maps (``predict``, ``cam_target``): the attended CAMs S'_c of the
aligned image, upsampled to ``heatmap_size`` and warped back into the
ORIGINAL image frame with the inverse transform, so that boxes are scored
against the ground truth of the input image.
"""

from __future__ import annotations

import functools
import io
import json
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from matplotlib.figure import Figure
from matplotlib.backends.backend_agg import FigureCanvasAgg

from cxr_jax import losses
from cxr_jax.data import schema
from cxr_jax.evaluation.report import write_bytes_atomic
from cxr_jax.methods.base import Batch, LossContext, PrepareContext, Stage
from cxr_jax.methods.baseline import label_mask
from cxr_jax.models import alignment, dm_attention
from cxr_jax.models.backbones import backbone_from_config, get_backbone

MASKS = ("dm", "pdm", "none")
CLASSIFIER = "(backbone|head)/.*"
ALIGNER = "aligner/.*"


class DiseaseMaskModel(nn.Module):
  """Aligner (optional) + classifier backbone + attention CAM head; params 'anchor', 'psi'.

  image_shape (H, W, C); feature_grid (h, w) of the backbone's last map;
  heatmap_size: side of the original-frame heat maps; grid_cell: B(G(.)) cell.
  """
  backbone: nn.Module
  aligner: nn.Module | None
  num_classes: int
  image_shape: tuple[int, int, int]
  feature_grid: tuple[int, int]
  heatmap_size: int
  grid_cell: int

  def setup(self):
    self.head = dm_attention.AttentionHead(self.num_classes)
    self.anchor = self.param("anchor", nn.initializers.zeros, self.image_shape)
    self.psi = self.param("psi", nn.initializers.zeros, self.feature_grid + (self.num_classes,))

  def matrices(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Eq. 6 matrices [N,2,3] of the images [N,H,W,C] (identity without an aligner)."""
    if self.aligner is None:
      return jnp.broadcast_to(alignment.affine_matrix(jnp.asarray(alignment.IDENTITY)),
                              (x.shape[0], 2, 3))
    return alignment.affine_matrix(self.aligner(x, train=train))

  def __call__(self, x: jax.Array, train: bool = False, align: bool = True,
               train_aligner: bool = False, train_backbone: bool = True) -> dict[str, jax.Array]:
    """{'logits' [N,K], 'cams' S'_c [N,h,w,K] (aligned frame), 'matrices' [N,2,3], 'aligned'}.

    align=False classifies the raw image (the 'perceptual' stage); the
    aligner's (and a frozen backbone's) BatchNorm runs on running averages
    unless ``train_aligner`` (``train_backbone``).
    """
    matrices = self.matrices(x, train=train and train_aligner)
    aligned = alignment.warp_affine(x, matrices) if align and self.aligner is not None else x
    features = self.backbone(aligned, train=train and train_backbone)
    logits, cams = self.head(features, self.psi)
    return {"logits": logits, "cams": cams, "matrices": matrices, "aligned": aligned}

  def align_outputs(self, x: jax.Array, train: bool = False) -> dict[str, Any]:
    """What the alignment loss compares: B(G(phi(I))) and the anchor, and their features.

    {'smoothed' [N,H,W,C], 'anchor' [H,W,C], 'features' / 'anchor_features':
    {conv2_x..conv5_x}} from the classifier backbone on running averages.
    """
    smoothed = alignment.grid_blur(alignment.warp_affine(x, self.matrices(x, train=train)),
                                   self.grid_cell)
    anchor = jax.lax.stop_gradient(self.anchor)
    return {"smoothed": smoothed, "anchor": anchor,
            "features": self.backbone(smoothed, train=False, return_stages=True),
            "anchor_features": self.backbone(anchor[None], train=False, return_stages=True)}

  def original_frame_cams(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(logits [N,K], heat maps [N,S,S,K]): S'_c in the ORIGINAL image frame, S = heatmap_size.

    The CAMs live on the aligned image; upsampled (bilinear) and warped back
    with M^-1 (original(X) = aligned(M^-1 X)), where the aligned image does
    not reach the map takes each map's minimum.
    """
    out = self(x)
    cams = out["cams"]
    n, _, _, k = cams.shape
    size = self.heatmap_size
    maps = jax.image.resize(cams, (n, size, size, k), "bilinear")
    if self.aligner is None:
      return out["logits"], maps
    low = jnp.min(maps, axis=(1, 2), keepdims=True)
    back = alignment.warp_affine(maps - low, alignment.invert_affine(out["matrices"]),
                                 mode="constant", cval=0.0)
    return out["logits"], back + low


# --------------------------------------------------------------------------- losses


def classification_loss(ctx: LossContext, params, batch: Batch, rng: jax.Array, *, align: bool):
  """Weighted BCE (Eq. 10) of the classifier on aligned (or raw) images."""
  del rng
  outputs, batch_stats = ctx.apply(params, batch["image"], align=align)
  loss = losses.weighted_bce(outputs["logits"], batch["labels"], label_mask(batch))
  return loss, {"metrics": {}, "batch_stats": batch_stats}


def alignment_loss(ctx: LossContext, params, batch: Batch, rng: jax.Array):
  """Eq. 9: L_e (Eq. 8) + L_p (Eq. 7) between the anchor and B(G(phi(I)))."""
  del rng
  out, batch_stats = ctx.apply(params, batch["image"], method="align_outputs")
  euclidean = alignment.euclidean_loss(out["anchor"], out["smoothed"])
  perceptual = alignment.perceptual_loss(out["anchor_features"], out["features"])
  return euclidean + perceptual, {"metrics": {"euclidean": euclidean, "perceptual": perceptual},
                                  "batch_stats": batch_stats}


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


def _png(fig: Figure) -> bytes:
  buffer = io.BytesIO()
  FigureCanvasAgg(fig).print_png(buffer)
  return buffer.getvalue()


def _gray(image: np.ndarray) -> np.ndarray:
  """[H,W,C] -> [H,W] for display (channel mean)."""
  return np.asarray(image).mean(-1)


def write_mask_panel(path: str, psi: np.ndarray, anchor: np.ndarray,
                     class_names: Sequence[str], title: str) -> None:
  """PNG like Kim's Fig. 3: each class's mask (upsampled) over the anchor image."""
  k = psi.shape[-1]
  cols = min(k, 7)
  rows = -(-k // cols)
  fig = Figure(figsize=(2.2 * cols, 2.4 * rows), dpi=100, layout="constrained")
  fig.suptitle(title)
  axes = fig.subplots(rows, cols, squeeze=False).ravel()
  size = anchor.shape[:2]
  for c, ax in enumerate(axes):
    ax.set_axis_off()
    if c >= k:
      continue
    up = np.asarray(jax.image.resize(jnp.asarray(psi[..., c]), size, "bilinear"))
    ax.imshow(_gray(anchor), cmap="gray")
    ax.imshow(up, cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
    ax.set_title(class_names[c], fontsize=8)
  write_bytes_atomic(path, _png(fig))


def write_aligned_examples(path: str, images: np.ndarray, aligned: np.ndarray,
                           anchor: np.ndarray) -> None:
  """PNG like Kim's Fig. 4: original images (top), aligned (bottom), the anchor on the right."""
  n = len(images)
  fig = Figure(figsize=(1.8 * (n + 1), 3.8), dpi=100, layout="constrained")
  axes = fig.subplots(2, n + 1, squeeze=False)
  for i in range(n):
    axes[0, i].imshow(_gray(images[i]), cmap="gray")
    axes[1, i].imshow(_gray(aligned[i]), cmap="gray")
  axes[0, n].imshow(_gray(anchor), cmap="gray")
  axes[0, n].set_title("anchor", fontsize=8)
  axes[0, 0].set_title("original", fontsize=8, loc="left")
  axes[1, 0].set_title("aligned", fontsize=8, loc="left")
  for ax in axes.ravel():
    ax.set_axis_off()
  write_bytes_atomic(path, _png(fig))


def pose_report(ctx: PrepareContext, params, batch_stats, split: str,
                max_images: int) -> dict[str, Any]:
  """Synthetic phantoms: residual pose (``alignment.residual_pose``) before / after alignment.

  Over up to ``max_images`` images of ``split`` (no augmentation): 'before'
  compares the identity with each phantom's known pose (``sample_pose``),
  'after' the aligner's transform. Per quantity: mean |.|, and the spread
  around the mean (std of rotation / log scale; mean distance of the shift
  vectors to their mean), which a constant offset of the anchor frame does
  not change.
  """
  from cxr_jax.data import pipeline   # pylint: disable=import-outside-toplevel
  from cxr_jax.data.sources import synthetic   # pylint: disable=import-outside-toplevel
  config, model = ctx.config, ctx.model
  source = pipeline.make_source(config.data, split)
  matrices_fn = jax.jit(lambda v, x: model.apply(v, x, method="matrices"))
  variables = {"params": params, "batch_stats": batch_stats}
  iterator = ctx.make_iterator(config.data, split, batch_size=config.eval_batch_size,
                               sharding=ctx.batch_sharding, seed=config.seed, shuffle=False,
                               num_epochs=1, drop_remainder=False, augment=False, source=source)
  predicted, poses = [], []
  try:
    for batch in iterator:
      m = np.asarray(matrices_fn(variables, batch["image"]))
      valid, index = np.asarray(batch["valid"]) > 0, np.asarray(batch["index"])
      for row in np.flatnonzero(valid):
        global_index = source.source.offset + int(source.indices[index[row]])
        poses.append(synthetic.sample_pose(config.data.synthetic.seed, global_index).matrix())
        predicted.append(m[row])
      if len(predicted) >= max_images:
        break
  finally:
    iterator.close()
  poses, predicted = np.stack(poses[:max_images]), np.stack(predicted[:max_images])
  identity = np.broadcast_to(np.array([[1.0, 0, 0], [0, 1.0, 0]]), poses.shape)
  return {"split": split, "num_images": len(poses),
          "before": _pose_summary(alignment.residual_pose(poses, identity)),
          "after": _pose_summary(alignment.residual_pose(poses, predicted))}


def _pose_summary(residual: dict[str, np.ndarray]) -> dict[str, float]:
  shift = residual["shift_xy"]
  return {"rotation_deg_mean_abs": float(np.mean(np.abs(residual["rotation_deg"]))),
          "rotation_deg_std": float(np.std(residual["rotation_deg"])),
          "scale_log_std": float(np.std(np.log(residual["scale"]))),
          "shift_mean": float(np.mean(np.linalg.norm(shift, axis=-1))),
          "shift_spread": float(np.mean(np.linalg.norm(shift - shift.mean(0), axis=-1)))}


def _write_json(path: str, payload) -> None:
  write_bytes_atomic(path, json.dumps(payload, indent=2, sort_keys=True).encode())


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
    classify = lambda align: functools.partial(classification_loss, align=align)
    stages = []
    if d.align:
      if d.perceptual_steps:
        stages.append(Stage(name="perceptual", loss=classify(False), steps=d.perceptual_steps,
                            optimizer=config.optimizer, trainable=(CLASSIFIER,),
                            apply_kwargs={"align": False}))
      stages.append(Stage(name="align", loss=alignment_loss, steps=d.align_steps,
                          optimizer=d.align_optimizer, trainable=(ALIGNER,),
                          batch_size=d.align_batch_size,
                          prepare=functools.partial(self.prepare_anchor, d)))
    stages.append(Stage(name="classify", loss=classify(True), steps=d.classify_steps,
                        optimizer=config.optimizer, trainable=(CLASSIFIER,),
                        prepare=functools.partial(self.report_alignment, d) if d.align else None))
    stages.append(Stage(name="dm_classify", loss=classify(True), steps=d.dm_steps,
                        optimizer=config.optimizer, trainable=(CLASSIFIER,),
                        eval_every=config.eval_every,
                        prepare=functools.partial(self.prepare_masks, d)))
    return stages

  # -- Stage.prepare passes ------------------------------------------------------------

  def prepare_anchor(self, d, ctx: PrepareContext):
    """Before 'align': params['anchor'] = mean of ``d.anchor_images`` No-Finding images."""
    anchor = compute_anchor(ctx, d.anchor_images, d.anchor_labels)
    return _with_leaf(ctx.params, "anchor", anchor), ctx.extras

  def report_alignment(self, d, ctx: PrepareContext):
    """Before 'classify' (the aligner is final): WORKDIR/alignment/examples.png (Fig. 4) and,
    on the phantoms, pose.json (``pose_report``)."""
    config = ctx.config
    variables = {"params": ctx.params, "batch_stats": ctx.batch_stats}
    iterator = ctx.make_iterator(config.data, "val", batch_size=config.eval_batch_size,
                                 sharding=ctx.batch_sharding, seed=config.seed, shuffle=False,
                                 num_epochs=1, drop_remainder=False, augment=False)
    try:
      images = next(iter(iterator))["image"]
    finally:
      iterator.close()
    aligned = jax.jit(lambda v, x: ctx.model.apply(v, x)["aligned"])(variables, images)
    report = None
    if config.data.name == "synthetic" and d.pose_images:
      report = pose_report(ctx, ctx.params, ctx.batch_stats, "val", d.pose_images)
    if jax.process_index() == 0:
      folder = os.path.join(ctx.workdir, "alignment")
      count = min(8, images.shape[0])
      write_aligned_examples(os.path.join(folder, "examples.png"),
                             np.asarray(images[:count]), np.asarray(aligned[:count]),
                             np.asarray(ctx.params["anchor"]))
      if report is not None:
        _write_json(os.path.join(folder, "pose.json"), report)
    return ctx.params, ctx.extras

  def prepare_masks(self, d, ctx: PrepareContext):
    """Before 'dm_classify': params['psi'] from ``d.masks`` (see the module docstring)."""
    config, params = ctx.config, ctx.params
    class_names = schema.get_label_space(config.data.label_space).classes
    grid = tuple(params["psi"].shape[:2])
    counts = None
    if d.masks == "none":
      psi = np.zeros(params["psi"].shape, np.float32)
    elif d.masks == "pdm":
      side = grid[0] * max(1, 64 // grid[0])
      if config.data.name == "synthetic":
        from cxr_jax.data.sources import synthetic   # pylint: disable=import-outside-toplevel
        regions = synthetic.anatomy_regions(side)
      else:
        regions = dm_attention.drawn_regions(side)
      psi = dm_attention.pseudo_disease_masks(regions, class_names, grid)
    else:
      total, counts = mask_pass(ctx, params, ctx.batch_stats, class_names, d.min_prob,
                                d.mask_images)
      psi = dm_attention.finalize_masks(total, counts, d.threshold)
    if jax.process_index() == 0 and d.masks != "none":
      folder = os.path.join(ctx.workdir, "disease_masks")
      buffer = io.BytesIO()
      arrays = {"psi": psi, "class_names": np.array(class_names)}
      if counts is not None:
        arrays["counts"] = counts
      np.savez(buffer, **arrays)
      write_bytes_atomic(os.path.join(folder, f"{d.masks}.npz"), buffer.getvalue())
      write_mask_panel(os.path.join(folder, f"{d.masks}.png"), psi, np.asarray(params["anchor"]),
                       class_names,
                       "disease masks (Eq. 3)" if d.masks == "dm" else "pseudo-disease masks")
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
