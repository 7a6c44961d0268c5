"""cxr-train: train and evaluate a method from a config file.

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
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from cxr_jax.cli import flags as cli_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/baseline.py[:dataset=nih,...].", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, eval JSON and plots.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0's coordinator, for a multi-process launch.")
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process launch.")
flags.DEFINE_integer("process_id", None, "This process's id in [0, num_processes).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from cxr_jax.train import parallel  # pylint: disable=g-import-not-at-top
  from cxr_jax.train import trainer  # pylint: disable=g-import-not-at-top
  cli_flags.quiet_library_logs()
  parallel.maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                        FLAGS.process_id)
  parallel.install_preemption_handler()
  logging.info("config:\n%s", FLAGS.config)
  try:
    trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except parallel.Preempted as e:
    logging.warning("%s", e)
    sys.exit(parallel.PREEMPTED_EXIT_CODE)


def run():
  cli_flags.run_config_app(main)


if __name__ == "__main__":
  run()
