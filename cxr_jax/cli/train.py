r"""cxr-train: train and evaluate a method from a config file.

  cxr-train --config=configs/quickstart.py --workdir=/tmp/quickstart
  cxr-train --config=configs/baseline.py:dataset=nih,backbone=resnet50 \
            --workdir=/tmp/b --config.batch_size=128

Writes checkpoints, TensorBoard events, WORKDIR/eval/<split>.json and
WORKDIR/report/*.png. Re-running with the same workdir resumes.

Several processes (one per host or per GPU): give each
``--coordinator_address=HOST:PORT --num_processes=N --process_id=I`` (or set
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, or launch under
SLURM with several tasks); it initialises jax.distributed first. See launch/.

SIGTERM (preemption, ``scancel``, a sweep being stopped) makes it write a
checkpoint at the next step boundary and exit with status 143; running the
same command again resumes.

Preflight: ``--dry_run`` builds the config, the method and every stage's data without
training, prints the plan (per stage its split's images, patients, positives, boxes and
gaze per class, steps, epochs, batch and trained params; the evaluators' splits) and
checks it: a stage or evaluator that needs boxes or gaze its split lacks, an empty split,
a split without positives is one line naming them and exit status 2. Every run does the
same check before its first step (``cxr_jax.train.preflight``).

Config fields: ``--print_config`` lists every field of the resolved config with
its value and comment, then exits (``cxr-train --config=configs/vkd.py:runlocal
--print_config``); ``--config.FIELD=VALUE`` overrides one. The run's config is
kept as WORKDIR/config.json; re-running a workdir with a config that differs
from it is an error naming the fields (``--force`` goes on). An error in the
config, flags, paths or data is one line and exit status 2 (``--verbose``: with
its traceback).
"""

from __future__ import annotations

import glob
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from cxr_jax import run_config
from cxr_jax.cli import flags as cli_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/baseline.py[:dataset=nih,...].", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, eval JSON and plots.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0's coordinator, for a multi-process launch.")
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process launch.")
flags.DEFINE_integer("process_id", None, "This process's id in [0, num_processes).")
flags.DEFINE_bool("print_config", False, "Print every field of the resolved config with its "
                  "value and comment, then exit (no --workdir needed).")
flags.DEFINE_bool("dry_run", False, "Build the config, the method and every stage's data without "
                  "training, print the plan (splits, counts, steps, trained params, evals) and "
                  "check it (no --workdir needed); a plan with errors exits with status 2.")
flags.DEFINE_bool("force", False, "Go on when --config differs from WORKDIR/config.json, the "
                  "config the workdir was trained with (where the shapes allow).")
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.print_config:
    cli_flags.print_config(FLAGS.config, cli_flags.config_spec(),
                           config_flags.get_config_filename(FLAGS["config"]))
    return
  if FLAGS.dry_run:
    dry_run(FLAGS.config)
    return
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required (the run's folder)")
  run_config.check(FLAGS.workdir, FLAGS.config, force=FLAGS.force,
                   advice="resume with the workdir's config or start another --workdir")
  from cxr_jax.train import parallel  # pylint: disable=g-import-not-at-top
  from cxr_jax.methods import get_method  # pylint: disable=g-import-not-at-top
  from cxr_jax.train import trainer  # pylint: disable=g-import-not-at-top
  cli_flags.quiet_library_logs()
  parallel.maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                        FLAGS.process_id)
  parallel.install_preemption_handler()
  try:
    trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir,
                               method=get_method(FLAGS.config.method))
  except parallel.Preempted as e:
    logging.warning("%s", e)
    sys.exit(parallel.PREEMPTED_EXIT_CODE)
  if parallel.jax.process_index() == 0:
    logging.info("%s", outputs_line(FLAGS.workdir))


def dry_run(config) -> None:
  """--dry_run: prints the preflight plan of ``config`` (``cxr_jax.train.preflight``); a plan
  with errors then raises its one-line ``PreflightError``."""
  from cxr_jax.methods import get_method  # pylint: disable=g-import-not-at-top
  from cxr_jax.train import preflight  # pylint: disable=g-import-not-at-top
  cli_flags.quiet_library_logs()
  preflight.run(config, get_method(config.method), log=print)


def outputs_line(workdir: str) -> str:
  """The last line of a run: where its eval JSON, report and TensorBoard events are."""
  workdir = os.path.abspath(workdir)
  results = sorted(glob.glob(os.path.join(workdir, "eval", "*.json")))
  report = os.path.join(workdir, "report")
  return (f"done: results in {', '.join(results) or 'no eval JSON'}"
          + (f"; plots in {report}/" if os.path.isdir(report) else "")
          + f"; TensorBoard: tensorboard --logdir={workdir}")


def run():
  cli_flags.run_config_app(main)


if __name__ == "__main__":
  run()
