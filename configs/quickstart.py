"""Quickstart: the baseline classifier on the synthetic phantoms, on a CPU in minutes.

cxr-train --config=configs/quickstart.py --workdir=/tmp/quickstart
"""

from configs import common


def get_config(arg=None):
  c = common.base_config(arg)
  c.method = "baseline"
  c.loss = "weighted_bce"   # baseline loss: weighted_bce (counts: loss_weighting) | bce
  c.data.image_size = 64
  c.data.synthetic.num_train = 6000
  c.data.synthetic.num_val = 500
  c.data.synthetic.num_test = 1000
  c.model.backbone = "resnet18"
  c.model.width = 0.25
  c.batch_size = 64
  c.train_steps = 1000
  c.eval_every = 500
  c.log_every = 50
  c.checkpoint_every = 500
  c.optimizer.learning_rate = 2e-3
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 100
  c.lock()
  return c


def get_sweep(arg=None):
  """Two seeds: cxr-sweep --config=configs/quickstart.py --workdir_root=DIR, then
  cxr-table --workdirs DIR/* gives mean +- std over them."""
  del arg
  return [{"seed": 0}, {"seed": 1}]
