"""Rozenberg 2020 Table 1: cross-validated patch-grid IoU / IoR accuracy, one command.

  python benchmarks/patch_loc_cv.py --workdir_root=/tmp/pl_cv \
      --config_arg=width=0.125,size=64,grid=8 --folds=5 \
      --variants=li,rozenberg,rozenberg+crf --unannotated=0,0.2 \
      --override=train_steps=300 --override=patch_loc.feature_stage=conv4_x

Every (variant, unannotated fraction, fold) is one run of configs/patch_loc.py
(``--config_arg`` plus loss=<variant>[,crf=1], folds, fold, unannotated), in
WORKDIR_ROOT/<variant>-un<fraction>-fold<fold>/, trained in this process one
after the other (``trainer.train_and_evaluate``); a run whose eval/test.json
already holds the patch report is reused, so a stopped benchmark resumes.
A '+crf' run whose workdir has no checkpoint starts from the last checkpoint
of its finished base run in the same root (e.g. rozenberg-un0-fold0 for
rozenberg+crf-un0-fold0): the stages before 'crf' are the same (same config,
seeds and data order), so only the CRF stage trains and the two rows compare
the CRF against the very unary model it refines.
``--run_folds`` runs only some folds (e.g. 0,1 on a slow machine); the table
says how many folds each cell averages.

Writes WORKDIR_ROOT/table1.md (Table 1's layout: per boxed class and mean, IoU
then IoR accuracy at ``--threshold``, rows = unannotated fraction x variant;
values = mean over the folds run) and WORKDIR_ROOT/table1.json (every T, per
fold and averaged).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from configs import patch_loc as patch_loc_config  # noqa: E402
from cxr_jax.cli.sweep import apply_overrides, parse_override  # noqa: E402
from cxr_jax.data import schema  # noqa: E402

VARIANTS = {"li": "loss=li", "rozenberg": "loss=rozenberg", "li+crf": "loss=li,crf=1",
            "rozenberg+crf": "loss=rozenberg,crf=1", "rozenberg_sigmoid": "loss=rozenberg,form=sigmoid"}


def run_config(config_arg: str, variant: str, folds: int, fold: int, unannotated: float,
               overrides: list[tuple[str, object]]):
  """The locked config of one run."""
  arg = ",".join(filter(None, [config_arg, VARIANTS[variant], f"folds={folds}", f"fold={fold}",
                               f"unannotated={unannotated}"]))
  config = apply_overrides(patch_loc_config.get_config(arg), dict(overrides), "--override")
  config.lock()
  return config


def read_patch_report(workdir: str) -> dict | None:
  """The 'patch_grid' section of WORKDIR/eval/test.json as {'iou'|'ior': {T: {class: accuracy,
  'mean'}}, 'count': {class: units}}, or None if the run has not finished."""
  path = os.path.join(workdir, "eval", "test.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    section = json.load(f).get("patch_grid")
  if section is None:
    return None
  out = {"iou": {}, "ior": {}, "count": {}}
  for key, metric in section.items():
    kind, _, t = key.partition("@")
    if kind in ("iou", "ior") and t:
      out[kind][t] = {**metric["per_class"], "mean": metric["mean"]}
      out["count"].update(metric["n"])
  return out


def start_from_base_run(workdir: str, base_workdir: str) -> bool:
  """Copies the newest checkpoint of the finished run ``base_workdir`` into ``workdir``.

  Only when ``workdir`` has no checkpoint and the base run has its patch report.
  Returns whether a checkpoint was copied.
  """
  target = os.path.join(workdir, "checkpoints")
  source = os.path.join(base_workdir, "checkpoints")
  if os.path.isdir(target) or read_patch_report(base_workdir) is None or not os.path.isdir(source):
    return False
  steps = [int(name) for name in os.listdir(source) if name.isdigit()]
  if not steps:
    return False
  os.makedirs(target)
  tmp = os.path.join(target, f".copy.{os.getpid()}")
  shutil.copytree(os.path.join(source, str(max(steps))), tmp)
  os.replace(tmp, os.path.join(target, str(max(steps))))
  return True


def average_folds(reports: list[dict]) -> dict:
  """{'iou'|'ior': {T: {class: mean over the folds where it occurs, 'mean': mean over classes}}}."""
  out = {}
  for metric in ("iou", "ior"):
    out[metric] = {}
    for t in reports[0][metric]:
      classes = sorted({c for r in reports for c in r[metric].get(t, {}) if c != "mean"})
      row = {c: float(np.mean([r[metric][t][c] for r in reports if c in r[metric].get(t, {})]))
             for c in classes}
      if row:
        row["mean"] = float(np.mean(list(row.values())))
      out[metric][t] = row
  return out


def markdown(table: dict, threshold: str, classes: tuple[str, ...]) -> str:
  lines = []
  for metric in ("iou", "ior"):
    lines += [f"{metric.upper()} accuracy (T = {threshold}), mean over folds", "",
              "| un [%] | model | folds | " + " | ".join(classes) + " | mean |",
              "|" + "---|" * (len(classes) + 4)]
    for key, entry in table.items():
      row = entry["mean"][metric].get(threshold, {})
      cells = [f"{row[c]:.3f}" if c in row else "-" for c in classes + ("mean",)]
      lines.append(f"| {100 * entry['unannotated']:g} | {entry['variant']} | {entry['folds']} | "
                   + " | ".join(cells) + " |")
    lines.append("")
  return "\n".join(lines)


def write_atomic(path: str, text: str) -> None:
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir_root", required=True)
  parser.add_argument("--config_arg", default="", help="configs/patch_loc.py arg (common keys)")
  parser.add_argument("--variants", default="li,rozenberg", help=f"comma list of {list(VARIANTS)}")
  parser.add_argument("--folds", type=int, default=5)
  parser.add_argument("--run_folds", default="", help="comma list of folds to run (default all)")
  parser.add_argument("--unannotated", default="0,0.2", help="unannotated fractions")
  parser.add_argument("--override", action="append", default=[], help="KEY=VALUE config override")
  parser.add_argument("--threshold", default="0.1", help="T of the markdown table")
  args = parser.parse_args(argv)

  variants = [v for v in args.variants.split(",") if v]
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown:
    raise SystemExit(f"--variants: unknown {unknown}; known: {list(VARIANTS)}")
  if args.folds < 2:
    raise SystemExit(f"--folds={args.folds}: cross-validation needs at least 2 folds")
  folds = [int(f) for f in args.run_folds.split(",") if f] or list(range(args.folds))
  bad = [f for f in folds if not 0 <= f < args.folds]
  if bad:
    raise SystemExit(f"--run_folds: {bad} not in [0, {args.folds})")
  fractions = [float(u) for u in args.unannotated.split(",") if u]
  overrides = [parse_override(o) for o in args.override]

  from cxr_jax.methods import get_method  # pylint: disable=import-outside-toplevel
  from cxr_jax.train import trainer  # pylint: disable=import-outside-toplevel
  os.makedirs(args.workdir_root, exist_ok=True)
  table, classes = {}, ()
  for unannotated in fractions:
    for variant in variants:
      reports = {}
      for fold in folds:
        workdir = os.path.join(args.workdir_root, f"{variant}-un{unannotated:g}-fold{fold}")
        config = run_config(args.config_arg, variant, args.folds, fold, unannotated, overrides)
        classes = schema.get_label_space(config.data.label_space).boxed
        if read_patch_report(workdir) is None:
          base = os.path.join(args.workdir_root,
                              f"{variant.split('+')[0]}-un{unannotated:g}-fold{fold}")
          reused = variant.endswith("+crf") and start_from_base_run(workdir, base)
          print(f"== {workdir}" + (f" (CRF stage from {base})" if reused else ""), flush=True)
          trainer.train_and_evaluate(config, workdir, method=get_method(config.method))
        reports[fold] = read_patch_report(workdir)
        if reports[fold] is None:
          raise SystemExit(f"{workdir}/eval/test.json has no patch_grid section")
      table[f"{variant}-un{unannotated:g}"] = {
          "variant": variant, "unannotated": unannotated, "folds": len(reports),
          "mean": average_folds(list(reports.values())),
          "per_fold": {str(f): {m: r[m] for m in ("iou", "ior", "count")}
                       for f, r in reports.items()}}
  text = markdown(table, args.threshold, tuple(classes))
  write_atomic(os.path.join(args.workdir_root, "table1.json"), json.dumps(
      {"config_arg": args.config_arg, "overrides": args.override, "num_folds": args.folds,
       "folds_run": folds, "rows": table}, indent=2))
  write_atomic(os.path.join(args.workdir_root, "table1.md"), text)
  print(text)


if __name__ == "__main__":
  main()
