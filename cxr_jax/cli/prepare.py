"""Prepares a real dataset once: resized images + annotations as TFDS ArrayRecord.

  cxr-prepare --dataset=nih --manual_dir=/data/nih --data_dir=/data/prepared \
      --image_size=512 --workers=8 [--skip_bad] [--only_present] [--mimic_dir=...]

Reads the official download in --manual_dir with the dataset's reader, writes
DATA_DIR/cxr_<dataset>/<config>/1.0.0 (``cxr_jax.data.shards``) with a
progress bar, in parallel over --workers processes. A killed build resumes
where it stopped when run again; the dataset only becomes visible once every
shard is written and verified. Train on it with
``--config.data.data_dir=DATA_DIR``. Prints the reading time and the writing throughput,
the rows left out per reason with the first images of each, how many images with boxes or
gaze are missing (or, with --skip_bad, unreadable) and their first names; prepare_report.json
lists every row left out and, uncapped, every such image ('annotated_missing').
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from cxr_jax.data import layout, prepared, shards
from cxr_jax.data.sources import records


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="cxr-prepare", description=__doc__.split("\n")[0])
  parser.add_argument("--dataset", required=True, choices=layout.DATASETS)
  parser.add_argument("--manual_dir", required=True, help="the official download folder")
  parser.add_argument("--data_dir", required=True, help="root folder of prepared datasets")
  parser.add_argument("--image_size", type=int, default=256, help="stored size (square), px")
  parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                      help="encoding processes (default: all CPU cores)")
  parser.add_argument("--uncertainty", default="zeros", choices=records.UNCERTAINTY_POLICIES)
  parser.add_argument("--all_views", action="store_true", help="keep lateral views too")
  parser.add_argument("--skip_bad", action="store_true",
                      help="skip bad rows / images and list them in prepare_report.json")
  parser.add_argument("--only_present", action="store_true",
                      help="nih: keep only the rows whose image file exists (partial downloads)")
  parser.add_argument("--mimic_dir", default="",
                      help="reflacx / egd: the MIMIC-CXR-JPG folder their images come from")
  parser.add_argument("--shard_size", type=int, default=shards.DEFAULT_SHARD_SIZE)
  parser.add_argument("--png_compression", type=int, choices=range(10),
                      default=shards.PNG_COMPRESSION,
                      help="zlib level of the stored PNGs; 0 (default) decodes fastest in the "
                      "training workers, and the shards' own zstd keeps them as small")
  parser.add_argument("--no_progress", action="store_true")
  args = parser.parse_args(argv)
  if args.shard_size < 1 or args.workers < 1:
    parser.error("--shard_size and --workers must be >= 1")
  if args.image_size < 16:
    parser.error(f"--image_size={args.image_size} must be >= 16")
  if args.only_present and args.dataset != "nih":
    parser.error("--only_present applies to --dataset=nih only")
  if args.dataset in ("reflacx", "egd") and not args.mimic_dir:
    parser.error(f"--dataset={args.dataset} needs --mimic_dir (its images are MIMIC-CXR-JPG's)")
  if args.mimic_dir and args.dataset not in ("reflacx", "egd"):
    parser.error("--mimic_dir applies to --dataset=reflacx / egd only")
  if not os.path.isdir(args.manual_dir):
    parser.error(f"--manual_dir={args.manual_dir} is not a folder")
  return args


def skipped_summary(recs: list[records.Record], stored_ids, names: int = 5) -> list[str]:
  """Console lines naming the records the build skipped (--skip_bad: image unreadable or gone
  by the time it was encoded), and those of them that carried boxes or gaze."""
  stored = set(stored_ids)
  lost = [r for r in recs if r.id not in stored]
  if not lost:
    return []
  annotated = [r for r in lost if records.annotations_of(r)]

  def listed(rs):
    more = f", ... (+{len(rs) - names})" if len(rs) > names else ""
    return ", ".join(r.id for r in rs[:names]) + more

  lines = [f"skipped {len(lost)} images while encoding (--skip_bad): {listed(lost)}"]
  if annotated:
    lines.append(f"{len(annotated)} of the skipped images had boxes or gaze: {listed(annotated)}")
  return lines


def main(argv: list[str]) -> str:
  args = parse_args(argv)
  kwargs = dict(only_present=True) if args.only_present else {}
  if args.mimic_dir:
    kwargs["mimic_dir"] = args.mimic_dir
  options = dict(uncertainty=args.uncertainty, frontal_only=not args.all_views)
  final = layout.dataset_dir(args.data_dir, args.dataset, args.image_size, **options)
  if os.path.isfile(os.path.join(final, "dataset_info.json")):
    print(f"already prepared: {final}")
    return final
  start = time.perf_counter()
  recs, problems, space = shards.read_records(args.dataset, args.manual_dir,
                                              skip_bad=args.skip_bad, **options, **kwargs)
  read_seconds = time.perf_counter() - start
  print(f"read {len(recs)} records in {read_seconds:.1f} s"
        + ("" if problems.count else "; no row left out"))
  for line in problems.summary():
    print(line)
  start = time.perf_counter()
  folder = shards.prepare_records(
      args.dataset, recs, problems, space, args.data_dir, args.image_size, **options,
      workers=args.workers, skip_bad=args.skip_bad, shard_size=args.shard_size,
      png_compression=args.png_compression, progress=not args.no_progress)
  seconds = time.perf_counter() - start
  source = prepared.PreparedSource(folder)
  for line in skipped_summary(recs, source.image_ids):
    print(line)
  counts = ", ".join(f"{s}: {(source.official_splits == s).sum()}" for s in source.splits)
  print(f"wrote {len(source)} images ({counts}) in {seconds:.1f} s = "
        f"{len(source) / seconds:.1f} images/s with {args.workers} workers\n-> {folder}\n"
        f"   report: {os.path.join(folder, layout.REPORT_FILE)} (every row left out; "
        f"'annotated_missing': every image lost with its boxes / gaze)\n"
        f"train with --config.data.data_dir={args.data_dir}")
  return folder


def run():
  try:
    main(sys.argv[1:])
  except (records.BadInput, FileNotFoundError, ValueError) as e:
    sys.exit(f"cxr-prepare: error: {e}")


if __name__ == "__main__":
  run()
