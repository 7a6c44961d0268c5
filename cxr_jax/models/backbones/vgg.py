"""VGG-16 (Simonyan & Zisserman 2015) ``features`` as torchvision builds it. NHWC.

13 3x3 convs (with bias, padding 1), each followed by ReLU (``batch_norm=True``:
conv, BN, ReLU as torchvision's ``vgg16_bn``), and 2x2/2 max pools after
blocks of 2, 2, 3, 3, 3 convs. The feature map is taken after pool5, where
torchvision's ``features`` ends: 512 channels at stride 32 (width 1).

Param names are the torchvision ``features`` index of the layer:
  features.N.{weight,bias} -> params/features_N/{kernel,bias}   (conv; OIHW -> HWIO)
  features.N.{weight,bias} -> params/features_N/{scale,bias}    (BN, vgg16_bn only)
  features.N.{running_mean,running_var} -> batch_stats/features_N/{mean,var}
vgg16 convs are features_0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28
(ReLUs and pools take the indices in between). ``classifier.*`` is not used.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cxr_jax.models import layers

POOL = "M"
VGG16 = (64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL, 512, 512, 512, POOL, 512, 512, 512, POOL)
STAGE_NAMES = ("conv2_x", "conv3_x", "conv4_x", "conv5_x")


class VGG(nn.Module):
  """VGG feature extractor (torchvision ``features``).

  Attributes:
    config: conv channel counts and ``"M"`` for a 2x2/2 max pool (five pools).
    batch_norm: BN between every conv and its ReLU (vgg16_bn).
    width: channel multiplier (counts rounded to multiples of 8, >= 8).
    dtype: compute dtype (float32 / bfloat16); params are float32.
  """
  config: Sequence[int | str] = VGG16
  batch_norm: bool = False
  width: float = 1.0
  dtype: Any = jnp.float32

  @property
  def num_features(self) -> int:
    """Channels of the final feature map."""
    return layers.round_channels([c for c in self.config if c != POOL][-1], self.width)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, return_stages: bool = False):
    """[N,H,W,C] (any C) -> [N,H//32,W//32,num_features].

    With ``return_stages``: 'conv2_x'..'conv5_x' are the outputs of pool2..pool5
    (strides 4, 8, 16, 32); 'conv5_x' is the returned feature map.
    """
    if x.ndim != 4:
      raise ValueError(f"VGG expects NHWC input [N,H,W,C], got shape {x.shape}")
    num_pools = sum(c == POOL for c in self.config)
    if num_pools != len(STAGE_NAMES) + 1:
      raise ValueError(f"VGG.config needs {len(STAGE_NAMES) + 1} pools, got {self.config}")
    stages = {}
    index = 0  # torchvision features index of the next layer
    pools_done = 0
    for c in self.config:
      if c == POOL:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        index += 1
        pools_done += 1
        if pools_done >= 2:
          stages[STAGE_NAMES[pools_done - 2]] = x
        continue
      x = layers.conv(layers.round_channels(c, self.width), 3, dtype=self.dtype, use_bias=True,
                      name=f"features_{index}")(x)
      index += 1
      if self.batch_norm:
        x = layers.batch_norm(train, self.dtype, name=f"features_{index}")(x)
        index += 1
      x = nn.relu(x)
      index += 1
    return stages if return_stages else x
