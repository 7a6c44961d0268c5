"""Backbones by name: ``get_backbone("resnet50", width=0.25, dtype="bfloat16")``.

Every backbone maps [N,H,W,C] images (any C, e.g. 1 or 3) to its last conv
feature map [N,H/32,W/32,num_features] and, with ``return_stages=True``, to the
dict {'conv2_x','conv3_x','conv4_x','conv5_x'} at strides 4, 8, 16, 32:

  feats = bb.apply(variables, x, train=False)
  stages = bb.apply(variables, x, train=False, return_stages=True)

``train`` selects BatchNorm batch statistics (and updates ``batch_stats`` when
it is mutable) versus running averages; a frozen backbone runs with
``train=False``.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cxr_jax.models import layers
from cxr_jax.models.backbones import densenet, resnet, vgg

_RESNETS = {
    "resnet18": (resnet.BasicBlock, (2, 2, 2, 2)),
    "resnet34": (resnet.BasicBlock, (3, 4, 6, 3)),
    "resnet50": (resnet.Bottleneck, (3, 4, 6, 3)),
    "preact_resnet18": (resnet.PreActBasicBlock, (2, 2, 2, 2)),
    "preact_resnet34": (resnet.PreActBasicBlock, (3, 4, 6, 3)),
    "preact_resnet50": (resnet.PreActBottleneck, (3, 4, 6, 3)),
}
_OTHERS = {
    "densenet121": functools.partial(densenet.DenseNet, block_config=(6, 12, 24, 16)),
    "vgg16": functools.partial(vgg.VGG, config=vgg.VGG16, batch_norm=False),
    "vgg16_bn": functools.partial(vgg.VGG, config=vgg.VGG16, batch_norm=True),
}
BACKBONES = tuple(_RESNETS) + tuple(_OTHERS)


def get_backbone(name: str, *, width: float = 1.0, dtype: Any = jnp.float32, blurpool: int = 0,
                 **kw) -> nn.Module:
  """The backbone module called ``name``.

  Args:
    name: one of ``BACKBONES``.
    width: channel multiplier (> 0); counts are rounded to multiples of 8, at least 8.
    dtype: compute dtype (``jnp.float32``, ``jnp.bfloat16`` or their names); params stay float32.
    blurpool: BlurPool filter size 1..7 before every downsampling (ResNets only), 0 = off.
    **kw: further fields of the module (e.g. ``blur_stem_conv=False`` for ResNets, ``name``).
  Raises:
    KeyError: unknown ``name`` (the message lists the known ones).
    ValueError: bad ``width`` / ``blurpool``, or ``blurpool`` on a non-ResNet.
  """
  if name not in BACKBONES:
    raise KeyError(f"unknown backbone {name!r}; known: {list(BACKBONES)}")
  if not width > 0:
    raise ValueError(f"backbone width must be > 0, got {width}")
  if blurpool:
    if name not in _RESNETS:
      raise ValueError(f"blurpool={blurpool} is only implemented for the ResNets, not {name!r}")
    layers.binomial_filter(blurpool)  # validates the size
  dtype = jnp.dtype(dtype)
  if name in _RESNETS:
    block, stage_sizes = _RESNETS[name]
    return resnet.ResNet(block, stage_sizes, width=width, blurpool=blurpool, dtype=dtype, **kw)
  return _OTHERS[name](width=width, dtype=dtype, **kw)


def backbone_from_config(model_config: Any) -> nn.Module:
  """``get_backbone`` from a config's ``model`` fields (backbone, width, dtype, blurpool)."""
  m = model_config
  return get_backbone(m.backbone, width=m.width, dtype=jnp.dtype(m.dtype), blurpool=m.blurpool)
