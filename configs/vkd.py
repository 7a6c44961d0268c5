"""Probabilistic integration of object-level annotations (van Sonsbeek et al. 2023).

cxr-train --config=configs/vkd.py:annotation=gaze,runlocal --workdir=/tmp/vkd
trains both stages, evaluates, and writes the Grad-CAM shift of Eq. 5 to
WORKDIR/eval/vkd_cam.json.

Arg keys: those of ``common.base_config`` plus ``release`` (Table 4 row, see
``cxr_jax.methods.vkd.RELEASES``) and ``annotation`` ('gaze' | 'boxes' |
'gaze+boxes'). The paper gives neither the latent size, beta nor learning
rates: the values below are ours.
"""

import ml_collections

from configs import common

VKD_ARGS = {"release": "ch2_prior", "annotation": "boxes"}
# Table 4, top to bottom (encoder / CH1 / CH2 released in stage 2; the prior always).
TABLE4_RELEASES = ("ch1_prior", "ch1_ch2_prior", "all", "ch2_prior")
# Table 1's annotation kinds the synthetic phantoms and NIH provide (NIH: boxes only).
TABLE1_ANNOTATIONS = ("boxes", "gaze", "gaze+boxes")


def _split_arg(arg):
  """'a=1,release=all' -> ('a=1', {'release': 'all', 'annotation': default})."""
  common_items, vkd = [], dict(VKD_ARGS)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key.strip() in vkd:
      vkd[key.strip()] = value
    else:
      common_items.append(item)
  return ",".join(common_items), vkd


def get_config(arg=None):
  common_arg, a = _split_arg(arg)
  c = common.base_config(common_arg)
  runlocal = "runlocal" in common_arg.split(",")
  c.method = "vkd"
  c.vkd = ml_collections.ConfigDict()
  c.vkd.release = a["release"]          # Table 4 row (methods/vkd.py RELEASES)
  c.vkd.annotation = a["annotation"]    # Table 1: 'gaze' | 'boxes' | 'gaze+boxes' (pixelwise max)
  c.vkd.latent_dim = 128                # L, size of z
  c.vkd.hidden = 512                    # CH1 / CH2 / prior MLP width (paper: 512)
  c.vkd.concat_feature = False          # classifier reads z only (True: [z, pooled feature])
  c.vkd.beta = 0.01                     # weight of the KL term (Eq. 3 / 4)
  c.vkd.train_samples = 1               # samples of z per image in training; eval: the mean
  c.vkd.patience = 3                    # early stopping: evals without a 1 % AUROC gain
  c.vkd.cam_split = "test"              # Grad-CAM shift (Eq. 5) on this split's annotated images
  c.vkd.cam_max_images = 256
  c.vkd.cam_relu = False                # signed Grad-CAM, min-max normalized (see vkd.positive_class_cams)
  c.vkd.stage2 = ml_collections.ConfigDict()
  c.vkd.stage2.steps = 500
  c.vkd.stage2.eval_every = 100
  c.vkd.stage2.batch_size = 32
  c.vkd.stage2.optimizer = ml_collections.ConfigDict(c.optimizer.to_dict())
  c.vkd.stage2.optimizer.learning_rate = 1e-4

  c.optimizer.name = "adam"
  c.train_steps = 2000                  # stage 1
  c.eval_every = 250

  if runlocal:
    c.data.image_size = 64               # 2x2 feature maps: Grad-CAM is constant at 32 px (1x1)
    c.vkd.latent_dim, c.vkd.hidden = 8, 32
    c.vkd.cam_max_images = 16
    c.vkd.stage2.steps, c.vkd.stage2.eval_every, c.vkd.stage2.batch_size = 8, 4, 16
    c.train_steps, c.eval_every = 20, 10
  c.lock()
  return c


def get_sweep(arg=None):
  """Override dicts: Table 4's four release rows, then Table 1's other annotation kinds."""
  del arg
  rows = [{"vkd.release": r, "vkd.annotation": VKD_ARGS["annotation"]} for r in TABLE4_RELEASES]
  rows += [{"vkd.release": VKD_ARGS["release"], "vkd.annotation": a}
           for a in TABLE1_ANNOTATIONS if a != VKD_ARGS["annotation"]]
  return rows
