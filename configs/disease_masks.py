"""Kim 2022: alignment module + disease-mask spatial attention (stages in cxr_jax/methods/disease_masks.py).

cxr-train --config=configs/disease_masks.py:width=0.25,backbone=resnet50 --workdir=/tmp/dm
cxr-sweep --config=configs/disease_masks.py:width=0.25 --workdir_root=/tmp/dm_sweep
  (Table 1 / 2 rows: base, +alignment, +alignment+DM, +alignment+PDM)

Besides the common args (configs/common.py) the arg takes ``masks``
(dm | pdm | none) and ``noalign``. The default backbone is the paper's
ResNet-50 (``backbone=`` overrides it); the aligner is a ResNet-18 of the
same width.

dataset=nih follows Sec. 4.1-4.2: 512 px, [-1, 1], 14 classes; aligner 5
epochs SGD lr 1e-3 batch 16; classifier 5 epochs on aligned images, then 5
with the masks, Adam lr 1e-4 batch 32. The perceptual-loss network is a
ResNet-50 trained on ChestX-ray14: here the 'perceptual' stage trains the
classifier on the raw images first (5 epochs; 0 with ``model.init_from``
CXR weights). Augmentation off (the paper mentions none). The synthetic
default is small: a few hundred steps per stage.
"""

from configs import common

MASKS = ("dm", "pdm", "none")
NIH_TRAIN_IMAGES = 0.7 * 112_120
EPOCHS = 5


def get_config(arg=None):
  arg, own = common.split_arg(arg, {"masks": "dm", "noalign": False})
  if "backbone" not in common.arg_keys(arg):
    arg = ",".join(filter(None, [arg, "backbone=resnet50"]))
  c = common.base_config(arg)
  c.method = "disease_masks"
  c.loss = "weighted_bce"   # Eq. 10 (per batch)
  steps = c.train_steps // 4
  c.dm = dict(
      align=not own["noalign"],   # False: the 'base' row (no aligner)
      masks=own["masks"],         # dm (Eq. 1-3) | pdm (Table 2) | none (psi = 0)
      aligner_backbone="resnet18",
      aligner_width=c.model.width,
      perceptual_steps=steps,     # classifier on raw images for the perceptual loss (0: skip)
      align_steps=steps,
      classify_steps=steps,
      dm_steps=steps,
      align_batch_size=16,
      align_optimizer=dict(name="sgd", learning_rate=1e-3, momentum=0.9, nesterov=False,
                           weight_decay=0.0, schedule="constant", warmup_steps=0,
                           decay_rate=0.1, decay_steps=0, grad_clip=0.0),
      anchor_images=2000,         # Sec. 3.2: mean of 2,000 No-Finding images
      anchor_labels="no_finding",  # or "any": NIH's boxed subset has no No-Finding image
      grid_cell=0,                # B(G(.)) cell; 0 = image_size // 32 (16 at their 512 px)
      min_prob=0.8,               # Eq. 2 filter P_c(x) >= 0.8
      threshold=0.5,              # T of Eq. 3, on the mean map rescaled to [0, 1]
      mask_images=0,              # images of the mask pass (0 = one epoch of 'train')
      heatmap_factor=8,           # original-frame heat maps: 8 x the feature grid (<= image)
      pose_images=500,            # phantoms: images of the pose residual report
  )
  if c.data.name == "nih":
    c.data.image_size = 512
    c.data.augment.update(dict(affine=0.0, intensity=0.0, blur=0.0, hflip=0.0,
                               random_resized_crop=0.0))
    c.batch_size = 32
    c.optimizer.update(dict(name="adam", learning_rate=1e-4, b1=0.9, b2=0.999))
    epoch = round(NIH_TRAIN_IMAGES / c.batch_size)
    c.dm.update(dict(perceptual_steps=EPOCHS * epoch, classify_steps=EPOCHS * epoch,
                     dm_steps=EPOCHS * epoch,
                     align_steps=EPOCHS * round(NIH_TRAIN_IMAGES / c.dm.align_batch_size)))
    c.train_steps = c.dm.perceptual_steps + c.dm.align_steps + c.dm.classify_steps + c.dm.dm_steps
    c.eval_every = epoch
    c.checkpoint_every = epoch
  if own["masks"] not in MASKS:
    raise KeyError(f"unknown masks {own['masks']!r}; known: {list(MASKS)}")
  c.lock()
  return c


def get_sweep(arg=None):
  """Table 1 / 2 ablation rows, the same classifier budget each."""
  del arg
  return [{"dm.align": False, "dm.masks": "none"},   # ResNet-50
          {"dm.masks": "none"},                      # + alignment
          {"dm.masks": "dm"},                        # + alignment + DM
          {"dm.masks": "pdm"}]                       # + alignment + PDM
