"""Class activation maps: CAM, Grad-CAM, Grad-CAM++, Score-CAM (pure, jit-able).

Every map explains a conv feature map ``features`` [N,h,w,D] (usually the
backbone's last one) and is returned as [N,C,h,w] for C requested classes
(default: all K), computed for all classes at once (one forward, a vmapped
backward; no Python loop over classes or images). The (features_fn, head_fn)
pair comes from ``Method.cam_target``:

  features_fn, head_fn = method.cam_target(model, variables)
  features = features_fn(images)
  maps = normalize(upsample(grad_cam(head_fn, features), images.shape[1:3]))

``head_fn`` maps features [N,h,w,D] -> logits [N,K] and must treat examples
independently (inference-mode BatchNorm), so that the gradient of the summed
class-c logits is each example's own gradient. All maps are differentiable
(the BYOL + CAM loss of Talasila 2023 backpropagates through Grad-CAM) and
computed in float32 (float64 for float64 inputs).

Conventions follow ``pytorch-grad-cam`` (Gildenblat et al.), which the parity
test compares against: maps are ReLU'd, upsampled bilinearly to the image and
min-max normalized per map (ReLU, upsampling and normalization commute up to
the order pytorch-grad-cam applies them, because resizing is linear with
weights summing to 1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

KINDS = ("gradcam", "gradcam++", "scorecam")


def _float(x: jax.Array) -> jax.Array:
  """At least float32 (bfloat16 features are explained in float32; float64 stays)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _class_indices(num_classes: int, classes) -> jax.Array:
  if classes is None:
    return jnp.arange(num_classes)
  return jnp.asarray(classes, jnp.int32)


def cam(features: jax.Array, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
  """CAM (Zhou 2016, Eq. 2): M_k(x, y) = sum_d w_dk f_d(x, y) (+ b_k).

  For a global-average-pooling + linear head the spatial mean of M_k (with
  the bias) is the class-k logit.

  Args:
    features: [N,h,w,D].
    kernel: [D,K] linear head weights.
    bias: optional [K].
  Returns:
    [N,K,h,w], not rectified.
  """
  maps = jnp.einsum("nhwd,dk->nkhw", _float(features), _float(kernel))
  if bias is not None:
    maps = maps + _float(bias)[None, :, None, None]
  return maps


def feature_gradients(head_fn: Callable[[jax.Array], jax.Array], features: jax.Array,
                      classes=None) -> jax.Array:
  """d logit_c / d features for every requested class: one forward, a vmapped VJP.

  Args:
    head_fn: features [N,h,w,D] -> logits [N,K] (examples independent).
    features: [N,h,w,D].
    classes: int [C] class indices, or None for all K.
  Returns:
    [C,N,h,w,D].
  """
  logits, vjp = jax.vjp(head_fn, _float(features))
  if logits.ndim != 2:
    raise ValueError(f"head_fn must return logits [N,K], got shape {logits.shape}")
  classes = _class_indices(logits.shape[1], classes)
  one_hot = jax.nn.one_hot(classes, logits.shape[1], dtype=logits.dtype)  # [C,K]
  cotangents = jnp.broadcast_to(one_hot[:, None, :], (len(classes),) + logits.shape)
  (grads,) = jax.vmap(vjp)(cotangents)
  return grads


def _weighted_sum(weights: jax.Array, features: jax.Array, relu: bool) -> jax.Array:
  """sum_d weights[c,n,d] * features[n,:,:,d] -> [N,C,h,w], optionally rectified."""
  maps = jnp.einsum("cnd,nhwd->nchw", weights, _float(features))
  return jax.nn.relu(maps) if relu else maps


def grad_cam(head_fn: Callable[[jax.Array], jax.Array], features: jax.Array,
             classes=None, relu: bool = True) -> jax.Array:
  """Grad-CAM (Selvaraju 2017, Eq. 1-2).

  alpha_d^c = mean_{x,y} d y^c / d A_d(x, y);  L^c = ReLU(sum_d alpha_d^c A_d).
  y^c is the raw logit (before the sigmoid), as pytorch-grad-cam's
  ClassifierOutputTarget.

  Args:
    head_fn: features [N,h,w,D] -> logits [N,K].
    features: [N,h,w,D].
    classes: int [C] or None (all K).
    relu: rectify the map (Eq. 2); False gives the signed map.
  Returns:
    [N,C,h,w].
  """
  weights = jnp.mean(feature_gradients(head_fn, features, classes), axis=(2, 3))  # [C,N,D]
  return _weighted_sum(weights, features, relu)


def grad_cam_plus_plus(head_fn: Callable[[jax.Array], jax.Array], features: jax.Array,
                       classes=None, eps: float = 1e-6) -> jax.Array:
  """Grad-CAM++ (Chattopadhyay 2018, Eq. 19 with the exponential score, Eq. 17-19).

  With S^c = exp(y^c) the higher derivatives are powers of g = d y^c / d A,
  which gives the closed form used here (and by pytorch-grad-cam):

    a_d^c(x, y) = g^2 / (2 g^2 + (sum_{x',y'} A_d(x', y')) g^3 + eps), 0 where g = 0;
    w_d^c = sum_{x,y} a_d^c(x, y) ReLU(g(x, y));   L^c = ReLU(sum_d w_d^c A_d).

  Args:
    head_fn: features [N,h,w,D] -> logits [N,K].
    features: [N,h,w,D].
    classes: int [C] or None (all K).
    eps: keeps the denominator away from 0.
  Returns:
    [N,C,h,w].
  """
  grads = feature_gradients(head_fn, features, classes)  # [C,N,h,w,D]
  grads2 = jnp.square(grads)
  activation_sums = jnp.sum(_float(features), axis=(1, 2))[None, :, None, None, :]
  alpha = grads2 / (2 * grads2 + activation_sums * grads2 * grads + eps)
  alpha = jnp.where(grads != 0, alpha, 0.0)
  weights = jnp.sum(alpha * jax.nn.relu(grads), axis=(2, 3))  # [C,N,D]
  return _weighted_sum(weights, features, relu=True)


def score_cam(logits_fn: Callable[[jax.Array], jax.Array], images: jax.Array,
              features: jax.Array, classes=None, batch_size: int = 64) -> jax.Array:
  """Score-CAM (Wang 2020, Eq. 5-8), as pytorch-grad-cam computes it.

  Each channel d of ``features`` is upsampled to the image (bilinear, corners
  aligned, as torch's UpsamplingBilinear2d), min-max normalized to a mask
  M_d in [0,1] and multiplied into the image; the masked image's raw class-c
  logit s_d^c is its score. The weights are softmax_d(s^c) (over channels,
  on raw logits, not on differences to the unmasked image's score):
  L^c = ReLU(sum_d softmax_d(s^c) A_d).

  Costs N * D forward passes of ``logits_fn``, run ``batch_size`` masked
  images at a time with ``lax.map`` (memory: batch_size images).

  Args:
    logits_fn: images [B,H,W,C] -> logits [B,K] (examples independent).
    images: [N,H,W,C].
    features: [N,h,w,D], the map of ``images`` being explained.
    classes: int [C] or None (all K).
    batch_size: masked images per forward pass.
  Returns:
    [N,C,h,w].
  """
  n, _, _, depth = features.shape
  masks = normalize(upsample(jnp.moveaxis(_float(features), -1, 1),
                             images.shape[1:3], align_corners=True), eps=1e-8)  # [N,D,H,W]
  total = n * depth
  chunks = -(-total // batch_size)
  pairs = jnp.minimum(jnp.arange(chunks * batch_size), total - 1).reshape(chunks, batch_size)

  def chunk_scores(pair):
    example, channel = pair // depth, pair % depth
    masked = images[example] * masks[example, channel][..., None]
    return _float(logits_fn(masked))

  scores = jax.lax.map(chunk_scores, pairs).reshape(chunks * batch_size, -1)[:total]
  scores = scores.reshape(n, depth, -1)  # [N,D,K]
  classes = _class_indices(scores.shape[-1], classes)
  weights = jax.nn.softmax(jnp.moveaxis(scores[:, :, classes], 2, 0), axis=-1)  # [C,N,D]
  return _weighted_sum(weights, features, relu=True)


def upsample(maps: jax.Array, size: Sequence[int], align_corners: bool = False) -> jax.Array:
  """Bilinear resize of the last two axes: [..., h, w] -> [..., H, W].

  align_corners=False: half-pixel centres (``jax.image.resize``; for upsampling
  the same as OpenCV's INTER_LINEAR, which pytorch-grad-cam uses).
  align_corners=True: corner pixels of input and output coincide
  (torch's UpsamplingBilinear2d, used by Score-CAM's masks).
  """
  height, width = int(size[0]), int(size[1])
  maps = _float(maps)
  shape = maps.shape[:-2] + (height, width)
  if not align_corners:
    return jax.image.resize(maps, shape, "bilinear")
  in_size = jnp.array(maps.shape[-2:], maps.dtype)
  out_size = jnp.array((height, width), maps.dtype)
  scale = jnp.where(in_size > 1, (out_size - 1) / jnp.maximum(in_size - 1, 1), out_size)
  translation = jnp.where(in_size > 1, 0.5 * (1 - scale), 0.0)
  return jax.image.scale_and_translate(maps, shape, (maps.ndim - 2, maps.ndim - 1), scale,
                                       translation, "linear", antialias=False)


def normalize(maps: jax.Array, eps: float = 1e-7) -> jax.Array:
  """Per-map min-max normalization of the last two axes to [0, 1]: (m - min) / (max - min + eps)."""
  low = jnp.min(maps, axis=(-2, -1), keepdims=True)
  shifted = maps - low
  return shifted / (jnp.max(shifted, axis=(-2, -1), keepdims=True) + eps)


def class_heatmaps(kind: str, features_fn: Callable[[jax.Array], jax.Array],
                   head_fn: Callable[[jax.Array], jax.Array], images: jax.Array,
                   classes=None, image_size: bool = False, score_batch_size: int = 64
                   ) -> jax.Array:
  """Heat maps of ``kind`` (one of ``KINDS``) for ``images`` [N,H,W,C].

  Returns [N,C,h,w] rectified maps, or with ``image_size`` maps upsampled to
  [N,C,H,W] and min-max normalized, as pytorch-grad-cam returns them.
  """
  features = features_fn(images)
  if kind == "gradcam":
    maps = grad_cam(head_fn, features, classes)
  elif kind == "gradcam++":
    maps = grad_cam_plus_plus(head_fn, features, classes)
  elif kind == "scorecam":
    maps = score_cam(lambda x: head_fn(features_fn(x)), images, features, classes,
                     batch_size=score_batch_size)
  else:
    raise ValueError(f"unknown CAM kind {kind!r}; known: {list(KINDS)}")
  if image_size:
    maps = normalize(upsample(maps, images.shape[1:3]))
  return maps
