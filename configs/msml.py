"""Ge 2018: multi-label softmax loss (MSML) + two-stream bilinear pooling.

cxr-train --config=configs/msml.py:dataset=synthetic,width=0.25 --workdir=/tmp/msml
cxr-train --config=configs/msml.py:dataset=nih,strategy=local_fixed --workdir=/tmp/msml_nih \
          --config.data.manual_dir=/data/nih
'R18 + R18-BL' (both streams BCE): ...msml.py:stream2=bce

Besides the common args (configs/common.py), the arg takes ``strategy``
(global | local | local_fixed, Table 2) and ``stream2`` (msml | bce).

dataset=nih follows the paper's Sec. 3 where the config layout allows:
patient-level random split 70/10/20 (val/test fractions), ImageNet mean/std
normalisation, Adam lr 1e-4 betas (0.9, 0.999), lr / 10 every 3 epochs
(step schedule, ``decay_steps`` = 3 epochs at ``batch_size``; for the local
strategies the schedule restarts with the second stage), 224 px training crops
of the image resized to 256 px. The pipeline's random crop samples the area
fraction (224/256)^2 exactly but its aspect ratio log-uniformly in
[3/4, 4/3] (not configurable), and evaluation resizes the whole image to 224
(the paper does not say how it evaluated). The paper gives no batch size or
epoch count: 64 and 10 epochs here. The synthetic default keeps the common
optimizer (Adam 1e-3, constant), as the baseline config does.
"""

from configs import common

STRATEGIES = ("global", "local", "local_fixed")
NIH_TRAIN_IMAGES = 0.7 * 112_120
EPOCHS = 10


def get_config(arg=None):
  arg, own = common.split_arg(arg, {"strategy": "global", "stream2": "msml"})
  c = common.base_config(arg)
  c.method = "msml"
  c.msml = dict(
      strategy=own["strategy"],   # Table 2: global | local | local_fixed
      stream2_loss=own["stream2"],  # msml (F-MSML) | bce (the '+ BL' bilinear model)
      alpha=0.2,                  # Eq. 5 weight of E_MSML + E_CE
      beta=0.6,                   # Eq. 5 weight of E_FCE
      reduce_dim=0,               # 1x1 conv channels before bilinear pooling (0 = none)
      stream_fraction=0.5,        # local strategies: share of train_steps for stage 'streams'
      predict="fce",              # fce | mean (of the CE and FCE heads' sigmoids)
  )
  if c.data.name == "nih":
    c.data.image_size = 224
    c.data.normalization = "imagenet"
    c.data.val_fraction, c.data.test_fraction = 0.1, 0.2
    c.data.augment.update(dict(random_resized_crop=1.0, crop_scale=((224 / 256) ** 2,) * 2,
                               affine=0.0, intensity=0.0, blur=0.0, hflip=0.0))
    steps_per_epoch = round(NIH_TRAIN_IMAGES / c.batch_size)
    c.optimizer.update(dict(name="adam", learning_rate=1e-4, b1=0.9, b2=0.999,
                            schedule="step", decay_rate=0.1, decay_steps=3 * steps_per_epoch))
    c.train_steps = EPOCHS * steps_per_epoch
    c.eval_every = steps_per_epoch
    c.checkpoint_every = steps_per_epoch
  c.lock()
  return c


def get_sweep(arg=None):
  """Table 2's three training strategies as config overrides."""
  del arg
  return [{"msml.strategy": s} for s in STRATEGIES]
