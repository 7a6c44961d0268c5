"""Li 2018 / Rozenberg 2020: patch-grid localization with limited box annotation.

cxr-train --config=configs/patch_loc.py:width=0.25,loss=rozenberg --workdir=/tmp/pl
cxr-train --config=configs/patch_loc.py:loss=li,folds=5,fold=0 --workdir=/tmp/pl_li_f0
Table 1 (folds x unannotated fraction, one run each; then benchmarks/patch_loc_cv.py):
cxr-sweep --config=configs/patch_loc.py:loss=rozenberg,folds=5 --workdir_root=/tmp/pl_cv
Table 1 as the paper prints it (``get_sweep('table=1')``: its six rows, 0 % / 20 % unannotated
x ours (new loss + PAC-CRF) / ref. (Li's loss) / new loss without PAC-CRF, each on every fold
of ``folds`` (default 5, ``data.cv.fold``); BlurPool as the dataset's preset sets it):
cxr-sweep --config=configs/patch_loc.py:table=1 --workdir_root=/runs/roz_t1
cxr-table --paper=rozenberg2020 --table=1 --workdirs /runs/roz_t1/*
Each 'ours' run trains its own unary model before its CRF stage (the same config and seed as
the fold's 'new loss without PAC-CRF' run, retrained, not resumed from that run).

Besides the common args (configs/common.py), the arg takes ``loss`` (li |
rozenberg), ``form`` (relu: Eq. 12 | sigmoid: Eq. 5, 8), ``crf`` (a flag: add
the PAC-CRF stage), ``grid`` (P), ``folds`` / ``fold`` / ``unannotated``
(data.cv: cross-validation over the annotated images, Table 1 protocol); the
default backbone is the paper's pre-act ResNet-50.

dataset=nih is Rozenberg's protocol (Sec. 4): 5-fold patient-level cross-validation over
the boxed images (folds=5, fold=0 unless the arg gives them; every NIH box is on an
official-test image, so without folds no training image has one), and evals.patch_grid
reports the held-out fold ('test'; the paper's figures are over the CV test folds).

Paper settings (Sec. 4): pre-act ResNet-50, P = 20, lambda_ann = 70, Adam with
weight decay 0.01, learning rate 1e-3 decaying exponentially, batch 48, NIH at
512 px in [-1, 1] (dataset=nih, unless the arg gives size). The decay rate is
not given: 0.1 over ``train_steps`` as the config sets it (an override of train_steps should set
optimizer.decay_steps too); each stage restarts its schedule. The thresholds' initial values and their optimizer (Adam, lr
``threshold_lr``, ``threshold_steps`` per alternation) are not given either.

Thresholds (dataset=nih: ``patch_loc.fixed_thresholds``): Sec. 4 alternates network stages
with stages that "find the optimal thresholds" with the network frozen, but names no objective
for them; under Eq. 12 itself, which falls as tau, tau_hat fall and rho, rho_hat rise, the
optimum is the degenerate solution the alternation is meant to avoid. The paper preset reads
the thresholds as the hyperparameters Sec. 3.2 allows (fixed at their initial values);
``fixed_thresholds=False`` runs the alternation as written (``alternations`` threshold stages,
the phantom default). BlurPool (``model.blurpool``) is on at dataset=nih.
"""

from configs import common

OWN = dict(backbone="preact_resnet50", loss="rozenberg", form="relu", crf=False, grid=0, folds=0,
           fold=0, unannotated=0.0)
TABLES = ("1",)
TABLE1_FOLDS = 5
# Table 1's models (the part of the row name after 'un[%] / '): patch_loc overrides.
TABLE1_MODELS = {"ours": {"patch_loc.loss": "rozenberg", "patch_loc.crf": True},
                 "ref.": {"patch_loc.loss": "li", "patch_loc.crf": False},
                 "new loss without PAC-CRF": {"patch_loc.loss": "rozenberg",
                                              "patch_loc.crf": False}}


def get_config(arg=None):
  a = common.sweep_arg(arg, TABLES, **OWN)
  if a.table and "folds" in common.arg_keys(arg) and a.folds < 2:
    raise ValueError(f"config arg table={a.table} needs folds >= 2 (default {TABLE1_FOLDS}); "
                     f"got folds={a.folds}")
  c = common.base_config(a)
  c.method = "patch_loc"
  c.cam = "none"  # localization is the patch protocol (evals.patch_grid), not CAM boxes
  c.patch_loc = dict(
      loss=a.loss,                 # li (Eq. 1-3, the reference) | rozenberg (Eq. 12)
      form=a.form,                 # rozenberg: relu (Eq. 9, 11) | sigmoid (Eq. 5, 8)
      lambda_ann=70.0,             # Eq. 3 / 12 weight of the annotated terms
      gamma=0.0,                   # Eq. 11 positive/negative ratio; 0 = per class, per batch
      box_classes="boxed",         # boxes used as annotations: boxed (NIH's 8) | all
      feature_stage="conv5_x",     # backbone map resized to the grid (conv4_x: stride 16)
      head_hidden=128,             # channels of the first of the head's two convs
      tau=0.5, rho=0.05,           # initial thresholds: fractions of |b| and |b_bar|
      tau_hat=4.0, rho_hat=1.0,    # initial thresholds: patch counts (of P^2)
      # Thresholds as hyperparameters (Sec. 3.2: "or can be considered hyperparameters"): True
      # trains one 'network' stage with them fixed at tau, rho, tau_hat, rho_hat; False: the
      # Sec. 4 alternation below, whose threshold stages minimise the same loss (monotone in the
      # thresholds: they only move towards tau -> 0, rho -> 1, or stay once the network meets them).
      fixed_thresholds=False,
      alternations=2,              # threshold stages between network stages (0 = joint)
      threshold_steps=50,          # steps of each threshold stage
      threshold_lr=1e-2,           # learning rate of the threshold stages (Adam)
      crf=a.crf,                   # add the PAC-CRF stage (Sec. 3.3)
      crf_steps=500,               # steps of the CRF stage
      crf_window=19,               # PAC window (Sec. 3.3: 19 x 19)
      crf_iterations=5,            # mean-field iterations
      guide_features=16,           # channels of the guide branch (PAC kernel features)
  )
  c.data.grid_size = a.grid or 20
  c.data.cv.num_folds = a.folds
  c.data.cv.fold = a.fold
  c.data.cv.unannotated_fraction = a.unannotated
  c.optimizer.update(dict(name="adam", learning_rate=1e-3, weight_decay=0.01,
                          schedule="exponential", decay_rate=0.1, decay_steps=c.train_steps))
  c.batch_size = 48
  c.eval_every = 0
  # After training: the patch-grid localization protocol (Li 2018 / Rozenberg 2020).
  c.evals.patch_grid = dict(type="patch_grid", splits=("val", "test"), when="end")
  if c.data.name == "nih":
    if "folds" not in common.arg_keys(arg):
      c.data.cv.num_folds = 5              # Rozenberg's CV over the boxed images (docstring)
    c.evals.patch_grid.splits = ("test",)  # the held-out fold: 'val' has no box on NIH
    # Anti-aliasing (Sec. 3.3, Zhang 2019) before every downsampling; the filter size is not
    # given: 3, Zhang's binomial [1, 2, 1]. The phantom presets keep it off (their documented
    # numbers were measured without it).
    c.model.blurpool = 3
    c.patch_loc.fixed_thresholds = True
    if "size" not in common.arg_keys(arg):
      c.data.image_size = 512
  c.lock()
  return c


def table1_rows(folds: int) -> dict[str, dict]:
  """{row name as paper_tables.json prints it: overrides} of Table 1 under ``folds`` folds."""
  return {f"{percent}% / {model}": {**overrides, "data.cv.num_folds": folds,
                                     "data.cv.unannotated_fraction": percent / 100}
          for percent in (0, 20) for model, overrides in TABLE1_MODELS.items()}


def get_sweep(arg=None):
  """Without ``table``: every fold x unannotated fraction {0, 0.2} (needs folds > 0 in the
  arg). ``table=1``: Table 1's rows (``table1_rows``) x every fold of ``folds`` (default 5)."""
  a = common.sweep_arg(arg, TABLES, **OWN)
  if a.table:
    get_config(arg)   # checks the arg
    folds = a.folds if "folds" in common.arg_keys(arg) else TABLE1_FOLDS
    return common.table_sweep("rozenberg2020", a.table, table1_rows(folds),
                              common.fold_replicates(folds))
  config = get_config(arg)
  folds = config.data.cv.num_folds
  if folds < 1:
    raise ValueError("configs/patch_loc.py get_sweep: pass folds=N (N >= 2) in the config arg")
  return [{"data.cv.unannotated_fraction": u, "data.cv.fold": f}
          for u in (0.0, 0.2) for f in range(folds)]
