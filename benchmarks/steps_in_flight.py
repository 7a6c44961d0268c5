"""Training throughput with the bound on the steps in flight and without (issue 32).

    python benchmarks/steps_in_flight.py [--steps=250] [--rounds=2] [--bounds=2,0]

The quickstart run (configs/quickstart.py: baseline, ResNet-18 w0.25, 64 px phantoms,
batch 64) through ``trainer.train_and_evaluate``, no evaluation and no checkpoint but the
stage's last; each round trains once per ``config.max_steps_in_flight`` of ``--bounds``
(0: no bound), one after another in this process. A run's rate is the steps from its 11th
batch to its end over the time between the 11th batch leaving the data iterator and the
stage's last progress line (written after the last step's metrics were read, so after the
devices finished every step).
"""

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cxr_jax.cli import flags as cli_flags  # noqa: E402

cli_flags.set_cpu_xla_defaults()
cli_flags.set_tf_env_defaults()

import numpy as np  # noqa: E402

from configs import quickstart  # noqa: E402
from cxr_jax.data import pipeline  # noqa: E402
from cxr_jax.methods import get_method  # noqa: E402
from cxr_jax.train import progress, trainer  # noqa: E402

FIRST = 10  # batches before the timed window (compilation, warm-up)


def timed_run(steps: int, bound: int) -> float:
  """Steps per second of one quickstart run of ``steps`` steps with ``bound`` steps in flight."""
  config = quickstart.get_config()
  with config.unlocked():
    config.train_steps, config.eval_every, config.checkpoint_every = steps, 0, 10 * steps
    config.max_steps_in_flight, config.evals.classification.when = bound, "never"
  marks = {}

  def make_iterator(*args, **kwargs):
    iterator = pipeline.make_iterator(*args, **kwargs)

    class Marking:
      count = 0

      def __iter__(self):
        return self

      def __next__(self):
        batch = next(iterator)
        Marking.count += 1
        if Marking.count == FIRST + 1:
          marks["start"] = time.perf_counter()
        return batch

      def __getattr__(self, name):
        return getattr(iterator, name)

    return Marking()

  report = progress.ProgressReport.maybe_report

  def maybe_report(self, *, force=False):
    if force:
      marks["end"] = time.perf_counter()
    return report(self, force=force)

  progress.ProgressReport.maybe_report = maybe_report
  try:
    with tempfile.TemporaryDirectory() as workdir:
      trainer.train_and_evaluate(config, workdir, method=get_method(config.method),
                                 make_iterator=make_iterator)
  finally:
    progress.ProgressReport.maybe_report = report
  return (steps - FIRST) / (marks["end"] - marks["start"])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=250)
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--bounds", default="2,0")
  args = parser.parse_args()
  bounds = [int(b) for b in args.bounds.split(",")]
  rates = {b: [] for b in bounds}
  for r in range(args.rounds):
    for b in (bounds if r % 2 == 0 else bounds[::-1]):
      rates[b].append(timed_run(args.steps, b))
      print(f"round {r} max_steps_in_flight={b}: {rates[b][-1]:.3f} steps/s", flush=True)
  for b in bounds:
    print(f"max_steps_in_flight={b}: median {np.median(rates[b]):.3f} steps/s over "
          f"{[round(x, 3) for x in rates[b]]}")


if __name__ == "__main__":
  main()
