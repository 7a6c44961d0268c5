"""Talasila 2023 figures: CAM-kind comparison (Fig. 3) and PR curves with iso-F1 lines (Fig. 5).

- ``compare_cams``: on the boxed images of a split, Grad-CAM, Grad-CAM++ and
  Score-CAM maps (``cam.class_heatmaps``, upsampled + min-max normalized) of
  every boxed class, scored with the evaluator's box protocol
  (``localization.box_scores``: threshold 127/255, connected components ->
  bounding rectangles, best IoU per ground-truth box).
- ``write_cam_panel``: one row per image, one column per CAM kind, ground-truth
  boxes red, boxes read off the map green.
- ``write_pr_comparison``: micro-averaged precision-recall curve of one or
  several models on one panel with iso-F1 lines and each model's AP.
- ``CamKindsEval`` (``config.evals.<name> = dict(type='byol_cam_kinds',
  splits=('test',), max_images=8)``): both on a run's final variables, per
  split: the section {'num_images', 'num_boxes', 'mean_iou': {kind: IoU},
  'micro_ap'} (eval/<split>.json under the eval's name),
  WORKDIR/report/cam_comparison_<split>.png, WORKDIR/report/pr_micro_<split>.png
  and the split's predictions WORKDIR/eval/predictions_<split>.npz, which
  ``compare_runs`` reads to draw several runs (e.g. the rows of a sweep) on one
  PR panel (the paper's Fig. 5).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure
from sklearn import metrics as skm

from cxr_jax import cam, files
from cxr_jax.data import pipeline, schema
from cxr_jax.evaluation import evaluator, localization, report

CAM_TITLES = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "scorecam": "Score-CAM"}


def micro_pr(probs: np.ndarray, labels: np.ndarray, mask: np.ndarray
             ) -> tuple[np.ndarray, np.ndarray, float]:
  """Micro-averaged PR over the unmasked entries of [N,K] arrays -> (precision, recall, AP)."""
  keep = np.asarray(mask, bool)
  y, p = np.asarray(labels)[keep], np.asarray(probs)[keep]
  if not y.any():
    raise ValueError("micro_pr: no positive label among the unmasked entries")
  precision, recall, _ = skm.precision_recall_curve(y, p)
  return precision, recall, float(skm.average_precision_score(y, p))


def write_pr_comparison(curves: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
                        out_path: str, title: str = "Precision-recall (micro-average)") -> str:
  """One panel: each model's micro-averaged PR curve (legend: AP) over iso-F1 lines.

  curves: {model name: (probs [N,K], labels [N,K], label_mask [N,K])}. Written atomically.
  """
  if not curves:
    raise ValueError("write_pr_comparison: no curve given")
  fig = Figure(figsize=(5, 5), dpi=100, layout="constrained")
  ax = fig.subplots()
  report._draw_iso_f1(ax)  # pylint: disable=protected-access
  for name, (probs, labels, mask) in curves.items():
    precision, recall, ap = micro_pr(probs, labels, mask)
    ax.plot(recall, precision, lw=1.4, label=f"{name} (AP {ap:.3f})")
  ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="recall", ylabel="precision", title=title)
  ax.legend(loc="lower left", fontsize=7)
  report.write_png(out_path, fig)
  return out_path


def write_predictions(path: str, out: Mapping[str, np.ndarray]) -> str:
  """'probs', 'labels', 'label_mask', 'index' of ``evaluator.predict_on`` as an .npz (atomically)."""
  files.write_npz_atomic(path, **{k: np.asarray(out[k])
                                  for k in ("probs", "labels", "label_mask", "index")})
  return path


def compare_runs(runs: Mapping[str, str], out_path: str, split: str = "test") -> str:
  """PR panel of several finished runs: {name: workdir} -> ``out_path`` (PNG).

  Reads each WORKDIR/eval/predictions_<split>.npz written by ``CamKindsEval``.
  """
  curves = {}
  for name, workdir in runs.items():
    path = os.path.join(workdir, "eval", f"predictions_{split}.npz")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"run {name!r}: {path} does not exist (written by the "
                              f"'byol_cam_kinds' evaluator)")
    with np.load(path) as f:
      curves[name] = (f["probs"], f["labels"], f["label_mask"])
  return write_pr_comparison(curves, out_path, title=f"Precision-recall, {split} (micro-average)")


def boxed_images(ctx, split: str, max_images: int) -> dict:
  """The first ``max_images`` rows of ``split`` with a box of a boxed class, in split order
  (``ctx``: an ``evaluators.EvalContext``).

  Returns numpy 'image' [M,H,W,C], 'boxes' [M,B,4], 'box_labels' [M,B], 'index' [M].
  """
  boxed = np.asarray(schema.get_label_space(ctx.config.data.label_space).boxed_indices, np.int64)
  with ctx.batches(split) as batches:
    rows = pipeline.first_rows(
        batches,
        lambda b: jax.device_get({k: b[k] for k in ("image", "boxes", "box_labels", "index",
                                                     "valid")}),
        lambda host: np.isin(host["box_labels"], boxed).any(axis=1), max_images)
  if not rows:
    raise ValueError(f"split {split!r} has no image with a box of a boxed class")
  return rows


def compare_cams(method, model, variables, images: np.ndarray, boxes: np.ndarray,
                 box_labels: np.ndarray, *, kinds: Sequence[str] = cam.KINDS,
                 threshold: float = 127 / 255, score_batch_size: int = 64) -> dict:
  """Maps and box IoU of each CAM kind on boxed images.

  Args:
    method, model, variables: a method with ``cam_target`` and its variables.
    images: [M,H,W,C]; boxes [M,B,4]; box_labels [M,B] (-1 = padding).
    kinds: CAM kinds of ``cam.KINDS``.
    threshold: binarization threshold on the normalized map (paper: 127/255).
  Returns:
    {kind: {'maps': [M,H,W] the map of each image's first box class,
            'pred_boxes': M arrays [b,4] read off those maps,
            'mean_iou': mean over the ground-truth boxes of the best IoU,
            'iou': [U] per ground-truth box}}.
  """
  classes = sorted({int(k) for k in np.unique(box_labels) if k >= 0})
  features_fn, head_fn = method.cam_target(model, variables)
  out = {}
  for kind in kinds:
    maps_fn = jax.jit(lambda x, kind=kind: cam.class_heatmaps(
        kind, features_fn, head_fn, x, classes=np.asarray(classes, np.int32), image_size=True,
        score_batch_size=score_batch_size))
    maps = np.asarray(jax.device_get(maps_fn(jnp.asarray(images, jnp.float32))))   # [M,C,H,W]
    _, ious, _ = localization.box_scores(maps, boxes, box_labels, threshold,
                                         channel_classes=classes)
    first = [classes.index(int(labels[labels >= 0][0])) for labels in box_labels]
    first_maps = maps[np.arange(len(maps)), first]
    out[kind] = {"maps": first_maps,
                 "pred_boxes": [localization.heatmap_to_boxes(m, threshold) for m in first_maps],
                 "mean_iou": float(np.mean(ious)) if len(ious) else float("nan"),
                 "iou": ious}
  return out


def cam_panel_figure(images: np.ndarray, boxes: np.ndarray, box_labels: np.ndarray,
                     compared: Mapping[str, Mapping], titles: Sequence[str] | None = None,
                     title: str = "CAM kinds compared", threshold: float | None = None
                     ) -> Figure:
  """The figure of ``write_cam_panel`` (not written)."""
  kinds = list(compared)
  n = len(images)
  fig = Figure(figsize=(2.2 * len(kinds) + 1.0, 2.2 * n + 0.9), dpi=100, layout="constrained")
  fig.suptitle(title, fontsize=10)
  axes = fig.subplots(n, len(kinds), squeeze=False)
  height, width = images.shape[1:3]
  for i in range(n):
    image = images[i, ..., 0]
    image = (image - image.min()) / max(float(image.max() - image.min()), 1e-7)
    labels = box_labels[i]
    first = labels == labels[labels >= 0][0]
    for j, kind in enumerate(kinds):
      ax = axes[i, j]
      ax.imshow(image, cmap="gray")
      ax.imshow(compared[kind]["maps"][i], cmap="magma", alpha=0.5, vmin=0, vmax=1)
      report._draw_boxes(ax, boxes[i][first], height, width, "red")  # pylint: disable=protected-access
      report._draw_boxes(ax, compared[kind]["pred_boxes"][i], height, width, "lime")  # pylint: disable=protected-access
      ax.set_axis_off()
      if i == 0:
        ax.set_title(f"{CAM_TITLES.get(kind, kind)}\nmean IoU {compared[kind]['mean_iou']:.3f}",
                     fontsize=8)
      if j == 0 and titles is not None:
        ax.text(-0.05, 0.5, titles[i], transform=ax.transAxes, rotation=90, va="center",
                ha="right", fontsize=7)
  pred = report.PRED_LABEL + (f" (threshold {threshold:.2f})" if threshold is not None else "")
  report.overlay_legend(fig, pred)
  report.heat_colorbar(fig, axes.ravel().tolist())
  return fig


def write_cam_panel(images: np.ndarray, boxes: np.ndarray, box_labels: np.ndarray,
                    compared: Mapping[str, Mapping], out_path: str,
                    titles: Sequence[str] | None = None, title: str = "CAM kinds compared",
                    threshold: float | None = None) -> str:
  """Rows = images, columns = CAM kinds (``compare_cams`` output): image in gray, map in
  magma (alpha 0.5), ground-truth boxes of the first box class red, map boxes green; the
  figure title ``title``, a legend of the box colours (``threshold``: the binarization
  that read the green boxes) and a colour bar of the maps. Written atomically."""
  fig = cam_panel_figure(images, boxes, box_labels, compared, titles, title, threshold)
  report.write_png(out_path, fig)
  return out_path


class CamKindsEval:
  """``dict(type='byol_cam_kinds', splits=('test',), max_images=8)``: per split, the CAM-kind
  comparison on its first ``max_images`` boxed images and the micro-averaged PR curve of the
  given (final) variables (module docstring); boxes read off the maps at ``config.cam_threshold``
  (127/255 without one)."""
  needs = ("boxes",)  # what its splits must hold (cxr_jax.train.preflight)

  def __init__(self, ctx, name: str, *, splits: Sequence[str] = ("test",), max_images: int = 8):
    self.ctx, self.name, self.splits, self.max_images = ctx, name, tuple(splits), int(max_images)

  def run(self, variables, *, stage: str) -> dict[str, dict]:
    del stage
    c = self.ctx
    variables = c.replicated(variables)
    threshold = float(c.config.get("cam_threshold", 127 / 255))
    sections = {}
    for split in self.splits:
      out = evaluator.predict_on(c.method, c.model, variables, c.config, split, mesh=c.mesh,
                                 make_iterator=c.make_iterator)
      boxed = boxed_images(c, split, self.max_images)
      compared = compare_cams(c.method, c.model, variables, boxed["image"], boxed["boxes"],
                              boxed["box_labels"], threshold=threshold)
      sections[split] = {
          "num_images": int(len(boxed["index"])),
          "num_boxes": int(np.sum(boxed["box_labels"] >= 0)),
          "mean_iou": {kind: compared_kind["mean_iou"] for kind, compared_kind in compared.items()},
          "micro_ap": micro_pr(out["probs"], out["labels"], out["label_mask"])[2]}
      if c.writes:
        write_cam_panel(boxed["image"], boxed["boxes"], boxed["box_labels"], compared,
                        c.path("report", f"cam_comparison_{split}.png"),
                        titles=[f"#{i}" for i in boxed["index"]],
                        title=f"{c.method.name}: CAM kinds on the first boxed images of {split} "
                              f"(map of each image's first boxed class)", threshold=threshold)
        write_predictions(c.path("eval", f"predictions_{split}.npz"), out)
        name = f"{c.method.name} ({c.config.model.backbone})"
        write_pr_comparison({name: (out["probs"], out["labels"], out["label_mask"])},
                            c.path("report", f"pr_micro_{split}.png"))
    return sections
