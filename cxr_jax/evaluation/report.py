"""Plots of an evaluation: ROC and precision-recall curves per class, CAM overlays (PNG).

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no global
backend switch), one subplot per class, written atomically.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from sklearn import metrics as skm

from cxr_jax.evaluation import metrics

ISO_F1 = (0.2, 0.4, 0.6, 0.8)


def write_bytes_atomic(path: str, data: bytes) -> None:
  """Writes ``data`` to a temp file in ``path``'s folder, then os.replace: readers see
  the old file or the new one, never a part; a failed write leaves no temp file."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be read by others
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _png_bytes(fig: Figure) -> bytes:
  buffer = io.BytesIO()
  FigureCanvasAgg(fig).print_png(buffer)
  return buffer.getvalue()


def _grid(num_classes: int, title: str) -> tuple[Figure, list]:
  cols = math.ceil(math.sqrt(num_classes))
  rows = math.ceil(num_classes / cols)
  fig = Figure(figsize=(3 * cols, 3 * rows), dpi=100, layout="constrained")
  fig.suptitle(title)
  axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
  for ax in axes[num_classes:]:
    ax.set_axis_off()
  return fig, axes[:num_classes]


def _draw_iso_f1(ax) -> None:
  """Curves of constant F1 = 2PR / (P + R): P = f R / (2R - f) for R > f / 2."""
  for f in ISO_F1:
    recall = np.linspace(f / 2 + 1e-3, 1.0, 100)
    precision = f * recall / (2 * recall - f)
    keep = precision <= 1.0
    ax.plot(recall[keep], precision[keep], color="0.8", lw=0.8, ls="--")
    ax.annotate(f"F1={f}", (0.9, f * 0.9 / (1.8 - f) + 0.02), fontsize=6, color="0.5")


def write_curves(probs, labels, mask, class_names: Sequence[str], out_dir: str,
                 prefix: str) -> list[str]:
  """ROC and PR curves of every class on unmasked rows -> [roc_<prefix>.png, pr_<prefix>.png].

  probs, labels, mask: [N, K] as in ``metrics``. A class with an undefined
  curve (no positive, or for ROC no negative) gets an empty panel saying so.
  The PR panels carry iso-F1 lines (Talasila 2023) and each panel's title the
  AUROC / AP.
  """
  probs, labels, mask = metrics.check_inputs(probs, labels, mask)
  aurocs, aps = metrics.auroc(probs, labels, mask), metrics.auprc(probs, labels, mask)
  roc_fig, roc_axes = _grid(len(class_names), f"ROC ({prefix})")
  pr_fig, pr_axes = _grid(len(class_names), f"Precision-recall ({prefix})")
  for k, name in enumerate(class_names):
    y, p = labels[mask[:, k], k], probs[mask[:, k], k]
    roc_ax, pr_ax = roc_axes[k], pr_axes[k]
    roc_ax.plot([0, 1], [0, 1], color="0.8", lw=0.8, ls="--")
    _draw_iso_f1(pr_ax)
    if np.isfinite(aurocs[k]):
      fpr, tpr, _ = skm.roc_curve(y, p)
      roc_ax.plot(fpr, tpr, lw=1.2)
    if np.isfinite(aps[k]):
      precision, recall, _ = skm.precision_recall_curve(y, p)
      pr_ax.plot(recall, precision, lw=1.2)
      pr_ax.axhline(y.mean(), color="0.6", lw=0.8, ls=":")  # chance level = prevalence
    roc_ax.set_title(f"{name}\nAUROC {aurocs[k]:.3f}" if np.isfinite(aurocs[k])
                     else f"{name}\nAUROC undefined", fontsize=8)
    pr_ax.set_title(f"{name}\nAP {aps[k]:.3f}" if np.isfinite(aps[k])
                    else f"{name}\nAP undefined", fontsize=8)
    roc_ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity", ylabel="sensitivity")
    pr_ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="recall", ylabel="precision")
    for ax in (roc_ax, pr_ax):
      ax.tick_params(labelsize=6)
      ax.xaxis.label.set_size(7)
      ax.yaxis.label.set_size(7)
  paths = [os.path.join(out_dir, f"roc_{prefix}.png"), os.path.join(out_dir, f"pr_{prefix}.png")]
  write_bytes_atomic(paths[0], _png_bytes(roc_fig))
  write_bytes_atomic(paths[1], _png_bytes(pr_fig))
  return paths


def _draw_boxes(ax, boxes, height: int, width: int, color: str) -> None:
  for x0, y0, x1, y1 in np.asarray(boxes, np.float64).reshape(-1, 4):
    ax.add_patch(Rectangle((x0 * width - 0.5, y0 * height - 0.5), (x1 - x0) * width,
                           (y1 - y0) * height, fill=False, edgecolor=color, lw=1.2))


def write_overlays(images, heatmaps, gt_boxes: Sequence, pred_boxes: Sequence, out_path: str,
                   titles: Sequence[str] | None = None) -> str:
  """PNG grid, one panel per example: image (gray), heat map (magma, alpha 0.5),
  ground-truth boxes (red) and predicted boxes (green). Written atomically.

  Args:
    images: [N,H,W,C] (C = 1 or 3, any range: each image is min-max scaled).
    heatmaps: [N,H,W] in [0, 1].
    gt_boxes, pred_boxes: N arrays [M,4] of normalized (x0, y0, x1, y1).
    out_path: the PNG file.
    titles: optional N panel titles.
  Returns:
    out_path.
  """
  images, heatmaps = np.asarray(images, np.float32), np.asarray(heatmaps, np.float32)
  n = len(images)
  if not n or heatmaps.shape != images.shape[:3] or len(gt_boxes) != n or len(pred_boxes) != n:
    raise ValueError(f"write_overlays: need N > 0 images [N,H,W,C], heat maps [N,H,W] and N box "
                     f"arrays; got {images.shape}, {heatmaps.shape}, {len(gt_boxes)}, "
                     f"{len(pred_boxes)}")
  fig, axes = _grid(n, os.path.basename(out_path))
  height, width = images.shape[1:3]
  for i, ax in enumerate(axes):
    image = images[i] if images.shape[-1] == 3 else images[i, ..., 0]
    image = (image - image.min()) / max(float(image.max() - image.min()), 1e-7)
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
    ax.imshow(heatmaps[i], cmap="magma", alpha=0.5, vmin=0, vmax=1)
    _draw_boxes(ax, gt_boxes[i], height, width, "red")
    _draw_boxes(ax, pred_boxes[i], height, width, "lime")
    if titles is not None:
      ax.set_title(titles[i], fontsize=7)
    ax.set_axis_off()
  write_bytes_atomic(out_path, _png_bytes(fig))
  return out_path
