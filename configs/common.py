"""Presets shared by every method config.

``parse_arg("dataset=nih,backbone=resnet50,size=224,runlocal")`` turns the
``--config=configs/x.py:ARG`` suffix into a dict; ``base_config(arg)`` builds the
fields every method reads. Method configs add their own fields, then lock.
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


def _typed(default, value: str):
  """``value`` as the type of ``default``; a bool key without a value is True."""
  if isinstance(default, bool):
    return not value or value.lower() in ("1", "true", "yes")
  return type(default)(value)


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'a=1,b=x,flag' -> ConfigDict(a=1, b='x', flag=True); unknown keys are an error."""
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    key = key.strip()
    if key not in out:
      raise KeyError(f"unknown config arg {key!r}; known: {sorted(out)}")
    out[key] = _typed(out[key], value)
  return ml_collections.ConfigDict(out)


def split_arg(arg: str | None, own: dict) -> tuple[str, dict]:
  """A method config's arg -> (the items for ``base_config``, values of its ``own`` keys).

  'size=64,release=all' with own={'release': 'ch2_prior'} -> ('size=64', {'release': 'all'});
  values take the type of ``own``'s defaults.
  """
  common_items, values = [], dict(own)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key.strip() in own:
      values[key.strip()] = _typed(own[key.strip()], value)
    else:
      common_items.append(item)
  return ",".join(common_items), values


def arg_keys(arg: str | None) -> set[str]:
  """The keys named in a config arg ('size=64,runlocal' -> {'size', 'runlocal'})."""
  return {item.partition("=")[0].strip() for item in filter(None, (arg or "").split(","))}


def base_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse_arg(arg, dataset="synthetic", backbone="resnet18", size=0, width=1.0, runlocal=False)
  if a.dataset not in DATASETS:
    raise KeyError(f"unknown dataset {a.dataset!r}; known: {sorted(DATASETS)}")
  if a.backbone not in BACKBONES:
    raise KeyError(f"unknown backbone {a.backbone!r}; known: {list(BACKBONES)}")
  label_space, channels, size = DATASETS[a.dataset]
  c = ml_collections.ConfigDict()
  c.method = "baseline"
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.name = a.dataset
  c.data.label_space = label_space
  c.data.image_size = a.size or size
  c.data.channels = channels
  c.data.normalization = "minus_one_one"   # or "imagenet" (mean/std) for ImageNet weights
  c.data.manual_dir = ""                   # real datasets: the official download folder
  c.data.data_dir = ""                     # real datasets: root of cxr-prepare output (read here)
  c.data.mimic_dir = ""                    # reflacx / egd without data_dir: MIMIC-CXR-JPG folder
  c.data.prepared_size = 0                 # stored image size to read (0 = data.image_size)
  c.data.uncertainty = "zeros"             # CheXpert-style uncertain labels: zeros / ones / ignore
  c.data.frontal_only = True               # real datasets: frontal views only
  c.data.split_seed = 0                    # patient-level val/test/cv splits of real data
  c.data.val_fraction = 0.1                # patient-level split fractions (real data)
  c.data.test_fraction = 0.2
  c.data.worker_count = 0                  # grain worker processes (0 = in the main process)
  c.data.prefetch = 2                      # batches prefetched onto the devices
  c.data.grid_size = 20                    # P of the P x P patch grid ('box_grid' maps)
  c.data.gaze_sigma_per_second = 10.0      # gaze map: sigma = a * seconds, in pixels of the map
  c.data.box_sigma = 5.0                   # box map: Gaussian edge smoothing, pixels of the map
  # Synthetic phantoms: sizes of the splits (disjoint index ranges, one seed).
  c.data.synthetic = ml_collections.ConfigDict(dict(
      seed=0, num_train=4000, num_val=500, num_test=1000, annotated_fraction=0.1))
  # Cross-validation over the annotated images (splits.cv_split; off when num_folds = 0):
  # 'train' = the other folds + a patient-level unannotated_fraction of the images
  # without boxes, 'test' = fold `fold`, 'val' unchanged.
  c.data.cv = ml_collections.ConfigDict(dict(num_folds=0, fold=0, unannotated_fraction=0.0))
  c.data.augment = ml_collections.ConfigDict(dict(
      random_resized_crop=0.0, crop_scale=(0.7, 1.0),
      affine=0.5, rotation=10.0, scale=0.1, shift=0.05,
      blur=0.0, blur_sigma=(0.1, 1.5),
      intensity=0.5, brightness=0.1, contrast=0.1,
      hflip=0.0))

  c.model = ml_collections.ConfigDict()
  c.model.backbone = a.backbone
  c.model.width = a.width
  c.model.dtype = "float32"                # compute dtype; params stay float32
  c.model.blurpool = 0                     # BlurPool filter size (0 = off)
  c.model.init_from = ""                   # converted weights (cxr-convert-weights) for the backbone

  c.batch_size = 64                        # global, over all devices and processes
  c.eval_batch_size = 128
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adam", learning_rate=1e-3, b1=0.9, b2=0.999, weight_decay=0.0,
      schedule="constant", warmup_steps=0, decay_rate=0.1, decay_steps=0,
      grad_clip=0.0))
  c.train_steps = 2000
  c.eval_every = 500
  c.log_every = 50
  c.checkpoint_every = 500
  c.keep_checkpoints = 2
  c.fsdp = False

  if a.runlocal:
    c.data.image_size = min(c.data.image_size, 32)
    c.data.synthetic.num_train, c.data.synthetic.num_val, c.data.synthetic.num_test = 256, 64, 64
    c.model.width = min(c.model.width, 0.125)
    c.batch_size, c.eval_batch_size = 16, 32
    c.train_steps, c.eval_every, c.log_every, c.checkpoint_every = 20, 10, 5, 10
  return c
