"""Localization with limited box annotation on a patch grid (Li 2018; Rozenberg 2020).

Model (``cxr_jax.models.patch_head.PatchLocalizer``): pre-act ResNet (BlurPool
with ``config.model.blurpool``) -> P x P grid -> K patch logits l, p = sigmoid(l);
optional PAC-CRF (``cxr_jax.models.pac_crf``) -> z. Training uses all K
classes of the label space; only boxes of ``config.patch_loc.box_classes``
('boxed': the label space's boxed classes, NIH's 8; 'all') are annotations
(a^k = 1 for a class with a box in an image whose boxes are kept).

Losses (``config.patch_loc.loss``), per image summed over classes (Eq. 3),
averaged over the batch:
  li         Li et al. Eq. 1-3 (``li_loss``), all in log space.
  rozenberg  Eq. 12 (``rozenberg_loss``; ``form = 'sigmoid'``: Eq. 5 and 8)
             with per-class thresholds tau, rho, tau_hat, rho_hat.

Stages:
  li:        'network' (backbone + head).
  rozenberg: alternation (Sec. 4, "Training Details"): 'network0', then
             ``alternations`` times ('thresholds<i>' = only the thresholds,
             network BatchNorm on running averages; 'network<i+1>' = only the
             network, thresholds frozen): two optimizers (param groups), one
             per kind of stage. ``alternations = 0`` trains both jointly in one
             stage 'joint' (the degenerate tau, tau_hat -> 0, rho -> 1 route).
  + 'crf' (``config.patch_loc.crf``): PAC-CRF and its guide branch only, the
             unary model and the thresholds frozen.

Evaluation (``after_training``; Rozenberg Table 1): on the boxed rows of 'val'
and 'test', patch positive if z >= 0.5, region = union of positive patches,
IoU / IoR accuracy at T in (0.1, 0.3, 0.5, 0.7) per boxed class
(``localization.patch_accuracy``), written into eval/<split>.json under
'localization'. ``predict`` gives 'heatmaps' = z [N,P,P,K] and image-level
'probs': 1 - prod_j (1 - z_j) (Eq. 2, noisy-OR, log space) for 'li', the mean
patch probability 1^T z / P^2 (the quantity Eq. 12 thresholds) for 'rozenberg'.
"""

from __future__ import annotations

import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from cxr_jax.data import pipeline, schema
from cxr_jax.evaluation import evaluator, localization
from cxr_jax.methods.base import Batch, DataSpec, LossContext, Stage
from cxr_jax.methods.baseline import label_mask
from cxr_jax.models.backbones import backbone_from_config
from cxr_jax.models.patch_head import PatchLocalizer
from cxr_jax.train import trainer

LOSSES = ("li", "rozenberg")
FORMS = ("relu", "sigmoid")
BOX_CLASSES = ("boxed", "all")
NETWORK_PARAMS = ("backbone/.*", "head/.*")
CRF_PARAMS = ("crf/.*", "guide/.*")
THRESHOLDS = (0.1, 0.3, 0.5, 0.7)

# --------------------------------------------------------------------------- log-space helpers


def log_softplus(logits: jax.Array) -> jax.Array:
  """log(softplus(l)) = log(-log(1 - sigmoid(l))), finite for every finite l (~ l for l << 0)."""
  safe = jnp.maximum(logits, -15.0)
  return jnp.where(logits < -15.0, logits, jnp.log(jax.nn.softplus(safe)))


def log1mexp_neg(amount: jax.Array, log_amount: jax.Array) -> jax.Array:
  """log(1 - exp(-A)) for A > 0 given A and log A; exact when A underflows to 0.

  A > ln 2: log1p(-exp(-A)); otherwise log A + log((1 - e^{-A}) / A), the ratio
  by -expm1(-A) / A (or its series 1 - A/2 for A < 1e-6).
  """
  big = amount > np.log(2.0)
  a_big = jnp.where(big, amount, 1.0)
  a_small = jnp.where(big | (amount < 1e-6), 1.0, amount)
  ratio = jnp.where(amount < 1e-6, 1.0 - 0.5 * amount, -jnp.expm1(-a_small) / a_small)
  return jnp.where(big, jnp.log1p(-jnp.exp(-a_big)), log_amount + jnp.log(ratio))


def log_noisy_or(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Eq. 2 in log space: (log p(y=1|x), log p(y=0|x)) from patch logits [N,P,P,K] -> [N,K] each.

  log p(y=0|x) = sum_j log(1 - p_j) = -sum_j softplus(l_j) = -A;
  log p(y=1|x) = log(1 - e^{-A}) with log A = logsumexp_j log softplus(l_j).
  """
  logits = logits.astype(jnp.float32)
  amount = jnp.sum(jax.nn.softplus(logits), axis=(1, 2))
  log_amount = jax.nn.logsumexp(log_softplus(logits), axis=(1, 2))
  return log1mexp_neg(amount, log_amount), -amount


# --------------------------------------------------------------------------- losses


def annotation_weights(grid: jax.Array, has_boxes: jax.Array, mask: jax.Array,
                       box_classes: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(a, u) [N,K]: a^k = 1 for a class with a box (kept, of ``box_classes``); u = (1 - a) * mask.

  grid: [N,P,P,K] {0,1}; has_boxes: [N]; mask: [N,K] label mask (valid rows);
  box_classes: [K] {0,1}.
  """
  boxed = (jnp.max(grid, axis=(1, 2)) > 0).astype(jnp.float32)
  valid = (jnp.sum(mask, axis=1, keepdims=True) > 0).astype(jnp.float32)
  a = boxed * has_boxes.astype(jnp.float32)[:, None] * box_classes[None, :] * valid
  return a, (1.0 - a) * mask


def li_loss(logits: jax.Array, grid: jax.Array, labels: jax.Array, annotated: jax.Array,
            unannotated: jax.Array, lambda_ann: float) -> tuple[jax.Array, dict]:
  """Li et al. 2018, Eq. 1-3, per image, in log space (no product of probabilities).

  L_ann^k = -log prod_{j in b} p_j prod_{j not in b} (1 - p_j)
          = sum_{j in b} softplus(-l_j) + sum_{j not in b} softplus(l_j)       (Eq. 1)
  L_un^k  = -y log p(y=1|x) - (1 - y) log p(y=0|x)   (Eq. 2, ``log_noisy_or``)
  L = sum_k lambda_ann a^k L_ann^k + u^k L_un^k                               (Eq. 3)

  logits, grid: [N,P,P,K]; labels, annotated (a), unannotated (u = (1 - a) *
  label mask): [N,K]. Returns (per-image loss [N], {'ann', 'un'} [N] each).
  """
  logits = logits.astype(jnp.float32)
  ann = jnp.sum(grid * jax.nn.softplus(-logits) + (1.0 - grid) * jax.nn.softplus(logits),
                axis=(1, 2))
  log_pos, log_neg = log_noisy_or(logits)
  un = -labels * log_pos - (1.0 - labels) * log_neg
  ann = jnp.sum(annotated * ann, axis=1)
  un = jnp.sum(unannotated * un, axis=1)
  return lambda_ann * ann + un, {"ann": ann, "un": un}


def positive_negative_ratio(labels: jax.Array, weight: jax.Array) -> jax.Array:
  """gamma^k = #positives / #negatives among the weighted entries [N,K] -> [K] (1 without negatives)."""
  positives = jnp.sum(weight * labels, axis=0)
  negatives = jnp.sum(weight * (1.0 - labels), axis=0)
  return jax.lax.stop_gradient(jnp.where(negatives > 0, positives / jnp.maximum(negatives, 1.0),
                                         1.0))


def rozenberg_loss(z: jax.Array, grid: jax.Array, labels: jax.Array, annotated: jax.Array,
                   unannotated: jax.Array, thresholds: dict, lambda_ann: float,
                   gamma: jax.Array, form: str = "relu") -> tuple[jax.Array, dict]:
  """Rozenberg 2020 Eq. 12 (form 'relu'), or Eq. 5 + Eq. 8 (form 'sigmoid'), per image.

  With s_b = 1^T(I[b] z), s_bbar = 1^T(I[b_bar] z), s = 1^T z, |b| + |b_bar| = P^2:
  relu:    L_ann = |b|^-1 ReLU(tau |b| - s_b) + |b_bar|^-1 ReLU(s_bbar - rho |b_bar|)   (Eq. 9)
           L_un  = y ReLU(tau_hat - s) + gamma (1 - y) ReLU(s - rho_hat)            (Eq. 11)
  sigmoid: L_ann = -sigma(s_b - tau |b|) sigma(rho |b_bar| - s_bbar)                 (Eq. 5)
           L_un  = -y sigma(s - tau_hat) - (1 - y) sigma(rho_hat - s)               (Eq. 8)
  L = sum_k lambda_ann a^k L_ann^k + u^k L_un^k                              (Eq. 3, 12)

  z, grid: [N,P,P,K] (z in [0, 1]); labels, annotated (a), unannotated (u):
  [N,K]; thresholds: {'tau', 'rho', 'tau_hat', 'rho_hat'} [K]; gamma: [K] or
  scalar. Returns (per-image loss [N], {'ann', 'un'} [N] each).
  """
  z = z.astype(jnp.float32)
  num_patches = z.shape[1] * z.shape[2]
  in_box = jnp.sum(grid * z, axis=(1, 2))
  total = jnp.sum(z, axis=(1, 2))
  out_box = total - in_box
  box_size = jnp.sum(grid, axis=(1, 2))
  rest_size = num_patches - box_size
  t = thresholds
  if form == "relu":
    ann = (jax.nn.relu(t["tau"] * box_size - in_box) / jnp.maximum(box_size, 1.0)
           + jax.nn.relu(out_box - t["rho"] * rest_size) / jnp.maximum(rest_size, 1.0))
    un = labels * jax.nn.relu(t["tau_hat"] - total) + gamma * (1.0 - labels) * jax.nn.relu(
        total - t["rho_hat"])
  elif form == "sigmoid":
    ann = -jax.nn.sigmoid(in_box - t["tau"] * box_size) * jax.nn.sigmoid(
        t["rho"] * rest_size - out_box)
    un = -labels * jax.nn.sigmoid(total - t["tau_hat"]) - (1.0 - labels) * jax.nn.sigmoid(
        t["rho_hat"] - total)
  else:
    raise ValueError(f"unknown config.patch_loc.form {form!r}; known: {list(FORMS)}")
  ann = jnp.sum(annotated * ann, axis=1)
  un = jnp.sum(unannotated * un, axis=1)
  return lambda_ann * ann + un, {"ann": ann, "un": un}


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


# --------------------------------------------------------------------------- evaluation


def boxed_classes(label_space: schema.LabelSpace, which: str) -> np.ndarray:
  """[K] {0,1}: the classes whose boxes are annotations ('boxed' or 'all')."""
  if which not in BOX_CLASSES:
    raise ValueError(f"unknown config.patch_loc.box_classes {which!r}; known: {list(BOX_CLASSES)}")
  out = np.zeros(len(label_space), np.float32)
  out[list(label_space.boxed_indices) if which == "boxed" else slice(None)] = 1.0
  return out


def patch_report(z: np.ndarray, grid: np.ndarray, label_space: schema.LabelSpace) -> dict:
  """Rozenberg Table 1 on the boxed classes: ``localization.patch_accuracy`` of z [N,P,P,K]
  against the ground-truth grid [N,P,P,K], channels restricted to ``label_space.boxed``."""
  boxed = list(label_space.boxed_indices)
  report = localization.patch_accuracy(z[..., boxed], grid[..., boxed], label_space.boxed,
                                       THRESHOLDS)
  return {"protocol": "rozenberg2020 patch grid: positive if z >= 0.5, region = union of "
                      "positive patches, correct if IoU (IoR) >= T",
          "grid_size": int(z.shape[1]), **report}


def predict_patches(method, model, variables, config, split: str, *, mesh, make_iterator
                    ) -> tuple[np.ndarray, np.ndarray]:
  """(z [M,P,P,K], ground-truth grid [M,P,P,K]) over the valid rows of ``split`` with boxes."""
  batches = make_iterator(config.data, split, batch_size=config.eval_batch_size,
                          sharding=NamedSharding(mesh, P("data")), seed=config.seed,
                          shuffle=False, num_epochs=1, drop_remainder=False,
                          maps=("box_grid",), augment=False)
  predict_fn = evaluator.cached_predict_fn(method, model, mesh)
  variables = jax.device_put(variables, NamedSharding(mesh, P()))
  zs, grids = [], []
  try:
    for batch in batches:
      heatmaps = predict_fn(variables, {"image": batch["image"]})["heatmaps"]
      host = jax.device_get({"z": heatmaps, "grid": batch["box_grid"], "valid": batch["valid"],
                             "has_boxes": batch["has_boxes"]})
      keep = (host["valid"] > 0) & (host["has_boxes"] > 0)
      zs.append(np.asarray(host["z"])[keep])
      grids.append(np.asarray(host["grid"])[keep])
  finally:
    close = getattr(batches, "close", None)
    if close is not None:
      close()
  return np.concatenate(zs), np.concatenate(grids)


# --------------------------------------------------------------------------- the method


class PatchLoc:
  """Li 2018 / Rozenberg 2020 patch-grid localization (module docstring)."""
  name = "patch_loc"

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
    if c.loss == "li":
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

  def after_training(self, config: ml_collections.ConfigDict, workdir: str, *, mesh,
                     make_iterator=None, evaluate=None) -> None:
    """Adds the Rozenberg Table 1 patch accuracies to eval/val.json and eval/test.json."""
    del evaluate
    make_iterator = make_iterator or pipeline.make_iterator
    _, model, variables, mesh = trainer.restore_for_eval(config, workdir)
    label_space = schema.get_label_space(config.data.label_space)
    for split in ("val", "test"):
      z, grid = predict_patches(self, model, variables, config, split, mesh=mesh,
                                make_iterator=make_iterator)
      if jax.process_index() != 0:
        continue
      path = os.path.join(workdir, "eval", f"{split}.json")
      with open(path) as f:
        payload = json.load(f)
      payload["localization"] = {**payload.get("localization", {}),
                                 "patch": patch_report(z, grid, label_space)}
      evaluator.write_json_atomic(path, payload)
