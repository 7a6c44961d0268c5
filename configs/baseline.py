"""Plain multi-label classifier: backbone + global average pooling + linear head.

cxr-train --config=configs/baseline.py:dataset=synthetic,backbone=resnet18 --workdir=/tmp/b
"""

from configs import common


def get_config(arg=None):
  c = common.base_config(arg)
  c.method = "baseline"
  c.loss = "weighted_bce"   # Wang 2017 / Kim Eq. 10 (counts: loss_weighting); or "bce"
  c.lock()
  return c
