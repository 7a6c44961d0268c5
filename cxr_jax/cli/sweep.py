"""cxr-sweep: run every row of a config's sweep, each as its own cxr-train.

  cxr-sweep --config=configs/quickstart.py --workdir_root=/tmp/qs_sweep [--parallel=2]
  cxr-sweep --config=configs/quickstart.py --workdir_root=/tmp/qs_sweep --emit=slurm
  cxr-sweep --config=configs/quickstart.py --workdir_root=/tmp/qs_sweep --dry_run

A config file may define ``get_sweep(arg)`` next to ``get_config(arg)``: a list
of override dicts, one per run, ``{'optimizer.learning_rate': 1e-3, 'seed': 1}``
(keys are config paths; a leading 'config.' is allowed). Each run gets
WORKDIR_ROOT/<row name>/ with

  config.json   the resolved config (get_config(arg) + --override + the row),
  sweep.json    the config file, arg and the row's overrides (cxr-table's
                'setting' column),
  train.log     the run's output (local runs),

and is ``cxr-train --config=FILE[:arg] --workdir=... --config.KEY=VALUE ...``.
Rows whose WORKDIR/eval/test.json exists are finished and skipped; any other
row is (re)launched, so re-running a stopped sweep resumes its runs. SIGTERM
or Ctrl-C is passed on to the running cxr-train processes, which checkpoint.

``--emit=slurm`` writes WORKDIR_ROOT/sweep.sbatch, a SLURM array job with one
task per row (run it with ``sbatch``); ``--dry_run`` prints the commands (stdout) and
preflights each row (stderr; ``cxr_jax.train.preflight``: splits, counts, what its stages
and evaluators need; a row with errors makes it exit with status 2), writing and running
nothing;
``--print_config`` prints the config every row starts from (get_config(arg) +
--override, each field with its value and comment) and the rows, then exits.
A config file, --override or row that names no field is one line naming it and
exit status 2 (``--verbose``: with its traceback).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from absl import app
from absl import flags

from cxr_jax import errors, files, run_config
from cxr_jax.cli import flags as cli_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "Config file with get_sweep(arg): configs/x.py[:arg].")
flags.DEFINE_string("workdir_root", None, "Each row runs in WORKDIR_ROOT/<row name>.")
flags.DEFINE_integer("parallel", 1, "Runs at a time (local; with --emit=slurm, array tasks at "
                     "a time, unlimited unless given).")
flags.DEFINE_enum("emit", None, ["slurm"], "Write a SLURM array script instead of running.")
flags.DEFINE_multi_string("override", [], "KEY=VALUE applied to every row (before the row's own).")
flags.DEFINE_bool("dry_run", False, "Print the cxr-train commands and preflight every row "
                  "(its data, what its stages and evaluators need); write and run nothing.")
flags.DEFINE_string("slurm_options", "",
                    "Extra '#SBATCH' lines for --emit=slurm, ';'-separated, e.g. "
                    "'--partition=gpu;--gres=gpu:1;--time=04:00:00'.")
flags.DEFINE_bool("print_config", False, "Print the config the rows start from (every field with "
                  "its value and comment) and the rows' overrides, then exit.")
flags.mark_flags_as_required(["config"])

FINISHED_FILE = os.path.join("eval", "test.json")


def load_config_module(spec: str):
  """(module, path, arg) of 'path/to/config.py[:arg]'."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise errors.MissingPath(f"--config={spec}: no such file {path!r}")
  module_spec = importlib.util.spec_from_file_location(
      "cxr_sweep_config_" + re.sub(r"\W", "_", os.path.basename(path)), path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module, path, arg or None


def parse_override(text: str) -> tuple[str, Any]:
  """'a.b=1e-3' -> ('a.b', 0.001): the value as a Python literal, else the string."""
  key, sep, value = text.partition("=")
  if not sep or not key:
    raise errors.UserError(f"--override={text}: expected KEY=VALUE")
  try:
    return key.strip(), ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return key.strip(), value


def normalize_row(row: Mapping[str, Any], where: str) -> dict[str, Any]:
  """Keys without a leading 'config.'; a row must be a non-empty dict."""
  if not isinstance(row, Mapping) or not row:
    raise errors.UserError(f"{where}: a sweep row must be a non-empty dict of overrides, "
                           f"got {row!r}")
  return {k[len("config."):] if k.startswith("config.") else k: v for k, v in row.items()}


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any],
                    where: str) -> ml_collections.ConfigDict:
  """A copy of ``config`` with the dotted ``overrides`` set (existing keys only); fields that
  reference another (``get_ref``) keep following it."""
  config = ml_collections.ConfigDict(config.to_dict(preserve_field_references=True))
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
        raise errors.UnknownKey(f"{where}: config has no field {key!r}")
      node = node[part]
    if leaf not in node:
      raise errors.UnknownKey(f"{where}: config has no field {key!r}")
    if isinstance(node[leaf], tuple) and isinstance(value, list):
      value = tuple(value)
    try:
      node[leaf] = value
    except TypeError as e:
      raise errors.UserError(f"{where}: {key}={value!r}: {e}") from None
  return config


def row_name(index: int, row: Mapping[str, Any]) -> str:
  """'03-learning_rate=0.001,seed=1': index, then the overridden leaves (file-name safe)."""
  parts = ",".join(f"{k.split('.')[-1]}={v}" for k, v in row.items())
  return f"{index:02d}-" + re.sub(r"[^A-Za-z0-9._=,+-]", "_", parts)[:120]


def base_config(spec: str, common: Sequence[str] = ()):
  """(module, path, arg, config): get_config(arg) of the config file with the ``common``
  overrides ('KEY=VALUE', --override) applied, each checked on its own."""
  module, path, arg = load_config_module(spec)
  try:
    config = module.get_config(arg)
  except (KeyError, ValueError) as e:  # the config file's own check of its arg
    raise errors.UserError(f"--config={spec}: {e.args[0] if e.args else e}") from e
  for text in common:
    config = apply_overrides(config, dict([parse_override(text)]), f"--override={text}")
  return module, path, arg, config


def plan(spec: str, workdir_root: str, common: Sequence[str] = ()) -> list[dict]:
  """The runs of a sweep: [{'name', 'workdir', 'overrides', 'config', 'command'}]."""
  module, path, arg, _ = base_config(spec, common)
  if not hasattr(module, "get_sweep"):
    raise errors.UserError(f"{path} defines no get_sweep(arg): nothing to sweep")
  base = module.get_config(arg)
  common_overrides = dict(parse_override(o) for o in common)
  rows = module.get_sweep(arg)
  if not rows:
    raise errors.UserError(f"{path}: get_sweep({arg!r}) returned no rows")
  runs, names = [], set()
  for index, raw in enumerate(rows):
    where = f"{path}: get_sweep({arg!r}) row {index}"
    row = normalize_row(raw, where)
    overrides = {**common_overrides, **row}
    config = apply_overrides(base, overrides, where)
    name = row_name(index, row)
    if name in names:
      raise errors.UserError(f"{where}: duplicate row name {name!r}")
    names.add(name)
    workdir = os.path.join(os.path.abspath(workdir_root), name)
    command = [sys.executable, "-m", "cxr_jax.cli.train",
               f"--config={os.path.abspath(path)}" + (f":{arg}" if arg else ""),
               f"--workdir={workdir}"]
    command += [f"--config.{k}={v}" for k, v in overrides.items()]
    runs.append({"name": name, "workdir": workdir, "overrides": overrides, "row": row,
                 "config": config, "command": command, "config_file": os.path.abspath(path),
                 "arg": arg})
  return runs


def preflight_rows(runs: Sequence[dict]) -> dict[str, str]:
  """Preflights every row's config (``cxr_jax.train.preflight``: its splits, counts and
  needs, no training), printing one line per row and its warnings to stderr (stdout keeps
  the commands alone); returns {row name: its errors in one line} of the rows that fail."""
  from cxr_jax.methods import get_method  # pylint: disable=g-import-not-at-top
  from cxr_jax.train import preflight  # pylint: disable=g-import-not-at-top
  cli_flags.quiet_library_logs()
  failed = {}
  for run in runs:
    config = run["config"]
    plan = preflight.make_plan(config, get_method(config.method))
    if plan.errors:
      failed[run["name"]] = "; ".join(plan.errors)
      line = f"{len(plan.errors)} error(s): {failed[run['name']]}"
    else:
      line = f"ok ({len(plan.warnings)} warning(s))"
    print(f"[cxr-sweep] preflight {run['name']}: {line}", file=sys.stderr, flush=True)
    for warning in plan.warnings:
      print(f"  warning: {warning}", file=sys.stderr, flush=True)
  return failed


def prepare(run: dict) -> None:
  """WORKDIR/config.json (resolved config) and WORKDIR/sweep.json (its sweep row)."""
  os.makedirs(run["workdir"], exist_ok=True)
  run_config.write(run["workdir"], run["config"])  # what cxr-train writes and checks against
  files.write_text_atomic(os.path.join(run["workdir"], "sweep.json"), json.dumps(
      {"name": run["name"], "config_file": run["config_file"], "arg": run["arg"],
       "row": run["row"], "overrides": run["overrides"]}, indent=2, default=str) + "\n")


def slurm_script(runs: Sequence[dict], parallel: int | None, options: Sequence[str],
                 log_dir: str) -> str:
  """A SLURM array job: task i runs row i's cxr-train command (``parallel`` at a time, if given).

  SLURM sends SIGTERM 120 s before the time limit, so a run checkpoints; resubmit to resume.
  """
  throttle = f"%{parallel}" if parallel else ""
  header = ["#!/bin/bash", "#SBATCH --job-name=cxr-sweep",
            f"#SBATCH --array=0-{len(runs) - 1}{throttle}", "#SBATCH --signal=TERM@120",
            "#SBATCH --open-mode=append", f"#SBATCH --output={log_dir}/%A_%a.log"]
  header += [f"#SBATCH {o}" for o in options]
  commands = "\n".join(f"  {shlex.quote(shlex.join(r['command']))}" for r in runs)
  return "\n".join(header) + f"""
# Written by cxr-sweep: one array task per sweep row; sbatch this file.
set -euo pipefail
COMMANDS=(
{commands}
)
echo "sweep row ${{SLURM_ARRAY_TASK_ID}}: ${{COMMANDS[SLURM_ARRAY_TASK_ID]}}"
eval "exec ${{COMMANDS[SLURM_ARRAY_TASK_ID]}}"
"""


def run_local(runs: Sequence[dict], parallel: int) -> dict[str, int]:
  """Runs the rows' commands, ``parallel`` at a time -> {name: exit status}."""
  pending, running, status = list(runs), {}, {}
  stopping = []

  def forward(signum, frame):
    stopping.append(signum)
    for proc, _ in running.values():
      proc.send_signal(signal.SIGTERM)

  previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    while pending or running:
      while pending and len(running) < max(parallel, 1) and not stopping:
        run = pending.pop(0)
        log = open(os.path.join(run["workdir"], "train.log"), "a")
        print(f"[cxr-sweep] start {run['name']}: {shlex.join(run['command'])}", flush=True)
        running[run["name"]] = (subprocess.Popen(run["command"], stdout=log,
                                                 stderr=subprocess.STDOUT), log)
      if stopping and not running:
        break
      for name, (proc, log) in list(running.items()):
        if proc.poll() is not None:
          log.close()
          status[name] = proc.returncode
          del running[name]
          print(f"[cxr-sweep] {name}: exit {proc.returncode}", flush=True)
      time.sleep(0.2)
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
  for run in pending:
    status.setdefault(run["name"], None)
  return status


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.print_config:
    _print_config(FLAGS.config, FLAGS.override)
    return
  if not FLAGS.workdir_root:
    raise app.UsageError("--workdir_root is required (each row runs in WORKDIR_ROOT/<row name>)")
  runs = plan(FLAGS.config, FLAGS.workdir_root, FLAGS.override)
  if FLAGS.dry_run:
    for run in runs:
      print(shlex.join(run["command"]))
    failed = preflight_rows(runs)
    if failed:
      raise errors.UserError(f"preflight failed for {len(failed)} of {len(runs)} rows: "
                             + "; ".join(f"{name}: {error}" for name, error in failed.items()))
    return
  todo = [r for r in runs if not os.path.exists(os.path.join(r["workdir"], FINISHED_FILE))]
  for run in runs:
    prepare(run)
  if FLAGS.emit == "slurm":
    log_dir = os.path.join(os.path.abspath(FLAGS.workdir_root), "slurm_logs")
    os.makedirs(log_dir, exist_ok=True)
    path = os.path.join(os.path.abspath(FLAGS.workdir_root), "sweep.sbatch")
    options = [o.strip() for o in FLAGS.slurm_options.split(";") if o.strip()]
    parallel = FLAGS.parallel if FLAGS["parallel"].present else None
    files.write_text_atomic(path, slurm_script(runs, parallel, options, log_dir))
    print(f"[cxr-sweep] wrote {path} ({len(runs)} array tasks): sbatch {path}")
    return
  for run in runs:
    if run not in todo:
      print(f"[cxr-sweep] {run['name']}: finished earlier, skipped", flush=True)
  status = run_local(todo, FLAGS.parallel)
  failed = {n: s for n, s in status.items() if s != 0}
  print(f"[cxr-sweep] {len(runs) - len(failed)}/{len(runs)} runs finished in "
        f"{os.path.abspath(FLAGS.workdir_root)}", flush=True)
  if failed:
    print(f"[cxr-sweep] not finished (exit status; None = not started): {failed}; "
          "run the same command again to resume them", file=sys.stderr)
    sys.exit(1)


def _print_config(spec: str, common: Sequence[str]) -> None:
  """--print_config: the config every row starts from, then each row's overrides."""
  module, path, arg, config = base_config(spec, common)
  cli_flags.print_config(config, " ".join([spec] + [f"--override={o}" for o in common]), path)
  rows = module.get_sweep(arg) if hasattr(module, "get_sweep") else []
  for index, raw in enumerate(rows):
    row = normalize_row(raw, f"{path}: get_sweep({arg!r}) row {index}")
    print(f"# row {index}: " + " ".join(f"{k}={v!r}" for k, v in row.items()))


def run():
  cli_flags.run_config_app(main, xla_defaults=False)


if __name__ == "__main__":
  run()
