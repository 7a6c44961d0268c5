"""Li 2018 / Rozenberg 2020: patch-grid localization with limited box annotation.

cxr-train --config=configs/patch_loc.py:width=0.25,loss=rozenberg --workdir=/tmp/pl
cxr-train --config=configs/patch_loc.py:loss=li,folds=5,fold=0 --workdir=/tmp/pl_li_f0
Table 1 (folds x unannotated fraction, one run each; then benchmarks/patch_loc_cv.py):
cxr-sweep --config=configs/patch_loc.py:loss=rozenberg,folds=5 --workdir_root=/tmp/pl_cv

Besides the common args (configs/common.py), the arg takes ``loss`` (li |
rozenberg), ``form`` (relu: Eq. 12 | sigmoid: Eq. 5, 8), ``crf`` (add the
PAC-CRF stage), ``grid`` (P), ``folds`` / ``fold`` / ``unannotated``
(data.cv: cross-validation over the annotated images, Table 1 protocol).

Paper settings (Sec. 4): pre-act ResNet-50, P = 20, lambda_ann = 70, Adam with
weight decay 0.01, learning rate 1e-3 decaying exponentially, batch 48, NIH at
512 px in [-1, 1] (dataset=nih, unless the arg gives size). The decay rate is
not given: 0.1 over ``train_steps`` as the config sets it (an override of train_steps should set
optimizer.decay_steps too); each stage restarts its schedule. The thresholds' initial values and their optimizer (Adam, lr
``threshold_lr``, ``threshold_steps`` per alternation) are not given either.
"""

from configs import common

OWN = {"loss": "rozenberg", "form": "relu", "crf": "0", "grid": "0", "folds": "0", "fold": "0",
       "unannotated": "0.0"}


def get_config(arg=None):
  arg, own = common.split_arg(arg, OWN)
  if "backbone" not in common.arg_keys(arg):
    arg = ",".join(filter(None, [arg, "backbone=preact_resnet50"]))
  c = common.base_config(arg)
  c.method = "patch_loc"
  c.cam = "none"  # localization is the patch protocol (after_training), not CAM boxes
  c.patch_loc = dict(
      loss=own["loss"],            # li (Eq. 1-3, the reference) | rozenberg (Eq. 12)
      form=own["form"],            # rozenberg: relu (Eq. 9, 11) | sigmoid (Eq. 5, 8)
      lambda_ann=70.0,             # Eq. 3 / 12 weight of the annotated terms
      gamma=0.0,                   # Eq. 11 positive/negative ratio; 0 = per class, per batch
      box_classes="boxed",         # boxes used as annotations: boxed (NIH's 8) | all
      feature_stage="conv5_x",     # backbone map resized to the grid (conv4_x: stride 16)
      head_hidden=128,             # channels of the first of the head's two convs
      tau=0.5, rho=0.05,           # initial thresholds: fractions of |b| and |b_bar|
      tau_hat=4.0, rho_hat=1.0,    # initial thresholds: patch counts (of P^2)
      alternations=2,              # threshold stages between network stages (0 = joint)
      threshold_steps=50,          # steps of each threshold stage
      threshold_lr=1e-2,
      crf=own["crf"] in ("1", "true", "True"),
      crf_steps=500,
      crf_window=19,               # PAC window (Sec. 3.3: 19 x 19)
      crf_iterations=5,            # mean-field iterations
      guide_features=16,           # channels of the guide branch (PAC kernel features)
  )
  c.data.grid_size = int(own["grid"]) or 20
  c.data.cv.num_folds = int(own["folds"])
  c.data.cv.fold = int(own["fold"])
  c.data.cv.unannotated_fraction = float(own["unannotated"])
  c.optimizer.update(dict(name="adam", learning_rate=1e-3, weight_decay=0.01,
                          schedule="exponential", decay_rate=0.1, decay_steps=c.train_steps))
  c.batch_size = 48
  c.eval_every = 0
  if c.data.name == "nih" and "size" not in common.arg_keys(arg):
    c.data.image_size = 512
  c.lock()
  return c


def get_sweep(arg=None):
  """Table 1: every fold x unannotated fraction {0, 0.2} (needs folds > 0 in the arg)."""
  config = get_config(arg)
  folds = config.data.cv.num_folds
  if folds < 1:
    raise ValueError("configs/patch_loc.py get_sweep: pass folds=N (N >= 2) in the config arg")
  return [{"data.cv.unannotated_fraction": u, "data.cv.fold": f}
          for u in (0.0, 0.2) for f in range(folds)]
