"""Multi-label softmax loss and two-stream bilinear pooling (Ge et al. 2018).

Model (``cxr_jax.models.bilinear.TwoStreamBilinear``): two backbones with
identical initial weights; stream 1 -> GAP -> Dense 'ce_head' (sigmoid BCE,
E_CE), stream 2 -> GAP -> Dense 'msml_head' (MSML, Eq. 2, ``losses.msml_loss``;
``config.msml.stream2_loss = 'bce'`` gives the 'R18 + R18-BL' model), their
last conv maps -> bilinear pooling -> signed sqrt -> L2 -> Dense 'fce_head'
(sigmoid BCE, E_FCE). Total loss (Eq. 5):

  E = alpha (E_MSML + E_CE) + beta E_FCE,   alpha = 0.2, beta = 0.6.

Training strategies (Table 2), ``config.msml.strategy``:
  global       one stage 'train', everything trainable, Eq. 5.
  local        stage 'streams' (streams + their heads, alpha (E_MSML + E_CE),
               ``stream_fraction`` of ``train_steps``, no evaluation: the FCE
               head is still untrained), then stage 'bilinear' (everything
               trainable, fine-tuned with beta E_FCE).
  local_fixed  as local, but in 'bilinear' the streams and their heads are
               frozen (Stage.trainable) and their BatchNorm runs on running
               averages (apply_kwargs train_streams=False).

Predictions: sigmoid of the FCE logits (``predict = 'fce'``) or the mean of
the sigmoids of the CE and FCE heads (``'mean'``), kept on the model as
``TwoStreamBilinear.prediction``; heat maps and ``cam_target``
are stream 1's CAMs with the CE head.

Single-stream baselines of Table 1 (``config.msml.streams``; model
``cxr_jax.models.bilinear.OneStream``, one stage 'train', strategy 'global' only):
  one      'R18': one backbone, GAP + Dense 'ce_head', sigmoid BCE (E_CE alone);
           predictions and CAMs from that head.
  one_bl   'R18-BL': one backbone pooled bilinearly with itself, Dense
           'fce_head', sigmoid BCE (E_FCE alone); predictions from that head,
           Grad-CAM through it (no linear CAM: 'heatmaps' are not predicted).
  two      the two-stream model above.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from cxr_jax import losses
from cxr_jax.data import schema
from cxr_jax.losses import label_mask, msml_loss
from cxr_jax.train.stage import Batch, LossContext, Stage, Validation
from cxr_jax.models.bilinear import OneStream, TwoStreamBilinear
from cxr_jax.models.classifier import class_activation_maps, linear_head_fn

STRATEGIES = ("global", "local", "local_fixed")
STREAMS = ("two", "one", "one_bl")
STREAM2_LOSSES = ("msml", "bce")
PREDICTIONS = ("fce", "mean")
STREAM_PARAMS = "(stream1|stream2|ce_head|msml_head)/.*"
BILINEAR_PARAMS = "(reduce1|reduce2|fce_head)/.*"


def msml_total_loss(weights: tuple[float, float, float], stream2_loss: str, ctx: LossContext,
                    params, batch: Batch, rng: jax.Array):
  """(w_ce E_CE + w_2 E_stream2 + w_fce E_FCE, aux); weights = (w_ce, w_2, w_fce).

  E_stream2 is ``losses.msml_loss`` (or ``losses.bce`` when stream2_loss == 'bce').
  Terms with weight 0 are left out of the graph.
  """
  del rng
  outputs, batch_stats = ctx.apply(params, batch["image"])
  labels, mask = batch["labels"], label_mask(batch)
  stream2_fn = msml_loss if stream2_loss == "msml" else losses.bce
  terms = {"ce": (weights[0], losses.bce, "ce_logits"),
           stream2_loss: (weights[1], stream2_fn, "msml_logits"),
           "fce": (weights[2], losses.bce, "fce_logits")}
  metrics, total = {}, jnp.zeros((), jnp.float32)
  for name, (weight, fn, key) in terms.items():
    if weight:
      metrics[name] = fn(outputs[key], labels, mask)
      total = total + weight * metrics[name]
  return total, {"metrics": metrics, "batch_stats": batch_stats}


class MSML:
  """Ge 2018: two-stream bilinear CNN with CE, MSML and FCE heads."""
  name = "msml"
  pretrained_prefixes = ("stream1", "stream2")  # same weights in both: identical start

  def model(self, config: ml_collections.ConfigDict) -> nn.Module:
    m = config.model
    num_classes = len(schema.get_label_space(config.data.label_space))
    if config.msml.streams != "two":
      # config.model.init_from loads into the one backbone there is.
      self.pretrained_prefixes = ("stream1",)
      return OneStream(
          backbone=m.backbone, num_classes=num_classes, width=m.width, dtype=jnp.dtype(m.dtype),
          blurpool=m.blurpool, reduce_dim=config.msml.reduce_dim,
          self_bilinear=config.msml.streams == "one_bl")
    return TwoStreamBilinear(
        backbone=m.backbone, num_classes=num_classes,
        width=m.width, dtype=jnp.dtype(m.dtype), blurpool=m.blurpool,
        reduce_dim=config.msml.reduce_dim, prediction=config.msml.predict)

  def stages(self, config: ml_collections.ConfigDict) -> list[Stage]:
    c = config.msml
    for key, value, known in (("streams", c.streams, STREAMS),
                              ("strategy", c.strategy, STRATEGIES),
                              ("stream2_loss", c.stream2_loss, STREAM2_LOSSES),
                              ("predict", c.predict, PREDICTIONS)):
      if value not in known:
        raise ValueError(f"unknown config.msml.{key} {value!r}; known: {list(known)}")
    loss = lambda weights: functools.partial(msml_total_loss, weights, c.stream2_loss)
    if c.streams != "two":
      if c.strategy != "global":
        raise ValueError(f"config.msml.streams={c.streams!r} trains one stage: "
                         f"config.msml.strategy must be 'global', got {c.strategy!r}")
      # E_CE alone ('one') or E_FCE alone ('one_bl'), weight 1: plain sigmoid BCE.
      weights = (1.0, 0.0, 0.0) if c.streams == "one" else (0.0, 0.0, 1.0)
      return [Stage(name="train", loss=loss(weights), steps=config.train_steps,
                    optimizer=config.optimizer, validation=Validation(every=config.eval_every))]
    if c.strategy == "global":
      return [Stage(name="train", loss=loss((c.alpha, c.alpha, c.beta)), steps=config.train_steps,
                    optimizer=config.optimizer, validation=Validation(every=config.eval_every))]
    stream_steps = round(config.train_steps * c.stream_fraction)
    if not 1 <= stream_steps < config.train_steps:
      raise ValueError(f"config.msml.stream_fraction={c.stream_fraction} leaves no steps for one "
                       f"of the two stages of strategy {c.strategy!r} "
                       f"(train_steps={config.train_steps})")
    fixed = c.strategy == "local_fixed"
    return [
        Stage(name="streams", loss=loss((c.alpha, c.alpha, 0.0)), steps=stream_steps,
              optimizer=config.optimizer, trainable=(STREAM_PARAMS,)),
        Stage(name="bilinear", loss=loss((0.0, 0.0, c.beta)),
              steps=config.train_steps - stream_steps, optimizer=config.optimizer,
              trainable=(BILINEAR_PARAMS,) if fixed else (".*",),
              apply_kwargs={"train_streams": False} if fixed else {},
              validation=Validation(every=config.eval_every)),
    ]

  def predict(self, model: nn.Module, variables, batch: Batch) -> dict[str, jax.Array]:
    outputs = model.apply(variables, batch["image"], train=False)
    if isinstance(model, OneStream):
      out = {"probs": jax.nn.sigmoid(outputs[model.logits_key])}
      if not model.self_bilinear:
        out["heatmaps"] = class_activation_maps(outputs["features"], variables["params"]["ce_head"])
      return out
    probs = jax.nn.sigmoid(outputs["fce_logits"])
    if model.prediction == "mean":
      probs = 0.5 * (probs + jax.nn.sigmoid(outputs["ce_logits"]))
    heatmaps = class_activation_maps(outputs["features"], variables["params"]["ce_head"])
    return {"probs": probs, "heatmaps": heatmaps}

  def cam_target(self, model: nn.Module, variables):
    features_fn = lambda images: model.apply(variables, images, method=model.stream1_features)
    if isinstance(model, OneStream):
      return features_fn, lambda features: model.apply(variables, features, method=model.head)
    return features_fn, linear_head_fn(variables["params"]["ce_head"])
