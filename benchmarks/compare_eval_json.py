"""Compares the numbers of two sets of finished runs, run by run (a refactoring check).

  python benchmarks/compare_eval_json.py BEFORE_ROOT AFTER_ROOT

Each root holds one workdir per run (same names in both). Every number of every
WORKDIR/eval/*.json (and the old WORKDIR/alignment/*.json) is flattened to a path and
compared; the sections the evaluator registry renamed are mapped first (the old
eval/vkd_cam.json -> test.json 'cam_shift', eval/byol_cam.json -> 'cam_kinds',
alignment/pose.json -> val.json 'alignment', localization.patch -> 'patch_grid', the old
accuracy tables <section>/iou/T/<class> -> <section>/iou@T/per_class/<class>). Prints per
run the count compared, the paths only one side has and the largest absolute difference.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys


def flat(node, prefix: str = "") -> dict[str, float]:
  out = {}
  if isinstance(node, dict):
    for k, v in node.items():
      out.update(flat(v, f"{prefix}/{k}" if prefix else k))
  elif isinstance(node, list):
    for i, v in enumerate(node):
      out.update(flat(v, f"{prefix}[{i}]"))
  elif isinstance(node, (int, float)) and not isinstance(node, bool):
    out[prefix] = float(node)
  return out


def load(run: str) -> dict[str, float]:
  out = {}
  for path in glob.glob(f"{run}/eval/*.json"):
    name = os.path.basename(path)[:-5]
    with open(path) as f:
      out.update({f"{name}:{k}": v for k, v in flat(json.load(f)).items()})
  for path in glob.glob(f"{run}/alignment/*.json"):
    with open(path) as f:
      out.update({f"align:{k}": v for k, v in flat(json.load(f)).items()})
  return out


def renamed(key: str) -> str:
  """An old path in today's layout."""
  key = key.replace("localization/patch/", "patch_grid/")
  m = re.match(r"^(.*?:(?:localization|patch_grid))/(iou|ior)/([0-9.]+)/(.+)$", key)
  if m:
    head, kind, t, leaf = m.groups()
    return f"{head}/{kind}@{t}/" + ("mean" if leaf == "mean" else f"per_class/{leaf}")
  m = re.match(r"^(.*?:(?:localization|patch_grid))/count/(.+)$", key)
  if m:
    return f"{m.group(1)}/iou@0.1/n/{m.group(2)}"
  m = re.match(r"^(.*?:localization)/mean_iou/(.+)$", key)
  if m and m.group(2) != "mean" and not m.group(2).startswith(("per_class", "n/")):
    return f"{m.group(1)}/mean_iou/per_class/{m.group(2)}"
  if key.startswith("vkd_cam:"):
    rest = re.sub(r"^delta_(mse|dice)_ci95\[(\d)\]$", r"delta_\1/ci95[\2]", key[8:])
    return "test:cam_shift/" + re.sub(r"^delta_(mse|dice)$", r"delta_\1/mean", rest)
  if key.startswith("byol_cam:"):
    return "test:cam_kinds/" + key[9:]
  if key.startswith("align:"):
    return "val:alignment/" + key[6:]
  return key


def main(before_root: str, after_root: str) -> float:
  worst = 0.0
  for run in sorted(os.listdir(before_root)):
    if not os.path.isdir(os.path.join(before_root, run)):
      continue
    before = {renamed(k): v for k, v in load(os.path.join(before_root, run)).items()}
    after = {renamed(k): v for k, v in load(os.path.join(after_root, run)).items()}
    common = set(before) & set(after)
    largest = max((abs(before[k] - after[k]) for k in common), default=0.0)
    worst = max(worst, largest)
    print(f"{run}: {len(common)} numbers compared, only before {len(set(before) - set(after))}, "
          f"only after {len(set(after) - set(before))}, max |diff| {largest:.3g}")
    for k in sorted(set(before) - set(after))[:5]:
      print("   only before:", k)
  print(f"largest difference over all runs: {worst:.3g}")
  return worst


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
