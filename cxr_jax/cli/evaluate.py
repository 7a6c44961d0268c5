"""cxr-eval: evaluate a trained method's checkpoint on a split.

  cxr-eval --config=configs/baseline.py --workdir=/tmp/b [--split=test]

Restores the checkpoint the trainer keeps in WORKDIR/checkpoints (through
``cxr_jax.train.trainer.restore_for_eval``), predicts the split, and writes
WORKDIR/eval/<split>.json and WORKDIR/report/{roc,pr}_<split>.png. F1
thresholds are chosen on 'val' (see ``evaluator.evaluate``). Use the same
--config (and --config.* overrides) as the training run.

Ensembles (Ge 2018, Table 1's 'R18 + D121' rows: the mean of several runs'
probabilities):

  cxr-eval --config=configs/msml.py:width=0.25 --workdir=/tmp/r18 \
      --ensemble_workdirs=/tmp/d121 \
      --ensemble_configs=configs/msml.py:width=0.25,backbone=densenet121

restores WORKDIR and every --ensemble_workdirs run, averages their
probabilities on the split (``evaluator.evaluate_ensemble``; F1 thresholds
chosen on the ensemble's 'val' predictions) and writes
WORKDIR/eval/<split>_ensemble.json (or --out); no curves, no localization.
--ensemble_configs is repeated, one per --ensemble_workdirs entry in order;
left out, every run uses --config. --config.* overrides apply to every run's
config (e.g. --config.data.manual_dir).
"""

from __future__ import annotations

import importlib.util
import os
import re

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
flags.DEFINE_list("ensemble_workdirs", [], "More training runs (comma-separated) whose "
                  "probabilities are averaged with WORKDIR's: evaluates the ensemble.")
flags.DEFINE_multi_string("ensemble_configs", [], "Config of each --ensemble_workdirs run, "
                          "repeated, in order (path.py[:arg]); default: --config for all.")
flags.DEFINE_string("out", "", "Ensemble JSON path (default WORKDIR/eval/<split>_ensemble.json).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from cxr_jax.evaluation import evaluator  # pylint: disable=g-import-not-at-top
  from cxr_jax.train import parallel  # pylint: disable=g-import-not-at-top
  from cxr_jax.train import trainer  # pylint: disable=g-import-not-at-top
  cli_flags.quiet_library_logs()
  parallel.maybe_initialize_distributed()
  if FLAGS.ensemble_workdirs:
    _evaluate_ensemble(evaluator, trainer)
    return
  if FLAGS.ensemble_configs or FLAGS.out:
    raise app.UsageError("--ensemble_configs and --out need --ensemble_workdirs")
  method, model, variables, mesh = trainer.restore_for_eval(FLAGS.config, FLAGS.workdir)
  stage = list(method.stages(FLAGS.config))[-1].name  # the trainer's final eval names it so
  payload = evaluator.evaluate(method, model, variables, FLAGS.config, FLAGS.split, FLAGS.workdir,
                               stage=stage, mesh=mesh, write_curves=FLAGS.curves)
  cls = payload["classification"]
  print(f"{payload['method']} on {FLAGS.split} ({payload['num_examples']} images): "
        f"mean AUROC {_fmt(cls['auroc']['mean'])}, AUPRC {_fmt(cls['auprc']['mean'])}, "
        f"F1 {_fmt(cls['f1']['mean'])}, W-AUC {_fmt(cls['w_auc'])}, D-AUC {_fmt(cls['d_auc'])}, "
        f"N-AUC {_fmt(cls['n_auc'])}; wrote {FLAGS.workdir}/eval/{FLAGS.split}.json")


def _evaluate_ensemble(evaluator, trainer):
  """Restores every run, averages their probabilities on --split, writes the ensemble JSON."""
  workdirs = [FLAGS.workdir] + FLAGS.ensemble_workdirs
  if FLAGS.ensemble_configs and len(FLAGS.ensemble_configs) != len(FLAGS.ensemble_workdirs):
    raise app.UsageError(f"{len(FLAGS.ensemble_configs)} --ensemble_configs for "
                         f"{len(FLAGS.ensemble_workdirs)} --ensemble_workdirs: give one per run "
                         "(in order), or none to use --config for all")
  overrides = config_flags.get_override_values(FLAGS["config"])
  configs = [FLAGS.config] + ([_load_config(spec, overrides) for spec in FLAGS.ensemble_configs]
                              or [FLAGS.config] * len(FLAGS.ensemble_workdirs))
  members, mesh = [], None
  for config, workdir in zip(configs, workdirs):
    method, model, variables, mesh = trainer.restore_for_eval(config, workdir)
    members.append((method, model, variables, config))
  path = FLAGS.out or os.path.join(FLAGS.workdir, "eval", f"{FLAGS.split}_ensemble.json")
  payload = evaluator.evaluate_ensemble(members, FLAGS.split, path, mesh=mesh, names=workdirs)
  cls = payload["classification"]
  print(f"ensemble of {len(members)} runs ({', '.join(m['method'] for m in payload['members'])}) "
        f"on {FLAGS.split} ({payload['num_examples']} images): mean AUROC "
        f"{_fmt(cls['auroc']['mean'])}, W-AUC {_fmt(cls['w_auc'])}, D-AUC {_fmt(cls['d_auc'])}, "
        f"N-AUC {_fmt(cls['n_auc'])}; wrote {path}")


def _load_config(spec: str, overrides: dict):
  """get_config(arg) of the config file 'path/to/config.py[:arg]', with ``overrides``
  ({'a.b': value}, the --config.* flags) applied."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise app.UsageError(f"--ensemble_configs: no such file {path!r}")
  cli_flags.add_config_root_to_path([f"--config={path}"])
  module_spec = importlib.util.spec_from_file_location(
      "cxr_eval_config_" + re.sub(r"\W", "_", os.path.basename(path)), path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  config.update_from_flattened_dict(overrides)
  return config


def _fmt(value) -> str:
  return "undefined" if value is None else f"{value:.4f}"


def run():
  cli_flags.run_config_app(main)


if __name__ == "__main__":
  run()
