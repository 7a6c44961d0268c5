"""The disease-mask model of Kim, Jung & Lee 2022: alignment + attention CAM head.

Aligner (``cxr_jax.models.alignment``, optional) -> affine warp of the image
-> classifier backbone -> CAM head with disease-mask attention
(``cxr_jax.models.dm_attention``: f' = psi f + f, Eq. 4; CAMs from f', Eq. 5).
Two params leaves no stage trains: 'anchor' [H,W,C] (Sec. 3.2) and 'psi'
[h,w,K] (Eq. 3), set by the method's ``Stage.prepare`` passes.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cxr_jax.models import alignment, dm_attention


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
