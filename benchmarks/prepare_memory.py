"""Peak memory and throughput of `cxr-prepare` (issue 13: streaming, peak RSS <= 2 GB).

Runs each stage as a subprocess tree and measures, for the whole tree:
  * rusage: ``os.wait4`` maxrss of the stage's process and its waited-for
    descendants (the pool workers): the largest single process's peak RSS
    (what ``getrusage(RUSAGE_CHILDREN)`` reports, scoped to one stage; the
    run-wide RUSAGE_SELF / RUSAGE_CHILDREN maxrss are in the JSON too);
  * sampled: every --interval s, VmRSS and Pss (``/proc/<pid>/status``,
    ``smaps_rollup``) summed over the live tree: the simultaneous total, the
    figure the 2 GB budget is checked against (RSS sum double-counts shared
    pages; Pss does not).

Cases:
  nih        cxr-prepare --dataset=nih --only_present on the real sample (--nih_dir)
             at --nih_size px;
  phantoms   for each N in --phantoms: cxr-phantoms --export_dir (N phantoms at
             --size px, NIH layout), then cxr-prepare --dataset=nih on that folder
             (the real-data path) at --size px.

  python benchmarks/prepare_memory.py --cases=nih,phantoms --phantoms=500,2000 \
      --size=512 --workers=2 --work_dir=/tmp/prepare_memory --json=prepare_memory.json

Prints one markdown row per stage and, with several N, the peak ratio between
the largest and the smallest N (memory flat in N: ratio ~1). Outputs are
deleted after each case unless --keep (20,000 phantoms at 512 px take ~3 GB
as PNGs plus ~3 GB prepared).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from cxr_jax.bench import memory  # noqa: E402  pylint: disable=wrong-import-position

BUDGET_MB = 2048.0


def tree_memory_kb(root: int) -> tuple[int, int, int]:
  """(sum of VmRSS, sum of Pss, number of processes) over ``root`` and its descendants."""
  pids = memory.process_tree(root)
  rss = sum(memory.proc_field_kb(f"/proc/{p}/status", "VmRSS") for p in pids)
  pss = sum(memory.proc_field_kb(f"/proc/{p}/smaps_rollup", "Pss") for p in pids)
  return rss, pss, len(pids)


def measure(command: list[str], interval: float, log_path: str) -> dict:
  """Runs ``command`` to completion; its tree's peak memory (MB) and wall time (s).

  Raises CalledProcessError (with the log's tail) when it fails.
  """
  start = time.perf_counter()
  with open(log_path, "w") as log:
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    peak_rss = peak_pss = peak_procs = 0
    while True:
      pid, status, usage = os.wait4(process.pid, os.WNOHANG)
      if pid:
        break
      rss, pss, procs = tree_memory_kb(process.pid)
      peak_rss, peak_pss, peak_procs = max(peak_rss, rss), max(peak_pss, pss), max(peak_procs,
                                                                                 procs)
      time.sleep(interval)
  seconds = time.perf_counter() - start
  code = os.waitstatus_to_exitcode(status)
  process.returncode = code
  if code != 0:
    with open(log_path) as f:
      tail = f.read()[-3000:]
    raise subprocess.CalledProcessError(code, command, output=tail)
  return dict(seconds=seconds, rusage_max_mb=usage.ru_maxrss / 1024,
              tree_rss_mb=peak_rss / 1024, tree_pss_mb=peak_pss / 1024, processes=peak_procs)


def _prepared_count(data_dir: str) -> int:
  """Number of images in the one prepared dataset under data_dir (its cxr_index.json)."""
  for root, _, files in os.walk(data_dir):
    if "cxr_index.json" in files and "dataset_info.json" in files:
      with open(os.path.join(root, "cxr_index.json")) as f:
        index = json.load(f)
      return sum(len(s["image_id"]) for s in index["splits"].values())
  raise FileNotFoundError(f"no finished prepared dataset under {data_dir}")


def _python(module: str, *args: str, nice: int) -> list[str]:
  prefix = ["nice", "-n", str(nice)] if nice else []
  return prefix + [sys.executable, "-m", module, *args]


def _row(case: str, stage: str, images: int, size: int, workers: int, m: dict) -> dict:
  return dict(case=case, stage=stage, images=images, size=size, workers=workers, **m,
              images_per_s=images / m["seconds"],
              within_budget=max(m["tree_rss_mb"], m["rusage_max_mb"]) <= BUDGET_MB)


def run_nih(args, work: str) -> list[dict]:
  data_dir = os.path.join(work, "nih_prepared")
  shutil.rmtree(data_dir, ignore_errors=True)
  m = measure(_python("cxr_jax.cli.prepare", "--dataset=nih", f"--manual_dir={args.nih_dir}",
                      "--only_present", f"--data_dir={data_dir}",
                      f"--image_size={args.nih_size}", f"--workers={args.workers}",
                      "--no_progress", nice=args.nice),
              args.interval, os.path.join(work, "nih_prepare.log"))
  row = _row("nih sample", "cxr-prepare", _prepared_count(data_dir), args.nih_size,
             args.workers, m)
  if not args.keep:
    shutil.rmtree(data_dir)
  return [row]


def run_phantoms(args, work: str, num: int) -> list[dict]:
  export_dir = os.path.join(work, f"phantoms_{num}_{args.size}")
  data_dir = os.path.join(work, f"phantoms_{num}_{args.size}_prepared")
  for folder in (export_dir, data_dir):
    shutil.rmtree(folder, ignore_errors=True)
  case = f"{num} phantoms"
  export = measure(_python("cxr_jax.cli.phantoms", f"--export_dir={export_dir}", f"--num={num}",
                           f"--size={args.size}", f"--seed={args.seed}",
                           f"--workers={args.workers}", nice=args.nice),
                   args.interval, os.path.join(work, f"phantoms_{num}_export.log"))
  prepare = measure(_python("cxr_jax.cli.prepare", "--dataset=nih",
                            f"--manual_dir={export_dir}", f"--data_dir={data_dir}",
                            f"--image_size={args.size}", f"--workers={args.workers}",
                            "--no_progress", nice=args.nice),
                    args.interval, os.path.join(work, f"phantoms_{num}_prepare.log"))
  images = _prepared_count(data_dir)
  if images != num:
    raise RuntimeError(f"{data_dir}: prepared {images} images, exported {num}")
  rows = [_row(case, "cxr-phantoms --export_dir", num, args.size, args.workers, export),
          _row(case, "cxr-prepare", images, args.size, args.workers, prepare)]
  if not args.keep:
    shutil.rmtree(export_dir)
    shutil.rmtree(data_dir)
  return rows


HEADER = ("| case | stage | images | px | workers | wall s | images/s | tree RSS sum MB "
          "| tree PSS sum MB | max 1-process RSS MB | processes | <= 2 GB |")


def markdown(row: dict) -> str:
  return (f"| {row['case']} | {row['stage']} | {row['images']} | {row['size']} | "
          f"{row['workers']} | {row['seconds']:.1f} | {row['images_per_s']:.1f} | "
          f"{row['tree_rss_mb']:.0f} | {row['tree_pss_mb']:.0f} | {row['rusage_max_mb']:.0f} | "
          f"{row['processes']} | {'yes' if row['within_budget'] else 'NO'} |")


def flatness(rows: list[dict]) -> list[dict]:
  """Per stage, peak tree RSS at the largest N / at the smallest N (phantom cases)."""
  out = []
  for stage in sorted({r["stage"] for r in rows if r["case"].endswith("phantoms")}):
    by_n = sorted((r["images"], r) for r in rows
                  if r["case"].endswith("phantoms") and r["stage"] == stage)
    if len(by_n) > 1:
      (n0, small), (n1, large) = by_n[0], by_n[-1]
      out.append(dict(stage=stage, small_n=n0, large_n=n1,
                      tree_rss_ratio=large["tree_rss_mb"] / small["tree_rss_mb"],
                      tree_pss_ratio=large["tree_pss_mb"] / max(small["tree_pss_mb"], 1e-9),
                      rusage_ratio=large["rusage_max_mb"] / small["rusage_max_mb"]))
  return out


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", default="nih,phantoms", help="comma list of nih, phantoms")
  parser.add_argument("--nih_dir", default=os.path.join(os.path.dirname(REPO), "shared", "data",
                                                        "nih14_sample"))
  parser.add_argument("--nih_size", type=int, default=256)
  parser.add_argument("--phantoms", default="2000", help="comma list of phantom counts N")
  parser.add_argument("--size", type=int, default=512, help="phantom size, px")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--work_dir", default="/tmp/prepare_memory")
  parser.add_argument("--interval", type=float, default=0.2, help="memory sampling period, s")
  parser.add_argument("--nice", type=int, default=0, help="run the stages under nice -n")
  parser.add_argument("--keep", action="store_true", help="keep exported / prepared folders")
  parser.add_argument("--json", default="", help="write the results here too")
  args = parser.parse_args(argv)
  cases = [c.strip() for c in args.cases.split(",") if c.strip()]
  unknown = set(cases) - {"nih", "phantoms"}
  if unknown:
    parser.error(f"--cases: unknown {sorted(unknown)}; known: nih, phantoms")
  counts = [int(n) for n in args.phantoms.split(",") if n.strip()]
  os.makedirs(args.work_dir, exist_ok=True)

  print(HEADER)
  print("|" + "---|" * (HEADER.count("|") - 1))
  rows = []
  runs = [lambda: run_nih(args, args.work_dir)] if "nih" in cases else []
  if "phantoms" in cases:
    runs += [lambda n=n: run_phantoms(args, args.work_dir, n) for n in counts]
  for run in runs:
    for row in run():
      rows.append(row)
      print(markdown(row), flush=True)
  flat = flatness(rows)
  for f in flat:
    print(f"memory vs N ({f['stage']}): N={f['large_n']} / N={f['small_n']} peak tree RSS ratio "
          f"{f['tree_rss_ratio']:.3f}, PSS ratio {f['tree_pss_ratio']:.3f}, "
          f"max 1-process RSS ratio {f['rusage_ratio']:.3f}")
  rusage = dict(self_max_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                children_max_mb=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
  print(f"getrusage maxrss over the whole run: this process {rusage['self_max_mb']:.0f} MB, "
        f"largest child process {rusage['children_max_mb']:.0f} MB")
  result = dict(
      rows=rows, flatness=flat, budget_mb=BUDGET_MB, rusage=rusage,
      machine=dict(platform=platform.platform(), cpus=os.cpu_count(),
                   load_average=os.getloadavg(), python=platform.python_version()),
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      command=" ".join([os.path.relpath(__file__, REPO)] + (sys.argv[1:] if argv is None
                                                             else argv)))
  if args.json:
    with open(args.json + ".tmp", "w") as f:
      json.dump(result, f, indent=1)
    os.replace(args.json + ".tmp", args.json)
  print(json.dumps(dict(budget_ok=all(r["within_budget"] for r in rows), machine=result["machine"])))
  return result


if __name__ == "__main__":
  main()
