"""ResNet v1 (torchvision layout) and pre-activation ResNet, optional BlurPool. NHWC.

ResNet v1 (He et al. 2016a) as torchvision builds it ("v1.5"): 7x7/2 conv, BN,
ReLU, 3x3/2 max pool, layer1..layer4; bottlenecks stride their 3x3 conv.
Pre-activation ResNet (He et al. 2016b, "Identity mappings in deep residual
networks"): every block is BN-ReLU-conv on its input, the shortcut is the raw
input (or a 1x1 projection of the pre-activated input where shape changes),
the stem is conv + max pool with no norm (the first block normalises), and a
final BN-ReLU follows layer4.

Anti-aliasing (``blurpool=k > 0``, Zhang 2019, the reference antialiased ResNet
design; filter size k in 1..7):
- strided conv -> the same conv with stride 1, then its BN-ReLU, then BlurPool
  (``layers.blur_pool``) before the next conv of the block;
- projection shortcut -> BlurPool, then the 1x1 conv with stride 1;
- stem max pool -> max pool 2x2 stride 1, then BlurPool;
- stem conv (``blur_stem_conv=True``, default: "every downsampling", as
  Rozenberg 2020 asks) -> 7x7 stride 1, BN-ReLU, BlurPool. ``False`` keeps it
  strided, as Zhang's released ImageNet weights ("pool_only") do.
BlurPool has no parameters, so the param tree is the same with or without it.

Param names map 1:1 to torchvision ``resnet*`` state_dict keys (for v1):
  conv1.weight                -> params/conv1/kernel      (OIHW -> HWIO)
  bn1.{weight,bias}           -> params/bn1/{scale,bias}
  bn1.{running_mean,running_var} -> batch_stats/bn1/{mean,var}
  layerI.J.convK / bnK        -> layerI_J/convK, layerI_J/bnK
  layerI.J.downsample.0 / .1  -> layerI_J/downsample_conv, layerI_J/downsample_bn
  (num_batches_tracked and fc.* have no counterpart.)
Pre-act models use the same rule; their extra final norm is ``bn_final`` and
their blocks have ``bn1..bn3`` before ``conv1..conv3`` and no ``downsample_bn``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from cxr_jax.models import layers

STAGE_NAMES = ("conv2_x", "conv3_x", "conv4_x", "conv5_x")


class _Block(nn.Module):
  """Fields shared by all residual blocks.

  Attributes:
    features: bottleneck/basic width ("planes"); the block outputs
      ``features * expansion`` channels.
    stride: 1 or 2.
    blurpool: BlurPool filter size (0 = plain strided convs).
    dtype: compute dtype.
  """
  features: int
  stride: int = 1
  blurpool: int = 0
  dtype: Any = jnp.float32

  expansion: ClassVar[int] = 1
  preact: ClassVar[bool] = False

  def _conv(self, features: int, kernel: int, stride: int, name: str) -> nn.Conv:
    return layers.conv(features, kernel, stride, dtype=self.dtype, name=name)

  def _bn(self, train: bool, name: str) -> nn.BatchNorm:
    return layers.batch_norm(train, self.dtype, name=name)

  @property
  def conv_stride(self) -> int:
    """Stride of the strided conv: 1 when BlurPool does the downsampling."""
    return 1 if self.blurpool else self.stride

  def _blur(self, x: jax.Array) -> jax.Array:
    """BlurPool after the (now stride-1) downsampling conv; identity when not downsampling."""
    return layers.blur_pool(x, self.blurpool, self.stride) if self.blurpool and self.stride > 1 else x

  def _needs_projection(self, x: jax.Array) -> bool:
    return self.stride != 1 or x.shape[-1] != self.features * self.expansion

  def _projection(self, x: jax.Array, train: bool, with_bn: bool) -> jax.Array:
    """1x1 projection shortcut; BlurPool then a stride-1 conv when anti-aliased."""
    x = self._conv(self.features * self.expansion, 1, self.conv_stride, "downsample_conv")(self._blur(x))
    return self._bn(train, "downsample_bn")(x) if with_bn else x


class BasicBlock(_Block):
  """v1 basic block: conv3x3(stride)-BN-ReLU-conv3x3-BN, add shortcut, ReLU. [N,H,W,Cin] -> [N,H/s,W/s,F]."""

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    y = self._conv(self.features, 3, self.conv_stride, "conv1")(x)
    y = self._blur(nn.relu(self._bn(train, "bn1")(y)))
    y = self._conv(self.features, 3, 1, "conv2")(y)
    y = self._bn(train, "bn2")(y)
    shortcut = self._projection(x, train, with_bn=True) if self._needs_projection(x) else x
    return nn.relu(y + shortcut)


class Bottleneck(_Block):
  """v1.5 bottleneck: 1x1-BN-ReLU, 3x3(stride)-BN-ReLU, 1x1(4F)-BN, add shortcut, ReLU.

  [N,H,W,Cin] -> [N,H/s,W/s,4F].
  """
  expansion: ClassVar[int] = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    y = self._conv(self.features, 1, 1, "conv1")(x)
    y = nn.relu(self._bn(train, "bn1")(y))
    y = self._conv(self.features, 3, self.conv_stride, "conv2")(y)
    y = self._blur(nn.relu(self._bn(train, "bn2")(y)))
    y = self._conv(self.features * 4, 1, 1, "conv3")(y)
    y = self._bn(train, "bn3")(y)
    shortcut = self._projection(x, train, with_bn=True) if self._needs_projection(x) else x
    return nn.relu(y + shortcut)


class PreActBasicBlock(_Block):
  """Pre-act basic block: BN-ReLU-conv3x3(stride), BN-ReLU-conv3x3, plus shortcut. No final ReLU."""
  preact: ClassVar[bool] = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    pre = nn.relu(self._bn(train, "bn1")(x))
    shortcut = self._projection(pre, train, with_bn=False) if self._needs_projection(x) else x
    y = self._conv(self.features, 3, self.conv_stride, "conv1")(pre)
    y = self._blur(nn.relu(self._bn(train, "bn2")(y)))
    y = self._conv(self.features, 3, 1, "conv2")(y)
    return y + shortcut


class PreActBottleneck(_Block):
  """Pre-act bottleneck: BN-ReLU-1x1, BN-ReLU-3x3(stride), BN-ReLU-1x1(4F), plus shortcut."""
  expansion: ClassVar[int] = 4
  preact: ClassVar[bool] = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    pre = nn.relu(self._bn(train, "bn1")(x))
    shortcut = self._projection(pre, train, with_bn=False) if self._needs_projection(x) else x
    y = self._conv(self.features, 1, 1, "conv1")(pre)
    y = nn.relu(self._bn(train, "bn2")(y))
    y = self._conv(self.features, 3, self.conv_stride, "conv2")(y)
    y = self._blur(nn.relu(self._bn(train, "bn3")(y)))
    y = self._conv(self.features * 4, 1, 1, "conv3")(y)
    return y + shortcut


class ResNet(nn.Module):
  """ResNet feature extractor (no pooling, no fc).

  Attributes:
    block: BasicBlock, Bottleneck, PreActBasicBlock or PreActBottleneck.
    stage_sizes: blocks per stage, e.g. (3, 4, 6, 3).
    width: channel multiplier (every count rounded to a multiple of 8, >= 8).
    blurpool: BlurPool filter size 1..7, 0 = off (module docstring).
    blur_stem_conv: with blurpool, also anti-alias the 7x7 stem conv.
    dtype: compute dtype (float32 / bfloat16); params are float32.
  """
  block: type[_Block]
  stage_sizes: Sequence[int]
  width: float = 1.0
  blurpool: int = 0
  blur_stem_conv: bool = True
  dtype: Any = jnp.float32

  @property
  def num_features(self) -> int:
    """Channels of the final feature map."""
    return layers.round_channels(512, self.width) * self.block.expansion

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, return_stages: bool = False):
    """[N,H,W,C] (any C) -> [N,H/32,W/32,num_features] (H, W multiples of 32; else as the pools round).

    With ``return_stages``: {'conv2_x','conv3_x','conv4_x','conv5_x'} -> outputs of
    layer1..layer4 at strides 4, 8, 16, 32; 'conv5_x' is the returned feature map
    (for pre-act models, after the final BN-ReLU).
    """
    if x.ndim != 4:
      raise ValueError(f"ResNet expects NHWC input [N,H,W,C], got shape {x.shape}")
    stem = layers.round_channels(64, self.width)
    blur_stem = self.blurpool and self.blur_stem_conv
    x = layers.conv(stem, 7, 1 if blur_stem else 2, dtype=self.dtype, name="conv1")(x)
    if not self.block.preact:
      x = nn.relu(layers.batch_norm(train, self.dtype, name="bn1")(x))
    if blur_stem:
      x = layers.blur_pool(x, self.blurpool)
    if self.blurpool:
      x = layers.blur_pool(nn.max_pool(x, (2, 2), strides=(1, 1)), self.blurpool)
    else:
      x = layers.max_pool_3x3_s2(x)

    stages = {}
    for i, num_blocks in enumerate(self.stage_sizes):
      features = layers.round_channels(64 * 2**i, self.width)
      for j in range(num_blocks):
        stride = 2 if i > 0 and j == 0 else 1
        x = self.block(features, stride, self.blurpool, self.dtype, name=f"layer{i + 1}_{j}")(x, train)
      stages[STAGE_NAMES[i]] = x
    if self.block.preact:
      x = nn.relu(layers.batch_norm(train, self.dtype, name="bn_final")(x))
      stages["conv5_x"] = x
    return stages if return_stages else x
