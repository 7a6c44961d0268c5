"""Rozenberg 2020 Table 1 on the patch grid: ``config.evals.<name> = dict(type='patch_grid')``.

On the rows of each split that carry boxes, the method's ``predict(...)['heatmaps']``
are the patch probabilities z [N,P,P,K]; a patch is positive if z >= 0.5, the
predicted region is the union of the positive patches, and a (image, boxed
class) is correct if its IoU (IoR) with the ground-truth patch grid
('box_grid') is >= T, T in ``THRESHOLDS`` (``localization.patch_accuracy``).
The section (eval/<split>.json under the eval's name) is
{'protocol', 'grid_size', 'iou@T': {'mean', 'per_class', 'n'}, 'ior@T': ...,
 'all_positive': {'iou@T': ..., 'ior@T': ...}} (the all-patches-positive reference).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from cxr_jax.data import schema
from cxr_jax.evaluation import evaluator, localization

THRESHOLDS = (0.1, 0.3, 0.5, 0.7)


def patch_report(z: np.ndarray, grid: np.ndarray, label_space: schema.LabelSpace) -> dict:
  """Rozenberg Table 1 on the boxed classes: ``localization.patch_accuracy`` of z [N,P,P,K]
  against the ground-truth grid [N,P,P,K], channels restricted to ``label_space.boxed``,
  in the eval JSON's metric form (``localization.accuracy_metrics``), and the same for
  the trivial map that calls every patch positive ('all_positive': the reference a lenient
  T is judged against)."""
  boxed = list(label_space.boxed_indices)
  z, grid = z[..., boxed], grid[..., boxed]
  ours = localization.patch_accuracy(z, grid, label_space.boxed, THRESHOLDS)
  trivial = localization.patch_accuracy(np.ones_like(z), grid, label_space.boxed, THRESHOLDS)
  return {"protocol": "rozenberg2020 patch grid: positive if z >= 0.5, region = union of "
                      "positive patches, correct if IoU (IoR) >= T",
          "grid_size": int(z.shape[1]),
          **localization.accuracy_metrics({"iou": ours["iou"], "ior": ours["ior"]}, ours["count"]),
          "all_positive": localization.accuracy_metrics(
              {"iou": trivial["iou"], "ior": trivial["ior"]}, trivial["count"])}


def predict_patches(ctx, variables, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(z [M,P,P,K], ground-truth grid [M,P,P,K]) over the valid rows of ``split`` with boxes."""
  predict_fn = evaluator.cached_predict_fn(ctx.method, ctx.model, ctx.mesh)
  variables = ctx.replicated(variables)
  zs, grids = [], []
  with ctx.batches(split, maps=("box_grid",)) as batches:
    for batch in batches:
      heatmaps = predict_fn(variables, {"image": batch["image"]})["heatmaps"]
      host = jax.device_get({"z": heatmaps, "grid": batch["box_grid"], "valid": batch["valid"],
                             "has_boxes": batch["has_boxes"]})
      keep = (host["valid"] > 0) & (host["has_boxes"] > 0)
      zs.append(np.asarray(host["z"])[keep])
      grids.append(np.asarray(host["grid"])[keep])
  return np.concatenate(zs), np.concatenate(grids)


class PatchGridEval:
  """``dict(type='patch_grid', splits=('val', 'test'))``: ``patch_report`` of each split."""
  needs = ("boxes",)  # what its splits must hold (cxr_jax.train.preflight)

  def __init__(self, ctx, name: str, *, splits: Sequence[str] = ("val", "test")):
    self.ctx, self.name, self.splits = ctx, name, tuple(splits)

  def run(self, variables, *, stage: str) -> dict[str, dict]:
    del stage
    label_space = schema.get_label_space(self.ctx.config.data.label_space)
    return {split: patch_report(*predict_patches(self.ctx, variables, split), label_space)
            for split in self.splits}
