"""BYOL + Grad-CAM box loss pretraining, then fine-tuning (Talasila et al. 2023).

cxr-train --config=configs/byol_cam.py:runlocal --workdir=/tmp/byol
pretrains (BYOL + CAM loss) on phantoms of seed 1, fine-tunes and evaluates on
the default phantoms, then writes the CAM comparison (WORKDIR/eval/byol_cam.json,
WORKDIR/report/cam_comparison.png, pr_micro_test.png).

Paper setting: dataset=nih for pretraining and chexpert for fine-tuning:
  --config=configs/byol_cam.py:dataset=chexpert,backbone=resnet50,pretrain=nih
  --config.byol.pretrain_manual_dir=/data/nih --config.data.manual_dir=/data/chexpert

Arg keys: those of ``common.base_config`` plus ``pretrain`` (dataset of the
pretraining stage, '' = the fine-tuning dataset), ``cam`` (lambda of Eq. 8),
``xrv`` (a converted torchxrayvision DenseNet-121, cxr-convert-weights; only
used by ``get_sweep``'s XRV rows).
"""

import ml_collections

from configs import common

BYOL_ARGS = {"pretrain": "", "cam": 2.0, "xrv": ""}


def _view(**fields):
  return ml_collections.ConfigDict(fields)


def get_config(arg=None):
  common_arg, a = common.split_arg(arg, BYOL_ARGS)
  if a["pretrain"] and a["pretrain"] not in common.DATASETS:
    raise KeyError(f"unknown pretrain dataset {a['pretrain']!r}; known: {sorted(common.DATASETS)}")
  c = common.base_config(common_arg)
  runlocal = "runlocal" in common_arg.split(",")
  c.method = "byol_cam"
  c.cam = "gradcam"                     # evaluator's localization: Grad-CAM, threshold 127/255
  # Fine-tuning augmentation: random affine only, p = 0.5, the target view's ranges (Sec. III-D).
  c.data.augment.update(dict(random_resized_crop=0.0, affine=0.5, rotation=15.0, scale=0.15,
                             shift=0.1, blur=0.0, intensity=0.0, hflip=0.0))

  b = c.byol = ml_collections.ConfigDict()
  b.ssl = True                          # run the BYOL pretraining stage
  b.cam_weight = a["cam"]               # lambda of Eq. 8 (0: SSL without CAM loss)
  b.cam_relu = False                    # signed Grad-CAM in the loss (see methods/byol_cam.cam_loss)
  # What the CAM loss's sigmoid reads: the per-cell class logit h w GC + b ('cell'), or GC itself
  # ('gradcam': GC is that logit / (h w), near 0 at 4x4-7x7 maps; the loss stayed above a constant
  # map's for 300 steps; benchmarks/RESULTS.md, Talasila session 9). See methods/byol_cam.cam_loss.
  b.cam_logit = "cell"
  b.probe_into_encoder = False          # probe BCE trains the encoder too (see methods/byol_cam)
  b.tau = 0.99                          # target EMA (Eq. 5)
  b.tau_schedule = "constant"           # or BYOL's "cosine" (tau -> 1)
  b.hidden_dim = 512                    # projector / predictor hidden size
  b.projection_dim = 256
  b.steps = 5000
  b.batch_size = 128
  b.optimizer = ml_collections.ConfigDict(dict(name="adam", learning_rate=1e-4, b1=0.9, b2=0.999,
                                               weight_decay=0.0, schedule="constant"))
  # Views merged over config.data.augment: the target view t' (view1) is stronger and more likely.
  b.online_view = _view(random_resized_crop=0.5, crop_scale=(0.6, 1.0), affine=0.5,
                        rotation=10.0, scale=0.1, shift=0.05, blur=0.3, blur_sigma=(0.1, 1.0))
  b.target_view = _view(random_resized_crop=0.8, crop_scale=(0.4, 1.0), affine=0.8,
                        rotation=15.0, scale=0.15, shift=0.1, blur=0.8, blur_sigma=(0.1, 2.0))
  b.pretrain_dataset = a["pretrain"]    # '' = config.data's dataset
  b.pretrain_label_space = common.DATASETS[a["pretrain"]][0] if a["pretrain"] else ""
  b.pretrain_manual_dir = ""
  b.pretrain_synthetic_seed = 1         # phantoms of another seed: the 'other dataset'
  b.cam_panel_images = 8                # after training: Grad-CAM / ++ / Score-CAM panel rows
  b.cam_split = "test"

  ft = b.finetune = ml_collections.ConfigDict()
  ft.steps = 3000
  ft.batch_size = 0                     # 0 = config.batch_size
  ft.eval_every = 250                   # val AUROC -> best checkpoint; plateau fed at each eval
  # What the plateau schedule watches: 'train_loss' (Sec. IV-b: "four consecutive epochs with no
  # improvement in training loss"; mean loss since the previous eval) or 'eval' (val AUROC).
  ft.plateau_signal = "train_loss"
  ft.cam_weight = 0.0                   # CAM loss on the head while fine-tuning (XRV + CAM loss)
  # The fine-tuning head: 'fresh' (a new fully-connected layer, as the paper must for NIH ->
  # CheXpert), 'probe' (a copy of the pretraining probe that the CAM loss trained; needs one label
  # space for both stages) or 'auto': 'probe' when both stages share the label space, else
  # 'fresh'. A fresh head loses the CAM loss's localization (benchmarks/RESULTS.md, Talasila).
  ft.head_init = "auto"
  ft.min_learning_rate = 1e-6
  ft.optimizer = ml_collections.ConfigDict(dict(
      name="adam", learning_rate=1e-4, b1=0.9, b2=0.999, weight_decay=0.0, schedule="plateau",
      decay_rate=0.1, plateau_patience=4, plateau_rtol=1e-4))
  c.batch_size = 128

  if runlocal:
    c.data.image_size = 64              # 2x2 feature maps (1x1 at 32 px: Grad-CAM is constant)
    b.hidden_dim, b.projection_dim = 64, 32
    b.steps, b.batch_size = 10, 16
    b.cam_panel_images = 4
    ft.steps, ft.eval_every = 10, 5
    c.batch_size = 16
  c.lock()
  return c


def get_sweep(arg=None):
  """Table II / III columns as overrides.

  Baseline (ResNet-50 from scratch, supervised), SSL + FT (no CAM loss),
  SSL + CAM loss + FT; with ``xrv=PATH`` (a converted torchxrayvision
  DenseNet-121, no download here) also XRV fine-tuned without and with the
  CAM loss.
  """
  _, a = common.split_arg(arg, BYOL_ARGS)
  lam = a["cam"] or 2.0
  rows = [
      {"model.backbone": "resnet50", "byol.ssl": False, "byol.cam_weight": 0.0},
      {"byol.ssl": True, "byol.cam_weight": 0.0},
      {"byol.ssl": True, "byol.cam_weight": lam},
  ]
  if a["xrv"]:
    xrv = {"model.backbone": "densenet121", "model.init_from": a["xrv"], "byol.ssl": False,
           "byol.cam_weight": 0.0}
    rows += [{**xrv, "byol.finetune.cam_weight": 0.0}, {**xrv, "byol.finetune.cam_weight": lam}]
  return rows
