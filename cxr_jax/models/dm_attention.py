"""Disease-mask spatial attention of Kim 2022 (Sec. 3.1): masks from CAMs (Eq. 1-3), f' (Eq. 4-5).

The masks are per class, psi [h,w,K] on the classifier's feature grid. Class
c's attended feature map is f'_c = psi_c * f + f (Eq. 4); its CAM (Eq. 5) is
linear in f, so no per-class copy of f is formed:

  S'_c = sum_k w_kc (psi_c f_k + f_k) = (1 + psi_c) S_c,

and the class logit is the global average of S'_c plus the bias. psi = 0
gives the plain GAP + linear classifier exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Kim 2022: the seven classes that occur on both sides use L + H(L) in Eq. 3;
# Cardiomegaly (the asymmetric class m) uses L. Classes outside the eight boxed
# ones follow the same rule: symmetric unless listed here.
ASYMMETRIC = ("Cardiomegaly", "Hernia")


class AttentionHead(nn.Module):
  """CAM head with disease-mask attention: (logits [N,K], attended CAMs S'_c [N,h,w,K]).

  Params 'kernel' [D,K] and 'bias' [K], as a Dense layer's (``baseline``'s 'head').
  """
  num_classes: int

  @nn.compact
  def __call__(self, features: jax.Array, psi: jax.Array) -> tuple[jax.Array, jax.Array]:
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (features.shape[-1], self.num_classes))
    bias = self.param("bias", nn.initializers.zeros, (self.num_classes,))
    cams = attended_cams(features, psi, kernel)
    return jnp.mean(cams, axis=(1, 2)) + bias, cams


def attended_cams(features: jax.Array, psi: jax.Array, kernel: jax.Array) -> jax.Array:
  """Eq. 5: S'_c = sum_k w_kc f'_k with f'_c = psi_c f + f (Eq. 4).

  features [N,h,w,D], psi [h,w,K], kernel [D,K] -> [N,h,w,K] (float32).
  """
  cams = jnp.einsum("nhwd,dk->nhwk", features.astype(jnp.float32), kernel.astype(jnp.float32))
  return cams * (1.0 + psi.astype(jnp.float32))[None]


def normalize_maps(maps: jax.Array, eps: float = 1e-7) -> jax.Array:
  """N(.) of Eq. 3: per image and class min-max to [0, 1]; [N,h,w,K] -> [N,h,w,K]."""
  low = jnp.min(maps, axis=(1, 2), keepdims=True)
  shifted = maps - low
  return shifted / (jnp.max(shifted, axis=(1, 2), keepdims=True) + eps)


def mask_statistics(cams: jax.Array, probs: jax.Array, keep: jax.Array, symmetric: jax.Array,
                    min_prob: float) -> tuple[jax.Array, jax.Array]:
  """One batch's share of Eq. 3: (sum of L-bar over kept maps [h,w,K], count per class [K]).

  cams [N,h,w,K]: S_c(x) (Eq. 1) of aligned images; probs [N,K]: P_c(x)
  (Eq. 2); keep [N]: real rows; symmetric [K] bool. A map counts for class c
  when P_c(x) >= ``min_prob``; L-bar = N(L) + H(N(L)) for symmetric classes
  (H: horizontal flip), N(L) otherwise.
  """
  maps = normalize_maps(cams)
  maps = jnp.where(symmetric[None, None, None, :], maps + maps[:, :, ::-1, :], maps)
  weight = ((probs >= min_prob) & keep[:, None]).astype(jnp.float32)    # [N,K]
  return jnp.einsum("nhwk,nk->hwk", maps, weight), jnp.sum(weight, axis=0)


def finalize_masks(total: np.ndarray, count: np.ndarray, threshold: float) -> np.ndarray:
  """Eq. 3: psi_c = T(mean of L-bar), float32 [h,w,K].

  The mean is rescaled to [0, 1] by its maximum (L + H(L) reaches 2), then
  T keeps the values >= ``threshold`` and zeroes the rest (soft masks as
  their Fig. 3). A class with no kept image gets psi_c = 0 (no attention).
  """
  mean = np.asarray(total, np.float64) / np.maximum(np.asarray(count, np.float64), 1.0)
  peak = mean.max(axis=(0, 1), keepdims=True)
  scaled = np.where(peak > 0, mean / np.where(peak > 0, peak, 1.0), 0.0)
  return np.where(scaled >= threshold, scaled, 0.0).astype(np.float32)


def symmetric_classes(class_names: Sequence[str]) -> np.ndarray:
  """bool [K]: whether Eq. 3 uses L + H(L) for each class."""
  return np.array([name not in ASYMMETRIC for name in class_names])


# ---------------------------------------------------------------------------
# Pseudo-disease masks (Table 2, Fig. 7): binary regions per class, drawn from
# external knowledge, on the canonical (aligned) frame.

# Class -> regions it is drawn on ('upper'/'lower': that half of the lungs).
PSEUDO_REGIONS = {
    "Atelectasis": ("lungs_lower",), "Cardiomegaly": ("heart",),
    "Effusion": ("lungs_lower",), "Infiltration": ("lungs",), "Mass": ("lungs",),
    "Nodule": ("lungs",), "Pneumonia": ("lungs",), "Pneumothorax": ("lungs_upper",),
    "Consolidation": ("lungs",), "Edema": ("lungs",), "Emphysema": ("lungs",),
    "Fibrosis": ("lungs",), "Pleural_Thickening": ("lungs",), "Hernia": ("below_heart",),
}

# NIH-14 drawn template: ellipses (cx, cy, rx, ry) in the [-1, 1] frame of an
# aligned PA film (x right, y down; the patient's left is the image right),
# read off the mean NIH image: lung fields either side of the spine, the heart
# low and to the image right, the gastro-oesophageal region under it.
NIH_TEMPLATE = {
    "lung_image_left": (-0.37, -0.08, 0.3, 0.55),
    "lung_image_right": (0.37, -0.08, 0.3, 0.55),
    "heart": (0.1, 0.3, 0.32, 0.24),
    "below_heart": (0.05, 0.6, 0.2, 0.12),
}


def _ellipse(size: int, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
  axis = (np.arange(size) + 0.5) * (2 / size) - 1
  return ((axis[None, :] - cx) / rx)**2 + ((axis[:, None] - cy) / ry)**2 < 1


def drawn_regions(size: int) -> dict[str, np.ndarray]:
  """bool [size,size] regions of ``NIH_TEMPLATE``: 'lung_image_left', 'lung_image_right',
  'heart', 'below_heart'."""
  return {name: _ellipse(size, *ellipse) for name, ellipse in NIH_TEMPLATE.items()}


def pseudo_disease_masks(regions: Mapping[str, np.ndarray], class_names: Sequence[str],
                         grid: tuple[int, int]) -> np.ndarray:
  """float32 [h,w,K] masks (``PSEUDO_REGIONS``) on the feature grid.

  regions: bool [S,S] maps with 'lung_image_left', 'lung_image_right', 'heart',
  'below_heart'. 'lungs_upper' / 'lungs_lower' split each lung at its row
  midpoint. Each class's binary region (1 inside, 0 outside, their Fig. 7)
  is area-averaged onto the grid: a cell holds the fraction it covers (binary
  when S equals the grid; on a coarse grid a threshold would erase the lungs).
  """
  lungs = regions["lung_image_left"] | regions["lung_image_right"]
  rows = np.arange(lungs.shape[0])[:, None]
  upper = np.zeros_like(lungs)
  for name in ("lung_image_left", "lung_image_right"):
    lung_rows = np.flatnonzero(regions[name].any(1))
    middle = (lung_rows[0] + lung_rows[-1]) / 2 if len(lung_rows) else 0
    upper |= regions[name] & (rows < middle)
  named = {"lungs": lungs, "lungs_upper": upper, "lungs_lower": lungs & ~upper,
           "heart": regions["heart"], "below_heart": regions["below_heart"]}
  masks = []
  for name in class_names:
    if name not in PSEUDO_REGIONS:
      raise KeyError(f"pseudo-disease masks: no region for class {name!r}; "
                     f"known: {sorted(PSEUDO_REGIONS)}")
    region = np.any([named[r] for r in PSEUDO_REGIONS[name]], axis=0).astype(np.float32)
    masks.append(_area_resize(region, grid))
  return np.stack(masks, -1).astype(np.float32)


def _area_resize(region: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
  """Mean of ``region`` [S,S] over each cell of a grid [h,w] (S a multiple of h and w)."""
  h, w = grid
  size = region.shape[0]
  if size % h or size % w:
    raise ValueError(f"pseudo-disease masks: template size {size} not a multiple of grid {grid}")
  return region.reshape(h, size // h, w, size // w).mean((1, 3))
