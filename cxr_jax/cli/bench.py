"""cxr-bench: throughput and memory figures, each in its own process, into a results table.

  cxr-bench --suite=cpu-small                  # minutes on a 2-core CPU
  cxr-bench --suite=gpu                        # one GPU: ResNet-50 / DenseNet-121 224 bf16 b256
  cxr-bench --suite=memory                     # issue 13's peak-memory budgets
  cxr-bench --suite=gpu --tiny                 # the GPU suite's code paths at tiny sizes (CPU)
  cxr-bench --suite=cpu-small --only='baseline/.*' --results=/tmp/r.md

Writes JSON_DIR/<suite>-<time>.json (every figure's numbers, memory peaks and the
machine) and appends a markdown table to --results (default benchmarks/RESULTS.md).
Figures needing PyTorch report 'skipped' without it. See ``cxr_jax.bench``.
"""

from __future__ import annotations

import os
import re
import sys

from absl import app
from absl import flags

from cxr_jax.bench import suites
from cxr_jax.cli import flags as cli_flags

FLAGS = flags.FLAGS
flags.DEFINE_enum("suite", "cpu-small", list(suites.SUITES), "Which figures to run.")
flags.DEFINE_string("results", None, "Markdown file the table is appended to "
                    "(default: benchmarks/RESULTS.md of this checkout).")
flags.DEFINE_string("json_dir", None, "Folder of the run's JSON (default: benchmarks/runs/).")
flags.DEFINE_string("only", "", "Run only the figures whose name matches this regex.")
flags.DEFINE_bool("tiny", False, "Shrink every figure to tiny sizes (suites.scale_down).")
flags.DEFINE_string("data_dir", "", "cxr-prepare output: adds input-pipeline figures on its "
                    "ArrayRecord shards (--dataset).")
flags.DEFINE_string("dataset", "nih", "Dataset name of --data_dir.")
flags.DEFINE_string("config_root", None, "Folder holding configs/ (default: this checkout).")
flags.DEFINE_float("timeout", 900, "Seconds before a figure's process is killed.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  root = FLAGS.config_root or suites.default_config_root()
  if not os.path.isdir(os.path.join(root, "configs")):
    raise app.UsageError(f"no configs/ folder in {root}: pass --config_root")
  specs = suites.SUITES[FLAGS.suite](FLAGS.data_dir)
  if FLAGS.data_dir:
    specs = [dict(s, arg=s["arg"].replace("dataset=nih", f"dataset={FLAGS.dataset}"))
             if "data.data_dir" in s.get("overrides", {}) else s for s in specs]
  if FLAGS.only:
    specs = [s for s in specs if re.search(FLAGS.only, s["name"])]
    if not specs:
      raise app.UsageError(f"--only={FLAGS.only!r} matches no figure of --suite={FLAGS.suite}")
  if FLAGS.tiny:
    specs = [suites.scale_down(s) for s in specs]
  run = suites.run_suite(
      specs, suite=FLAGS.suite, tiny=FLAGS.tiny, config_root=root, timeout=FLAGS.timeout,
      results=FLAGS.results or os.path.join(root, "benchmarks", "RESULTS.md"),
      json_dir=FLAGS.json_dir or os.path.join(root, "benchmarks", "runs"),
      command="cxr-bench " + " ".join(sys.argv[1:]))
  failed = [f["spec"]["name"] for f in run["figures"] if "error" in f]
  print(f"wrote {run['json']}; table appended to "
        f"{FLAGS.results or os.path.join(root, 'benchmarks', 'RESULTS.md')}")
  if failed:
    print(f"{len(failed)} figure(s) failed: {failed}", file=sys.stderr)
    sys.exit(1)


def run():
  cli_flags.run_app(main)


if __name__ == "__main__":
  run()
