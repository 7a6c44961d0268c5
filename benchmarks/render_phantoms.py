"""Phantom rendering throughput: images/s on one core, single process.

  python benchmarks/render_phantoms.py [--sizes 64 128] [--num 500]

Renders ``--num`` consecutive examples (after a short warm-up) with
``SyntheticPhantoms.render`` (the path a Grain worker runs) and prints images
per second of this process's CPU time (= images/s/core; robust to other load
on the machine) and per wall-clock second; with ``--with-masks`` the
ground-truth masks are included.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

from cxr_jax.data.sources import synthetic


def images_per_second(size: int, num: int, with_masks: bool,
                      seed: int = 0) -> tuple[float, float]:
  """(images per CPU second, images per wall-clock second)."""
  source = synthetic.SyntheticPhantoms(image_size=size, seed=seed)
  for i in range(20):
    source.render(i, with_masks=with_masks)
  cpu, wall = time.process_time(), time.perf_counter()
  for i in range(num):
    source.render(20 + i, with_masks=with_masks)
  return num / (time.process_time() - cpu), num / (time.perf_counter() - wall)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
  parser.add_argument("--num", type=int, default=500)
  parser.add_argument("--with-masks", action="store_true")
  parser.add_argument("--repeats", type=int, default=3, help="report the best of N runs")
  args = parser.parse_args()
  # One core: keep numpy/OpenCV from spreading work over threads.
  import cv2  # pylint: disable=g-import-not-at-top
  cv2.setNumThreads(1)
  print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
        f"single process, single thread")
  print("size_px  images_per_cpu_s  images_per_wall_s")
  for size in args.sizes:
    runs = [images_per_second(size, args.num, args.with_masks) for _ in range(args.repeats)]
    print(f"{size:7d}  {max(r[0] for r in runs):16.1f}  {max(r[1] for r in runs):17.1f}")


if __name__ == "__main__":
  main()
