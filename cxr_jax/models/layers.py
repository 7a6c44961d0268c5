"""Building blocks shared by the backbones and the method heads (NHWC).

- ``blur_pool``: anti-aliased downsampling (Zhang 2019, "Making convolutional
  networks shift-invariant again"): a depthwise binomial low-pass filter on the
  reflect-padded input, evaluated every ``stride`` pixels.
- ``batch_norm`` / ``conv``: Flax layers configured with torchvision's
  semantics (BatchNorm momentum/epsilon, explicit symmetric padding), so
  converted torchvision weights reproduce torchvision's outputs.
- ``MLP`` and ``global_avg_pool`` for heads (BYOL projector/predictor, VKD CH1/CH2).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

MAX_BLUR_SIZE = 7

# torchvision initialises conv kernels with kaiming_normal_(mode="fan_out") (ResNet, VGG).
kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def round_channels(channels: int, width: float, multiple: int = 8) -> int:
  """``channels * width`` rounded to the nearest multiple of ``multiple`` (at least ``multiple``).

  Exact for width 1 whenever ``channels`` is already a multiple (all standard
  ResNet/DenseNet/VGG counts are).
  """
  return max(multiple, int(channels * width / multiple + 0.5) * multiple)


def binomial_filter(size: int) -> np.ndarray:
  """1-D binomial low-pass filter of ``size`` taps, normalised to sum 1.

  size 1: [1]; 2: [1,1]/2; 3: [1,2,1]/4; 4: [1,3,3,1]/8; ... (rows of Pascal's triangle).
  """
  if not 1 <= size <= MAX_BLUR_SIZE:
    raise ValueError(f"blur filter size must be in 1..{MAX_BLUR_SIZE}, got {size}")
  taps = np.array([1.0])
  for _ in range(size - 1):
    taps = np.convolve(taps, [1.0, 1.0])
  return taps / taps.sum()


def blur_pool(x: jax.Array, size: int, stride: int = 2) -> jax.Array:
  """BlurPool (Zhang 2019): depthwise binomial blur, then keep every ``stride``-th pixel.

  The input is reflect-padded by ``(size-1)//2`` before and ``size//2`` after
  each spatial axis (the reference design), so the output has
  ``ceil(H/stride) x ceil(W/stride)`` pixels and pixel ``i`` is centred on input
  pixel ``stride*i`` (for odd ``size``). ``size == 1`` is plain subsampling.

  Args:
    x: [N, H, W, C], any float dtype (the filter is cast to it).
    size: filter taps per axis, 1..7.
    stride: subsampling factor.
  Returns:
    [N, ceil(H/stride), ceil(W/stride), C], dtype of ``x``.
  """
  taps = binomial_filter(size)
  if size == 1:
    return x[:, ::stride, ::stride, :]
  pad = ((0, 0), ((size - 1) // 2, size // 2), ((size - 1) // 2, size // 2), (0, 0))
  x = jnp.pad(x, pad, mode="reflect")
  channels = x.shape[-1]
  kernel = np.outer(taps, taps)[:, :, None, None] * np.ones((1, 1, 1, channels))
  return jax.lax.conv_general_dilated(
      x, jnp.asarray(kernel, x.dtype), window_strides=(stride, stride), padding="VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels)


def batch_norm(train: bool, dtype: Dtype = jnp.float32, name: str | None = None, **kw) -> nn.BatchNorm:
  """BatchNorm with torchvision's semantics: Flax momentum 0.9 == torch momentum 0.1, eps 1e-5.

  ``train=True`` normalises with the batch statistics (over every axis but the
  last, i.e. the global batch when the batch axis is sharded under jit) and
  updates ``batch_stats``; ``train=False`` uses the running averages (a frozen
  backbone is called with ``train=False``). One difference from torch: torch
  updates ``running_var`` with the *unbiased* batch variance (n/(n-1)), Flax
  with the biased one. It changes the running statistics accumulated while
  training, not inference with converted torchvision weights.
  Params (scale, bias) are float32; ``dtype`` is the compute dtype.
  """
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      dtype=dtype, param_dtype=jnp.float32, name=name, **kw)


def conv(features: int, kernel: int, stride: int = 1, *, dtype: Dtype = jnp.float32,
         use_bias: bool = False, kernel_init=kaiming_fan_out, name: str | None = None) -> nn.Conv:
  """k x k convolution with torch's explicit symmetric padding ``k // 2`` on each side."""
  p = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((p, p), (p, p)),
                 use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                 kernel_init=kernel_init, name=name)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """torch ``MaxPool2d(3, stride=2, padding=1)`` (padding acts as -inf). [N,H,W,C] -> [N,ceil(H/2),ceil(W/2),C]."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def global_avg_pool(x: jax.Array) -> jax.Array:
  """Spatial mean. [N, H, W, C] -> [N, C]."""
  return jnp.mean(x, axis=(1, 2))


class MLP(nn.Module):
  """Dense layers with ReLU between them (none after the last).

  ``features=(512, 256)`` is Dense(512) -> [BN] -> ReLU -> Dense(256), e.g. the
  BYOL projector (hidden 512 -> 256) or the VKD heads CH1/CH2 (hidden 512).
  Param names: ``dense_0, bn_0, dense_1, ...``.

  Attributes:
    features: output size of each Dense layer, the last one is the output size.
    batch_norm: BatchNorm after every hidden Dense layer (before its ReLU).
    dtype: compute dtype; params stay float32.
  """
  features: Sequence[int]
  batch_norm: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """[..., D_in] -> [..., features[-1]]."""
    if not self.features:
      raise ValueError("MLP.features must name at least one layer size")
    for i, size in enumerate(self.features):
      x = nn.Dense(size, dtype=self.dtype, param_dtype=jnp.float32, name=f"dense_{i}")(x)
      if i < len(self.features) - 1:
        if self.batch_norm:
          x = batch_norm(train, self.dtype, name=f"bn_{i}")(x)
        x = nn.relu(x)
    return x
