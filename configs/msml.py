"""Ge 2018: multi-label softmax loss (MSML) + two-stream bilinear pooling.

cxr-train --config=configs/msml.py:dataset=synthetic,width=0.25 --workdir=/tmp/msml
cxr-train --config=configs/msml.py:dataset=nih,strategy=local_fixed --workdir=/tmp/msml_nih \
          --config.data.manual_dir=/data/nih
'R18 + R18-BL' (both streams BCE): ...msml.py:stream2=bce; 'R18': streams=one;
'R18-BL': streams=one_bl

Besides the common args (configs/common.py), the arg takes ``strategy``
(global | local | local_fixed, Table 2), ``stream2`` (msml | bce), ``streams``
(two | one | one_bl: the single-stream rows of Table 1) and the table sweep's
``table`` / ``seeds`` (``common.SWEEP_ARGS``) and ``members``.

Paper tables (``get_sweep('table=N')``: every row x seeds 0-2, ``seeds=K`` for K; rows
set ``model.backbone``, ``msml.streams`` / ``stream2_loss`` / ``strategy`` and ``table.*``):
  Table 1 (R18, R18-BL, R18 + R18-BL, R18 + R18-F-MSML, the same with D121):
    cxr-sweep --config=configs/msml.py:table=1 --workdir_root=/runs/ge_t1
    cxr-table --paper=ge2018 --table=1 --workdirs /runs/ge_t1/*
  Table 1's ensemble rows: each row's run is its first member (R18 or D121, one stream); the
  second members (D121; a VGG-16 F-MSML model) are the ``members`` sweep (no table row);
  cxr-eval then writes each row's eval/test_ensemble.json, which cxr-table reads:
    cxr-sweep --config=configs/msml.py:table=1-ensembles --workdir_root=/runs/ge_t1e
    cxr-sweep --config=configs/msml.py:table=1-ensembles,members --workdir_root=/runs/ge_t1m
    for s in 0 1 2; do for pair in R18_+_D121:densenet121 R18_+_VGG-F-MSML:vgg16 \
        D121_+_VGG-F-MSML:vgg16; do
      cxr-eval --split=test --workdir=$(echo /runs/ge_t1e/*-row=${pair%:*},seed=$s,*) \
               --ensemble_workdirs=$(echo /runs/ge_t1m/*-seed=$s,backbone=${pair#*:},*)
    done; done
    cxr-table --paper=ge2018 --table=1-ensembles --workdirs /runs/ge_t1e/*
  Table 2 (Local, Local-Fixed, Global; R18-F-MSML):
    cxr-sweep --config=configs/msml.py:table=2 --workdir_root=/runs/ge_t2
    cxr-table --paper=ge2018 --table=2 --workdirs /runs/ge_t2/*

dataset=nih follows the paper's Sec. 3 where the config layout allows:
patient-level random split 70/10/20 of all images (``data.split_policy =
'random'``: the official test list is not used; 'official' keeps it), ImageNet mean/std
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
TABLES = ("1", "1-ensembles", "2")
# Table 1's backbones by the prefix of its row names.
TABLE1_BACKBONES = {"R18": "resnet18", "D121": "densenet121"}
# The ensemble rows: (first member: the row's own run, second member: a ``members`` run), each
# (backbone, msml.streams); F-MSML is the two-stream model with MSML on stream 2.
ENSEMBLES = {"R18 + D121": (("resnet18", "one"), ("densenet121", "one")),
             "R18 + VGG-F-MSML": (("resnet18", "one"), ("vgg16", "two")),
             "D121 + VGG-F-MSML": (("densenet121", "one"), ("vgg16", "two"))}
NIH_TRAIN_IMAGES = 0.7 * 112_120
EPOCHS = 10


def get_config(arg=None):
  a = common.sweep_arg(arg, TABLES, strategy="global", stream2="msml", streams="two",
                       members=False)
  if a.members and a.table != "1-ensembles":
    raise ValueError("config arg members: the ensembles' members are a sweep of "
                     "table=1-ensembles (members alone: table=1-ensembles,members)")
  c = common.base_config(a)
  c.method = "msml"
  c.msml = dict(
      strategy=a.strategy,        # Table 2: global | local | local_fixed
      streams=a.streams,          # two (Fig. 1) | one ('R18': GAP head, CE) | one_bl ('R18-BL')
      stream2_loss=a.stream2,     # msml (F-MSML) | bce (the '+ BL' bilinear model)
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
    c.data.split_policy = "random"      # Sec. 3: random patient split 70/10/20, no official lists
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


def model_overrides(backbone: str, streams: str, stream2: str = "msml",
                    strategy: str = "global") -> dict:
  """The overrides of one of the paper's models."""
  return {"model.backbone": backbone, "msml.streams": streams, "msml.stream2_loss": stream2,
          "msml.strategy": strategy}


def table_rows(table: str) -> dict[str, dict]:
  """{row name as paper_tables.json prints it: overrides} of a paper table."""
  if table == "1":
    rows = {}
    for name, backbone in TABLE1_BACKBONES.items():
      rows[name] = model_overrides(backbone, "one")
      rows[f"{name}-BL"] = model_overrides(backbone, "one_bl")
      rows[f"{name} + {name}-BL"] = model_overrides(backbone, "two", "bce")
      rows[f"{name} + {name}-F-MSML"] = model_overrides(backbone, "two", "msml")
    return rows
  if table == "1-ensembles":
    return {name: model_overrides(*first) for name, (first, _) in ENSEMBLES.items()}
  return {"Local": model_overrides("resnet18", "two", strategy="local"),
          "Local-Fixed": model_overrides("resnet18", "two", strategy="local_fixed"),
          "Global": model_overrides("resnet18", "two", strategy="global")}


def get_sweep(arg=None):
  """Without ``table``: Table 2's three training strategies as config overrides.

  ``table=N``: that paper table's rows x ``seeds`` seeds (``common.table_sweep``).
  ``table=1-ensembles,members``: the ensembles' second members (one per backbone, x seeds),
  runs of no table row, that the docstring's cxr-eval command averages with the rows' runs.
  """
  a = common.sweep_arg(arg, TABLES, strategy="global", stream2="msml", streams="two",
                       members=False)
  get_config(arg)   # checks the arg
  if a.members:
    seconds = dict.fromkeys(second for _, second in ENSEMBLES.values())
    return [{"seed": s, **model_overrides(*member)} for s in range(a.seeds) for member in seconds]
  if a.table:
    return common.table_sweep("ge2018", a.table, table_rows(a.table),
                              common.seed_replicates(a.seeds))
  return [{"msml.strategy": s} for s in STRATEGIES]
