"""BYOL self-supervision with a Grad-CAM box loss, then fine-tuning (Talasila et al. 2023).

Model: ``cxr_jax.models.byol.BYOLNetwork`` (backbone f, projector g,
predictor q, linear probe, fine-tuning head).

Stages:
  'pretrain' (``byol.ssl``; split 'train' of the pretraining data, which
      ``pretrain_overrides`` may swap for another dataset, e.g. a second
      phantom seed, and cut by ``byol.pretrain_cv`` into cross-validation
      folds over its boxed images: NIH's boxes are all on official-test
      images): two views per image from the input pipeline
      (``DataSpec.views``: view0 = the online view t, view1 = the stronger,
      more likely target view t'), one online forward over
      [view0; view1; image] and one target forward over [view0; view1], loss

        L = L_{theta,delta} + L~_{theta,delta} + lambda * L_CAM + L_probe   (Eq. 8)

      with L_{theta,delta} the normalized MSE of Eq. 3 (symmetrised), the
      target network (backbone + projector) an EMA of the online one (Eq. 5,
      ``models.byol.ema_update``; tau fixed or BYOL's cosine schedule) in
      ``TrainState.extras['target']``.
      Where the class score comes from: self-supervised pretraining has no
      classifier, so the class score y^c that Grad-CAM differentiates is a
      linear probe on the pooled online features y = GAP(A), trained jointly
      with BCE on the image labels of 'image' (L_probe). With
      ``byol.probe_into_encoder`` False (default) the probe's BCE sees
      stop_gradient(y), so labels reach the encoder only through the CAM loss
      (the encoder stays self-supervised apart from the box term); True lets
      the probe's BCE train the encoder as well (weakly + fully supervised).
      The CAM loss always trains both encoder and probe.
  'cam_finetune' (``byol.finetune.cam_stage_steps`` > 0; the "XRV + CAM loss"
      row): the fine-tuning loss with the head's CAM loss on split 'train' of
      the pretraining data (``cam_stage_overrides``: its boxed images, labels
      and boxes mapped into the fine-tuning label space), before 'finetune'.
  'finetune': encoder + a new linear head on split 'train', weighted BCE
      (``losses.weighted_bce``), the data's random affine (p = 0.5),
      ReduceLROnPlateau (factor 0.1, patience 4 evaluations, lr floor
      ``byol.finetune.min_learning_rate``) on the mean training loss since the
      previous evaluation (Sec. IV-b; ``byol.finetune.plateau_signal``,
      'eval' watches the validation AUROC instead), ends with the
      best-validation-AUROC params. ``byol.finetune.cam_weight`` > 0 adds
      the CAM loss on the head's Grad-CAM (the "XRV + CAM loss" row).

CAM loss (Eq. 6-7, ``losses.cam_loss``): for each image with boxes and each class c
among its boxes, the Grad-CAM map of the encoder's last feature map for c
(signed by default, see ``byol.cam_relu``), upsampled bilinearly to the image,
against the union of all the image's boxes as a binary mask (pixel-centre
rule, after the batch's augmentation): l_{n,c} = mean over pixels of
BCE(sigmoid(GC^{n,c}), mask_n); L_CAM = the mean of l over the (n, c) pairs.
By default (``byol.cam_logit='cell'``) the sigmoid reads GC as a per-cell class
logit, h w GC + y^c(0); see ``cam_loss``. The gradient flows through Grad-CAM
(second order through ``cam.grad_cam``).

After training, the 'byol_cam_kinds' evaluator (``config.evals``,
``cxr_jax.evaluation.byol_report.CamKindsEval``): Grad-CAM vs Grad-CAM++ vs
Score-CAM on boxed test images (panel PNG and mean box IoU per CAM kind) and a
micro-averaged PR curve with iso-F1 lines.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from cxr_jax import losses
from cxr_jax.data import schema
from cxr_jax.losses import CAM_LOGITS, cam_loss, label_mask, symmetrised_byol_loss
from cxr_jax.train.stage import (PLATEAU_SIGNALS, Batch, DataSpec, Hooks, LossContext, Stage,
                                  Validation)
from cxr_jax.models.backbones import backbone_from_config
from cxr_jax.models.byol import TAU_SCHEDULES, BYOLNetwork, ema_update, init_target
from cxr_jax.models.classifier import linear_head_fn

HEAD_INITS = ("auto", "fresh", "probe")


# --------------------------------------------------------------------------- stage losses


def cam_weights(batch: Batch) -> jax.Array:
  """[N] 1 for rows whose boxes take part in the CAM loss: annotated (has_boxes), valid, boxed."""
  w = jnp.any(batch["box_labels"] >= 0, axis=1).astype(jnp.float32)
  w = w * batch.get("has_boxes", jnp.ones_like(w)).astype(jnp.float32)
  return w * batch.get("valid", jnp.ones_like(w)).astype(jnp.float32)


def pretrain_loss(b: ml_collections.ConfigDict, ctx: LossContext, params, batch: Batch,
                  rng: jax.Array):
  """Eq. 8 (+ the probe's BCE): BYOL on view0/view1, CAM loss and probe on 'image'."""
  del rng
  for key in ("view0", "view1"):
    if key not in batch:
      raise KeyError(f"byol pretraining needs batch[{key!r}] (Stage.data.views); has {sorted(batch)}")
  views = jnp.concatenate([batch["view0"], batch["view1"]])
  num_views = views.shape[0]
  images = batch["image"]
  outputs, batch_stats = ctx.apply(params, jnp.concatenate([views, images]), mode="byol",
                                   view_rows=num_views)
  target_params = jax.lax.stop_gradient(ctx.extras["target"])
  target, _ = ctx.apply({**params, **target_params}, views, mode="target")
  byol = symmetrised_byol_loss(outputs["prediction"], target["projection"])

  features = outputs["features"][num_views:]
  pooled = outputs["pooled"][num_views:]
  probe = params["probe"]
  probe_input = pooled if b.probe_into_encoder else jax.lax.stop_gradient(pooled)
  probe_bce = losses.bce(probe_input @ probe["kernel"] + probe["bias"], batch["labels"],
                         label_mask(batch))
  loss = byol + probe_bce
  metrics = {"byol": byol, "probe_bce": probe_bce}
  if b.cam_weight > 0:
    l_cam = cam_loss(linear_head_fn(probe), features, batch["boxes"], batch["box_labels"],
                     cam_weights(batch), images.shape[1:3], relu=b.cam_relu, logit=b.cam_logit)
    loss = loss + b.cam_weight * l_cam
    metrics["cam"] = l_cam
  return loss, {"metrics": metrics, "batch_stats": batch_stats}


def finetune_loss(cam_weight: float, cam_relu: bool, cam_logit: str, ctx: LossContext, params,
                  batch: Batch, rng: jax.Array, *, weighting: str = "per_class"):
  """Weighted BCE of the head (|P|, |N| counted by ``weighting``, config.loss_weighting)
  (+ cam_weight * L_CAM of the head's Grad-CAM)."""
  del rng
  outputs, batch_stats = ctx.apply(params, batch["image"])
  bce = losses.weighted_bce(outputs["logits"], batch["labels"], label_mask(batch),
                            counts=weighting)
  loss, metrics = bce, {"bce": bce}
  if cam_weight > 0:
    l_cam = cam_loss(linear_head_fn(params["head"]), outputs["features"], batch["boxes"],
                     batch["box_labels"], cam_weights(batch), batch["image"].shape[1:3],
                     relu=cam_relu, logit=cam_logit)
    loss = loss + cam_weight * l_cam
    metrics["cam"] = l_cam
  return loss, {"metrics": metrics, "batch_stats": batch_stats}


def head_from_probe(ctx) -> tuple[dict, dict]:
  """Fine-tuning's ``prepare`` when ``finetune_head_init`` is 'probe': the new head starts as a
  copy of the pretraining probe, the class layer the CAM loss shaped. The paper replaces
  "the encoder's fully-connected layer" for fine-tuning because CheXpert's labels are not NIH's;
  with one label space for both stages the head can start from it. Returns (params, extras)."""
  probe, head = ctx.params["probe"], ctx.params["head"]
  shapes = lambda tree: jax.tree.map(jnp.shape, tree)
  if shapes(probe) != shapes(head):
    raise ValueError(f"config.byol.finetune.head_init='probe' needs the pretraining and fine-tuning "
                     f"label spaces to match: probe {shapes(probe)}, head {shapes(head)}")
  return {**ctx.params, "head": jax.tree.map(jnp.array, probe)}, ctx.extras


def finetune_head_init(config: ml_collections.ConfigDict) -> str:
  """``byol.finetune.head_init`` with 'auto' resolved: 'probe' when pretraining ran on the
  fine-tuning label space (the probe's classes are the head's), else 'fresh' (the paper's
  NIH -> CheXpert case). Raises on an unknown value or 'probe' without pretraining."""
  b, head_init = config.byol, config.byol.finetune.head_init
  if head_init not in HEAD_INITS:
    raise ValueError(f"unknown config.byol.finetune.head_init {head_init!r}; "
                     f"known: {list(HEAD_INITS)}")
  if head_init == "probe" and not b.ssl:
    raise ValueError("config.byol.finetune.head_init='probe' needs the pretraining stage "
                     "(config.byol.ssl=True): the probe is trained there")
  if head_init != "auto":
    return head_init
  pretrain_space = pretrain_overrides(config).get("label_space", config.data.label_space)
  return "probe" if b.ssl and pretrain_space == config.data.label_space else "fresh"


def drop_extras(params, extras) -> dict:
  """Fine-tuning keeps no target network."""
  del params, extras
  return {}


# --------------------------------------------------------------------------- the method


def pretrain_overrides(config: ml_collections.ConfigDict) -> dict:
  """``DataSpec.overrides`` of the pretraining stage: the 'other dataset'.

  byol.pretrain_dataset (+ pretrain_label_space, pretrain_manual_dir): pretrain
  on another dataset than config.data (paper: NIH, then fine-tune on CheXpert);
  '' keeps config.data's. byol.pretrain_synthetic_seed >= 0: phantoms of another
  seed (for synthetic data, the stand-in for a second dataset).
  """
  b = config.byol
  out = {}
  if b.pretrain_dataset and b.pretrain_dataset != config.data.name:
    out.update({"name": b.pretrain_dataset, "label_space": b.pretrain_label_space,
                "manual_dir": b.pretrain_manual_dir})
  if b.pretrain_synthetic_seed >= 0 and (out.get("name") or config.data.name) == "synthetic":
    out["synthetic.seed"] = b.pretrain_synthetic_seed
  cv = b.pretrain_cv
  if cv.num_folds > 0:
    out.update({"cv.num_folds": cv.num_folds, "cv.fold": cv.fold,
                "cv.unannotated_fraction": cv.unannotated_fraction})
  return out


def cam_stage_overrides(config: ml_collections.ConfigDict) -> dict:
  """``DataSpec.overrides`` of 'cam_finetune': the pretraining data (its boxes) with its labels
  and boxes mapped into the fine-tuning label space, which the head predicts."""
  return {**pretrain_overrides(config), "label_space": config.data.label_space}



class BYOLCAM:
  """BYOL (+ CAM loss) pretraining, then supervised fine-tuning of encoder + new head."""
  name = "byol_cam"
  pretrained_prefixes = ("backbone",)  # config.model.init_from loads here

  def model(self, config: ml_collections.ConfigDict) -> nn.Module:
    b = config.byol
    return BYOLNetwork(backbone=backbone_from_config(config.model),
                       num_classes=len(schema.get_label_space(config.data.label_space)),
                       probe_classes=len(schema.get_label_space(
                           pretrain_overrides(config).get("label_space", config.data.label_space))),
                       hidden_dim=b.hidden_dim, projection_dim=b.projection_dim)

  def stages(self, config: ml_collections.ConfigDict) -> list[Stage]:
    b, ft = config.byol, config.byol.finetune
    if b.tau_schedule not in TAU_SCHEDULES:
      raise ValueError(f"unknown config.byol.tau_schedule {b.tau_schedule!r}; "
                       f"known: {list(TAU_SCHEDULES)}")
    if ft.plateau_signal not in PLATEAU_SIGNALS:
      raise ValueError(f"unknown config.byol.finetune.plateau_signal {ft.plateau_signal!r}; "
                       f"known: {list(PLATEAU_SIGNALS)}")
    if b.cam_logit not in CAM_LOGITS:
      raise ValueError(f"unknown config.byol.cam_logit {b.cam_logit!r}; known: {list(CAM_LOGITS)}")
    head_init = finetune_head_init(config)
    if not 0.0 <= b.tau <= 1.0:
      raise ValueError(f"config.byol.tau must lie in [0, 1], got {b.tau}")
    stages = []
    if b.ssl:
      stages.append(Stage(
          name="pretrain", loss=functools.partial(pretrain_loss, b), steps=b.steps,
          optimizer=b.optimizer, apply_kwargs={"mode": "byol"},
          data=DataSpec(split="train", views=(b.online_view.to_dict(), b.target_view.to_dict()),
                        overrides=pretrain_overrides(config),
                        needs=("boxes",) if b.cam_weight > 0 else ()),
          hooks=Hooks(init_extras=init_target,
                      update_extras=functools.partial(ema_update, b.tau, b.tau_schedule, b.steps)),
          batch_size=b.batch_size))
    finetune = lambda cam_weight: functools.partial(finetune_loss, cam_weight, b.cam_relu,
                                                    b.cam_logit, weighting=config.loss_weighting)
    # With a 'cam_finetune' stage the CAM loss runs there: 'finetune' has none.
    finetune_cam = 0.0 if ft.cam_stage_steps > 0 else ft.cam_weight
    # The first stage that trains the head drops the target network and starts the head.
    head_hooks = Hooks(init_extras=drop_extras if b.ssl else None,
                       prepare=head_from_probe if head_init == "probe" else None)
    if ft.cam_stage_steps > 0:
      stages.append(Stage(
          name="cam_finetune", loss=finetune(ft.cam_weight), steps=ft.cam_stage_steps,
          optimizer=b.optimizer,
          data=DataSpec(split="train", overrides=cam_stage_overrides(config),
                        needs=("boxes",) if ft.cam_weight > 0 else ()),
          batch_size=b.batch_size, hooks=head_hooks))
      head_hooks = Hooks()
    optimizer = ml_collections.ConfigDict(ft.optimizer.to_dict())
    if optimizer.get("schedule") == "plateau":
      optimizer.plateau_min_scale = ft.min_learning_rate / optimizer.learning_rate
    stages.append(Stage(
        name="finetune", loss=finetune(finetune_cam),
        steps=ft.steps, optimizer=optimizer,
        data=DataSpec(split="train", needs=("boxes",) if finetune_cam > 0 else ()),
        validation=Validation(every=ft.eval_every, select_best=True,
                              plateau_signal=ft.plateau_signal),
        batch_size=ft.batch_size,
        hooks=head_hooks))
    return stages

  def predict(self, model: nn.Module, variables, batch: Batch) -> dict[str, jax.Array]:
    return {"probs": jax.nn.sigmoid(model.apply(variables, batch["image"])["logits"])}

  def cam_target(self, model: nn.Module, variables):
    features_fn = lambda images: model.apply(variables, images)["features"]
    return features_fn, linear_head_fn(variables["params"]["head"])
