"""Classification losses: pure functions of logits, labels and masks.

Shapes: ``logits``, ``labels``, ``label_mask`` are [N, K]; labels in {0, 1};
``label_mask`` is 1 where the label is known (0 = unknown / uncertain / padding
row). Log-probabilities come from ``log_sigmoid`` (log(1 - sigmoid(x)) =
log_sigmoid(-x)), so extreme logits give finite losses and gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """sum(mask * values) / max(sum(mask), 1): 0 when everything is masked."""
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def bce(logits: jax.Array, labels: jax.Array, label_mask: jax.Array,
        pos_weight: jax.Array | None = None) -> jax.Array:
  """Binary cross-entropy with logits, mean over the unmasked entries.

  Per entry, as torch's ``BCEWithLogitsLoss(pos_weight=...)``:
    l = -[pos_weight_k * y log sigmoid(x) + (1 - y) log(1 - sigmoid(x))]
  ``pos_weight``: [K] (or broadcastable to [N, K]); None means 1.
  Returns a float32 scalar.
  """
  logits = logits.astype(jnp.float32)
  labels = labels.astype(jnp.float32)
  pw = 1.0 if pos_weight is None else jnp.asarray(pos_weight, jnp.float32)
  per_entry = -(pw * labels * jax.nn.log_sigmoid(logits)
                + (1.0 - labels) * jax.nn.log_sigmoid(-logits))
  return _masked_mean(per_entry, label_mask.astype(jnp.float32))


def weighted_bce(logits: jax.Array, labels: jax.Array, label_mask: jax.Array) -> jax.Array:
  """Weighted BCE of Wang et al. 2017 (Eq. 1) / Kim et al. 2022 (Eq. 10).

  Per class k, over the unmasked entries of the batch: |P_k| positives,
  |N_k| negatives, and
    w_P = (|P_k| + |N_k|) / |P_k|,   w_N = (|P_k| + |N_k|) / |N_k|,
    l_nk = -[w_P y log sigmoid(x) + w_N (1 - y) log(1 - sigmoid(x))].
  The loss is the mean of l over the unmasked entries. A class with no
  positive (or no negative) in the batch has no such terms; its other weight
  is then (0 + |N|)/|N| = 1, i.e. plain BCE for that class. The weights are
  constants (no gradient flows through the counts).
  Returns a float32 scalar.
  """
  logits = logits.astype(jnp.float32)
  labels = labels.astype(jnp.float32)
  mask = label_mask.astype(jnp.float32)
  num_pos = jnp.sum(mask * labels, axis=0)           # [K]
  num_neg = jnp.sum(mask * (1.0 - labels), axis=0)   # [K]
  total = num_pos + num_neg
  w_pos = jnp.where(num_pos > 0, total / jnp.maximum(num_pos, 1.0), 0.0)
  w_neg = jnp.where(num_neg > 0, total / jnp.maximum(num_neg, 1.0), 0.0)
  per_entry = -(w_pos * labels * jax.nn.log_sigmoid(logits)
                + w_neg * (1.0 - labels) * jax.nn.log_sigmoid(-logits))
  return _masked_mean(per_entry, mask)


def _expm1_minus_x(x: jax.Array) -> jax.Array:
  """exp(x) - 1 - x, accurate to float32 precision for every x (a Taylor series below |x| = 0.01,
  where ``expm1(x) - x`` would lose ~2 eps / |x| relative precision to cancellation)."""
  small = jnp.abs(x) < 1e-2
  s = jnp.where(small, x, 0.0)  # keeps the unused branch (and its gradient) finite
  series = s * s * (0.5 + s * (1.0 / 6.0 + s * (1.0 / 24.0)))
  return jnp.where(small, series, jnp.expm1(x) - x)


def gaussian_kl(mu_q: jax.Array, logvar_q: jax.Array,
                mu_p: jax.Array, logvar_p: jax.Array) -> jax.Array:
  """KL(q || p) of diagonal Gaussians from log-variances, summed over the last axis.

  The KL term of van Sonsbeek et al. 2023, Eq. 3 (p = N(0, I): pass zeros) and
  Eq. 4 (p = p(z|c)). With d = logvar_q - logvar_p, per dimension
    KL = 0.5 * [exp(d) - 1 - d + (mu_q - mu_p)^2 exp(-logvar_p)],
  with exp(d) - 1 - d evaluated without cancellation (accurate when q is close
  to p) and without ever forming a variance that could overflow on its own.
  Shapes: all [..., L] (broadcastable); returns [...] float32, >= 0.
  """
  mu_q, logvar_q, mu_p, logvar_p = (jnp.asarray(a, jnp.float32)
                                    for a in (mu_q, logvar_q, mu_p, logvar_p))
  per_dim = (_expm1_minus_x(logvar_q - logvar_p)
             + jnp.square(mu_q - mu_p) * jnp.exp(-logvar_p))
  return 0.5 * jnp.sum(per_dim, axis=-1)
