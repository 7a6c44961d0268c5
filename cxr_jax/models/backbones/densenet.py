"""DenseNet-121 (Huang et al. 2017) as torchvision builds it. NHWC, feature extractor only.

conv0 7x7/2, norm0, ReLU, max pool 3x3/2; four dense blocks (6, 12, 24, 16
layers, growth 32, bottleneck width bn_size * growth = 128) separated by
transitions (BN-ReLU-1x1 conv to half the channels, 2x2/2 average pool); then
norm5 and the ReLU torchvision's ``forward`` applies. Output: 1024 channels at
stride 32 (width 1).

Param names map 1:1 to torchvision ``densenet121`` state_dict keys: drop the
``features.`` prefix and turn dots into ``/``:
  features.conv0.weight                         -> params/conv0/kernel (OIHW -> HWIO)
  features.norm0.{weight,bias}                  -> params/norm0/{scale,bias}
  features.norm0.{running_mean,running_var}     -> batch_stats/norm0/{mean,var}
  features.denseblockB.denselayerL.{norm1,conv1,norm2,conv2}
                                                -> denseblockB/denselayerL/{norm1,conv1,norm2,conv2}
  features.transitionT.{norm,conv}              -> transitionT/{norm,conv}
  features.norm5                                -> norm5
(``classifier.*`` and ``num_batches_tracked`` have no counterpart. The old
torchvision/torchxrayvision keys ``norm.1`` / ``conv.1`` inside dense layers are
``norm1`` / ``conv1``.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cxr_jax.models import layers

STAGE_NAMES = ("conv2_x", "conv3_x", "conv4_x", "conv5_x")

# torchvision DenseNet: kaiming_normal_ with its default fan_in mode.
kaiming_fan_in = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


class DenseLayer(nn.Module):
  """BN-ReLU-1x1 conv (bn_size * growth), BN-ReLU-3x3 conv (growth). [N,H,W,C] -> [N,H,W,growth] (new features only)."""
  growth_rate: int
  bn_size: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    y = nn.relu(layers.batch_norm(train, self.dtype, name="norm1")(x))
    y = layers.conv(self.bn_size * self.growth_rate, 1, dtype=self.dtype, kernel_init=kaiming_fan_in, name="conv1")(y)
    y = nn.relu(layers.batch_norm(train, self.dtype, name="norm2")(y))
    return layers.conv(self.growth_rate, 3, dtype=self.dtype, kernel_init=kaiming_fan_in, name="conv2")(y)


class DenseBlock(nn.Module):
  """``num_layers`` dense layers, each fed the concatenation of all earlier outputs.

  [N,H,W,C] -> [N,H,W,C + num_layers * growth].
  """
  num_layers: int
  growth_rate: int
  bn_size: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for i in range(self.num_layers):
      new = DenseLayer(self.growth_rate, self.bn_size, self.dtype, name=f"denselayer{i + 1}")(x, train)
      x = jnp.concatenate([x, new], axis=-1)
    return x


class Transition(nn.Module):
  """BN-ReLU-1x1 conv to ``features``, 2x2 average pool stride 2. [N,H,W,C] -> [N,H//2,W//2,features]."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = nn.relu(layers.batch_norm(train, self.dtype, name="norm")(x))
    x = layers.conv(self.features, 1, dtype=self.dtype, kernel_init=kaiming_fan_in, name="conv")(x)
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class DenseNet(nn.Module):
  """DenseNet feature extractor (no classifier).

  Attributes:
    block_config: layers per dense block; (6, 12, 24, 16) is DenseNet-121.
    growth_rate: new channels per dense layer (scaled by ``width``, >= 8).
    num_init_features: stem channels (scaled by ``width``).
    bn_size: bottleneck width factor of a dense layer.
    width: channel multiplier.
    dtype: compute dtype (float32 / bfloat16); params are float32.
  """
  block_config: Sequence[int] = (6, 12, 24, 16)
  growth_rate: int = 32
  num_init_features: int = 64
  bn_size: int = 4
  width: float = 1.0
  dtype: Any = jnp.float32

  @property
  def _growth(self) -> int:
    return layers.round_channels(self.growth_rate, self.width)

  @property
  def num_features(self) -> int:
    """Channels of the final feature map (transitions halve, rounding down, as torchvision)."""
    channels = layers.round_channels(self.num_init_features, self.width)
    for i, num_layers in enumerate(self.block_config):
      channels += num_layers * self._growth
      if i < len(self.block_config) - 1:
        channels //= 2
    return channels

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, return_stages: bool = False):
    """[N,H,W,C] (any C) -> [N,H/32,W/32,num_features] (for H, W multiples of 32).

    With ``return_stages``: 'conv2_x'..'conv4_x' are the outputs of dense
    blocks 1..3 (strides 4, 8, 16, before their transition), 'conv5_x' is the
    returned feature map (dense block 4, norm5, ReLU; stride 32).
    """
    if x.ndim != 4:
      raise ValueError(f"DenseNet expects NHWC input [N,H,W,C], got shape {x.shape}")
    if len(self.block_config) != len(STAGE_NAMES):
      raise ValueError(f"DenseNet.block_config needs {len(STAGE_NAMES)} blocks, got {self.block_config}")
    init = layers.round_channels(self.num_init_features, self.width)
    x = layers.conv(init, 7, 2, dtype=self.dtype, kernel_init=kaiming_fan_in, name="conv0")(x)
    x = nn.relu(layers.batch_norm(train, self.dtype, name="norm0")(x))
    x = layers.max_pool_3x3_s2(x)
    stages = {}
    for i, num_layers in enumerate(self.block_config):
      x = DenseBlock(num_layers, self._growth, self.bn_size, self.dtype, name=f"denseblock{i + 1}")(x, train)
      if i < len(self.block_config) - 1:
        stages[STAGE_NAMES[i]] = x
        x = Transition(x.shape[-1] // 2, self.dtype, name=f"transition{i + 1}")(x, train)
    x = nn.relu(layers.batch_norm(train, self.dtype, name="norm5")(x))
    stages["conv5_x"] = x
    return stages if return_stages else x
