"""The methods' losses: pure functions of arrays (no params, no config).

Classification (all methods): ``bce``, ``weighted_bce`` (Wang 2017 Eq. 1 /
Kim 2022 Eq. 10), ``msml_loss`` (Ge 2018 Eq. 2); ``gaussian_kl`` (van
Sonsbeek 2023 Eq. 3-4); patch-grid localization (Li 2018 Eq. 1-3, Rozenberg
2020 Eq. 5-12); BYOL and the Grad-CAM box loss (Talasila 2023 Eq. 3, 6-8).

Shapes: ``logits``, ``labels``, ``label_mask`` are [N, K]; labels in {0, 1};
``label_mask`` is 1 where the label is known (0 = unknown / uncertain / padding
row; ``label_mask(batch)`` builds it). Log-probabilities come from
``log_sigmoid`` (log(1 - sigmoid(x)) = log_sigmoid(-x)), so extreme logits give
finite losses and gradients.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from cxr_jax import cam

ROZENBERG_FORMS = ("relu", "sigmoid")
CAM_LOGITS = ("gradcam", "cell")
# What weighted_bce counts |P| and |N| over (config.loss_weighting).
WEIGHTINGS = ("per_class", "batch")


def label_mask(batch: Mapping[str, jax.Array]) -> jax.Array:
  """The batch's label mask [N,K] with padding rows (valid = 0) masked out."""
  mask = batch["label_mask"].astype(jnp.float32)
  if "valid" in batch:
    mask = mask * batch["valid"].astype(jnp.float32)[:, None]
  return mask


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


def weighted_bce(logits: jax.Array, labels: jax.Array, label_mask: jax.Array,
                 counts: str = "per_class") -> jax.Array:
  """Weighted BCE of Wang et al. 2017 (Eq. 1, W-CEL) / Kim et al. 2022 (Eq. 10).

  Over the unmasked entries of the batch: |P| positives, |N| negatives, and
    w_P = (|P| + |N|) / |P|,   w_N = (|P| + |N|) / |N|,
    l_nk = -[w_P y log sigmoid(x) + w_N (1 - y) log(1 - sigmoid(x))].
  ``counts`` says what |P| and |N| count (``WEIGHTINGS``):
    'per_class' (default): per class k, the positives and negatives of column k of
      the batch, so each class has its own w_P, w_N: Kim 2022 Eq. 10 read per class
      ("the number of positive and negative samples in a batch", of each class).
    'batch': the 1s and 0s of the whole [N, K] batch label matrix, one w_P and
      one w_N for every class: Wang 2017's W-CEL as printed.
  The loss is the mean of l over the unmasked entries. Counts with no positive
  (or no negative) have no such terms; the other weight is then
  (0 + |N|)/|N| = 1, i.e. plain BCE. The weights are constants (no gradient
  flows through the counts).
  Returns a float32 scalar.
  """
  if counts not in WEIGHTINGS:
    raise ValueError(f"weighted_bce counts={counts!r}; known: {list(WEIGHTINGS)} "
                     f"(config.loss_weighting)")
  logits = logits.astype(jnp.float32)
  labels = labels.astype(jnp.float32)
  mask = label_mask.astype(jnp.float32)
  axis = 0 if counts == "per_class" else None
  num_pos = jnp.sum(mask * labels, axis=axis)           # [K] or a scalar
  num_neg = jnp.sum(mask * (1.0 - labels), axis=axis)
  total = num_pos + num_neg
  w_pos = jnp.where(num_pos > 0, total / jnp.maximum(num_pos, 1.0), 0.0)
  w_neg = jnp.where(num_neg > 0, total / jnp.maximum(num_neg, 1.0), 0.0)
  per_entry = -(w_pos * labels * jax.nn.log_sigmoid(logits)
                + w_neg * (1.0 - labels) * jax.nn.log_sigmoid(-logits))
  return _masked_mean(per_entry, mask)


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


# ------------------------------------------------------------ patch grid (Li 2018, Rozenberg 2020)


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
  """Li et al. 2018 Eq. 2 (noisy-OR) in log space: patch logits [N,P,P,K] ->
  (log p(y=1|x), log p(y=0|x)), [N,K] each.

  log p(y=0|x) = sum_j log(1 - p_j) = -sum_j softplus(l_j) = -A;
  log p(y=1|x) = log(1 - e^{-A}) with log A = logsumexp_j log softplus(l_j).
  """
  logits = logits.astype(jnp.float32)
  amount = jnp.sum(jax.nn.softplus(logits), axis=(1, 2))
  log_amount = jax.nn.logsumexp(log_softplus(logits), axis=(1, 2))
  return log1mexp_neg(amount, log_amount), -amount


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
    raise ValueError(f"unknown config.patch_loc.form {form!r}; known: {list(ROZENBERG_FORMS)}")
  ann = jnp.sum(annotated * ann, axis=1)
  un = jnp.sum(unannotated * un, axis=1)
  return lambda_ann * ann + un, {"ann": ann, "un": un}


# ------------------------------------------------------------ BYOL + CAM loss (Talasila 2023)


def normalized_mse(prediction: jax.Array, target: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Talasila 2023 Eq. 3: || p / |p| - z / |z| ||^2 = 2 - 2 cos(p, z). [N,P], [N,P] -> [N]."""
  p = prediction / jnp.maximum(jnp.linalg.norm(prediction, axis=-1, keepdims=True), eps)
  z = target / jnp.maximum(jnp.linalg.norm(target, axis=-1, keepdims=True), eps)
  return jnp.sum(jnp.square(p - z), axis=-1)


def symmetrised_byol_loss(predictions: jax.Array, target_projections: jax.Array) -> jax.Array:
  """L + L~ of Talasila 2023 Eq. 3 / 8, mean over the batch.

  predictions: q(g(f(.))) of the online network on [view0; view1], [2N,P];
  target_projections: g(f(.)) of the target network on [view0; view1], [2N,P]
  (gradients stopped here). view0's prediction is matched with view1's target
  projection and vice versa.
  """
  n = predictions.shape[0] // 2
  target = jax.lax.stop_gradient(target_projections)
  swapped = jnp.concatenate([target[n:], target[:n]])
  per_pair = normalized_mse(predictions, swapped)          # [2N]
  return jnp.mean(per_pair[:n] + per_pair[n:])


def boxes_to_mask(boxes: jax.Array, box_labels: jax.Array, height: int, width: int) -> jax.Array:
  """Union of each image's real boxes as a {0,1} mask, [N,B,4], [N,B] -> [N,H,W] float32.

  The pixel-centre rule of ``cxr_jax.data.annotations.boxes_to_mask``: pixel
  (i, j) is inside if x0 W <= j + 0.5 < x1 W and y0 H <= i + 0.5 < y1 H.
  """
  boxes = boxes.astype(jnp.float32)
  cols = jnp.arange(width, dtype=jnp.float32) + 0.5
  rows = jnp.arange(height, dtype=jnp.float32) + 0.5
  x0, y0, x1, y1 = (boxes[..., i, None] for i in range(4))
  in_cols = (cols >= x0 * width) & (cols < x1 * width)                       # [N,B,W]
  in_rows = (rows >= y0 * height) & (rows < y1 * height) & (box_labels >= 0)[..., None]
  hits = jnp.einsum("nbh,nbw->nhw", in_rows.astype(jnp.float32), in_cols.astype(jnp.float32))
  return (hits > 0).astype(jnp.float32)


def box_classes(box_labels: jax.Array, num_classes: int) -> jax.Array:
  """Which classes have a box in each image: [N,B] (-1 = padding) -> [N,K] float32 {0,1}."""
  one_hot = jax.nn.one_hot(box_labels, num_classes, dtype=jnp.float32)    # -1 -> all zeros
  return jnp.max(one_hot, axis=1)


def cam_loss(head_fn, features: jax.Array, boxes: jax.Array, box_labels: jax.Array,
             weights: jax.Array, image_size: tuple[int, int], relu: bool = False,
             logit: str = "gradcam") -> jax.Array:
  """L_CAM of Talasila 2023 Eq. 6-7.

  Args:
    head_fn: features [N,h,w,D] -> class scores [N,K] (examples independent).
    features: the encoder's last feature map A [N,h,w,D].
    boxes: [N,B,4] normalized (x0, y0, x1, y1); box_labels: int [N,B], -1 = padding.
    weights: [N], 1 for images that take part (annotated, valid), else 0.
    image_size: (H, W) the maps are upsampled to (bilinear), the mask's size.
    relu: rectify Grad-CAM (Eq. 2) before the sigmoid. With the ReLU,
      sigmoid(GC) >= 0.5 everywhere, so background pixels can never reach a
      low probability and get no gradient once rectified; the default signed
      map lets the loss push the background down.
    logit: what the sigmoid reads. 'gradcam': the Grad-CAM map GC itself (Eq. 6
      read literally). 'cell': h w GC + y^c(0), the class logit each feature-map
      cell carries; for a GAP + linear head this is the class activation map
      A(x, y) . W_c + b_c, whose mean over the cells is the head's logit y^c.
      Grad-CAM averages the gradient over the h w cells, so GC is the same map
      divided by h w: at 4 x 4 or 7 x 7 maps its values stay near 0, sigmoid(GC)
      near 0.5 everywhere, and the loss sits above what a constant map reaches.
  Returns:
    mean over (image n, box class c) pairs of
    mean_pixels[-y log sigmoid(M^{n,c}) - (1 - y) log(1 - sigmoid(M^{n,c}))], M the
    upsampled map ``logit`` names (GC or h w GC + y^c(0)); 0 when no image has a box.
  """
  if logit not in CAM_LOGITS:
    raise ValueError(f"unknown CAM-loss logit {logit!r}; known: {list(CAM_LOGITS)}")
  maps = cam.grad_cam(head_fn, features, relu=relu)                          # [N,K,h,w]
  if logit == "cell":
    cells = features.shape[1] * features.shape[2]
    offset = head_fn(jnp.zeros_like(features[:1]))[0].astype(maps.dtype)    # y^c(0), [K]
    maps = cells * maps + offset[:, None, None]
  maps = cam.upsample(maps, image_size)                                      # [N,K,H,W]
  mask = boxes_to_mask(boxes, box_labels, *image_size)[:, None]              # [N,1,H,W]
  per_pixel = jax.nn.softplus(maps) - mask * maps                            # BCE with logits
  per_pair = jnp.mean(per_pixel, axis=(2, 3))                                # [N,K]
  pairs = box_classes(box_labels, maps.shape[1]) * weights.astype(per_pair.dtype)[:, None]
  return jnp.sum(per_pair * pairs) / jnp.maximum(jnp.sum(pairs), 1.0)
