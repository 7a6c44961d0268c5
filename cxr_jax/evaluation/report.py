"""Plots of an evaluation: ROC and precision-recall curves per class, CAM overlays (PNG).

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no global
backend switch), one subplot per class, written atomically.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from sklearn import metrics as skm

from cxr_jax.evaluation import metrics
from cxr_jax.files import write_bytes_atomic

ISO_F1 = (0.2, 0.4, 0.6, 0.8)


def write_png(path: str, fig: Figure) -> None:
  """``fig`` rendered on the Agg canvas, written to ``path`` as PNG (atomically)."""
  write_bytes_atomic(path, _png_bytes(fig))


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
  """Curves of constant F1 = 2PR / (P + R): P = f R / (2R - f) for R > f / 2, each value
  written just right of the panel at recall 1 (outside the data region, so it covers no curve)."""
  for f in ISO_F1:
    recall = np.linspace(f / 2 + 1e-3, 1.0, 100)
    precision = f * recall / (2 * recall - f)
    keep = precision <= 1.0
    ax.plot(recall[keep], precision[keep], color="0.8", lw=0.8, ls="--")
    ax.annotate(f"{f:g}", (1.0, f / (2 - f)), xytext=(2, 0), textcoords="offset points",
                ha="left", va="center", fontsize=6, color="0.5", annotation_clip=False)


def _curve_legend(fig: Figure, entries: Sequence[tuple[str, dict]]) -> None:
  """One legend for the whole grid, below the panels: (label, Line2D style) per line kind."""
  handles = [Line2D([], [], label=label, **style) for label, style in entries]
  fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8,
             frameon=False)


def _positives_text(y: np.ndarray) -> str:
  return f"{int(y.sum())} pos / {int(len(y) - y.sum())} neg"


def _mean_text(name: str, values: np.ndarray) -> str:
  """'mean AUROC 0.612' over the classes where it is defined (and how many those are)."""
  defined = np.isfinite(values)
  if not defined.any():
    return f"{name} undefined for every class"
  text = f"mean {name} {float(values[defined].mean()):.3f}"
  return text if defined.all() else f"{text} over {int(defined.sum())} of {len(values)} classes"


def curve_figures(probs, labels, mask, class_names: Sequence[str], split: str,
                  title: str | None = None) -> tuple[Figure, Figure]:
  """The ROC and PR figures of ``write_curves`` (not written)."""
  probs, labels, mask = metrics.check_inputs(probs, labels, mask)
  aurocs, aps = metrics.auroc(probs, labels, mask), metrics.auprc(probs, labels, mask)
  what = f"{title}, {split}" if title else split
  roc_fig, roc_axes = _grid(len(class_names), f"ROC ({what}): {_mean_text('AUROC', aurocs)}")
  pr_fig, pr_axes = _grid(len(class_names),
                          f"Precision-recall ({what}): {_mean_text('AP', aps)}")
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
    counts = _positives_text(y)
    roc_ax.set_title(f"{name} ({counts})\n" + (f"AUROC {aurocs[k]:.3f}" if np.isfinite(aurocs[k])
                                                else "AUROC undefined"), fontsize=8)
    pr_ax.set_title(f"{name} ({counts})\n" + (f"AP {aps[k]:.3f}" if np.isfinite(aps[k])
                                             else "AP undefined"), fontsize=8)
    roc_ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity", ylabel="sensitivity")
    pr_ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="recall", ylabel="precision")
    for ax in (roc_ax, pr_ax):
      ax.tick_params(labelsize=6)
      ax.xaxis.label.set_size(7)
      ax.yaxis.label.set_size(7)
  _curve_legend(roc_fig, [("ROC curve", dict(lw=1.2, color="C0")),
                          ("chance", dict(color="0.8", lw=0.8, ls="--"))])
  _curve_legend(pr_fig, [("PR curve", dict(lw=1.2, color="C0")),
                         ("chance (prevalence)", dict(color="0.6", lw=0.8, ls=":")),
                         ("iso-F1 (value at the right edge)", dict(color="0.8", lw=0.8, ls="--"))])
  return roc_fig, pr_fig


def write_curves(probs, labels, mask, class_names: Sequence[str], out_dir: str,
                 prefix: str, title: str | None = None) -> list[str]:
  """ROC and PR curves of every class on unmasked rows -> [roc_<prefix>.png, pr_<prefix>.png].

  probs, labels, mask: [N, K] as in ``metrics``. A class with an undefined
  curve (no positive, or for ROC no negative) gets an empty panel saying so.
  Each panel's title carries the class's positives / negatives and its AUROC /
  AP, the figure title the mean over the classes where it is defined (with
  ``title``, e.g. the method, before the split ``prefix``). The PR panels carry
  iso-F1 lines (Talasila 2023), labelled at the right edge.
  """
  roc_fig, pr_fig = curve_figures(probs, labels, mask, class_names, prefix, title)
  paths = [os.path.join(out_dir, f"roc_{prefix}.png"), os.path.join(out_dir, f"pr_{prefix}.png")]
  write_png(paths[0], roc_fig)
  write_png(paths[1], pr_fig)
  return paths


def _draw_boxes(ax, boxes, height: int, width: int, color: str) -> None:
  for x0, y0, x1, y1 in np.asarray(boxes, np.float64).reshape(-1, 4):
    ax.add_patch(Rectangle((x0 * width - 0.5, y0 * height - 0.5), (x1 - x0) * width,
                           (y1 - y0) * height, fill=False, edgecolor=color, lw=1.2))


GT_LABEL = "ground-truth box"
PRED_LABEL = "box read off the map"
HEAT_LABEL = "CAM (min-max normalized)"


def overlay_legend(fig: Figure, pred_label: str | None = PRED_LABEL) -> None:
  """Figure legend of the box colours: red = ground truth, green (lime) = read off the map."""
  handles = [Rectangle((0, 0), 1, 1, fill=False, edgecolor="red", lw=1.2, label=GT_LABEL)]
  if pred_label:
    handles.append(Rectangle((0, 0), 1, 1, fill=False, edgecolor="lime", lw=1.2,
                             label=pred_label))
  fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8,
             frameon=False)


def heat_colorbar(fig: Figure, axes, label: str = HEAT_LABEL) -> None:
  """Colour bar of the heat maps (magma on [0, 1]) to the right of ``axes``."""
  mappable = ScalarMappable(norm=Normalize(0, 1), cmap="magma")
  fig.colorbar(mappable, ax=axes, label=label, shrink=0.6, aspect=30)


def overlay_figure(images, heatmaps, gt_boxes: Sequence, pred_boxes: Sequence,
                   titles: Sequence[str] | None = None, title: str = "CAM overlays", *,
                   pred_label: str | None = PRED_LABEL, heat_label: str = HEAT_LABEL) -> Figure:
  """The figure of ``write_overlays`` (not written)."""
  images, heatmaps = np.asarray(images, np.float32), np.asarray(heatmaps, np.float32)
  n = len(images)
  if not n or heatmaps.shape != images.shape[:3] or len(gt_boxes) != n or len(pred_boxes) != n:
    raise ValueError(f"write_overlays: need N > 0 images [N,H,W,C], heat maps [N,H,W] and N box "
                     f"arrays; got {images.shape}, {heatmaps.shape}, {len(gt_boxes)}, "
                     f"{len(pred_boxes)}")
  fig, axes = _grid(n, title)
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
  overlay_legend(fig, pred_label)
  heat_colorbar(fig, fig.axes, heat_label)
  return fig


def write_overlays(images, heatmaps, gt_boxes: Sequence, pred_boxes: Sequence, out_path: str,
                   titles: Sequence[str] | None = None, title: str = "CAM overlays", *,
                   pred_label: str | None = PRED_LABEL, heat_label: str = HEAT_LABEL) -> str:
  """PNG grid, one panel per example: image (gray), heat map (magma, alpha 0.5),
  ground-truth boxes (red) and predicted boxes (green), under the figure title
  ``title``, with a legend of the box colours and a colour bar. Written atomically.

  Args:
    images: [N,H,W,C] (C = 1 or 3, any range: each image is min-max scaled).
    heatmaps: [N,H,W] in [0, 1].
    gt_boxes, pred_boxes: N arrays [M,4] of normalized (x0, y0, x1, y1).
    out_path: the PNG file.
    titles: optional N panel titles.
    title: the figure title (what the maps are: method, CAM kind, split).
    pred_label: the legend entry of the green boxes; None leaves it out (no predicted boxes).
    heat_label: the colour bar's label.
  Returns:
    out_path.
  """
  fig = overlay_figure(images, heatmaps, gt_boxes, pred_boxes, titles, title,
                       pred_label=pred_label, heat_label=heat_label)
  write_png(out_path, fig)
  return out_path
