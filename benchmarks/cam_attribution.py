"""Where a trained model's Grad-CAM falls on the phantoms: in the class's boxes, on support devices, or nowhere.

    python benchmarks/cam_attribution.py --config=vkd:width=0.25,size=128 --workdir=W [--stage=base]
        [--num_images=512] [--override=KEY=VALUE ...]

The phantoms know where support devices lie (``device_mask``; devices are ~7x more frequent
on films with an ICU finding, a shortcut a classifier can take). For every (test image,
positive class c) the Grad-CAM of class c (the method's ``cam_target``, upsampled to the
image) is scored against c's mask, the union of c's boxes:

  mass on c     sum of the map over c's mask / its sum over the image;
  mass on dev.  the same over the device mask (images with devices only);
  pointing      whether the map's maximum lies inside c's mask (Zhang 2018's pointing game),
and each is set against a map that knows nothing: the mask's share of the image (area). A
ratio mass / area near 1 is a map that does not localize. Maps: ReLU'd Grad-CAM, the signed
map shifted to min 0, and a ceiling row that scores the mask itself area-averaged onto the
feature grid (the best a map of that grid can do).

--stage reads WORKDIR/best/<stage> (VKD: 'base' = stage 1); without it the run's final state.
--head_from=NAME scores the params subtree NAME as the class head, in place of 'head' (byol_cam:
'probe', the pretraining probe the CAM loss trains; on a checkpoint from the end of pretraining).
"""

import argparse
import os
import sys

import cv2
import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cxr_jax import cam  # noqa: E402
from cxr_jax.bench import configs as bench_configs  # noqa: E402
from cxr_jax.cli.sweep import parse_override  # noqa: E402
from cxr_jax.data import annotations, pipeline, schema  # noqa: E402
from cxr_jax.methods import get_method  # noqa: E402
from cxr_jax.train import trainer  # noqa: E402
from cxr_jax.train.checkpoint import RunCheckpoints  # noqa: E402


def render_test_images(config, num_images: int) -> dict:
  """The first ``num_images`` test phantoms with a positive label, with their masks."""
  split = pipeline.make_source(config.data, "test")
  rows = []
  for local in split.indices:
    example = split.source.render(int(local), with_masks=True)
    if example["labels"].max() > 0:
      rows.append(example)
    if len(rows) == num_images:
      break
  out = {key: np.stack([r[key] for r in rows]) for key in
         ("image", "labels", "device_mask", "boxes", "box_labels")}
  size, num_classes = config.data.image_size, out["labels"].shape[1]
  out["box_masks"] = np.moveaxis(annotations.boxes_to_class_masks(
      out["boxes"], out["box_labels"], size, size, num_classes) > 0, -1, 1)   # [N,K,H,W]
  return out


def grid_ceiling(masks: np.ndarray, grid: int) -> np.ndarray:
  """masks [M,H,W] bool -> [M,H,W]: each mask area-averaged onto a grid x grid map, upsampled."""
  h, w = masks.shape[1:]
  cells = np.stack([cv2.resize(m.astype(np.float32), (grid, grid), interpolation=cv2.INTER_AREA)
                    for m in masks])
  return np.asarray(cam.upsample(jnp.asarray(cells), (h, w)))


def attribution(maps: np.ndarray, masks: np.ndarray, devices: np.ndarray) -> dict:
  """maps [M,H,W] >= 0, masks / devices bool [M,H,W] -> per-row scores [M]."""
  total = maps.sum(axis=(1, 2))
  safe = np.maximum(total, 1e-12)
  flat_max = maps.reshape(len(maps), -1).argmax(axis=1)
  return {
      "mass": np.where(total > 0, (maps * masks).sum(axis=(1, 2)) / safe, np.nan),
      "area": masks.mean(axis=(1, 2)),
      "device_mass": np.where(total > 0, (maps * devices).sum(axis=(1, 2)) / safe, np.nan),
      "device_area": devices.mean(axis=(1, 2)),
      "pointing": np.where(total > 0, masks.reshape(len(masks), -1)[np.arange(len(masks)),
                                                                       flat_max], np.nan),
      "empty": total <= 0,
  }


def _mean(values: np.ndarray) -> float:
  """Mean of the finite entries; nan when there are none."""
  finite = values[np.isfinite(values)]
  return float(finite.mean()) if finite.size else float("nan")


def summary(name: str, scores: dict, rows: np.ndarray) -> str:
  s = {k: v[rows] for k, v in scores.items()}
  dev = s["device_area"] > 0
  return (f"| {name} | {rows.sum()} | {_mean(s['mass']):.3f} | {s['area'].mean():.3f} | "
          f"{_mean(s['mass']) / s['area'].mean():.2f} | {_mean(s['pointing']):.3f} | "
          f"{_mean(s['device_mass'][dev]):.3f} | {_mean(s['device_area'][dev]):.3f} | "
          f"{s['empty'].mean():.2f} |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True, help="NAME:ARG of configs/NAME.py")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--stage", default="")
  parser.add_argument("--num_images", type=int, default=512)
  parser.add_argument("--override", action="append", default=[])
  parser.add_argument("--head_from", default="", help="params subtree to score as the head")
  args = parser.parse_args()
  name, _, arg = args.config.partition(":")
  config = bench_configs.load_config(ROOT, name, arg, dict(map(parse_override, args.override)))
  method = get_method(config.method)
  model = method.model(config)
  if args.stage:
    checkpoints = RunCheckpoints(os.path.abspath(args.workdir), config.keep_checkpoints)
    try:
      variables = checkpoints.best_variables(args.stage)
    finally:
      checkpoints.close()
  else:
    _, variables, _ = trainer.restore_for_eval(config, args.workdir, method)
  if args.head_from:
    if args.head_from not in variables["params"]:
      raise KeyError(f"--head_from={args.head_from!r}: {args.workdir} params have "
                     f"{sorted(variables['params'])}")
    variables = {**variables, "params": {**variables["params"],
                                         "head": variables["params"][args.head_from]}}

  data = render_test_images(config, args.num_images)
  images = pipeline.normalize_images(jnp.asarray(data["image"]), config.data.normalization,
                                     config.data.channels)

  features_fn = lambda v, x: method.cam_target(model, v)[0](x)
  grid = jax.eval_shape(features_fn, variables, images[:1]).shape[1]

  @jax.jit
  def class_maps(variables, images):
    features_fn, head_fn = method.cam_target(model, variables)
    signed = cam.grad_cam(head_fn, features_fn(images), relu=False)          # [N,K,h,w]
    return cam.upsample(signed, images.shape[1:3])

  signed = np.concatenate([np.asarray(class_maps(variables, images[start:start + 64]))
                           for start in range(0, len(images), 64)])

  image_rows, class_cols = np.nonzero(data["labels"] > 0)
  masks = data["box_masks"][image_rows, class_cols]
  keep = masks.any(axis=(1, 2))
  image_rows, class_cols, masks = image_rows[keep], class_cols[keep], masks[keep]
  devices = data["device_mask"][image_rows]
  signed = signed[image_rows, class_cols]
  relu = np.maximum(signed, 0)
  shifted = signed - signed.min(axis=(1, 2), keepdims=True)   # min-max but the scale, which no score reads
  ceiling = grid_ceiling(masks, grid)

  classes = schema.get_label_space(config.data.label_space).classes
  print(f"{args.config} {args.workdir} stage={args.stage or 'final'}: {len(data['image'])} test "
        f"images, {len(masks)} (image, positive class) pairs, {grid} x {grid} feature grid\n")
  header = ("| rows | pairs | mass on c | area of c | mass / area | pointing in c | mass on devices "
            "| device area | maps <= 0 |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
  everything = np.ones(len(masks), bool)
  for title, maps in (("ReLU Grad-CAM", relu), ("signed Grad-CAM, min-max", shifted),
                      ("ceiling: mask averaged onto the grid", ceiling)):
    scores = attribution(maps, masks, devices)
    print(f"{title}\n\n{header}")
    print(summary("all", scores, everything))
    for c in np.unique(class_cols):
      print(summary(classes[c], scores, class_cols == c))
    print()


if __name__ == "__main__":
  main()
