"""PAC-CRF (Su et al. 2019) on the P x P patch grid (Rozenberg 2020, Sec. 3.3).

Unary terms: the base model's patch logits u = logit(p). Pairwise potential
between patch i and a patch j in the window Omega(i) (w x w, j != i):

  psi(k_i, k_j) = G(f_i, f_j) W_{k_i k_j}(xi_i - xi_j),
  G(f_i, f_j) = exp(-||f_i - f_j||^2 / 2),

f the learned guide features on the grid (a second image branch), W a learned
K x K inter-class compatibility for every offset in the window. Mean-field
with sigmoid (multi-label) marginals, ``iterations`` times:

  q^0 = sigmoid(u),   q^{t+1}_i(k) = sigmoid(u_i(k) + m_i(k)),
  m_i(k) = sum_{j in Omega(i), j != i} G(f_i, f_j) sum_{k'} W_{k k'}(xi_j - xi_i) q^t_j(k').

W starts at zero, so an untrained CRF returns the unary probabilities
(Rozenberg: "in the absence of neighbour dependence the CRF chooses z = p").
Neighbours outside the grid do not exist (no padding values enter). The
window is unfolded with ``lax.conv_general_dilated_patches`` (one op, no loop
over pixels or offsets).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cxr_jax.models import layers


def unfold(x: jax.Array, window: int) -> jax.Array:
  """Every pixel's w x w neighbourhood: [N,P,Q,C] -> [N,P,Q,C,w*w] (zeros outside the grid).

  Offset index o = (dy + r) * w + (dx + r) for dy, dx in [-r, r], r = w // 2.
  """
  n, p, q, c = x.shape
  patches = jax.lax.conv_general_dilated_patches(
      x, (window, window), (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return patches.reshape(n, p, q, c, window * window)  # channel-major, offset-minor


def pairwise_kernel(features: jax.Array, window: int) -> jax.Array:
  """G(f_i, f_j) over each window, 0 for j = i and for j outside the grid.

  features: [N,P,Q,C] guide features. Returns [N,P,Q,w*w] float32.
  """
  features = features.astype(jnp.float32)
  n, p, q, _ = features.shape
  neighbours = unfold(features, window)                                  # [N,P,Q,C,O]
  inside = unfold(jnp.ones((1, p, q, 1), jnp.float32), window)[..., 0, :]  # [1,P,Q,O]
  distance = jnp.sum(jnp.square(neighbours - features[..., None]), axis=-2)
  centre = jnp.arange(window * window) == (window * window) // 2
  return jnp.exp(-0.5 * distance) * inside * (~centre).astype(jnp.float32)


def message(q: jax.Array, kernel: jax.Array, compatibility: jax.Array, window: int) -> jax.Array:
  """m_i(k) = sum_o kernel_i(o) sum_k' W[o, k, k'] q_{i+o}(k').

  q: [N,P,Q,K] marginals; kernel: [N,P,Q,w*w] (``pairwise_kernel``);
  compatibility: W [w*w,K,K]. Returns [N,P,Q,K].
  """
  neighbours = unfold(q.astype(jnp.float32), window) * kernel[..., None, :]  # [N,P,Q,K',O]
  return jnp.einsum("npqjo,okj->npqk", neighbours, compatibility)  # one matmul over (K', O)


def mean_field(unary_logits: jax.Array, features: jax.Array, compatibility: jax.Array,
               window: int, iterations: int) -> jax.Array:
  """Logits u + m after ``iterations`` mean-field updates (module docstring); [N,P,Q,K]."""
  kernel = pairwise_kernel(features, window)
  logits = unary_logits.astype(jnp.float32)
  for _ in range(iterations):  # a handful of unrolled updates, each one vectorised op
    logits = unary_logits + message(jax.nn.sigmoid(logits), kernel, compatibility, window)
  return logits


class PacCRF(nn.Module):
  """Mean-field PAC-CRF, then two 3x3 convs each followed by ReLU and BatchNorm (Sec. 3.3).

  The convs refine the mean-field logits as a residual; the second BatchNorm's
  scale starts at 0, so the untrained module is the identity on the logits.
  """
  num_classes: int
  window: int = 19
  iterations: int = 5
  hidden: int = 32

  @nn.compact
  def __call__(self, unary_logits: jax.Array, features: jax.Array, train: bool = False) -> jax.Array:
    """unary_logits [N,P,P,K], features [N,P,P,C] -> refined logits [N,P,P,K]."""
    if self.window % 2 != 1:
      raise ValueError(f"PAC-CRF window must be odd, got {self.window}")
    compatibility = self.param("compatibility", nn.initializers.zeros,
                               (self.window * self.window, self.num_classes, self.num_classes))
    logits = mean_field(unary_logits, features, compatibility, self.window, self.iterations)
    h = nn.Conv(self.hidden, (3, 3), name="conv_a")(logits)
    h = layers.batch_norm(train, name="bn_a")(nn.relu(h))
    h = nn.Conv(self.num_classes, (3, 3), name="conv_b")(h)
    h = layers.batch_norm(train, name="bn_b", scale_init=nn.initializers.zeros)(nn.relu(h))
    return logits + h
