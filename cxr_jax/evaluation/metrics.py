"""Multi-label classification metrics: AUROC, AUPRC, F1, W-AUC, D-AUC, N-AUC.

All functions take numpy arrays

  probs   [N, K]  predicted probabilities (any monotone score works)
  labels  [N, K]  in {0, 1}
  mask    [N, K]  in {0, 1}, 0 = label unknown (row ignored for that class);
                  ``None`` = every label known

and return per-class numpy arrays [K] or python floats.

Undefined values. A class whose unmasked rows hold no positive or no negative
label has no ROC curve: its AUROC is NaN. AUPRC (average precision) and F1 are
NaN for a class with no positive label (recall is 0/0). Means over classes
skip NaN classes; ``classification_report`` lists the skipped classes and
writes NaN as ``None`` (JSON null).

W-AUC, D-AUC and N-AUC follow Ge et al. 2018 (Sec. 3, "Evaluation Metrics"),
which names them without formulas; the definitions taken here are in each
docstring.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from sklearn import metrics as skm

NO_FINDING = "No Finding"   # a label-space class that is not a disease (D-AUC, N-AUC)
DEFAULT_THRESHOLD = 0.5     # F1 threshold of a class with none chosen (no val positive)


def check_inputs(probs, labels, mask) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Validates shapes and values; returns float64 probs, bool labels, bool mask."""
  probs = np.asarray(probs, np.float64)
  labels = np.asarray(labels)
  mask = np.ones(labels.shape, bool) if mask is None else np.asarray(mask)
  if probs.ndim != 2 or probs.shape != labels.shape or probs.shape != mask.shape:
    raise ValueError(f"probs {probs.shape}, labels {labels.shape} and mask {mask.shape} "
                     "must all be [N, K]")
  for name, a in (("labels", labels), ("mask", mask)):
    if not np.isin(a, (0, 1)).all():
      raise ValueError(f"{name} must be 0/1; found values {np.unique(a)[:8].tolist()}")
  if not np.isfinite(probs).all():
    rows = np.unique(np.nonzero(~np.isfinite(probs))[0])
    raise ValueError(f"probs has NaN/inf in rows {rows[:8].tolist()}")
  return probs, labels.astype(bool), mask.astype(bool)


def _per_class(score: Callable[[np.ndarray, np.ndarray], float], probs, labels,
               mask) -> np.ndarray:
  """[K]: ``score(y, p)`` over each class's unmasked rows (y bool, p float64)."""
  probs, labels, mask = check_inputs(probs, labels, mask)
  return np.array([score(labels[mask[:, k], k], probs[mask[:, k], k])
                   for k in range(probs.shape[1])], np.float64)


def _auroc_or_nan(y: np.ndarray, p: np.ndarray) -> float:
  return float(skm.roc_auc_score(y, p)) if 0 < y.sum() < y.size else np.nan


def _ap_or_nan(y: np.ndarray, p: np.ndarray) -> float:
  return float(skm.average_precision_score(y, p)) if y.any() else np.nan


def _best_f1_threshold_or_nan(y: np.ndarray, p: np.ndarray) -> float:
  """The score t maximizing F1 of the rule ``p >= t``; the highest such t on ties."""
  if not y.any():
    return np.nan
  order = np.argsort(-p, kind="stable")
  p, y = p[order], y[order]
  last_of_tie = np.r_[p[1:] != p[:-1], True]    # predicting >= p[i] takes rows 0..i
  tp = np.cumsum(y)[last_of_tie]
  predicted = np.arange(1, p.size + 1)[last_of_tie]
  f1_at = 2 * tp / (predicted + y.sum())        # 2TP / (2TP + FP + FN)
  return float(p[last_of_tie][np.argmax(f1_at)])


def auroc(probs, labels, mask=None) -> np.ndarray:
  """[K] area under the ROC curve per class (sklearn ``roc_auc_score``, ties count 1/2).

  NaN for a class with no positive or no negative among its unmasked rows.
  """
  return _per_class(_auroc_or_nan, probs, labels, mask)


def auprc(probs, labels, mask=None) -> np.ndarray:
  """[K] average precision per class (sklearn ``average_precision_score``).

  AP = sum_n (R_n - R_{n-1}) P_n over the distinct thresholds. NaN for a class
  with no positive among its unmasked rows.
  """
  return _per_class(_ap_or_nan, probs, labels, mask)


def best_f1_thresholds(probs, labels, mask=None) -> np.ndarray:
  """[K] per class, the threshold t maximizing F1 of ``probs >= t`` on these rows.

  Candidates are the distinct unmasked scores of the class (every distinct
  F1 value is reached at one of them); on ties the highest t wins. Chosen on the
  validation split and applied unchanged to test. NaN for a class with no
  positive (F1 is 0/0 or 0 for every t).
  """
  return _per_class(_best_f1_threshold_or_nan, probs, labels, mask)


def f1(probs, labels, mask=None, thresholds=None) -> np.ndarray:
  """[K] F1 = 2TP / (2TP + FP + FN) per class with predictions ``probs >= thresholds``.

  thresholds: [K]. NaN for a class with no positive among its unmasked rows
  or with a NaN threshold.
  """
  probs, labels, mask = check_inputs(probs, labels, mask)
  thresholds = np.asarray(thresholds, np.float64)
  if thresholds.shape != (probs.shape[1],):
    raise ValueError(f"thresholds has shape {thresholds.shape}; expected ({probs.shape[1]},)")
  pred = probs >= thresholds
  tp = (pred & labels & mask).sum(0)
  fp = (pred & ~labels & mask).sum(0)
  fn = (~pred & labels & mask).sum(0)
  defined = ((labels & mask).sum(0) > 0) & np.isfinite(thresholds)
  return np.where(defined, 2 * tp / np.maximum(2 * tp + fp + fn, 1), np.nan)


def prevalence(labels, mask=None) -> np.ndarray:
  """[K] fraction of unmasked rows that are positive, per class (NaN if none unmasked)."""
  labels = np.asarray(labels, bool)
  mask = np.ones(labels.shape, bool) if mask is None else np.asarray(mask, bool)
  known = mask.sum(0)
  return np.where(known > 0, (labels & mask).sum(0) / np.maximum(known, 1), np.nan)


def w_auc(probs, labels, mask=None, normalize: bool = False) -> float:
  """Weighted AUC (Ge 2018): sum_c w_c AUC_c with w_c = the prevalence of class c.

  w_c = (positive rows of c) / (unmasked rows of c) in the evaluated set; classes
  with NaN AUROC are left out of the sum. Ge 2018's Table 1 (W-AUC ~0.58 for a
  mean AUC ~0.82 on NIH, whose prevalences sum to ~0.72) shows the weights are
  NOT renormalized: the value is on the scale sum_c w_c, not [0, 1]. With
  ``normalize=True`` it is the weighted mean sum_c w_c AUC_c / sum_c w_c instead.
  """
  aucs, weights = auroc(probs, labels, mask), prevalence(labels, mask)
  defined = np.isfinite(aucs)
  total = float(np.sum(weights[defined] * aucs[defined]))
  if not normalize:
    return total
  weight_sum = float(np.sum(weights[defined]))
  return total / weight_sum if weight_sum > 0 else float("nan")


def _disease_columns(num_classes: int, disease: Sequence[int] | None) -> np.ndarray:
  return np.arange(num_classes) if disease is None else np.asarray(disease, np.int64)


def _mean_auc_over_rows(probs, labels, rows_of_class: Callable[[int], np.ndarray],
                        columns: np.ndarray) -> float:
  aucs = [_auroc_or_nan(labels[rows_of_class(c), c], probs[rows_of_class(c), c]) for c in columns]
  return float(np.nanmean(aucs)) if np.isfinite(aucs).any() else float("nan")


def d_auc(probs, labels, mask=None, disease: Sequence[int] | None = None) -> float:
  """Disease-vs-disease AUC (Ge 2018): AUROC restricted to images with a finding.

  Diseased images: rows with at least one observed positive (labels * mask = 1)
  among the ``disease`` columns (default: all; pass the indices without a
  "No Finding" class where the label space has one). For each disease class c,
  the AUROC of probs[:, c] over the diseased rows with c unmasked: positives
  have c, negatives have some other finding but not c. D-AUC is the mean over
  disease classes with a defined AUROC (NaN if none).
  """
  probs, labels, mask = check_inputs(probs, labels, mask)
  columns = _disease_columns(probs.shape[1], disease)
  diseased = (labels[:, columns] & mask[:, columns]).any(1)
  return _mean_auc_over_rows(probs, labels, lambda c: diseased & mask[:, c], columns)


def n_auc(probs, labels, mask=None, disease: Sequence[int] | None = None) -> float:
  """Disease-vs-no-finding AUC (Ge 2018): each disease against normal images only.

  Normal ("No Finding") images: rows whose ``disease`` columns are all observed
  (mask 1) and all negative. For each disease class c, the AUROC of
  probs[:, c] over the rows positive for c (unmasked) together with the normal
  rows; images with other findings but not c are left out. N-AUC is the mean
  over disease classes with a defined AUROC (NaN if none).
  """
  probs, labels, mask = check_inputs(probs, labels, mask)
  columns = _disease_columns(probs.shape[1], disease)
  normal = (mask[:, columns] & ~labels[:, columns]).all(1)
  return _mean_auc_over_rows(probs, labels, lambda c: normal | (labels[:, c] & mask[:, c]),
                             columns)


def _summary(values: np.ndarray, class_names: Sequence[str]) -> dict:
  """{'mean', 'per_class', 'excluded'}: NaN -> None, mean over the defined classes."""
  defined = np.isfinite(values)
  return {
      "mean": float(values[defined].mean()) if defined.any() else None,
      "per_class": {n: (float(v) if d else None) for n, v, d in zip(class_names, values, defined)},
      "excluded": [n for n, d in zip(class_names, defined) if not d],
  }


def _json_float(x: float) -> float | None:
  return float(x) if np.isfinite(x) else None


def classification_report(probs, labels, mask, class_names: Sequence[str], thresholds=None,
                          threshold_source: str | None = None) -> dict:
  """Every classification metric as a JSON-ready dict (NaN written as None).

  {'auroc' | 'auprc' | 'f1': {'mean', 'per_class': {name: float|None},
                              'excluded': [names with an undefined value]},
   'f1' also: 'thresholds' {name: float}, 'threshold_source', 'default_threshold_classes',
   'w_auc', 'w_auc_normalized', 'd_auc', 'n_auc', 'prevalence': {name: float|None},
   'num_positives': {name: int}}

  thresholds: [K] F1 thresholds chosen elsewhere (the validation split), or
    None to choose them on these rows (``threshold_source`` says which). A class
    whose chosen threshold is undefined (no positive where it was chosen) uses
    DEFAULT_THRESHOLD = 0.5 and is listed in 'default_threshold_classes'.
  A class named "No Finding" is not a disease for D-AUC / N-AUC.
  """
  probs, labels, mask = check_inputs(probs, labels, mask)
  class_names = list(class_names)
  if len(class_names) != probs.shape[1]:
    raise ValueError(f"{len(class_names)} class names for {probs.shape[1]} classes")
  if thresholds is None:
    thresholds, threshold_source = best_f1_thresholds(probs, labels, mask), threshold_source or "self"
  thresholds = np.asarray(thresholds, np.float64)
  undefined = ~np.isfinite(thresholds)
  thresholds = np.where(undefined, DEFAULT_THRESHOLD, thresholds)
  disease = [i for i, n in enumerate(class_names) if n != NO_FINDING]
  f1_summary = _summary(f1(probs, labels, mask, thresholds), class_names)
  f1_summary.update(
      thresholds={n: float(t) for n, t in zip(class_names, thresholds)},
      threshold_source=threshold_source or "given",
      default_threshold_classes=[n for n, u in zip(class_names, undefined) if u])
  return {
      "auroc": _summary(auroc(probs, labels, mask), class_names),
      "auprc": _summary(auprc(probs, labels, mask), class_names),
      "f1": f1_summary,
      "w_auc": _json_float(w_auc(probs, labels, mask)),
      "w_auc_normalized": _json_float(w_auc(probs, labels, mask, normalize=True)),
      "d_auc": _json_float(d_auc(probs, labels, mask, disease)),
      "n_auc": _json_float(n_auc(probs, labels, mask, disease)),
      "prevalence": {n: _json_float(v) for n, v in zip(class_names, prevalence(labels, mask))},
      "num_positives": {n: int(v) for n, v in zip(class_names, (labels & mask).sum(0))},
  }
