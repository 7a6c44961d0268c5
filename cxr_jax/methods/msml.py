"""Multi-label softmax loss and two-stream bilinear pooling (Ge et al. 2018).

Model (``cxr_jax.models.bilinear.TwoStreamBilinear``): two backbones with
identical initial weights; stream 1 -> GAP -> Dense 'ce_head' (sigmoid BCE,
E_CE), stream 2 -> GAP -> Dense 'msml_head' (MSML, Eq. 2, ``msml_loss``;
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
from cxr_jax.methods import baseline
from cxr_jax.models.bilinear import TwoStreamBilinear

STRATEGIES = ("global", "local", "local_fixed")
STREAM2_LOSSES = ("msml", "bce")
PREDICTIONS = ("fce", "mean")
STREAM_PARAMS = "(stream1|stream2|ce_head|msml_head)/.*"
BILINEAR_PARAMS = "(reduce1|reduce2|fce_head)/.*"


def msml_loss(logits: jax.Array, labels: jax.Array, label_mask: jax.Array) -> jax.Array:
  """Multi-label softmax loss (MSML) of Ge et al. 2018, Eq. 2, as a negative log-likelihood.

  For image n with positives P = {k: y=1, mask=1} and negatives
  N = {k: y=0, mask=1} (masked classes are neither), each positive l is a
  softmax of x_l against all negatives:
    E_n = 1/|P| sum_{l in P} -log( e^{x_l} / (e^{x_l} + sum_{k in N} e^{x_k}) )
        = 1/|P| sum_{l in P} softplus(logsumexp_{k in N} x_k - x_l).
  Eq. 2 prints the probability; its gradient (Eq. 3) is that of this negative
  log:  dE_n/dx_l = -(1 - p_l)/|P| for l in P, with p_l the softmax above,
        dE_n/dx_k = 1/|P| sum_{l in P} e^{x_k} / (e^{x_l} + sum_{j in N} e^{x_j})
  for k in N, and 0 for masked classes.
  An image with no positive contributes 0 (no term, no gradient); one with no
  negative gives p_l = 1, i.e. 0. The batch loss is the mean of E_n over the
  images with at least one positive (0 when there are none).
  Shapes: [N, K] each; returns a float32 scalar.
  """
  logits = logits.astype(jnp.float32)
  mask = label_mask.astype(jnp.float32)
  positive = mask * labels.astype(jnp.float32)
  negative = (mask - positive) > 0
  has_negative = jnp.any(negative, axis=-1)
  # logsumexp over the negatives; -inf (with zero gradient) when there are none.
  shift = jax.lax.stop_gradient(jnp.max(jnp.where(negative, logits, -jnp.inf), axis=-1))
  shift = jnp.where(has_negative, shift, 0.0)
  total = jnp.sum(jnp.exp(jnp.where(negative, logits - shift[:, None], -jnp.inf)), axis=-1)
  negative_lse = jnp.where(has_negative, shift + jnp.log(jnp.where(has_negative, total, 1.0)),
                           -jnp.inf)
  per_entry = jax.nn.softplus(negative_lse[:, None] - logits)        # [N, K]
  num_positive = jnp.sum(positive, axis=-1)
  per_image = jnp.sum(positive * per_entry, axis=-1) / jnp.maximum(num_positive, 1.0)
  has_positive = (num_positive > 0).astype(jnp.float32)
  return jnp.sum(per_image * has_positive) / jnp.maximum(jnp.sum(has_positive), 1.0)


def msml_total_loss(weights: tuple[float, float, float], stream2_loss: str, ctx: LossContext,
                    params, batch: Batch, rng: jax.Array):
  """(w_ce E_CE + w_2 E_stream2 + w_fce E_FCE, aux); weights = (w_ce, w_2, w_fce).

  E_stream2 is ``msml_loss`` (or ``losses.bce`` when stream2_loss == 'bce').
  Terms with weight 0 are left out of the graph.
  """
  del rng
  outputs, batch_stats = ctx.apply(params, batch["image"])
  labels, mask = batch["labels"], baseline.label_mask(batch)
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
    return TwoStreamBilinear(
        backbone=m.backbone, num_classes=len(schema.get_label_space(config.data.label_space)),
        width=m.width, dtype=jnp.dtype(m.dtype), blurpool=m.blurpool,
        reduce_dim=config.msml.reduce_dim, prediction=config.msml.predict)

  def stages(self, config: ml_collections.ConfigDict) -> list[Stage]:
    c = config.msml
    for key, value, known in (("strategy", c.strategy, STRATEGIES),
                              ("stream2_loss", c.stream2_loss, STREAM2_LOSSES),
                              ("predict", c.predict, PREDICTIONS)):
      if value not in known:
        raise ValueError(f"unknown config.msml.{key} {value!r}; known: {list(known)}")
    loss = lambda weights: functools.partial(msml_total_loss, weights, c.stream2_loss)
    if c.strategy == "global":
      return [Stage(name="train", loss=loss((c.alpha, c.alpha, c.beta)), steps=config.train_steps,
                    optimizer=config.optimizer, eval_every=config.eval_every)]
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
              eval_every=config.eval_every),
    ]

  def predict(self, model: nn.Module, variables, batch: Batch) -> dict[str, jax.Array]:
    outputs = model.apply(variables, batch["image"], train=False)
    probs = jax.nn.sigmoid(outputs["fce_logits"])
    if model.prediction == "mean":
      probs = 0.5 * (probs + jax.nn.sigmoid(outputs["ce_logits"]))
    heatmaps = baseline.class_activation_maps(outputs["features"], variables["params"]["ce_head"])
    return {"probs": probs, "heatmaps": heatmaps}

  def cam_target(self, model: nn.Module, variables):
    head = variables["params"]["ce_head"]
    features_fn = lambda images: model.apply(variables, images, method=model.stream1_features)
    head_fn = lambda f: jnp.mean(f.astype(jnp.float32), axis=(1, 2)) @ head["kernel"] + head["bias"]
    return features_fn, head_fn
