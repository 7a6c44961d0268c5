"""Localization metrics: heat maps -> regions / boxes -> IoU, IoR, accuracy at T.

Host-side numpy (and OpenCV for connected components). Boxes are normalized
(x0, y0, x1, y1) as in ``cxr_jax.data.schema``; they become pixel masks with
the pixel-centre rule of ``cxr_jax.data.annotations.boxes_to_mask``, and a
box read off pixel columns x..x+w-1 is (x / W, ..., (x + w) / W), so it
rasterizes back to exactly those pixels.

Protocols:
- Rozenberg 2020, Table 1 (``patch_accuracy``): on a P x P patch grid, a patch
  is positive if z >= 0.5; detected region = union of positive patches; IoU
  and IoR against the ground-truth patches of the class; correct if >= T.
- Kim 2022, Table 1 / Wang 2017 (``box_accuracy``): binarize the heat map,
  boxes around connected regions, correct if IoU > T, T in {0.3, 0.5, 0.7}.
  Talasila 2023 draws boxes the same way (threshold 127 of the [0, 255]
  normalized Grad-CAM, contours -> bounding rectangles).
- van Sonsbeek 2023, Eq. 5 (``delta_s``).

Accuracies are per class (over the (image, class) units or boxes that have a
ground truth) and their unweighted mean over the classes that occur; tables
are JSON-ready dicts keyed by the threshold written as a string.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from cxr_jax.data import annotations

MODES = ("absolute", "fraction_of_max")
METRICS = ("mse", "dice")


def binarize(heatmap: np.ndarray, threshold: float, mode: str = "absolute") -> np.ndarray:
  """Heat map [H,W] -> bool [H,W].

  absolute: heatmap >= threshold (e.g. 127/255 on a [0,1]-normalized map, Talasila 2023).
  fraction_of_max: heatmap >= threshold * max(heatmap); a map whose max is <= 0 gives
    an empty mask (nothing is activated).
  """
  heatmap = np.asarray(heatmap)
  if heatmap.ndim != 2:
    raise ValueError(f"heatmap must be [H,W], got shape {heatmap.shape}")
  if mode == "absolute":
    return heatmap >= threshold
  if mode == "fraction_of_max":
    peak = heatmap.max()
    if peak <= 0:
      return np.zeros(heatmap.shape, bool)
    return heatmap >= threshold * peak
  raise ValueError(f"unknown binarize mode {mode!r}; known: {list(MODES)}")


def mask_to_boxes(mask: np.ndarray, largest_only: bool = False) -> np.ndarray:
  """Bounding rectangles of the 8-connected components of ``mask`` [H,W].

  Returns float32 [M,4] normalized (x0, y0, x1, y1), largest component
  (by pixel count) first; M = 0 for an empty mask, M <= 1 with ``largest_only``.
  """
  mask = np.asarray(mask, bool)
  height, width = mask.shape
  _, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
  stats = stats[1:]  # row 0 is the background
  stats = stats[np.argsort(-stats[:, cv2.CC_STAT_AREA], kind="stable")]
  if largest_only:
    stats = stats[:1]
  x, y = stats[:, cv2.CC_STAT_LEFT], stats[:, cv2.CC_STAT_TOP]
  w, h = stats[:, cv2.CC_STAT_WIDTH], stats[:, cv2.CC_STAT_HEIGHT]
  return np.stack([x / width, y / height, (x + w) / width, (y + h) / height],
                  axis=-1).astype(np.float32).reshape(-1, 4)


def heatmap_to_boxes(heatmap: np.ndarray, threshold: float, mode: str = "absolute",
                     largest_only: bool = False) -> np.ndarray:
  """``binarize`` then ``mask_to_boxes``: [H,W] -> [M,4] normalized boxes, largest first.

  Talasila 2023: threshold 127/255 (absolute) of the min-max normalized map;
  its contours -> bounding rectangles equal the components' rectangles here.
  """
  return mask_to_boxes(binarize(heatmap, threshold, mode), largest_only)


def box_masks(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
  """Each normalized box [M,4] as its own pixel mask, bool [M,H,W] (pixel-centre rule)."""
  boxes = np.asarray(boxes, np.float32).reshape(-1, 1, 4)
  return annotations.boxes_to_mask(boxes, np.zeros(boxes.shape[:2], np.int64),
                                   height, width) > 0


def iou(a_mask: np.ndarray, b_mask: np.ndarray) -> np.ndarray:
  """|A ∩ B| / |A ∪ B| over the last two axes (0 when both are empty)."""
  a_mask, b_mask = np.asarray(a_mask, bool), np.asarray(b_mask, bool)
  inter = np.sum(a_mask & b_mask, axis=(-2, -1))
  union = np.sum(a_mask | b_mask, axis=(-2, -1))
  return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def ior(detected_mask: np.ndarray, gt_mask: np.ndarray) -> np.ndarray:
  """IoR (Rozenberg 2020): |D ∩ G| / |D|, intersection over the detected region (0 if D is empty)."""
  detected_mask, gt_mask = np.asarray(detected_mask, bool), np.asarray(gt_mask, bool)
  inter = np.sum(detected_mask & gt_mask, axis=(-2, -1))
  area = np.sum(detected_mask, axis=(-2, -1))
  return np.where(area > 0, inter / np.maximum(area, 1), 0.0)


def accuracy_table(class_index: np.ndarray, scores: np.ndarray, thresholds: Sequence[float],
                   class_names: Sequence[str], strict: bool) -> dict:
  """Fraction of units with score >= T (``strict``: > T), per class and mean.

  Args:
    class_index: int [U], each unit's class (index into ``class_names``).
    scores: float [U] (IoU or IoR).
    thresholds: the T values.
    class_names: names of the class indices.
    strict: '>' (Kim 2022 / Wang 2017) instead of '>=' (Rozenberg 2020).
  Returns:
    {str(T): {class name: accuracy, ..., 'mean': unweighted mean over the
    classes present}}; classes without units are absent; an empty table for U = 0.
  """
  class_index, scores = np.asarray(class_index, np.int64), np.asarray(scores, np.float64)
  present = np.unique(class_index)
  table = {}
  for t in thresholds:
    correct = scores > t if strict else scores >= t
    row = {class_names[k]: float(np.mean(correct[class_index == k])) for k in present}
    if row:
      row["mean"] = float(np.mean(list(row.values())))
    table[str(t)] = row
  return table if len(present) else {}


def counts(class_index: np.ndarray, class_names: Sequence[str]) -> dict[str, int]:
  """Units per class name, for the classes that occur."""
  present, n = np.unique(np.asarray(class_index, np.int64), return_counts=True)
  return {class_names[k]: int(c) for k, c in zip(present, n)}


def accuracy_metrics(tables: dict, count: dict[str, int]) -> dict:
  """Accuracy tables in the eval JSON's metric form.

  tables: {'iou': accuracy_table, 'ior': accuracy_table}; count: units per class.
  Returns {'iou@T': {'mean', 'per_class': {class: accuracy}, 'n': {class: units}}, ...,
  'ior@T': ...}, one entry per threshold T of the tables (none for an empty table).
  """
  out = {}
  for kind, table in tables.items():
    for t, row in table.items():
      per_class = {k: v for k, v in row.items() if k != "mean"}
      out[f"{kind}@{t}"] = {"mean": row.get("mean"), "per_class": per_class,
                            "n": {k: int(count[k]) for k in per_class}}
  return out


def patch_scores(z: np.ndarray, gt_grid: np.ndarray, z_threshold: float = 0.5
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Rozenberg 2020 (Table 1) units: every (image, class) with >= 1 ground-truth patch.

  Detected region D = {patches with z >= z_threshold}; G = ground-truth patches.

  Args:
    z: [N,P,P,K] (or [P,P,K]) patch probabilities.
    gt_grid: same shape, {0,1} (``annotations.boxes_to_patch_grid``).
  Returns:
    (class_index [U], iou [U], ior [U]), units ordered by image then class.
  """
  z, gt = np.asarray(z), np.asarray(gt_grid) > 0
  if z.shape != gt.shape or z.ndim not in (3, 4):
    raise ValueError(f"z and gt_grid must both be [N,P,P,K] or [P,P,K]; got {z.shape}, "
                     f"{gt.shape}")
  if z.ndim == 3:
    z, gt = z[None], gt[None]
  detected = np.moveaxis(z >= z_threshold, -1, 1)  # [N,K,P,P]
  gt = np.moveaxis(gt, -1, 1)
  image, cls = np.nonzero(gt.any(axis=(-2, -1)))
  d, g = detected[image, cls], gt[image, cls]
  return cls, iou(d, g), ior(d, g)


def patch_accuracy(z: np.ndarray, gt_grid: np.ndarray, classes: Sequence[str],
                   thresholds: Sequence[float] = (0.1, 0.3, 0.5, 0.7),
                   z_threshold: float = 0.5) -> dict:
  """Rozenberg 2020 Table 1: IoU and IoR accuracy (correct if >= T) on the patch grid.

  Args:
    z: [N,P,P,K] patch probabilities; gt_grid: [N,P,P,K] ground-truth patches.
    classes: names of the K channels.
  Returns:
    {'iou': accuracy_table, 'ior': accuracy_table, 'count': units per class}.
  """
  cls, ious, iors = patch_scores(z, gt_grid, z_threshold)
  return {"iou": accuracy_table(cls, ious, thresholds, classes, strict=False),
          "ior": accuracy_table(cls, iors, thresholds, classes, strict=False),
          "count": counts(cls, classes)}


def box_scores(heatmaps: np.ndarray, boxes: np.ndarray, box_labels: np.ndarray,
               threshold: float, mode: str = "absolute", largest_only: bool = False,
               channel_classes: Sequence[int] | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Kim 2022 / Wang 2017 units: every ground-truth box, scored against the predicted boxes.

  The heat map of the box's class is binarized (``binarize``), each 8-connected
  component gives a predicted box (only the largest with ``largest_only``).
  A ground-truth box scores the best IoU over the predicted boxes of its
  image and class (each GT box is matched on its own, so one predicted box
  may serve two GT boxes), and the IoR of that same predicted box; 0 when
  nothing is predicted. Both boxes are compared as pixel masks at the heat
  map's resolution.

  Args:
    heatmaps: [N,C,H,W] (e.g. normalized CAMs at image size).
    boxes: [N,B,4] normalized; box_labels: int [N,B], -1 = padding.
    threshold, mode: see ``binarize``.
    largest_only: one predicted box per map (the largest component).
    channel_classes: class index of each of the C channels (default 0..C-1);
      boxes of classes without a channel are skipped.
  Returns:
    (class_index [U], iou [U], ior [U]) over the GT boxes, in order.
  """
  heatmaps = np.asarray(heatmaps)
  if heatmaps.ndim != 4:
    raise ValueError(f"heatmaps must be [N,C,H,W], got shape {heatmaps.shape}")
  n, c, height, width = heatmaps.shape
  boxes, box_labels = np.asarray(boxes, np.float32), np.asarray(box_labels, np.int64)
  if boxes.shape[:1] != (n,) or boxes.shape[:2] != box_labels.shape:
    raise ValueError(f"boxes [N,B,4] and box_labels [N,B] must match heatmaps' N={n}; got "
                     f"{boxes.shape}, {box_labels.shape}")
  channel_of = {int(k): i for i, k in enumerate(range(c) if channel_classes is None
                                                else channel_classes)}
  out_cls, out_iou, out_ior = [], [], []
  for i, j in zip(*np.nonzero(box_labels >= 0)):
    label = int(box_labels[i, j])
    if label not in channel_of:
      continue
    predicted = box_masks(heatmap_to_boxes(heatmaps[i, channel_of[label]], threshold, mode,
                                           largest_only), height, width)
    gt = box_masks(boxes[i, j], height, width)[0]
    ious = iou(predicted, gt)
    best = int(np.argmax(ious)) if len(ious) else -1
    out_cls.append(label)
    out_iou.append(float(ious[best]) if best >= 0 else 0.0)
    out_ior.append(float(ior(predicted[best], gt)) if best >= 0 else 0.0)
  return (np.asarray(out_cls, np.int64), np.asarray(out_iou, np.float64),
          np.asarray(out_ior, np.float64))


def box_accuracy(heatmaps: np.ndarray, boxes: np.ndarray, box_labels: np.ndarray,
                 classes: Sequence[str], thresholds: Sequence[float] = (0.3, 0.5, 0.7),
                 threshold: float = 127 / 255, mode: str = "absolute",
                 largest_only: bool = False) -> dict:
  """Kim 2022 Table 1 (after Wang 2017): accuracy = fraction of GT boxes with IoU > T.

  Args:
    heatmaps: [N,K,H,W], one map per class of ``classes``.
    boxes, box_labels, threshold, mode, largest_only: see ``box_scores``.
    classes: names of the K classes.
  Returns:
    {'iou': accuracy_table, 'ior': accuracy_table, 'count': GT boxes per class}.
  """
  cls, ious, iors = box_scores(heatmaps, boxes, box_labels, threshold, mode, largest_only)
  return {"iou": accuracy_table(cls, ious, thresholds, classes, strict=True),
          "ior": accuracy_table(cls, iors, thresholds, classes, strict=True),
          "count": counts(cls, classes)}


def resize_normalized(maps: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """[..., h, w] -> [..., H, W]: bilinear (OpenCV INTER_LINEAR, half-pixel centres,
  as ``cam.upsample``), then per-map min-max to [0, 1]."""
  maps = np.asarray(maps, np.float32)
  flat = maps.reshape((-1,) + maps.shape[-2:])
  height, width = int(size[0]), int(size[1])
  out = np.stack([cv2.resize(m, (width, height), interpolation=cv2.INTER_LINEAR) for m in flat])
  out = out - out.min(axis=(-2, -1), keepdims=True)
  out = out / (out.max(axis=(-2, -1), keepdims=True) + 1e-7)
  return out.reshape(maps.shape[:-2] + (height, width))


def per_image_similarity(annotation: np.ndarray, heatmap: np.ndarray, metric: str) -> np.ndarray:
  """S(c, CAM) of each image, float64 [N], from [N,H,W] (or [H,W]) maps in [0, 1].

  mse: mean (c - CAM)^2 (lower = closer). dice: soft Dice 2 sum(c CAM) / (sum c + sum CAM)
  (higher = closer; 0 when both maps are empty).
  """
  c = np.asarray(annotation, np.float64)
  m = np.asarray(heatmap, np.float64)
  if c.shape != m.shape:
    raise ValueError(f"annotation {c.shape} and heat map {m.shape} must have the same shape")
  c, m = c.reshape((-1,) + c.shape[-2:]), m.reshape((-1,) + m.shape[-2:])
  if metric == "mse":
    return np.mean((c - m) ** 2, axis=(1, 2))
  if metric == "dice":
    total = c.sum(axis=(1, 2)) + m.sum(axis=(1, 2))
    return np.where(total > 0, 2 * (c * m).sum(axis=(1, 2)) / np.maximum(total, 1e-12), 0.0)
  raise ValueError(f"unknown similarity metric {metric!r}; known: {list(METRICS)}")


def similarity(annotation: np.ndarray, heatmap: np.ndarray, metric: str) -> float:
  """Mean over images of ``per_image_similarity``."""
  return float(np.mean(per_image_similarity(annotation, heatmap, metric)))


def delta_s(cam_base: np.ndarray, cam_sub: np.ndarray, annotation: np.ndarray,
            metric: str = "mse") -> float:
  """van Sonsbeek 2023 Eq. 5, as the percentage change its Table 2 prints (+14 = 14% better).

  Eq. 5 is Delta S = S(c, CAM_base) / S(c, CAM_sub) * 100, CAM_base after
  stage 1, CAM_sub after stage 2, c the annotation map. Sign convention here:
  the result is positive when the stage-2 CAMs agree better with c, so
    mse  (a distance):   S_base / S_sub * 100 - 100   (Eq. 5 as printed, minus 100);
    dice (a similarity): S_sub / S_base * 100 - 100   (the ratio inverted, so that
                          an improvement is positive for both metrics).
  S is averaged over the images first (``similarity``). The ratio is undefined
  when its denominator is 0 (CAMs equal to the annotation under MSE, or with no
  overlap at all under Dice): that raises a ValueError naming the case.

  Args:
    cam_base, cam_sub, annotation: [N,H,W] (or [H,W]) maps in [0, 1], same size.
    metric: 'mse' or 'dice'.
  """
  base = similarity(annotation, cam_base, metric)
  sub = similarity(annotation, cam_sub, metric)
  return float(_percent_change(np.float64(base), np.float64(sub), metric))


def _percent_change(base: np.ndarray, sub: np.ndarray, metric: str) -> np.ndarray:
  """Eq. 5 in ``delta_s``'s sign convention from mean S of each stage (arrays of any shape)."""
  numerator, denominator = (base, sub) if metric == "mse" else (sub, base)
  if np.any(denominator == 0):
    which = "stage-2" if metric == "mse" else "stage-1"
    raise ValueError(f"delta_s({metric}): S of the {which} CAMs is 0, so Eq. 5's ratio is undefined")
  return numerator / denominator * 100 - 100


def delta_s_interval(cam_base: np.ndarray, cam_sub: np.ndarray, annotation: np.ndarray,
                     metric: str = "mse", confidence: float = 0.95, num_resamples: int = 2000,
                     seed: int = 0) -> tuple[float, float]:
  """Paired percentile-bootstrap interval of ``delta_s``: images resampled with replacement,
  the same draw for both stages, Eq. 5 recomputed from each resample's mean S.

  Args: as ``delta_s``; ``confidence`` in (0, 1); ``num_resamples`` draws from ``seed``.
  Returns: (low, high) percentage points.
  """
  base = per_image_similarity(annotation, cam_base, metric)
  sub = per_image_similarity(annotation, cam_sub, metric)
  draws = np.random.default_rng(seed).integers(0, len(base), size=(num_resamples, len(base)))
  deltas = _percent_change(base[draws].mean(axis=1), sub[draws].mean(axis=1), metric)
  tail = (1 - confidence) / 2 * 100
  low, high = np.percentile(deltas, [tail, 100 - tail])
  return float(low), float(high)
