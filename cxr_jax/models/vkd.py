"""Variational classifier with an annotation-conditioned prior (van Sonsbeek et al. 2023, Fig. 2).

Posterior q(z|x) (Sec. 3.5, 4.2): image encoder -> global average pooling ->
CH1 (two-layer MLP, hidden ``hidden``) -> CH2 (two-layer MLP, hidden
``hidden``) -> (mu, logvar) of a fully factorised Gaussian over z [L].
Classifier p(y|z, x): one Dense layer on z (or on [z, pooled image feature]
when ``concat_feature``) -> K logits.
Prior p(z|c) (Eq. 4): a second encoder of the same type on the annotation map
c -> global average pooling -> two-layer MLP (hidden ``hidden``) ->
(mu_p, logvar_p). Stage 1's prior N(0, I) has no parameters.
With ``spatial_latent`` the MLPs act on every cell of their encoder's feature
map instead of on its pooled vector, so z, the prior and the KL are per cell.
The prior encoder reads c resized to ``prior_scale`` of the image side (antialiased; at least
``MIN_PRIOR_SIZE`` px): c is a smooth map, and the prior encoder is the only
network stage 2 trains through, so its resolution sets stage 2's cost.

Param names (the stage freeze regexes of ``cxr_jax.methods.vkd`` read them):
``encoder``, ``ch1``, ``ch2``, ``classifier``, ``prior_encoder``, ``prior_head``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cxr_jax.models.layers import MLP, global_avg_pool

# Smallest side the prior encoder reads: a backbone's five stride-2 stages leave >= 1 x 1.
MIN_PRIOR_SIZE = 32


def split_gaussian(stats: jax.Array) -> tuple[jax.Array, jax.Array]:
  """[..., 2L] -> (mu [..., L], logvar [..., L]) in float32."""
  mu, logvar = jnp.split(stats.astype(jnp.float32), 2, axis=-1)
  return mu, logvar


def prior_input_size(image_size: int, scale: float) -> int:
  """Side of the map the prior encoder reads: round(scale * image_size), at least
  ``MIN_PRIOR_SIZE`` and at most ``image_size``."""
  if not 0.0 < scale <= 1.0:
    raise ValueError(f"config.vkd.prior_scale must be in (0, 1], got {scale}")
  return min(image_size, max(MIN_PRIOR_SIZE, round(scale * image_size)))


def reparameterize(mu: jax.Array, logvar: jax.Array, rng: jax.Array, num_samples: int) -> jax.Array:
  """z^(l) = mu + exp(logvar / 2) * eps^(l), eps^(l) ~ N(0, I) (Sec. 3.5). [N,L] -> [S,N,L]."""
  eps = jax.random.normal(rng, (num_samples,) + mu.shape, mu.dtype)
  return mu + jnp.exp(0.5 * logvar) * eps


class VKDModel(nn.Module):
  """q(z|x), p(y|z,x) and p(z|c).

  Attributes:
    encoder: image backbone, [N,H,W,C] -> [N,h,w,D].
    prior_encoder: annotation-map backbone of the same type.
    num_classes: K.
    latent_dim: L.
    hidden: hidden (and CH1 output) width of the MLPs (paper: 512).
    concat_feature: the classifier reads [z, pooled image feature] instead of z.
    image_channels: C; the one-channel annotation map is repeated to C channels.
    prior_scale: the prior encoder reads c at this fraction of the image side
      (``prior_input_size``; 1.0 = the paper's full resolution).
    spatial_latent: z is a map [N,h,w,L]: CH1, CH2 and the prior head act on each
      cell of their encoder's feature map (1 x 1 convolutions), the classifier reads
      z averaged over the cells, and the KL compares q and p cell by cell. False: z
      [N,L] from the pooled feature.
  """
  encoder: nn.Module
  prior_encoder: nn.Module
  num_classes: int
  latent_dim: int
  hidden: int = 512
  concat_feature: bool = False
  image_channels: int = 1
  prior_scale: float = 1.0
  spatial_latent: bool = False

  def setup(self):
    self.ch1 = MLP((self.hidden, self.hidden))
    self.ch2 = MLP((self.hidden, 2 * self.latent_dim))
    self.classifier = nn.Dense(self.num_classes, dtype=jnp.float32)
    self.prior_head = MLP((self.hidden, 2 * self.latent_dim))

  def encode(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Images [N,H,W,C] -> the encoder's last feature map [N,h,w,D] (what Grad-CAM explains)."""
    return self.encoder(x, train=train)

  def posterior(self, features: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Feature map [N,h,w,D] -> (pooled [N,D], mu, logvar) of q(z|x), [N,L] or, with
    ``spatial_latent``, [N,h,w,L]."""
    features = features.astype(jnp.float32)
    pooled = global_avg_pool(features)
    h = self.ch1(features if self.spatial_latent else pooled)
    mu, logvar = split_gaussian(self.ch2(nn.relu(h)))
    return pooled, mu, logvar

  def classify(self, z: jax.Array, pooled: jax.Array) -> jax.Array:
    """p(y|z, x): z [..., N, L] or [..., N, h, w, L] (pooled [N, D]) -> logits [..., N, K]."""
    if self.spatial_latent:
      z = jnp.mean(z, axis=(-3, -2))
    if self.concat_feature:
      pooled = jnp.broadcast_to(pooled, z.shape[:-1] + pooled.shape[-1:])
      z = jnp.concatenate([z, pooled], axis=-1)
    return self.classifier(z)

  def head(self, features: jax.Array) -> jax.Array:
    """Feature map [N,h,w,D] -> logits [N,K] at the posterior mean (inference, Grad-CAM)."""
    pooled, mu, _ = self.posterior(features)
    return self.classify(mu, pooled)

  def prior(self, annotation: jax.Array, train: bool = False,
            grid: tuple[int, int] | None = None) -> tuple[jax.Array, jax.Array]:
    """p(z|c): annotation map [N,H,W,1] in [0,1] -> (mu_p, logvar_p) [N,L]; with
    ``spatial_latent`` [N,h,w,L] on ``grid`` = (h, w), the posterior's cells (the
    prior encoder's map is resized to it when ``prior_scale`` makes it smaller)."""
    n, height, width, _ = annotation.shape
    size = (prior_input_size(height, self.prior_scale), prior_input_size(width, self.prior_scale))
    if size != (height, width):
      annotation = jax.image.resize(annotation.astype(jnp.float32), (n, *size, 1), "linear",
                                    antialias=True)
    c = jnp.broadcast_to(annotation, annotation.shape[:-1] + (self.image_channels,))
    features = self.prior_encoder(c, train=train).astype(jnp.float32)
    if not self.spatial_latent:
      return split_gaussian(self.prior_head(global_avg_pool(features)))
    if grid is not None and features.shape[1:3] != tuple(grid):
      features = jax.image.resize(features, (n, *grid, features.shape[-1]), "linear",
                                  antialias=True)
    return split_gaussian(self.prior_head(features))

  def __call__(self, x: jax.Array, annotation: jax.Array | None = None, *, train: bool = False,
               train_encoder: bool = True, num_samples: int = 0) -> dict[str, jax.Array]:
    """Forward pass.

    Args:
      x: images [N,H,W,C].
      annotation: map c [N,H,W,1]; given, the prior p(z|c) is computed too.
      train: BatchNorm on batch statistics (and updated) vs running averages.
      train_encoder: False runs the (frozen) image encoder's BatchNorm on its
        running averages while ``train`` holds for the rest.
      num_samples: S > 0 draws S reparameterised samples of z (rng 'sample').
    Returns:
      'logits' [N,K] at the posterior mean; 'features' [N,h,w,D]; 'mu',
      'logvar' [N,L] ([N,h,w,L] with ``spatial_latent``); with S > 0
      'sample_logits' [S,N,K]; with an annotation 'prior_mu', 'prior_logvar'
      shaped as 'mu'.
    """
    features = self.encode(x, train=train and train_encoder)
    pooled, mu, logvar = self.posterior(features)
    out = {"logits": self.classify(mu, pooled), "features": features, "mu": mu, "logvar": logvar}
    if num_samples > 0:
      z = reparameterize(mu, logvar, self.make_rng("sample"), num_samples)
      out["sample_logits"] = self.classify(z, pooled)
    if annotation is None and self.is_initializing():
      annotation = jnp.zeros(x.shape[:-1] + (1,), jnp.float32)  # create the prior's params
    if annotation is not None:
      out["prior_mu"], out["prior_logvar"] = self.prior(annotation, train=train,
                                                        grid=features.shape[1:3])
    return out
