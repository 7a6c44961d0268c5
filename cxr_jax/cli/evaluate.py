r"""cxr-eval: evaluate a trained method's checkpoint on a split.

  cxr-eval --config=configs/baseline.py --workdir=/tmp/b [--split=test]

Restores the checkpoint the trainer keeps in WORKDIR/checkpoints (through
``cxr_jax.train.trainer.restore_for_eval``) and runs every evaluator of
``config.evals`` that reports on the split (``cxr_jax.evaluation.evaluators``):
WORKDIR/eval/<split>.json (each evaluator's section) and WORKDIR/report/ (ROC / PR
curves, CAM overlays, the papers' figures). F1 thresholds are chosen on 'val' (see
``evaluator.evaluate``). The config is the training run's, WORKDIR/config.json
(written by cxr-train); a --config (with --config.* overrides) that differs from
it is an error naming the differing fields, unless --force. ``--print_config``
lists every field of that config with its value and comment, then exits.
An error in the config, flags or paths is one line and exit status 2
(``--verbose``: with its traceback).

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

from cxr_jax import errors, run_config
from cxr_jax.cli import flags as cli_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file of the training run, e.g. configs/baseline.py[:dataset=nih,...] "
    "(default: WORKDIR/config.json).", lock_config=True)
flags.DEFINE_string("workdir", None, "The training run's directory (holds checkpoints/).")
flags.DEFINE_bool("print_config", False, "Print every field of the config with its value and "
                  "comment, then exit.")
flags.DEFINE_bool("force", False, "Go on when --config differs from WORKDIR/config.json "
                  "(where the shapes allow).")
flags.DEFINE_string("split", "test", "Split to evaluate: 'val', 'test', ...")
flags.DEFINE_bool("curves", True, "Also write ROC / PR curves under WORKDIR/report/.")
flags.DEFINE_list("ensemble_workdirs", [], "More training runs (comma-separated) whose "
                  "probabilities are averaged with WORKDIR's: evaluates the ensemble.")
flags.DEFINE_multi_string("ensemble_configs", [], "Config of each --ensemble_workdirs run, "
                          "repeated, in order (path.py[:arg]); default: --config for all.")
flags.DEFINE_string("out", "", "Ensemble JSON path (default WORKDIR/eval/<split>_ensemble.json).")
flags.mark_flags_as_required(["workdir"])


def run_config_of(workdir: str, flag_config=None, *, force: bool = False):
  """The config to evaluate ``workdir`` with: ``flag_config`` (checked against
  WORKDIR/config.json, if there is one) or WORKDIR/config.json. Nothing is created: a
  workdir without checkpoints is ``restore_for_eval``'s error."""
  if flag_config is None:
    if not os.path.isdir(workdir):
      raise errors.MissingPath(f"--workdir={workdir}: no such folder")
    return run_config.load(workdir)
  run_config.check(workdir, flag_config, force=force,
                   advice="leave out --config to evaluate with the run's own config")
  return flag_config


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = run_config_of(FLAGS.workdir, FLAGS.config, force=FLAGS.force)
  if FLAGS.print_config:
    spec = cli_flags.config_spec() if FLAGS.config is not None else run_config.config_path(
        FLAGS.workdir)
    cli_flags.print_config(config, spec, config_flags.get_config_filename(FLAGS["config"])
                           if FLAGS.config is not None else None)
    return
  from cxr_jax.evaluation import evaluator  # pylint: disable=g-import-not-at-top
  from cxr_jax.train import parallel  # pylint: disable=g-import-not-at-top
  from cxr_jax.train import trainer  # pylint: disable=g-import-not-at-top
  cli_flags.quiet_library_logs()
  parallel.maybe_initialize_distributed()
  if FLAGS.ensemble_workdirs:
    _evaluate_ensemble(evaluator, trainer, config)
    return
  if FLAGS.ensemble_configs or FLAGS.out:
    raise app.UsageError("--ensemble_configs and --out need --ensemble_workdirs")
  results = _run_declared(config, FLAGS.workdir, FLAGS.split, trainer)
  for name, sections in results.items():
    payload = sections.get(FLAGS.split, {})
    if "classification" not in payload:
      print(f"{name} on {FLAGS.split}: wrote section {name!r} of "
            f"{FLAGS.workdir}/eval/{FLAGS.split}.json")
      continue
    cls = payload["classification"]
    print(f"{payload['method']} on {FLAGS.split} ({payload['num_examples']} images): "
          f"mean AUROC {_fmt(cls['auroc']['mean'])}, AUPRC {_fmt(cls['auprc']['mean'])}, "
          f"F1 {_fmt(cls['f1']['mean'])}, W-AUC {_fmt(cls['w_auc'])}, D-AUC {_fmt(cls['d_auc'])}, "
          f"N-AUC {_fmt(cls['n_auc'])}; wrote {FLAGS.workdir}/eval/{FLAGS.split}.json")


def _run_declared(config, workdir: str, split: str, trainer) -> dict:
  """Runs every ``config.evals`` evaluator that reports on ``split`` on the workdir's final
  checkpoint (stage evaluators read their stage's best checkpoint)."""
  from cxr_jax.evaluation import evaluator, evaluators  # pylint: disable=g-import-not-at-top
  from cxr_jax.methods import get_method  # pylint: disable=g-import-not-at-top
  from cxr_jax.train.checkpoint import RunCheckpoints  # pylint: disable=g-import-not-at-top
  method = get_method(config.method)
  model, variables, mesh = trainer.restore_for_eval(config, workdir, method)
  stages = {s.name: s for s in method.stages(config)}
  opened = []

  def stage_variables(name: str) -> dict:
    if not opened:
      opened.append(RunCheckpoints(os.path.abspath(workdir), config.keep_checkpoints))
    return opened[0].best_variables(name, stages[name].monitor().mode)

  try:
    ctx = evaluators.EvalContext(
        config=config, workdir=workdir, method=method, model=model, mesh=mesh,
        make_iterator=evaluators.default_make_iterator, evaluate=evaluator.evaluate,
        stage_variables=stage_variables)
    declared = [d for d in evaluators.build_evals(ctx, list(stages))
                if split in d.evaluator.splits]
    for d in declared:
      d.evaluator.splits = (split,)
      if isinstance(d.evaluator, evaluator.ClassificationEval):
        d.evaluator.write_curves = FLAGS.curves
    if not declared:
      raise app.UsageError(f"no evaluator of config.evals reports on split {split!r}")
    return evaluators.run_evals(ctx, declared, variables, stage=list(stages)[-1])
  finally:
    for checkpoints in opened:
      checkpoints.close()


def _evaluate_ensemble(evaluator, trainer, config):
  """Restores every run, averages their probabilities on --split, writes the ensemble JSON
  (``config``: WORKDIR's)."""
  from cxr_jax.methods import get_method  # pylint: disable=g-import-not-at-top
  others = cli_flags.rejoin_paths(list(FLAGS.ensemble_workdirs))
  workdirs = [FLAGS.workdir] + others
  if FLAGS.ensemble_configs and len(FLAGS.ensemble_configs) != len(others):
    raise app.UsageError(f"{len(FLAGS.ensemble_configs)} --ensemble_configs for "
                         f"{len(others)} --ensemble_workdirs: give one per run "
                         "(in order), or none to use --config for all")
  overrides = (config_flags.get_override_values(FLAGS["config"]) if FLAGS.config is not None
               else {})
  if FLAGS.ensemble_configs:
    given = [_load_config(spec, overrides) for spec in FLAGS.ensemble_configs]
  else:  # --config for every run, else each run's own WORKDIR/config.json
    given = [FLAGS.config] * len(others)
  configs = [config] + [run_config_of(w, c, force=FLAGS.force) for w, c in zip(others, given)]
  members, mesh = [], None
  for config, workdir in zip(configs, workdirs):
    method = get_method(config.method)
    model, variables, mesh = trainer.restore_for_eval(config, workdir, method)
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
