"""BlurPool, BatchNorm semantics, MLP and pooling against float64 numpy references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxr_jax.models import layers


def _reflect(i: int, n: int) -> int:
  """Index i of a reflect-padded axis of length n (no edge repeat), by explicit folding."""
  while i < 0 or i >= n:
    i = -i if i < 0 else 2 * (n - 1) - i
  return i


def _blur_pool_reference(x: np.ndarray, size: int, stride: int = 2) -> np.ndarray:
  """Explicit loops in float64: reflect pad ((size-1)//2, size//2), binomial filter, stride."""
  taps = np.array([math.comb(size - 1, k) for k in range(size)], np.float64)
  taps /= taps.sum()
  n, h, w, c = x.shape
  before = (size - 1) // 2
  out_h, out_w = -(-h // stride), -(-w // stride)
  out = np.zeros((n, out_h, out_w, c))
  for oi in range(out_h):
    for oj in range(out_w):
      for a in range(size):
        for b in range(size):
          i = _reflect(oi * stride - before + a, h)
          j = _reflect(oj * stride - before + b, w)
          out[:, oi, oj, :] += taps[a] * taps[b] * x[:, i, j, :]
  return out


def test_binomial_filter_is_pascal_row():
  for size in range(1, 8):
    row = np.array([math.comb(size - 1, k) for k in range(size)], np.float64)
    np.testing.assert_allclose(layers.binomial_filter(size), row / row.sum(), rtol=1e-12)
  for bad in (0, 8):
    with pytest.raises(ValueError, match="1..7"):
      layers.binomial_filter(bad)


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5])
def test_blur_pool_matches_numpy_reference(size):
  x = np.random.default_rng(size).normal(size=(2, 9, 12, 3))  # odd and even sides
  got = np.asarray(layers.blur_pool(jnp.asarray(x, jnp.float32), size))
  want = _blur_pool_reference(x, size)
  assert got.shape == (2, 5, 6, 3)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_blur_pool_shift_by_two_shifts_output_by_one():
  """Blur then subsample by 2 is equivariant to even shifts (away from the borders)."""
  x = np.random.default_rng(0).normal(size=(1, 32, 32, 2)).astype(np.float32)
  shifted = np.roll(x, (2, 2), axis=(1, 2))
  for size in (3, 4, 5):
    out = np.asarray(layers.blur_pool(jnp.asarray(x), size))
    out_shifted = np.asarray(layers.blur_pool(jnp.asarray(shifted), size))
    np.testing.assert_allclose(out_shifted[:, 2:-1, 2:-1], out[:, 1:-2, 1:-2], atol=1e-6)


def test_blur_pool_reduces_change_under_one_pixel_shift():
  """Zhang 2019: low-pass before subsampling makes the output change less under a 1-px shift.

  On white noise plain striding gives two independent grids (relative change ~sqrt(2));
  larger binomial filters correlate neighbouring samples more, so the change shrinks.
  """
  x = np.random.default_rng(1).normal(size=(2, 64, 64, 4)).astype(np.float32)
  shifted = np.roll(x, (1, 1), axis=(1, 2))
  interior = (slice(None), slice(2, -2), slice(2, -2))

  def relative_change(size):
    a = np.asarray(layers.blur_pool(jnp.asarray(x), size))[interior]
    b = np.asarray(layers.blur_pool(jnp.asarray(shifted), size))[interior]
    return np.linalg.norm(a - b) / np.linalg.norm(a)

  changes = [relative_change(size) for size in range(1, 6)]
  assert changes[0] == pytest.approx(math.sqrt(2), rel=0.05)  # size 1 is plain striding
  assert all(later < earlier for earlier, later in zip(changes, changes[1:])), changes


def test_blur_pool_keeps_bfloat16():
  x = jnp.ones((1, 8, 8, 2), jnp.bfloat16)
  out = layers.blur_pool(x, 3)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), 1.0)  # filter sums to one


def test_batch_norm_train_updates_running_stats_with_torch_momentum():
  rng = np.random.default_rng(0)
  x = (3.0 + 2.0 * rng.normal(size=(4, 5, 5, 6))).astype(np.float32)
  bn = layers.batch_norm(train=True)
  scale, bias = rng.normal(size=6), rng.normal(size=6)
  old_mean, old_var = rng.normal(size=6), rng.uniform(0.5, 2.0, size=6)
  variables = {"params": {"scale": jnp.asarray(scale, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)},
               "batch_stats": {"mean": jnp.asarray(old_mean, jnp.float32), "var": jnp.asarray(old_var, jnp.float32)}}
  out, updates = bn.apply(variables, jnp.asarray(x), mutable=["batch_stats"])

  x64 = x.astype(np.float64).reshape(-1, 6)
  mean, var = x64.mean(0), x64.var(0)  # biased batch variance (torch normalises with it too)
  np.testing.assert_allclose(out, ((x - mean) / np.sqrt(var + 1e-5)) * scale + bias, atol=2e-4)
  np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.9 * old_mean + 0.1 * mean, rtol=1e-5)
  np.testing.assert_allclose(updates["batch_stats"]["var"], 0.9 * old_var + 0.1 * var, rtol=1e-5)


def test_batch_norm_eval_uses_running_averages():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
  scale, bias = rng.normal(size=4), rng.normal(size=4)
  mean, var = rng.normal(size=4), rng.uniform(0.5, 2.0, size=4)
  variables = {"params": {"scale": jnp.asarray(scale, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)},
               "batch_stats": {"mean": jnp.asarray(mean, jnp.float32), "var": jnp.asarray(var, jnp.float32)}}
  out = layers.batch_norm(train=False).apply(variables, jnp.asarray(x))
  np.testing.assert_allclose(out, (x - mean) / np.sqrt(var + 1e-5) * scale + bias, atol=1e-5)


def test_batch_norm_bfloat16_compute_keeps_float32_params():
  bn = layers.batch_norm(train=False, dtype=jnp.bfloat16)
  out, variables = jax.eval_shape(bn.init_with_output, jax.random.key(0), jnp.ones((1, 2, 2, 3)))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
  assert out.dtype == jnp.bfloat16


def _random_variables(module, x, seed=0):
  """Variables of ``module`` filled from numpy (no init compilation); BN statistics kept as (0, 1)."""
  shapes = jax.eval_shape(module.init, jax.random.key(0), x)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    if path[0].key == "batch_stats":
      return jnp.full(leaf.shape, 1.0 if path[-1].key == "var" else 0.0, jnp.float32)
    return jnp.asarray(rng.normal(0.0, 0.5, leaf.shape), jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def test_mlp_matches_numpy():
  x = np.random.default_rng(2).normal(size=(5, 7)).astype(np.float32)
  mlp = layers.MLP(features=(16, 8, 3))
  params = _random_variables(mlp, x)["params"]
  assert sorted(params) == ["dense_0", "dense_1", "dense_2"]
  h = x.astype(np.float64)
  for i in range(3):
    h = h @ np.asarray(params[f"dense_{i}"]["kernel"], np.float64) + np.asarray(params[f"dense_{i}"]["bias"])
    if i < 2:
      h = np.maximum(h, 0.0)
  np.testing.assert_allclose(jax.jit(mlp.apply)({"params": params}, jnp.asarray(x)), h, atol=1e-4)


def test_mlp_batch_norm_between_dense_and_relu():
  x = np.random.default_rng(3).normal(size=(6, 4)).astype(np.float32)
  mlp = layers.MLP(features=(8, 2), batch_norm=True)
  variables = _random_variables(mlp, x, seed=1)
  assert sorted(variables["params"]) == ["bn_0", "dense_0", "dense_1"]
  assert sorted(variables["batch_stats"]) == ["bn_0"]  # no norm after the output layer
  apply = jax.jit(mlp.apply, static_argnames=("train", "mutable"))
  out, updates = apply(variables, jnp.asarray(x), train=True, mutable=("batch_stats",))
  p = variables["params"]
  h = x.astype(np.float64) @ np.asarray(p["dense_0"]["kernel"]) + np.asarray(p["dense_0"]["bias"])
  h = (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5) * np.asarray(p["bn_0"]["scale"]) + np.asarray(p["bn_0"]["bias"])
  h = np.maximum(h, 0.0)
  want = h @ np.asarray(p["dense_1"]["kernel"]) + np.asarray(p["dense_1"]["bias"])
  np.testing.assert_allclose(out, want, atol=1e-4)
  assert not np.allclose(updates["batch_stats"]["bn_0"]["mean"], 0.0)
  with pytest.raises(ValueError, match="at least one"):
    jax.eval_shape(layers.MLP(features=()).init, jax.random.key(0), jnp.asarray(x))


def test_global_avg_pool():
  x = np.random.default_rng(4).normal(size=(2, 3, 5, 4)).astype(np.float32)
  np.testing.assert_allclose(layers.global_avg_pool(jnp.asarray(x)), x.mean(axis=(1, 2)), atol=1e-6)


def test_round_channels():
  assert [layers.round_channels(c, 1.0) for c in (64, 128, 2048, 32)] == [64, 128, 2048, 32]
  assert layers.round_channels(64, 0.125) == 8
  assert layers.round_channels(64, 0.01) == 8  # floor of 8
  assert layers.round_channels(100, 1.0) == 104  # nearest multiple of 8
