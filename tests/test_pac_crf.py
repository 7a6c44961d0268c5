"""PAC-CRF (Su 2019) on the patch grid: vectorised mean field vs a float64 numpy loop."""

import jax
import jax.numpy as jnp
import numpy as np

from cxr_jax.models import pac_crf


def mean_field_reference(unary, features, compatibility, window, iterations):
  """Float64 loops over images, pixels, window offsets and classes (pac_crf docstring)."""
  unary, features, w = (np.asarray(a, np.float64) for a in (unary, features, compatibility))
  n, p, q, k = unary.shape
  r = window // 2
  sigmoid = lambda v: 1 / (1 + np.exp(-v))
  logits = unary.copy()
  for _ in range(iterations):
    marg = sigmoid(logits)
    new = unary.copy()
    for b in range(n):
      for i in range(p):
        for j in range(q):
          for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
              y, x = i + dy, j + dx
              if (dy, dx) == (0, 0) or not (0 <= y < p and 0 <= x < q):
                continue
              g = np.exp(-0.5 * np.sum((features[b, i, j] - features[b, y, x]) ** 2))
              o = (dy + r) * window + (dx + r)
              new[b, i, j] += g * (w[o] @ marg[b, y, x])
    logits = new
  return logits


def test_mean_field_matches_float64_loop():
  rng = np.random.default_rng(0)
  n, p, k, c, window = 2, 6, 3, 4, 5
  unary = rng.normal(0, 1.5, (n, p, p, k)).astype(np.float32)
  features = rng.normal(0, 0.7, (n, p, p, c)).astype(np.float32)
  compatibility = rng.normal(0, 0.3, (window * window, k, k)).astype(np.float32)
  got = jax.jit(pac_crf.mean_field, static_argnums=(3, 4))(
      jnp.asarray(unary), jnp.asarray(features), jnp.asarray(compatibility), window, 3)
  want = mean_field_reference(unary, features, compatibility, window, 3)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_window_larger_than_grid_sees_only_grid_patches():
  """A 19 x 19 window on a 3 x 5 grid (clipped to 5 x 9 offsets): every other patch is a
  neighbour with its own offset's W, nothing outside."""
  rng = np.random.default_rng(1)
  unary = rng.normal(0, 1, (1, 3, 5, 2)).astype(np.float32)
  features = rng.normal(0, 0.5, (1, 3, 5, 3)).astype(np.float32)
  compatibility = rng.normal(0, 0.2, (19 * 19, 2, 2)).astype(np.float32)
  got = pac_crf.mean_field(jnp.asarray(unary), jnp.asarray(features), jnp.asarray(compatibility),
                           19, 2)
  np.testing.assert_allclose(np.asarray(got),
                             mean_field_reference(unary, features, compatibility, 19, 2),
                             rtol=1e-4, atol=1e-4)


def test_untrained_crf_returns_the_unary_logits_and_trains():
  """W = 0 and a zero-scale last BatchNorm: z = p before training (Rozenberg Sec. 3.3)."""
  rng = np.random.default_rng(2)
  unary = jnp.asarray(rng.normal(0, 1, (2, 4, 4, 3)), jnp.float32)
  features = jnp.asarray(rng.normal(0, 1, (2, 4, 4, 4)), jnp.float32)
  crf = pac_crf.PacCRF(num_classes=3, window=5, iterations=2, hidden=8)
  out, variables = jax.jit(lambda k: crf.init_with_output(k, unary, features))(jax.random.key(1))
  np.testing.assert_allclose(np.asarray(out), np.asarray(unary), atol=1e-6)

  def loss(params):
    logits, _ = crf.apply({**variables, "params": params}, unary, features, train=True,
                          mutable=["batch_stats"])
    return jnp.mean((jax.nn.sigmoid(logits) - 1.0) ** 2)

  grads = jax.jit(jax.grad(loss))(variables["params"])
  assert float(jnp.max(jnp.abs(grads["bn_b"]["scale"]))) > 0      # the refinement can learn
  assert float(jnp.max(jnp.abs(grads["compatibility"]))) > 0      # ... and so can W
