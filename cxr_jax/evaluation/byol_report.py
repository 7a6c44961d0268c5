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
- ``run_report``: both for a finished run (``BYOLCAM.after_training``):
  WORKDIR/eval/byol_cam.json, WORKDIR/report/cam_comparison.png,
  WORKDIR/report/pr_micro_<split>.png, and the split's predictions
  WORKDIR/eval/predictions_<split>.npz, which ``compare_runs`` reads to draw
  several runs (e.g. the rows of a sweep) on one PR panel (the paper's Fig. 5).
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from matplotlib.figure import Figure
from sklearn import metrics as skm

from cxr_jax import cam
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
  report.write_bytes_atomic(out_path, report._png_bytes(fig))  # pylint: disable=protected-access
  return out_path


def write_predictions(path: str, out: Mapping[str, np.ndarray]) -> str:
  """'probs', 'labels', 'label_mask', 'index' of ``evaluator.predict_on`` as an .npz (atomically)."""
  buffer = io.BytesIO()
  np.savez(buffer, **{k: np.asarray(out[k]) for k in ("probs", "labels", "label_mask", "index")})
  report.write_bytes_atomic(path, buffer.getvalue())
  return path


def compare_runs(runs: Mapping[str, str], out_path: str, split: str = "test") -> str:
  """PR panel of several finished runs: {name: workdir} -> ``out_path`` (PNG).

  Reads each WORKDIR/eval/predictions_<split>.npz written by ``run_report``.
  """
  curves = {}
  for name, workdir in runs.items():
    path = os.path.join(workdir, "eval", f"predictions_{split}.npz")
    if not os.path.isfile(path):
      raise FileNotFoundError(f"run {name!r}: {path} does not exist (written after training by "
                              f"the byol_cam method)")
    with np.load(path) as f:
      curves[name] = (f["probs"], f["labels"], f["label_mask"])
  return write_pr_comparison(curves, out_path, title=f"Precision-recall, {split} (micro-average)")


def boxed_images(config, split: str, max_images: int, *, mesh, make_iterator=None) -> dict:
  """The first ``max_images`` rows of ``split`` with a box of a boxed class, in split order.

  Returns numpy 'image' [M,H,W,C], 'boxes' [M,B,4], 'box_labels' [M,B], 'index' [M].
  """
  make_iterator = make_iterator or evaluator._default_make_iterator  # pylint: disable=protected-access
  boxed = np.asarray(schema.get_label_space(config.data.label_space).boxed_indices, np.int64)
  batches = make_iterator(config.data, split, batch_size=config.eval_batch_size,
                          sharding=NamedSharding(mesh, P("data")), seed=config.seed, shuffle=False,
                          num_epochs=1, drop_remainder=False, augment=False)
  rows = pipeline.first_rows(
      batches,
      lambda b: jax.device_get({k: b[k] for k in ("image", "boxes", "box_labels", "index", "valid")}),
      lambda host: np.isin(host["box_labels"], boxed).any(axis=1), max_images)
  if not rows:
    raise ValueError(f"split {split!r} has no image with a box of a boxed class "
                     f"(config.byol.cam_split)")
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


def write_cam_panel(images: np.ndarray, boxes: np.ndarray, box_labels: np.ndarray,
                    compared: Mapping[str, Mapping], out_path: str,
                    titles: Sequence[str] | None = None) -> str:
  """Rows = images, columns = CAM kinds (``compare_cams`` output): image in gray, map in
  magma (alpha 0.5), ground-truth boxes of the first box class red, map boxes green."""
  kinds = list(compared)
  n = len(images)
  fig = Figure(figsize=(2.2 * len(kinds), 2.2 * n), dpi=100, layout="constrained")
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
  report.write_bytes_atomic(out_path, report._png_bytes(fig))  # pylint: disable=protected-access
  return out_path


def run_report(method, config, workdir: str, *, mesh, make_iterator=None) -> dict:
  """The CAM comparison and micro PR curve of a finished run (its final checkpoint).

  Writes WORKDIR/eval/byol_cam.json {'split', 'num_images', 'mean_iou': {kind: IoU},
  'num_boxes', 'micro_ap'}, WORKDIR/report/cam_comparison.png and
  WORKDIR/report/pr_micro_<split>.png (process 0). Returns the JSON payload.
  """
  from cxr_jax.train import trainer  # pylint: disable=import-outside-toplevel
  _, model, variables, _ = trainer.restore_for_eval(config, workdir)
  variables = jax.device_put(variables, NamedSharding(mesh, P()))
  split = config.byol.cam_split
  out = evaluator.predict_on(method, model, variables, config, split, mesh=mesh,
                             make_iterator=make_iterator)
  boxed = boxed_images(config, split, config.byol.cam_panel_images, mesh=mesh,
                       make_iterator=make_iterator)
  compared = compare_cams(method, model, variables, boxed["image"], boxed["boxes"],
                          boxed["box_labels"], threshold=float(config.get("cam_threshold", 127 / 255)))
  payload = {"split": split, "num_images": int(len(boxed["index"])),
             "num_boxes": int(np.sum(boxed["box_labels"] >= 0)),
             "mean_iou": {kind: c["mean_iou"] for kind, c in compared.items()},
             "micro_ap": micro_pr(out["probs"], out["labels"], out["label_mask"])[2]}
  if jax.process_index() == 0:
    evaluator.write_json_atomic(os.path.join(workdir, "eval", "byol_cam.json"), payload)
    write_cam_panel(boxed["image"], boxed["boxes"], boxed["box_labels"], compared,
                    os.path.join(workdir, "report", "cam_comparison.png"),
                    titles=[f"#{i}" for i in boxed["index"]])
    write_predictions(os.path.join(workdir, "eval", f"predictions_{split}.npz"), out)
    name = f"{method.name} ({config.model.backbone})"
    write_pr_comparison({name: (out["probs"], out["labels"], out["label_mask"])},
                        os.path.join(workdir, "report", f"pr_micro_{split}.png"))
  return payload
