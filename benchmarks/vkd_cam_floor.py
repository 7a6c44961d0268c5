"""Floor and ceiling of van Sonsbeek's CAM-vs-annotation similarity (Eq. 5) on the phantoms.

    python benchmarks/vkd_cam_floor.py [--config_arg=width=0.25] [--draws=20]

The annotation maps c of ``cam_shift.collect_cams`` (the annotated images of the VKD preset's
'cam_shift' evaluator, ``config.evals.cam_shift``),
scored with ``localization.similarity`` (MSE, soft Dice) and the hard Dice (both maps
binarized at 0.5) against maps that no model produced:
  random    per positive class a map of i.i.d. N(0, 1) values on the model's feature grid,
            upsampled, min-max normalized and maxed over the classes, exactly as
            ``cam_shift.positive_class_cams`` treats a signed Grad-CAM (``draws`` draws);
  ceiling   c area-averaged onto the feature grid, upsampled and min-max normalized:
            the closest a map of that grid comes to c by this construction;
  constant  the same value everywhere (1, and each stage's mean CAM mass if given).
A trained model's S(c, CAM) is read against these rows.

With ``--workdir`` of a finished VKD run (same ``--config_arg``), also what stage 2 could reach
with the encoder frozen: a frozen encoder leaves Grad-CAM only a re-weighting of stage 1's last
feature maps, so one weight per channel (plus a bias) is fit by least squares to c on the grid
(c area-averaged) over the first half of the images, and that map, upsampled and min-max
normalized, is scored on the second half next to each stage's CAM (``cam_shift.collect_cams``).
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
from cxr_jax.data import pipeline  # noqa: E402
from cxr_jax.evaluation import cam_shift, evaluators, localization  # noqa: E402
from cxr_jax.methods import vkd  # noqa: E402
from cxr_jax.train import parallel  # noqa: E402
from cxr_jax.train.checkpoint import RunCheckpoints  # noqa: E402


def hard_dice(c: np.ndarray, m: np.ndarray) -> float:
  """Mean over images of the Dice of (c >= 0.5) and (m >= 0.5); 0 when both are empty."""
  a, b = c >= 0.5, m >= 0.5
  total = a.sum(axis=(1, 2)) + b.sum(axis=(1, 2))
  return float(np.mean(np.where(total > 0, 2 * (a & b).sum(axis=(1, 2)) / np.maximum(total, 1), 0)))


def scores(c: np.ndarray, m: np.ndarray) -> str:
  return (f"MSE {localization.similarity(c, m, 'mse'):.4f} | soft Dice "
          f"{localization.similarity(c, m, 'dice'):.4f} | hard Dice {hard_dice(c, m):.4f} | "
          f"mass {m.mean():.3f}")


def area_average(maps: np.ndarray, height: int, width: int) -> np.ndarray:
  """[N,H,W] -> [N,height,width]: each map area-averaged onto the feature grid."""
  return np.stack([cv2.resize(x, (width, height), interpolation=cv2.INTER_AREA) for x in maps])


def frozen_reweighting_bound(config, workdir: str, mesh) -> None:
  """Prints S(c, .) on the second half of the annotated images for both stages' CAMs and for
  the least-squares channel re-weighting of stage 1's feature maps fit on the first half."""
  if config.data.channels != 1:
    raise ValueError(f"--workdir: the bound re-reads the CAM images' first channel; "
                     f"config.data.channels={config.data.channels} (one-channel data only)")
  method = vkd.VKD()
  model = method.model(config)
  checkpoints = RunCheckpoints(os.path.abspath(workdir), config.keep_checkpoints)
  try:
    variables = {stage: checkpoints.best_variables(stage) for stage in cam_shift.STAGES}
  finally:
    checkpoints.close()
  shift = config.evals.cam_shift
  rows = cam_shift.collect_cams(method, model, variables, config, shift.splits[0],
                                max_images=shift.max_images, relu=shift.relu, mesh=mesh)
  c = rows["annotation"].astype(np.float64)
  features_fn = jax.jit(method.cam_target(model, variables["base"])[0])
  features = np.asarray(features_fn(jnp.asarray(rows["image"])[..., None]), np.float64)
  n, h, w, d = features.shape
  pooled = area_average(c, h, w)
  design = np.concatenate([features.reshape(n, h * w, d), np.ones((n, h * w, 1))], axis=-1)
  fit, held_out = np.arange(n // 2), np.arange(n // 2, n)
  weights, *_ = np.linalg.lstsq(design[fit].reshape(-1, d + 1), pooled[fit].reshape(-1), rcond=None)
  best = np.asarray(cam.normalize(cam.upsample(jnp.asarray((design @ weights).reshape(n, h, w)),
                                               c.shape[1:])))
  print(f"{workdir}: {n} images, fit on {len(fit)}, scored on {len(held_out)}")
  for name, maps in (("stage-1 CAM", rows["base"]), ("stage-2 CAM", rows["prior"]),
                     ("frozen re-weighting (least squares)", best)):
    print(f"{name}:", scores(c[held_out], np.asarray(maps, np.float64)[held_out]))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config_arg", default="width=0.25")
  parser.add_argument("--draws", type=int, default=20)
  parser.add_argument("--masses", default="0.558", help="comma-separated constant maps")
  parser.add_argument("--workdir", default="", help="a finished VKD run: the frozen-encoder bound")
  args = parser.parse_args()
  config = bench_configs.load_config(ROOT, "vkd", args.config_arg)
  size = config.data.image_size
  mesh = parallel.make_mesh()
  if args.workdir:
    frozen_reweighting_bound(config, args.workdir, mesh)
  maps = cam_shift.ANNOTATIONS[config.vkd.annotation]
  split, max_images = config.evals.cam_shift.splits[0], config.evals.cam_shift.max_images
  with evaluators.eval_batches(config, split, mesh=mesh, data=cam_shift.stage2_data_config(config),
                               maps=maps) as batches:
    rows = pipeline.first_rows(
        batches, lambda b: jax.device_get({"c": cam_shift.annotation_map(b, maps)[..., 0],
                                           "labels": b["labels"], "valid": b["valid"]}),
        lambda host: (host["c"].max(axis=(1, 2)) > 0) & (host["labels"].max(axis=1) > 0),
        max_images)
  c, positive = rows["c"].astype(np.float32), rows["labels"] > 0
  model = vkd.VKD().model(config)
  variables = model.init(jax.random.key(0), jnp.zeros((1, size, size, config.data.channels)),
                         train=False)
  features_fn, _ = vkd.VKD().cam_target(model, variables)
  grid = jax.eval_shape(features_fn, jnp.zeros((1, size, size, config.data.channels))).shape[1:3]
  print(f"{len(c)} annotated {split} images, {size} px, feature grid "
        f"{grid[0]}x{grid[1]}, annotation {config.vkd.annotation}, annotated area {c.mean():.3f}")

  def to_cam(grid_maps):  # [N, K, h, w] -> [N, H, W] as positive_class_cams does
    up = cam.normalize(cam.upsample(jnp.asarray(grid_maps), (size, size)))
    return np.asarray(jnp.max(up * positive[:, :, None, None], axis=1))

  rng = np.random.default_rng(0)
  draws = [to_cam(rng.standard_normal((len(c), positive.shape[1]) + tuple(grid)))
           for _ in range(args.draws)]
  for name, fn in (("MSE", lambda m: localization.similarity(c, m, "mse")),
                   ("soft Dice", lambda m: localization.similarity(c, m, "dice")),
                   ("hard Dice", lambda m: hard_dice(c, m))):
    values = np.array([fn(m) for m in draws])
    print(f"random ({args.draws} draws): {name} {values.mean():.4f} +- {values.std():.4f}")
  pooled = area_average(c, grid[0], grid[1])
  print("ceiling (c on the grid):", scores(c, np.asarray(cam.normalize(cam.upsample(
      jnp.asarray(pooled), (size, size))))))
  for value in [1.0] + [float(v) for v in args.masses.split(",") if v]:
    print(f"constant {value:.3f}:", scores(c, np.full_like(c, value)))


if __name__ == "__main__":
  main()
