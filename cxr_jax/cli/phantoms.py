"""Renders a grid of synthetic phantoms with their boxes and gaze to a PNG.

  cxr-phantoms --out=docs/phantoms.png --size=128 --num=16 --columns=4 --seed=0

Boxes are drawn in a colour per class with the class name; gaze fixations are
circles centred on (x, y) with a radius proportional to their duration.

With --export_dir, writes --num phantoms as an NIH ChestX-ray14 download
instead (``cxr_jax.data.sources.phantom_export``), in parallel over --workers
processes, ready for ``cxr-prepare --dataset=nih --manual_dir=DIR``:

  cxr-phantoms --export_dir=/data/phantoms_nih --num=20000 --size=512 --workers=8
"""

from __future__ import annotations

import argparse
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from cxr_jax import files  # pylint: disable=g-import-not-at-top
from cxr_jax.data import schema  # pylint: disable=g-import-not-at-top
from cxr_jax.data.sources import phantom_export  # pylint: disable=g-import-not-at-top
from cxr_jax.data.sources import synthetic  # pylint: disable=g-import-not-at-top

# Fixation circle radius, as a fraction of the image size per second of dwell.
GAZE_RADIUS_PER_SECOND = 0.03


def plot_grid(examples: list[dict], columns: int, class_names=schema.NIH14.classes,
              tile_inches: float = 2.6) -> plt.Figure:
  """A figure with one panel per Example: image, boxes with class names, gaze."""
  rows = -(-len(examples) // columns)
  fig, axes = plt.subplots(rows, columns, figsize=(columns * tile_inches, rows * tile_inches),
                           squeeze=False)
  colours = plt.get_cmap("tab20")(np.linspace(0, 1, len(class_names), endpoint=False))
  for ax in axes.flat:
    ax.axis("off")
  for ax, ex in zip(axes.flat, examples):
    h, w = ex["image"].shape
    ax.imshow(ex["image"], cmap="gray", vmin=0, vmax=255, extent=(0, 1, 1, 0))
    for fx, fy, seconds in ex["gaze"][ex["gaze"][:, 2] > 0]:
      ax.add_patch(plt.Circle((fx, fy), GAZE_RADIUS_PER_SECOND * seconds, fill=False,
                              color="#ffdd00", lw=0.6, alpha=0.7))
    for (x0, y0, x1, y1), c in zip(ex["boxes"], ex["box_labels"]):
      if c < 0:
        continue
      ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False,
                                 color=colours[c], lw=1.2))
      ax.text(x0, y0, class_names[c], color=colours[c], fontsize=6, va="bottom",
              clip_on=True)
    findings = [class_names[c] for c in np.flatnonzero(ex["labels"])] or ["No Finding"]
    ax.set_title(f"{ex['image_id']} ({h}x{w})\n" + ", ".join(findings), fontsize=6)
    ax.set_xlim(0, 1)
    ax.set_ylim(1, 0)
  fig.tight_layout()
  return fig


def save_figure_atomically(fig: plt.Figure, path: str, dpi: int = 100) -> None:
  with files.atomic_open(path, "wb") as f:
    fig.savefig(f, format="png", dpi=dpi)


def run(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="phantoms.png", help="output PNG path")
  parser.add_argument("--size", type=int, default=128, help="image size in pixels")
  parser.add_argument("--num", type=int, default=16, help="number of phantoms")
  parser.add_argument("--seed", type=int, default=0, help="phantom set seed")
  parser.add_argument("--offset", type=int, default=0, help="index of the first phantom")
  parser.add_argument("--columns", type=int, default=4, help="panels per row")
  parser.add_argument("--dpi", type=int, default=100)
  parser.add_argument("--export_dir", default="",
                      help="write the phantoms as an NIH download here instead of a grid")
  parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                      help="--export_dir: rendering processes")
  parser.add_argument("--test_fraction", type=float,
                      default=phantom_export.DEFAULT_TEST_FRACTION,
                      help="--export_dir: fraction of patients in test_list.txt")
  args = parser.parse_args(argv)
  if args.num < 1 or args.columns < 1 or args.workers < 1:
    parser.error(f"--num={args.num}, --columns={args.columns} and --workers={args.workers} "
                 f"must be >= 1")
  if args.export_dir:
    if args.offset:
      parser.error("--offset does not apply to --export_dir (phantoms 0 .. num-1 are written)")
    try:
      summary = phantom_export.export(args.export_dir, args.num, args.size, seed=args.seed,
                                      workers=args.workers, test_fraction=args.test_fraction)
    except ValueError as e:
      parser.error(str(e))
    print(f"wrote {summary['images']} phantoms at {args.size} px ({summary['boxes']} boxes; "
          f"train_val {summary['train_val']}, test {summary['test']}) in "
          f"{summary['seconds']:.1f} s = {summary['images'] / summary['seconds']:.1f} images/s "
          f"with {args.workers} workers\n-> {args.export_dir}\n"
          f"prepare with: cxr-prepare --dataset=nih --manual_dir={args.export_dir} "
          f"--data_dir=DATA_DIR --image_size={args.size}")
    return
  source = synthetic.SyntheticPhantoms(num_examples=args.num, image_size=args.size,
                                       seed=args.seed, offset=args.offset)
  fig = plot_grid([source[i] for i in range(len(source))], args.columns)
  save_figure_atomically(fig, args.out, dpi=args.dpi)
  plt.close(fig)
  print(f"wrote {args.out}: {args.num} phantoms at {args.size} px")


if __name__ == "__main__":
  run()
