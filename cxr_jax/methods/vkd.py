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
           ``RELEASES`` holds Table 4's four rows.
Both evaluate on 'val' every ``eval_every`` steps, stop early after
``vkd.patience`` evaluations without a 1 % improvement of the mean AUROC, and
end with their best params (WORKDIR/best/<stage>).

Inference uses the posterior mean z = mu (no sampling). After training
(``VKD.after_training``, run by the trainer), ``cam_shift_report`` compares
Grad-CAMs of the stage-1 and stage-2 params against the annotation maps of
annotated test images of the stage-2 dataset (Eq. 5) and writes
WORKDIR/eval/vkd_cam.json.
"""

from __future__ import annotations

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from cxr_jax import cam, losses
from cxr_jax.data import pipeline, schema
from cxr_jax.methods.base import Batch, DataSpec, EarlyStopping, LossContext, Stage
from cxr_jax.methods.baseline import label_mask
from cxr_jax.models.backbones import backbone_from_config
from cxr_jax.models.vkd import VKDModel
from cxr_jax.train import parallel
from cxr_jax.train.checkpoint import RunCheckpoints

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
# Table 1 annotation kinds -> the pipeline maps stage 2 reads. With both, c is
# their pixelwise maximum (the union of the two pseudo-segmentations, in [0,1]).
ANNOTATIONS = {
    "gaze": ("gaze_map",),
    "boxes": ("box_map",),
    "gaze+boxes": ("gaze_map", "box_map"),
}


def stage2_overrides(config: ml_collections.ConfigDict) -> dict[str, str]:
  """``DataSpec.overrides`` of stage 2: the dataset of its annotated subset."""
  dataset = config.vkd.stage2.dataset
  return {"name": dataset} if dataset and dataset != config.data.name else {}


def stage2_data_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config.data`` of the stage-2 dataset (where the annotation maps are)."""
  overrides = stage2_overrides(config)
  if not overrides:
    return config.data
  data = config.data.copy_and_resolve_references()
  with data.unlocked():
    data.update(overrides)
  return data


def trainable_regexes(parts) -> tuple[str, ...]:
  return tuple(r for part in parts for r in PARTS[part])


def annotation_map(batch: Batch, maps: tuple[str, ...]) -> jax.Array:
  """c [N,H,W,1] in [0,1]: the requested map, or the pixelwise max of several."""
  missing = [m for m in maps if m not in batch]
  if missing:
    raise KeyError(f"batch lacks annotation maps {missing} (stage DataSpec.maps); has {sorted(batch)}")
  return functools.reduce(jnp.maximum, [batch[m].astype(jnp.float32) for m in maps])


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
        eval_every=config.eval_every, early_stopping=stop)
    prior = Stage(
        name="prior", loss=functools.partial(vkd_loss, v.stage2.beta, v.train_samples, maps),
        steps=v.stage2.steps, optimizer=v.stage2.optimizer,
        trainable=trainable_regexes(released),
        data=DataSpec(split=v.stage2.split, maps=maps, overrides=stage2_overrides(config)),
        apply_kwargs={"train_encoder": "encoder" in released},
        eval_every=v.stage2.eval_every, early_stopping=stop, batch_size=v.stage2.batch_size)
    return [base, prior]

  def predict(self, model: nn.Module, variables, batch: Batch) -> dict[str, jax.Array]:
    """Probabilities at the posterior mean z = mu."""
    return {"probs": jax.nn.sigmoid(model.apply(variables, batch["image"])["logits"])}

  def cam_target(self, model: nn.Module, variables):
    features_fn = lambda images: model.apply(variables, images, method=VKDModel.encode)
    head_fn = lambda features: model.apply(variables, features, method=VKDModel.head)
    return features_fn, head_fn

  def after_training(self, config: ml_collections.ConfigDict, workdir: str, *, mesh,
                     make_iterator=None, evaluate=None) -> None:
    """The Grad-CAM shift of Eq. 5 between the two stages (``cam_shift_report``)."""
    cam_shift_report(config, workdir, method=self, mesh=mesh, make_iterator=make_iterator,
                     evaluate=evaluate)


# --------------------------------------------------------------------------- Grad-CAM shift (Eq. 5)


def positive_class_cams(features_fn, head_fn, images: jax.Array, labels: jax.Array,
                        relu: bool = True) -> jax.Array:
  """CAM(x) [N,H,W] in [0,1]: per image, the pixelwise max over its positive classes
  of the Grad-CAM maps (each upsampled to the image and min-max normalized);
  0 everywhere for an image without a positive label.

  relu=False keeps Grad-CAM's signed map before normalizing: on a coarse
  feature map (2 x 2 at 64 px) a class whose evidence is net negative over the
  whole image otherwise gets an all-zero map.
  """
  maps = cam.grad_cam(head_fn, features_fn(images), relu=relu)
  maps = cam.normalize(cam.upsample(maps, images.shape[1:3]))
  return jnp.max(maps * (labels > 0).astype(maps.dtype)[:, :, None, None], axis=1)


def load_stage_variables(workdir: str, stage: str, keep: int = 1) -> dict:
  """{'params', 'batch_stats'} of stage ``stage``'s best state (WORKDIR/best/<stage>)."""
  checkpoints = RunCheckpoints(os.path.abspath(workdir), keep)
  try:
    manager = checkpoints.best(stage, EarlyStopping().mode)
    step = manager.best_step()
    if step is None:
      raise FileNotFoundError(f"{workdir}/best/{stage} holds no checkpoint: train the stage with "
                              f"eval_every > 0 first")
    restored = manager.restore(step, args=ocp.args.StandardRestore())
  finally:
    checkpoints.close()
  return {"params": restored["params"], "batch_stats": restored.get("batch_stats") or {}}


def collect_cams(method: VKD, model: nn.Module, stage_variables: dict, config, *, mesh,
                 make_iterator=None) -> dict[str, np.ndarray]:
  """Grad-CAMs of each stage's variables on the annotated images of ``config.vkd.cam_split``
  of the stage-2 dataset (``stage2_data_config``).

  An image counts as annotated when its annotation map (``config.vkd.annotation``)
  is not all zero and it has a positive label; the first ``config.vkd.cam_max_images``
  such images, in split order, are kept.
  Returns numpy 'annotation' [M,H,W], 'index' [M], 'labels' [M,K], 'image' [M,H,W]
  (first channel), 'boxes' [M,B,4], 'box_labels' [M,B] and one [M,H,W] CAM per
  stage name of ``stage_variables``.
  """
  maps = ANNOTATIONS[config.vkd.annotation]
  make_iterator = make_iterator or pipeline.make_iterator
  data = parallel.data_sharding(mesh)
  replicated = parallel.replicated(mesh)

  @jax.jit
  def cams_fn(variables, images, labels):
    return positive_class_cams(*method.cam_target(model, variables), images, labels,
                               relu=config.vkd.cam_relu)

  size, channels = config.data.image_size, config.data.channels
  some_variables = next(iter(stage_variables.values()))
  feature_shape = jax.eval_shape(method.cam_target(model, some_variables)[0],
                                 jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)).shape
  if feature_shape[1] * feature_shape[2] < 2:
    raise ValueError(f"config.data.image_size={size} gives a {feature_shape[1]}x{feature_shape[2]} "
                     f"feature map: its Grad-CAM is constant over the image; use larger images")
  stage_variables = {k: jax.device_put(v, replicated) for k, v in stage_variables.items()}
  batches = make_iterator(stage2_data_config(config), config.vkd.cam_split,
                          batch_size=config.eval_batch_size, sharding=data, seed=config.seed,
                          shuffle=False, num_epochs=1, drop_remainder=False, maps=maps,
                          augment=False)
  def to_host(batch):
    c = annotation_map(batch, maps)[..., 0]
    outs = {name: cams_fn(v, batch["image"], batch["labels"]) for name, v in stage_variables.items()}
    return jax.device_get({"annotation": c, "index": batch["index"], "labels": batch["labels"],
                           "image": batch["image"][..., 0], "boxes": batch["boxes"],
                           "box_labels": batch["box_labels"], "valid": batch["valid"], **outs})

  rows = pipeline.first_rows(
      batches, to_host,
      lambda host: (host["annotation"].max(axis=(1, 2)) > 0) & (host["labels"].max(axis=1) > 0),
      config.vkd.cam_max_images)
  if not rows:
    raise ValueError(f"split {config.vkd.cam_split!r} (config.vkd.cam_split) has no image with "
                     f"a positive label and a non-empty {config.vkd.annotation!r} map")
  return rows


def write_cam_overlays(cams: dict, out_dir: str, write_overlays, num: int = 16) -> list[str]:
  """PNG grids of the first ``num`` images: the annotation map c, then the CAMs after
  stage 1 and stage 2, each with the image's ground-truth boxes (red)."""
  n = min(num, len(cams["index"]))
  boxes = [b[l >= 0] for b, l in zip(cams["boxes"][:n], cams["box_labels"][:n])]
  titles = [f"#{i}" for i in cams["index"][:n]]
  return [write_overlays(cams["image"][:n, ..., None], cams[name][:n], boxes, [np.zeros((0, 4))] * n,
                         os.path.join(out_dir, f"vkd_cam_{name}.png"), titles)
          for name in ("annotation", "base", "prior")]


def _jsonable(value):
  """numpy / jax scalars and arrays inside dicts -> Python floats and lists."""
  if isinstance(value, dict):
    return {k: _jsonable(v) for k, v in value.items()}
  array = np.asarray(value)
  return float(array) if array.ndim == 0 else array.tolist()


def cam_shift_report(config, workdir: str, *, method: VKD | None = None, mesh=None,
                     make_iterator=None, evaluate=None) -> dict:
  """Eq. 5 on a finished run: Grad-CAMs after stage 1 ('base') and stage 2 ('prior')
  against the annotation maps, plus each stage's classification on ``config.vkd.cam_split``.

  Reads WORKDIR/best/{base,prior}; writes WORKDIR/eval/vkd_cam.json (atomically)
  and the before/after overlays WORKDIR/report/vkd_cam_{annotation,base,prior}.png
  (the paper's Fig. 3). Returns the payload:
    {'annotation', 'split', 'num_images', 'delta_mse', 'delta_dice',
     'delta_mse_ci95', 'delta_dice_ci95' ([low, high]),
     'similarity': {stage: {'mse', 'dice'}},
     'classification': {stage: {'auroc_mean', 'f1_mean'}}}
  with the Delta S of ``localization.delta_s`` (positive: the stage-2 CAMs are
  closer to the annotation, the paper's Table 2 sign).
  """
  from cxr_jax.evaluation import evaluator, localization, report  # pylint: disable=import-outside-toplevel
  method = method or VKD()
  model = method.model(config)
  mesh = mesh or parallel.make_mesh()
  variables = {stage: load_stage_variables(workdir, stage, config.keep_checkpoints)
               for stage in ("base", "prior")}
  cams = collect_cams(method, model, variables, config, mesh=mesh, make_iterator=make_iterator)
  evaluate = evaluate or evaluator.evaluate
  classification = {}
  for stage, v in variables.items():
    payload = evaluate(method, model, v, config, config.vkd.cam_split, None, stage=stage, mesh=mesh,
                       make_iterator=make_iterator)
    classification[stage] = {"auroc_mean": payload["classification"]["auroc"]["mean"],
                             "f1_mean": payload["classification"]["f1"]["mean"]}
  result = {
      "method": method.name, "dataset": config.data.name, "annotation": config.vkd.annotation,
      "release": config.vkd.release, "split": config.vkd.cam_split,
      "num_images": int(len(cams["index"])),
      "delta_mse": _jsonable(localization.delta_s(cams["base"], cams["prior"], cams["annotation"],
                                                  metric="mse")),
      "delta_dice": _jsonable(localization.delta_s(cams["base"], cams["prior"], cams["annotation"],
                                                   metric="dice")),
      # 95 % paired bootstrap over the images (``localization.delta_s_interval``).
      **{f"delta_{metric}_ci95": list(localization.delta_s_interval(
          cams["base"], cams["prior"], cams["annotation"], metric=metric))
         for metric in ("mse", "dice")},
      "similarity": {stage: {metric: localization.similarity(cams["annotation"], cams[stage], metric)
                             for metric in ("mse", "dice")} for stage in variables},
      "classification": classification,
  }
  if jax.process_index() == 0:
    evaluator.write_json_atomic(os.path.join(workdir, "eval", "vkd_cam.json"), result)
    write_cam_overlays(cams, os.path.join(workdir, "report"), report.write_overlays)
  return result
