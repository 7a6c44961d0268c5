"""BYOL + Grad-CAM box loss pretraining, then fine-tuning (Talasila et al. 2023).

cxr-train --config=configs/byol_cam.py:runlocal --workdir=/tmp/byol
pretrains (BYOL + CAM loss) on phantoms of seed 1, fine-tunes and evaluates on
the default phantoms, then writes the CAM comparison (``config.evals.cam_kinds``: the
'cam_kinds' section of WORKDIR/eval/test.json, WORKDIR/report/cam_comparison_test.png,
pr_micro_test.png).

Paper setting: dataset=nih for pretraining and chexpert for fine-tuning:
  --config=configs/byol_cam.py:dataset=chexpert,backbone=resnet50,pretrain=nih
  --config.byol.pretrain_manual_dir=/data/nih --config.data.manual_dir=/data/chexpert
With NIH as the pretraining data, its boxed images are dealt into 5 patient-level folds
(``byol.pretrain_cv``; all NIH boxes are on official-test images): pretraining reads the
other 4 folds' boxed images and the unboxed official-train images, and the held-out
fold's boxed images give the NIH IoU (``config.evals.nih_boxes``: the 'nih_boxes'
section of WORKDIR/eval/test.json; ``cam_kinds`` reads them too).

Departures and readings, each a switch with the literal reading available: the CAM loss's
class score, which the paper does not name, is a linear probe trained with BCE on the image
labels (``byol.probe_into_encoder``: whether that BCE also trains the encoder); its sigmoid
reads per-cell logits (``byol.cam_logit``; 'gradcam': the Grad-CAM map itself); the
fine-tuning head starts from the probe where both stages share a label space
(``byol.finetune.head_init``; 'fresh': the paper's new layer); the "XRV + CAM loss" row's
NIH fine-tuning is stage 'cam_finetune' (``byol.finetune.cam_stage_steps``). Not switches:
the XRV rows fine-tune a new head (the converted weights hold the backbone only), and the
NIH IoU is scored in the fine-tuning label space (CheXpert: the 5 boxed NIH classes with a
counterpart).

Arg keys: those of ``common.base_config`` plus ``pretrain`` (dataset of the
pretraining stage, '' = the fine-tuning dataset), ``cam`` (lambda of Eq. 8),
``xrv`` (a converted torchxrayvision DenseNet-121, cxr-convert-weights; only
used by ``get_sweep``'s XRV rows) and the table sweep's ``table`` / ``seeds``.

Paper tables (``get_sweep('table=N')``: Baseline, SSL + FT, SSL + CAM Loss + FT (ours), and
with ``xrv=PATH`` the XRV (SOTA) and XRV + CAM Loss rows, which need the converted weights;
replicates: seeds 0-2 (``seeds=K``), or, where the pretraining data is cross-validated
(``byol.pretrain_cv``, NIH), its 5 folds (``byol.pretrain_cv.fold``: the held-out IoU fold)):
  cxr-sweep --config=configs/byol_cam.py:table=II --workdir_root=/runs/tal_t2
  cxr-table --paper=talasila2023 --table=II --workdirs /runs/tal_t2/*
  cxr-sweep --config=configs/byol_cam.py:table=III --workdir_root=/runs/tal_t3
  cxr-table --paper=talasila2023 --table=III --workdirs /runs/tal_t3/*
On the phantoms both tables are the same runs' settings. Real data: Table II with
``dataset=chexpert,backbone=resnet50,pretrain=nih,xrv=PATH,table=II``; Table III with
``dataset=nih,backbone=resnet50,xrv=PATH,table=III`` fine-tunes and tests on NIH (the paper
tests its CheXpert-fine-tuned model on NIH's test set, which no evaluator here does).
"""

import ml_collections

from configs import common

BYOL_ARGS = dict(pretrain="", cam=2.0, xrv="")
TABLES = ("II", "III")


def _view(**fields):
  return ml_collections.ConfigDict(fields)


def held_out_data(c: ml_collections.ConfigDict) -> dict:
  """An evaluator's ``data``: the pretraining data's held-out cross-validation fold
  (byol.pretrain_cv) in the fine-tuning label space; references, so overrides of the byol
  fields on the command line reach it."""
  b = c.byol
  out = dict(label_space=c.data.get_ref("label_space"),
             cv=dict(num_folds=b.pretrain_cv.get_ref("num_folds"),
                     fold=b.pretrain_cv.get_ref("fold")))
  if b.pretrain_dataset and b.pretrain_dataset != c.data.name:
    out.update(name=b.pretrain_dataset, manual_dir=b.get_ref("pretrain_manual_dir"))
  return out


def get_config(arg=None):
  a = common.sweep_arg(arg, TABLES, **BYOL_ARGS)
  if a.pretrain and a.pretrain not in common.DATASETS:
    raise KeyError(f"unknown pretrain dataset {a.pretrain!r}; known: {sorted(common.DATASETS)}")
  c = common.base_config(a)
  c.method = "byol_cam"
  pretrain_name = a.pretrain or a.dataset
  c.cam = "gradcam"                     # evaluator's localization: Grad-CAM, threshold 127/255
  # Fine-tuning augmentation: random affine only, p = 0.5, the target view's ranges (Sec. III-D).
  c.data.augment.update(dict(random_resized_crop=0.0, affine=0.5, rotation=15.0, scale=0.15,
                             shift=0.1, blur=0.0, intensity=0.0, hflip=0.0))

  b = c.byol = ml_collections.ConfigDict()
  b.ssl = True                          # run the BYOL pretraining stage
  b.cam_weight = a.cam                  # lambda of Eq. 8 (0: SSL without CAM loss)
  b.cam_relu = False                    # signed Grad-CAM in the loss (see cxr_jax.losses.cam_loss)
  # What the CAM loss's sigmoid reads: the per-cell class logit h w GC + b ('cell'), or GC itself
  # ('gradcam': GC is that logit / (h w), near 0 at 4x4-7x7 maps; the loss stayed above a constant
  # map's for 300 steps; benchmarks/RESULTS.md, Talasila session 9). See cxr_jax.losses.cam_loss.
  b.cam_logit = "cell"
  b.probe_into_encoder = False          # probe BCE trains the encoder too (see methods/byol_cam)
  b.tau = 0.99                          # target EMA (Eq. 5)
  b.tau_schedule = "constant"           # or BYOL's "cosine" (tau -> 1)
  b.hidden_dim = 512                    # projector / predictor hidden size
  b.projection_dim = 256                # projector / predictor output size
  b.steps = 5000                        # steps of the pretraining stage
  b.batch_size = 128                    # global batch of the pretraining stage
  b.optimizer = common.optimizer(name="adam", learning_rate=1e-4, b1=0.9, b2=0.999,
                                 weight_decay=0.0, schedule="constant")  # pretraining's
  # Views merged over config.data.augment: the target view t' (view1) is stronger and more likely.
  b.online_view = _view(random_resized_crop=0.5, crop_scale=(0.6, 1.0), affine=0.5,
                        rotation=10.0, scale=0.1, shift=0.05, blur=0.3, blur_sigma=(0.1, 1.0))
  b.target_view = _view(random_resized_crop=0.8, crop_scale=(0.4, 1.0), affine=0.8,
                        rotation=15.0, scale=0.15, shift=0.1, blur=0.8, blur_sigma=(0.1, 2.0))
  b.pretrain_dataset = a.pretrain       # '' = config.data's dataset
  b.pretrain_label_space = common.DATASETS[a.pretrain][0] if a.pretrain else ""  # '' = data's
  b.pretrain_manual_dir = ""            # the pretraining dataset's official download folder
  b.pretrain_synthetic_seed = 1         # phantoms of another seed: the 'other dataset'
  # Cross-validation over the pretraining data's boxed images (splits.cv_split; off at
  # num_folds = 0). NIH's 984 boxes are all on official-test images, so its official train
  # split has none: the pretraining stage reads the other folds' boxed images plus a patient-level
  # unannotated_fraction of the unboxed official-train images, and the held-out fold's boxed
  # images are the NIH IoU test set (Sec. IV: "984 ... boxes, divided 80/20 between training and
  # test"; 5 folds = 80/20).
  b.pretrain_cv = ml_collections.ConfigDict()
  b.pretrain_cv.num_folds = 5 if pretrain_name == "nih" else 0  # folds (0 = off)
  b.pretrain_cv.fold = 0                # the held-out fold (the IoU test set)
  b.pretrain_cv.unannotated_fraction = 1.0  # share of the unboxed images BYOL also trains on

  ft = b.finetune = ml_collections.ConfigDict()
  ft.steps = 3000                       # steps of the fine-tuning stage
  ft.batch_size = 0                     # 0 = config.batch_size
  ft.eval_every = 250                   # val AUROC -> best checkpoint; plateau fed at each eval
  # What the plateau schedule watches: 'train_loss' (Sec. IV-b: "four consecutive epochs with no
  # improvement in training loss"; mean loss since the previous eval) or 'eval' (val AUROC).
  ft.plateau_signal = "train_loss"
  ft.cam_weight = 0.0                   # CAM loss on the head while fine-tuning (XRV + CAM loss)
  # > 0: a stage 'cam_finetune' of these steps before 'finetune': weighted BCE + cam_weight *
  # CAM loss of the head on the pretraining data's 'train' split (its boxes, labels mapped into
  # data.label_space), the "XRV + CAM loss" row ("finetuned on NIH CXR with our proposed CAM
  # loss", Sec. IV) when the fine-tuning data has no boxes; 'finetune' then has no CAM loss.
  ft.cam_stage_steps = 0
  # The fine-tuning head: 'fresh' (a new fully-connected layer, as the paper must for NIH ->
  # CheXpert), 'probe' (a copy of the pretraining probe that the CAM loss trained; needs one label
  # space for both stages) or 'auto': 'probe' when both stages share the label space, else
  # 'fresh'. A fresh head loses the CAM loss's localization (benchmarks/RESULTS.md, Talasila).
  ft.head_init = "auto"
  ft.min_learning_rate = 1e-6           # plateau floor (optimizer.plateau_min_scale follows it)
  ft.optimizer = common.optimizer(
      name="adam", learning_rate=1e-4, b1=0.9, b2=0.999, weight_decay=0.0, schedule="plateau",
      decay_rate=0.1, plateau_patience=4, plateau_rtol=1e-4)  # fine-tuning's
  c.batch_size = 128
  # After training: Grad-CAM / ++ / Score-CAM boxes (mean IoU, a panel row each) on the first
  # ``max_images`` images of ``splits`` with a box.
  c.evals.cam_kinds = dict(type="byol_cam_kinds", splits=("test",), when="end", max_images=8)
  if b.pretrain_cv.num_folds:
    # The paper's NIH IoU: the held-out fold of the pretraining data's boxed images, in the
    # fine-tuning label space (boxes of classes without a counterpart dropped). 'nih_boxes':
    # Grad-CAM boxes of every held-out boxed image (its 'localization' / 'mean_iou', beside AUROC
    # there) as the section 'nih_boxes' of eval/test.json; 'cam_kinds' reads the same images.
    c.evals.cam_kinds.data = held_out_data(c)
    c.evals.nih_boxes = dict(type="classification", splits=("test",), when="end",
                             data=held_out_data(c))

  if a.runlocal:
    c.data.image_size = 64              # 2x2 feature maps (1x1 at 32 px: Grad-CAM is constant)
    b.hidden_dim, b.projection_dim = 64, 32
    b.steps, b.batch_size = 10, 16
    c.evals.cam_kinds.max_images = 4
    ft.steps, ft.eval_every = 10, 5
    c.batch_size = 16
  c.lock()
  return c


def get_sweep(arg=None):
  """Table II / III columns as overrides.

  Baseline (ResNet-50 from scratch, supervised), SSL + FT (no CAM loss),
  SSL + CAM loss + FT; with ``xrv=PATH`` (a converted torchxrayvision
  DenseNet-121, no download here) also XRV fine-tuned without and with the
  CAM loss (with ``pretrain=nih``: its CAM loss in stage 'cam_finetune' on the NIH folds,
  before fine-tuning, so that it differs from the XRV row).

  ``table=II`` / ``table=III``: those rows (``table_rows``) under the tables' names x seeds,
  or x the pretraining data's cross-validation folds where it has them.
  """
  a = common.sweep_arg(arg, TABLES, **BYOL_ARGS)
  config = get_config(arg)
  rows = table_rows(a, config)
  if a.table:
    cv = config.byol.pretrain_cv
    replicates = (common.fold_replicates(cv.num_folds, "byol.pretrain_cv.fold") if cv.num_folds
                  else common.seed_replicates(a.seeds))
    return common.table_sweep("talasila2023", a.table, rows, replicates)
  order = ("Baseline", "SSL + FT", "SSL + CAM Loss + FT (ours)", "XRV (SOTA)", "XRV + CAM Loss")
  return [rows[name] for name in order if name in rows]


def table_rows(a, config) -> dict[str, dict]:
  """{row name as Tables II / III print it: overrides}; the XRV rows only with ``a.xrv``."""
  lam = a.cam or 2.0
  rows = {"Baseline": {"model.backbone": "resnet50", "byol.ssl": False, "byol.cam_weight": 0.0}}
  if a.xrv:
    xrv = {"model.backbone": "densenet121", "model.init_from": a.xrv, "byol.ssl": False,
           "byol.cam_weight": 0.0}
    xrv_cam = {**xrv, "byol.finetune.cam_weight": lam}
    if config.byol.pretrain_cv.num_folds:
      # NIH's boxes are not in the fine-tuning data: the CAM loss runs in 'cam_finetune' on the
      # pretraining folds first, as long as pretraining would.
      xrv_cam["byol.finetune.cam_stage_steps"] = config.byol.steps
    rows["XRV (SOTA)"] = {**xrv, "byol.finetune.cam_weight": 0.0}
    rows["XRV + CAM Loss"] = xrv_cam
  rows["SSL + FT"] = {"byol.ssl": True, "byol.cam_weight": 0.0}
  rows["SSL + CAM Loss + FT (ours)"] = {"byol.ssl": True, "byol.cam_weight": lam}
  return rows
