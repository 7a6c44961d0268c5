"""Alignment module of Kim 2022 (Sec. 3.2, after Liu 2019): an affine warp learned to match an anchor.

Coordinates: an image of H x W pixels spans [-1, 1]^2 (x right, y down),
pixel (row i, column j) has its centre at x = (j + 0.5) 2/W - 1,
y = (i + 0.5) 2/H - 1 (the synthetic phantoms' frame). The aligner regresses
(s_x, s_y, t_x, t_y, theta) and Eq. 6's matrix

  M = [[s_x cos theta, -s_y sin theta, t_x],
       [s_x sin theta,  s_y cos theta, t_y]]

maps a point p of the ALIGNED image to the point M [p; 1] of the input that
it samples (the spatial-transformer convention): aligned(p) = I(M p). A map
given in the aligned frame goes back to the input frame with the inverse
matrix: original(X) = aligned(M^-1 X) (``invert_affine``).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

IDENTITY = (1.0, 1.0, 0.0, 0.0, 0.0)   # (s_x, s_y, t_x, t_y, theta)
WARP_MODES = ("edge", "constant")


def affine_matrix(transform: jax.Array) -> jax.Array:
  """Eq. 6: [..., 5] (s_x, s_y, t_x, t_y, theta) -> [..., 2, 3]."""
  sx, sy, tx, ty, theta = jnp.moveaxis(transform, -1, 0)
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  return jnp.stack([jnp.stack([sx * cos, -sy * sin, tx], -1),
                    jnp.stack([sx * sin, sy * cos, ty], -1)], -2)


def invert_affine(matrices: jax.Array) -> jax.Array:
  """[..., 2, 3] -> [..., 2, 3], the inverse map X -> p of p -> M [p; 1]."""
  linear, shift = matrices[..., :2], matrices[..., 2:]
  inverse = jnp.linalg.inv(linear)
  return jnp.concatenate([inverse, -inverse @ shift], -1)


def warp_affine(images: jax.Array, matrices: jax.Array, mode: str = "edge",
                cval: float = 0.0) -> jax.Array:
  """Bilinear sampling out(p) = images(M [p; 1]), differentiable in images and M.

  Args:
    images: [N,H,W,C].
    matrices: [N,2,3] in normalized coordinates (module docstring).
    mode: 'edge' (samples outside clamp to the border, OpenCV BORDER_REPLICATE)
      or 'constant' (outside pixels read ``cval``, BORDER_CONSTANT).
  Returns:
    [N,H,W,C], same grid as ``images``.
  """
  if mode not in WARP_MODES:
    raise ValueError(f"warp_affine mode {mode!r}; known: {list(WARP_MODES)}")
  n, height, width, channels = images.shape
  xs = (jnp.arange(width, dtype=matrices.dtype) + 0.5) * (2.0 / width) - 1.0
  ys = (jnp.arange(height, dtype=matrices.dtype) + 0.5) * (2.0 / height) - 1.0
  m = matrices[:, :, :, None, None]
  x_src = m[:, 0, 0] * xs[None, :] + m[:, 0, 1] * ys[:, None] + m[:, 0, 2]   # [N,H,W]
  y_src = m[:, 1, 0] * xs[None, :] + m[:, 1, 1] * ys[:, None] + m[:, 1, 2]
  u = (x_src + 1.0) * (width / 2.0) - 0.5     # source pixel coordinates
  v = (y_src + 1.0) * (height / 2.0) - 0.5
  u0, v0 = jnp.floor(u), jnp.floor(v)
  du, dv = u - u0, v - v0
  flat = images.reshape(n, height * width, channels)
  out = jnp.zeros((n, height, width, channels), jnp.result_type(images.dtype, du.dtype))
  for col_offset, row_offset, weight in ((0, 0, (1 - du) * (1 - dv)), (1, 0, du * (1 - dv)),
                                         (0, 1, (1 - du) * dv), (1, 1, du * dv)):
    col = (u0 + col_offset).astype(jnp.int32)
    row = (v0 + row_offset).astype(jnp.int32)
    inside = (col >= 0) & (col < width) & (row >= 0) & (row < height)
    index = jnp.clip(row, 0, height - 1) * width + jnp.clip(col, 0, width - 1)
    values = jnp.take_along_axis(flat, index.reshape(n, -1, 1), axis=1).reshape(out.shape)
    if mode == "constant":
      values = jnp.where(inside[..., None], values, cval)
    out = out + weight[..., None] * values
  return out


def grid_blur(images: jax.Array, cell: int = 16) -> jax.Array:
  """B(G(.)) of Eq. 6: cell x cell average pooling (stride cell), bilinear upsampling back.

  [N,H,W,C] -> [N,H,W,C]; H and W multiples of ``cell``.
  """
  n, height, width, channels = images.shape
  if height % cell or width % cell:
    raise ValueError(f"grid_blur: image {height}x{width} is not a multiple of cell={cell}")
  pooled = images.reshape(n, height // cell, cell, width // cell, cell, channels).mean((2, 4))
  return jax.image.resize(pooled, images.shape, "bilinear")


def euclidean_loss(anchor: jax.Array, warped: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Eq. 8 per pixel: mean over images and the P x P pixels of ||A_ij - phi(I)_ij||_2.

  anchor [H,W,C], warped [N,H,W,C] -> scalar. Eq. 8 sums over pixels; the mean
  (Eq. 8 / P^2) keeps the SGD learning rate of Sec. 4.2 independent of P.
  """
  diff = warped - anchor[None]
  return jnp.mean(jnp.sqrt(jnp.sum(jnp.square(diff), axis=-1) + eps))


def perceptual_loss(anchor_features: dict, features: dict, eps: float = 1e-12) -> jax.Array:
  """Eq. 7: sum_s ||F_s(A) - F_s(phi(I))||_2 / (C^s H^s W^s), averaged over images.

  anchor_features: {stage: [1,h,w,c]}; features: {stage: [N,h,w,c]} -> scalar.
  """
  total = 0.0
  for stage, feats in features.items():
    diff = (feats - anchor_features[stage]).astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(diff), axis=(1, 2, 3)) + eps)
    total = total + jnp.mean(norm) / math.prod(feats.shape[1:])
  return total


class Aligner(nn.Module):
  """ResNet (Kim: ResNet-18) + GAP + Dense(5) -> (s_x, s_y, t_x, t_y, theta) [N,5].

  The Dense layer's kernel starts at zero and its bias at ``IDENTITY``: the
  untrained aligner is the identity warp (kernel zero: no image dependence).
  """
  backbone: nn.Module

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    pooled = jnp.mean(self.backbone(x, train=train).astype(jnp.float32), axis=(1, 2))
    identity = lambda *_: jnp.asarray(IDENTITY, jnp.float32)
    return nn.Dense(5, kernel_init=nn.initializers.zeros, bias_init=identity,
                    dtype=jnp.float32, name="transform")(pooled)


def residual_pose(pose_matrices: np.ndarray, matrices: np.ndarray) -> dict[str, np.ndarray]:
  """How far the aligned frame still is from a known canonical frame.

  pose_matrices [N,2,3]: canonical point -> image point (the phantoms' ``Pose``);
  matrices [N,2,3]: aligned point -> image point (Eq. 6). The residual
  R = pose^-1 o M maps aligned points to canonical ones (identity = perfectly
  aligned). Returns float64 [N] arrays: 'rotation_deg' (atan2 of R's first
  column), 'scale' (sqrt |det|), 'shift_xy' [N,2] (R(0): the canonical point
  the aligned centre lands on, in [-1, 1] units) and 'shift' (its norm).
  """
  pose = np.asarray(pose_matrices, np.float64)
  m = np.asarray(matrices, np.float64)
  pose_inv = np.linalg.inv(pose[:, :, :2])
  linear = pose_inv @ m[:, :, :2]
  shift = pose_inv @ (m[:, :, 2:] - pose[:, :, 2:])
  return {"rotation_deg": np.degrees(np.arctan2(linear[:, 1, 0], linear[:, 0, 0])),
          "scale": np.sqrt(np.abs(np.linalg.det(linear))),
          "shift_xy": shift[:, :, 0], "shift": np.linalg.norm(shift[:, :, 0], axis=-1)}
