"""cxr-eval: evaluate a trained method's checkpoint on a split.

  cxr-eval --config=configs/baseline.py --workdir=/tmp/b [--split=test]

Restores the checkpoint the trainer keeps in WORKDIR/checkpoints (through
``cxr_jax.train.trainer.restore_for_eval``), predicts the split, and writes
WORKDIR/eval/<split>.json and WORKDIR/report/{roc,pr}_<split>.png. F1
thresholds are chosen on 'val' (see ``evaluator.evaluate``). Use the same
--config (and --config.* overrides) as the training run.
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from cxr_jax.cli import flags as cli_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file of the training run, e.g. configs/baseline.py[:dataset=nih,...].",
    lock_config=True)
flags.DEFINE_string("workdir", None, "The training run's directory (holds checkpoints/).")
flags.DEFINE_string("split", "test", "Split to evaluate: 'val', 'test', ...")
flags.DEFINE_bool("curves", True, "Also write ROC / PR curves under WORKDIR/report/.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from cxr_jax.evaluation import evaluator  # pylint: disable=g-import-not-at-top
  from cxr_jax.train import parallel  # pylint: disable=g-import-not-at-top
  from cxr_jax.train import trainer  # pylint: disable=g-import-not-at-top
  cli_flags.quiet_library_logs()
  parallel.maybe_initialize_distributed()
  method, model, variables, mesh = trainer.restore_for_eval(FLAGS.config, FLAGS.workdir)
  stage = list(method.stages(FLAGS.config))[-1].name  # the trainer's final eval names it so
  payload = evaluator.evaluate(method, model, variables, FLAGS.config, FLAGS.split, FLAGS.workdir,
                               stage=stage, mesh=mesh, write_curves=FLAGS.curves)
  cls = payload["classification"]
  print(f"{payload['method']} on {FLAGS.split} ({payload['num_examples']} images): "
        f"mean AUROC {_fmt(cls['auroc']['mean'])}, AUPRC {_fmt(cls['auprc']['mean'])}, "
        f"F1 {_fmt(cls['f1']['mean'])}, W-AUC {_fmt(cls['w_auc'])}, D-AUC {_fmt(cls['d_auc'])}, "
        f"N-AUC {_fmt(cls['n_auc'])}; wrote {FLAGS.workdir}/eval/{FLAGS.split}.json")


def _fmt(value) -> str:
  return "undefined" if value is None else f"{value:.4f}"


def run():
  cli_flags.add_config_root_to_path(sys.argv)
  app.run(main)


if __name__ == "__main__":
  run()
