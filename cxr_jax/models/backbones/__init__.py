"""Backbones (ResNet v1 / pre-act with BlurPool, DenseNet-121, VGG-16): ``get_backbone(name, ...)``."""

from cxr_jax.models.backbones.registry import BACKBONES, backbone_from_config, get_backbone

__all__ = ["BACKBONES", "backbone_from_config", "get_backbone"]
