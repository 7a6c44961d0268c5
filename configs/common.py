"""Presets shared by every method config.

``parse_arg`` is the one grammar of the ``--config=configs/x.py:ARG`` preset
suffix ('dataset=nih,backbone=resnet50,size=224,runlocal'); ``method_arg`` parses
a method config's preset (the common keys of ``ARGS`` plus its own);
``base_config(arg)`` builds the fields every method reads. Method configs add
their own fields (and evaluators under ``evals``), then lock. Every field the
code reads is declared here or in its method's config, with a one-line comment.
"""

import ml_collections

DATASETS = {
    # name: (label space, channels, default image size)
    "synthetic": ("nih14", 1, 64),
    "nih": ("nih14", 1, 256),
    "chexpert": ("chexpert14", 1, 256),
    "mimic": ("chexpert14", 1, 256),
    "reflacx": ("reflacx", 1, 256),
    "egd": ("egd3", 1, 256),
}

BACKBONES = ("resnet18", "resnet34", "resnet50", "preact_resnet50", "densenet121", "vgg16")


# The keys of the preset every config takes (``base_config``) and their defaults.
ARGS = dict(dataset="synthetic", backbone="resnet18", size=0, width=1.0, runlocal=False)
# Values of a flag key ('runlocal' alone is 'runlocal=1').
TRUE, FALSE = ("1", "true", "yes"), ("0", "false", "no")


def _typed(key: str, default, value: str | None):
  """``value`` as the type of ``default``; ``None`` (the key alone) or '' is True for a flag key."""
  if isinstance(default, bool):
    flag = (value or "1").lower()
    if flag not in TRUE + FALSE:
      raise ValueError(f"config arg {key}={value!r}: a flag takes one of {list(TRUE + FALSE)}")
    return flag in TRUE
  if value is None:
    raise ValueError(f"config arg {key!r} needs a value ({key}=...)")
  try:
    return type(default)(value)
  except ValueError:
    raise ValueError(f"config arg {key}={value!r}: expected a {type(default).__name__}") from None


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'a=1,b=x,flag' -> ConfigDict(a=1, b='x', flag=True), each value of its default's type.

  The one preset grammar of every config: comma-separated ``key=value`` items; a
  flag key alone, or =1/true/yes, is True and =0/false/no False; an unknown key
  is a KeyError and a malformed value a ValueError, both naming the key.
  """
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    key = key.strip()
    if key not in out:
      raise KeyError(f"unknown config arg {key!r}; known: {sorted(out)}")
    out[key] = _typed(key, defaults[key], value.strip() if sep else None)
  return ml_collections.ConfigDict(out)


def method_arg(arg: str | None, **own) -> ml_collections.ConfigDict:
  """A method config's preset: the keys of ``ARGS`` plus the method's ``own`` keys
  (an own key may change a common default, e.g. ``backbone='resnet50'``)."""
  return parse_arg(arg, **{**ARGS, **own})


# Keys of a method config's preset that pick a paper table's sweep (``get_sweep('table=N')``):
# ``table`` (its key in cxr_jax/evaluation/paper_tables.json; '' = the config's own sweep) and
# ``seeds`` (the replicates of a row where they are seeds 0 .. seeds-1, not folds).
SWEEP_ARGS = dict(table="", seeds=3)


def sweep_arg(arg: str | None, tables: tuple[str, ...], **own) -> ml_collections.ConfigDict:
  """``method_arg`` with the keys of ``SWEEP_ARGS``; a ``table`` not in ``tables`` is a
  KeyError listing them."""
  a = method_arg(arg, **SWEEP_ARGS, **own)
  if a.table and a.table not in tables:
    raise KeyError(f"config arg table={a.table!r}: no such table; known: {list(tables)}")
  if a.seeds < 1:
    raise ValueError(f"config arg seeds={a.seeds}: need >= 1")
  return a


def seed_replicates(seeds: int) -> list[dict]:
  """A table row's replicates: seeds 0 .. seeds-1."""
  return [{"seed": s} for s in range(seeds)]


def fold_replicates(folds: int, key: str = "data.cv.fold") -> list[dict]:
  """A table row's replicates under cross-validation: every fold of ``key``."""
  return [{key: f} for f in range(folds)]


def table_sweep(paper: str, table: str, rows: dict[str, dict],
                replicates: list[dict]) -> list[dict]:
  """A paper table's sweep: one override dict per (replicate, row), replicate-major (a first
  pass over the rows gives every row one run), each the row's name (``table.row``), the
  replicate's keys, the row's overrides and ``table.paper`` / ``table.table``, in that order
  (cxr-sweep names each workdir 'NN-row=<row>,seed=0,...' from it).

  rows: {row name exactly as paper_tables.json prints it: its config overrides}.
  """
  return [{"table.row": name, **replicate, **overrides, "table.paper": paper,
           "table.table": table} for replicate in replicates for name, overrides in rows.items()]


def arg_keys(arg: str | None) -> set[str]:
  """The keys named in a config arg ('size=64,runlocal' -> {'size', 'runlocal'})."""
  return {item.partition("=")[0].strip() for item in filter(None, (arg or "").split(","))}


def optimizer(**fields) -> ml_collections.ConfigDict:
  """An optimizer config: every field ``cxr_jax.train.optim`` reads, at these defaults
  updated by ``fields`` (a field it does not read is a KeyError)."""
  o = ml_collections.ConfigDict()
  o.name = "adam"                          # adam | adamw | sgd | lars
  o.learning_rate = 1e-3                   # peak learning rate
  o.b1 = 0.9                               # Adam beta1 (adam, adamw)
  o.b2 = 0.999                             # Adam beta2 (adam, adamw)
  o.momentum = 0.9                         # sgd / lars momentum (0 = plain SGD)
  o.nesterov = False                       # sgd / lars: Nesterov momentum
  o.weight_decay = 0.0                     # adam / sgd: L2 in the gradient; adamw / lars: decoupled
  o.schedule = "constant"                  # constant | cosine | step | exponential | plateau
  o.warmup_steps = 0                       # linear warm-up from 0 over these steps
  o.decay_rate = 0.1                       # step / exponential decay factor; plateau: lr factor
  o.decay_steps = 0                        # step / exponential: steps per decay_rate
  o.plateau_patience = 4                   # plateau: evaluations without improvement before a drop
  o.plateau_rtol = 1e-4                    # plateau: relative improvement that counts
  o.plateau_min_scale = 0.0                # plateau: the lr scale never drops below this
  o.grad_clip = 0.0                        # clip gradients to this global norm (0 = off)
  unknown = sorted(set(fields) - set(o))
  if unknown:
    raise KeyError(f"optimizer fields {unknown} are not read by cxr_jax.train.optim; "
                   f"known: {sorted(o)}")
  o.update(fields)
  return o


def base_config(arg: str | ml_collections.ConfigDict | None = None) -> ml_collections.ConfigDict:
  """The fields every method reads; ``arg``: a preset string or a ``method_arg`` result."""
  a = arg if isinstance(arg, ml_collections.ConfigDict) else parse_arg(arg, **ARGS)
  if a.dataset not in DATASETS:
    raise KeyError(f"unknown dataset {a.dataset!r}; known: {sorted(DATASETS)}")
  if a.backbone not in BACKBONES:
    raise KeyError(f"unknown backbone {a.backbone!r}; known: {list(BACKBONES)}")
  label_space, channels, size = DATASETS[a.dataset]
  c = ml_collections.ConfigDict()
  c.method = "baseline"                    # cxr_jax.methods registry name
  c.seed = 0                               # parameter init, data order and augmentation

  c.data = ml_collections.ConfigDict()
  c.data.name = a.dataset                  # DATASETS key; 'a+b' / 'a:gaze' join prepared datasets
  c.data.label_space = label_space         # cxr_jax.data.schema label space of the labels
  c.data.image_size = a.size or size       # square side the images are resized to, pixels
  c.data.channels = channels               # image channels the model reads (3 for ImageNet weights)
  c.data.normalization = "minus_one_one"   # or "imagenet" (mean/std) for ImageNet weights
  c.data.manual_dir = ""                   # real datasets: the official download folder
  c.data.data_dir = ""                     # real datasets: root of cxr-prepare output (read here)
  c.data.mimic_dir = ""                    # reflacx / egd without data_dir: MIMIC-CXR-JPG folder
  c.data.prepared_size = 0                 # stored image size to read (0 = data.image_size)
  c.data.uncertainty = "zeros"             # CheXpert-style uncertain labels: zeros / ones / ignore
  c.data.frontal_only = True               # real datasets: frontal views only
  c.data.split_seed = 0                    # patient-level val/test/cv splits of real data
  c.data.val_fraction = 0.1                # patient-level split fraction of val (real data)
  c.data.test_fraction = 0.2               # patient-level split fraction of test (real data)
  # Prepared real data (splits.split_indices): 'official' keeps the official test / validation
  # lists; 'random' ignores them and splits every image by patient into train / val / test
  # (1 - val_fraction - test_fraction, val_fraction, test_fraction; Ge 2018's 70/10/20).
  c.data.split_policy = "official"
  c.data.worker_count = 0                  # grain worker processes (0 = in the main process)
  c.data.prefetch = 2                      # batches prefetched onto the devices
  c.data.skip_bad_examples = False         # skip (and count) examples that fail to read, not raise
  c.data.grid_size = 20                    # P of the P x P patch grid ('box_grid' maps)
  c.data.gaze_sigma_per_second = 10.0      # gaze map: sigma = a * seconds, in pixels of the map
  c.data.box_sigma = 5.0                   # box map: Gaussian edge smoothing, pixels of the map
  # Synthetic phantoms: sizes of the splits (disjoint index ranges, one seed).
  c.data.synthetic = ml_collections.ConfigDict()
  c.data.synthetic.seed = 0                # phantom generator seed
  c.data.synthetic.num_train = 4000        # phantoms in 'train'
  c.data.synthetic.num_val = 500           # phantoms in 'val'
  c.data.synthetic.num_test = 1000         # phantoms in 'test'
  c.data.synthetic.annotated_fraction = 0.1  # share of train patients whose images keep boxes
  # Cross-validation over the annotated images (splits.cv_split; off when num_folds = 0):
  # 'train' = the other folds + a patient-level unannotated_fraction of the images
  # without boxes, 'test' = fold `fold`, 'val' unchanged.
  c.data.cv = ml_collections.ConfigDict()
  c.data.cv.num_folds = 0                  # folds over the annotated images (0 = off)
  c.data.cv.fold = 0                       # the fold that is 'test'
  c.data.cv.unannotated_fraction = 0.0     # share of the images without boxes added to 'train'
  # Training augmentation (cxr_jax.data.augment.train_transform): each transform runs with its
  # probability; crop, affine and flip are composed and the image resampled once.
  c.data.augment = ml_collections.ConfigDict()
  c.data.augment.random_resized_crop = 0.0  # probability of a random resized crop
  c.data.augment.crop_scale = (0.7, 1.0)   # its area, a fraction of the image, uniform in this range
  c.data.augment.affine = 0.5              # probability of a random affine transform
  c.data.augment.rotation = 10.0           # its angle, uniform in +- this many degrees
  c.data.augment.scale = 0.1               # its scale, uniform in 1 +- this
  c.data.augment.shift = 0.05              # its shifts, uniform in +- this fraction of the side
  c.data.augment.blur = 0.0                # probability of a Gaussian blur
  c.data.augment.blur_sigma = (0.1, 1.5)   # its sigma, uniform in this range (pixels)
  c.data.augment.intensity = 0.5           # probability of a brightness / contrast change
  c.data.augment.brightness = 0.1          # its brightness offset, uniform in +- this
  c.data.augment.contrast = 0.1            # its contrast factor, uniform in 1 +- this
  c.data.augment.hflip = 0.0               # probability of a horizontal flip (anatomy is not symmetric)

  c.model = ml_collections.ConfigDict()
  c.model.backbone = a.backbone            # BACKBONES name
  c.model.width = a.width                  # channel-width multiplier of the backbone
  c.model.dtype = "float32"                # compute dtype; params stay float32
  c.model.blurpool = 0                     # BlurPool filter size (0 = off)
  c.model.init_from = ""                   # converted weights (cxr-convert-weights) for the backbone

  # What weighted BCE (losses.weighted_bce: the baseline and disease_masks 'weighted_bce' loss,
  # byol_cam fine-tuning) counts |P| and |N| over: 'per_class' (each class's column of the batch,
  # Kim 2022 Eq. 10 read per class) | 'batch' (the whole batch label matrix, Wang 2017's W-CEL).
  c.loss_weighting = "per_class"
  c.batch_size = 64                        # global, over all devices and processes
  c.eval_batch_size = 128                  # global batch of the evaluation passes
  c.optimizer = optimizer()                # every stage's optimizer unless the method gives its own
  c.train_steps = 2000                     # steps of the (main) training stage
  c.eval_every = 500                       # validation every N steps of a stage (0 = none)
  c.log_every = 50                         # training metrics every N steps
  c.checkpoint_every = 500                 # checkpoint every N global steps
  c.keep_checkpoints = 2                   # the newest checkpoints kept
  c.fsdp = False                           # shard large parameters over the devices (else replicate)
  c.max_steps_in_flight = 2                # steps queued ahead of the devices; SIGTERM waits for them (0: no bound)
  c.progress_every_secs = 60.0             # a progress line (finished steps, img/s, ETA) this often
  # Divergence guard (cxr_jax.train.progress.diverged): a stage stops with an error when a logged
  # mean loss exceeds `factor` times the smallest of its first `window` logged losses.
  c.divergence = ml_collections.ConfigDict()
  c.divergence.factor = 100.0              # the multiple of the reference that stops a run (0 = off)
  c.divergence.window = 5                  # first steps of a stage, logged one by one: the reference

  # Localization from class activation maps (cxr_jax.evaluation.evaluator).
  c.cam = "gradcam"                        # gradcam | gradcam++ | scorecam | predict | none
  c.cam_threshold = 127 / 255              # map threshold of the boxes (Talasila 2023: 127/255)
  c.cam_threshold_mode = "absolute"        # 'absolute' (min-max normalized map) | 'fraction_of_max'
  c.cam_largest_only = False               # True: the largest component per class; False: every one

  # Named evaluators the trainer runs: {name: {type, splits, when, **its own keyword args}}.
  # type: cxr_jax.evaluation.evaluators.TYPES; splits: the splits it reports on; when:
  # 'end' (after training), 'stage:<name>' (when that stage ends), 'every:<N>' (every N
  # global steps during training) or 'never' (switched off). Method configs add their own.
  c.evals = ml_collections.ConfigDict()
  # AUROC and friends (and CAM localization where ``cam`` is not 'none').
  c.evals.classification = ml_collections.ConfigDict(dict(
      type="classification", splits=("val", "test"), when="end"))

  # The paper table row this run is (set by a config's get_sweep('table=N'); read by
  # cxr-table --paper, cxr_jax/evaluation/paper_tables.json).
  c.table = ml_collections.ConfigDict()
  c.table.paper = ""                       # e.g. 'rozenberg2020' ('' = not a paper table run)
  c.table.table = ""                       # the table as the paper numbers it, e.g. '1'
  c.table.row = ""                         # the row's name as printed in the paper

  if a.runlocal:
    c.data.image_size = min(c.data.image_size, 32)
    c.data.synthetic.num_train, c.data.synthetic.num_val, c.data.synthetic.num_test = 256, 64, 64
    c.model.width = min(c.model.width, 0.125)
    c.batch_size, c.eval_batch_size = 16, 32
    c.train_steps, c.eval_every, c.log_every, c.checkpoint_every = 20, 10, 5, 10
  return c
