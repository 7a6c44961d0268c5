"""Report figures: titles, positives per class, means, legends, colour bars, iso-F1 labels."""

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg

from cxr_jax.evaluation import byol_report, cam_shift, dm_report, evaluator, metrics, report


def _probs_labels():
  """50 rows, 3 classes: 4, 9 and 0 positives (the last class has no curve)."""
  rng = np.random.default_rng(0)
  labels = np.zeros((50, 3), np.float32)
  labels[:4, 0] = 1
  labels[10:19, 1] = 1
  probs = np.clip(labels * 0.3 + rng.uniform(size=(50, 3)), 0, 1)
  return probs, labels


def _panel_titles(fig) -> list[str]:
  return [ax.get_title() for ax in fig.axes if ax.get_title()]


def _legend_texts(fig) -> list[str]:
  return [t.get_text() for legend in fig.legends for t in legend.get_texts()]


def _colorbar_labels(fig) -> list[str]:
  """The label of every colour bar of ``fig`` (its axes carry a ``_colorbar``)."""
  return [ax.get_ylabel() for ax in fig.axes if getattr(ax, "_colorbar", None) is not None]


def test_curve_panels_show_positives_and_the_figures_the_mean():
  probs, labels = _probs_labels()
  roc, pr = report.curve_figures(probs, labels, None, ["a", "b", "c"], "test", title="baseline")
  aurocs, aps = metrics.auroc(probs, labels), metrics.auprc(probs, labels)
  assert _panel_titles(roc) == [f"a (4 pos / 46 neg)\nAUROC {aurocs[0]:.3f}",
                                f"b (9 pos / 41 neg)\nAUROC {aurocs[1]:.3f}",
                                "c (0 pos / 50 neg)\nAUROC undefined"]
  assert _panel_titles(pr) == [f"a (4 pos / 46 neg)\nAP {aps[0]:.3f}",
                               f"b (9 pos / 41 neg)\nAP {aps[1]:.3f}",
                               "c (0 pos / 50 neg)\nAP undefined"]
  assert roc.get_suptitle() == (f"ROC (baseline, test): mean AUROC {np.mean(aurocs[:2]):.3f} "
                                f"over 2 of 3 classes")
  assert pr.get_suptitle() == (f"Precision-recall (baseline, test): mean AP "
                               f"{np.mean(aps[:2]):.3f} over 2 of 3 classes")
  assert "iso-F1 (value at the right edge)" in _legend_texts(pr)
  every = report.curve_figures(probs[:, :2], labels[:, :2], None, ["a", "b"], "val")[0]
  assert every.get_suptitle() == f"ROC (val): mean AUROC {np.mean(aurocs[:2]):.3f}"


def test_iso_f1_labels_lie_right_of_the_data_region():
  probs, labels = _probs_labels()
  _, pr = report.curve_figures(probs, labels, None, ["a", "b", "c"], "test")
  renderer = FigureCanvasAgg(pr).get_renderer()
  pr.draw(renderer)
  panels = [ax for ax in pr.axes if ax.get_title()]
  for ax in panels:
    box = ax.get_window_extent(renderer)
    labels_of_panel = [t for t in ax.texts if t.get_text()]
    assert [t.get_text() for t in labels_of_panel] == [f"{f:g}" for f in report.ISO_F1]
    for text in labels_of_panel:
      assert text.get_window_extent(renderer).x0 >= box.x1, text.get_text()


def test_write_curves_passes_the_title(tmp_path, monkeypatch):
  figures = _capture(monkeypatch, report, "curve_figures")
  probs, labels = _probs_labels()
  report.write_curves(probs, labels, None, ["a", "b", "c"], str(tmp_path), "val", title="msml")
  assert figures[0][0].get_suptitle().startswith("ROC (msml, val): mean AUROC")
  assert (tmp_path / "roc_val.png").read_bytes()[:4] == b"\x89PNG"


def _overlay_inputs(n=3, size=16):
  rng = np.random.default_rng(1)
  images = rng.uniform(size=(n, size, size, 1)).astype(np.float32)
  heatmaps = rng.uniform(size=(n, size, size)).astype(np.float32)
  gt = [np.array([[0.1, 0.1, 0.5, 0.5]])] * n
  pred = [np.array([[0.2, 0.2, 0.6, 0.6]])] * n
  return images, heatmaps, gt, pred


def test_overlay_figure_has_title_legend_and_colour_bar():
  fig = report.overlay_figure(*_overlay_inputs(), titles=["#0", "#1", "#2"],
                              title="baseline: gradcam maps, test")
  assert fig.get_suptitle() == "baseline: gradcam maps, test"
  assert _legend_texts(fig) == [report.GT_LABEL, report.PRED_LABEL]
  colours = [h.get_edgecolor()[:3] for legend in fig.legends for h in legend.legend_handles]
  assert colours == [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0)]   # red = ground truth, lime = predicted
  assert _colorbar_labels(fig) == [report.HEAT_LABEL]
  without = report.overlay_figure(*_overlay_inputs(), pred_label=None, heat_label="map c")
  assert _legend_texts(without) == [report.GT_LABEL] and _colorbar_labels(without) == ["map c"]


def test_write_overlays_title_is_not_the_file_name(tmp_path, monkeypatch):
  figures = _capture(monkeypatch, report, "overlay_figure")
  path = report.write_overlays(*_overlay_inputs(), str(tmp_path / "cam_test.png"))
  assert (tmp_path / "cam_test.png").read_bytes()[:4] == b"\x89PNG" and path.endswith("png")
  assert figures[0].get_suptitle() == "CAM overlays"


def _capture(monkeypatch, module, name: str) -> list:
  """Wraps ``module.name`` (a figure function): the list receives what each call returns."""
  out, function = [], getattr(module, name)

  def wrapped(*args, **kwargs):
    out.append(function(*args, **kwargs))
    return out[-1]

  monkeypatch.setattr(module, name, wrapped)
  return out


def test_box_localizer_overlays_name_the_map_and_threshold(tmp_path, monkeypatch):
  figures = _capture(monkeypatch, report, "overlay_figure")
  localizer = evaluator.BoxLocalizer(None, (0,), ["Atelectasis"], kind="gradcam++",
                                     threshold=0.5, mode="absolute", largest_only=False)
  images, heatmaps, gt, pred = _overlay_inputs(2)
  localizer.overlays = {"images": list(images), "heatmaps": list(heatmaps), "gt": gt,
                        "pred": pred, "titles": ["#0 Atelectasis", "#4 Atelectasis"]}
  localizer.write_overlays(str(tmp_path / "cam_test.png"), title="baseline: gradcam++ maps, test")
  localizer.write_overlays(str(tmp_path / "cam_val.png"))
  assert [f.get_suptitle() for f in figures] == ["baseline: gradcam++ maps, test", "gradcam++ maps"]
  assert _legend_texts(figures[0]) == [report.GT_LABEL,
                                       f"{report.PRED_LABEL} (threshold 0.50)"]
  assert _colorbar_labels(figures[0]) == [report.HEAT_LABEL]


def test_cam_comparison_panel_has_title_legend_and_colour_bar(tmp_path, monkeypatch):
  figures = _capture(monkeypatch, byol_report, "cam_panel_figure")
  images, heatmaps, gt, pred = _overlay_inputs(2)
  boxes = np.stack([np.concatenate([g, np.zeros((1, 4))]) for g in gt]).astype(np.float32)
  box_labels = np.array([[1, -1], [0, -1]])
  compared = {kind: {"maps": heatmaps, "pred_boxes": pred, "mean_iou": 0.25}
              for kind in ("gradcam", "scorecam")}
  byol_report.write_cam_panel(images, boxes, box_labels, compared, str(tmp_path / "p.png"),
                              titles=["#0", "#1"], title="byol_cam: CAM kinds, test",
                              threshold=127 / 255)
  fig = figures[0]
  assert fig.get_suptitle() == "byol_cam: CAM kinds, test"
  assert _legend_texts(fig) == [report.GT_LABEL, f"{report.PRED_LABEL} (threshold 0.50)"]
  assert _colorbar_labels(fig) == [report.HEAT_LABEL]
  assert _panel_titles(fig) == ["Grad-CAM\nmean IoU 0.250", "Score-CAM\nmean IoU 0.250"]


def test_vkd_overlays_are_titled_per_map_without_a_predicted_box_entry(tmp_path, monkeypatch):
  figures = _capture(monkeypatch, report, "overlay_figure")
  images, heatmaps, _, _ = _overlay_inputs(2)
  cams = {"image": images[..., 0], "annotation": heatmaps, "base": heatmaps, "prior": heatmaps,
          "index": np.array([3, 7]), "boxes": np.array([[[0.1, 0.1, 0.4, 0.4]]] * 2),
          "box_labels": np.array([[2], [-1]])}
  paths = cam_shift.write_cam_overlays(cams, str(tmp_path), "_test", what="gaze annotation, test")
  assert len(paths) == 3
  assert [f.get_suptitle() for f in figures] == [
      "VKD: annotation map c, gaze annotation, test",
      "VKD: stage-1 ('base') Grad-CAM, gaze annotation, test",
      "VKD: stage-2 ('prior') Grad-CAM, gaze annotation, test"]
  for fig in figures:
    assert _legend_texts(fig) == [report.GT_LABEL]
    assert len(_colorbar_labels(fig)) == 1
  assert _colorbar_labels(figures[0]) == ["annotation map c"]


def test_disease_mask_panel_has_a_colour_bar_and_alignment_a_title(tmp_path, monkeypatch):
  masks = _capture(monkeypatch, dm_report, "mask_panel_figure")
  aligned = _capture(monkeypatch, dm_report, "aligned_figure")
  rng = np.random.default_rng(2)
  psi = rng.uniform(size=(4, 4, 3)).astype(np.float32)
  anchor = rng.uniform(size=(16, 16, 1)).astype(np.float32)
  dm_report.write_mask_panel(str(tmp_path / "m.png"), psi, anchor, ["a", "b", "c"],
                             "disease masks (Eq. 3)")
  assert masks[0].get_suptitle() == "disease masks (Eq. 3)"
  assert _colorbar_labels(masks[0]) == [dm_report.MASK_LABEL]
  images = rng.uniform(size=(2, 16, 16, 1)).astype(np.float32)
  dm_report.write_aligned_examples(str(tmp_path / "a.png"), images, images, anchor,
                                   title="disease_masks: alignment, val")
  assert aligned[0].get_suptitle() == "disease_masks: alignment, val"

