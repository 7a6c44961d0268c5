"""Metrics against scikit-learn and direct numpy constructions of Ge 2018's subsets."""

import json

import numpy as np
import pytest
from sklearn import metrics as skm

from cxr_jax.evaluation import metrics

K = 6


def _data(seed=0, n=300, quantize=False):
  """probs correlated with labels, ~20% masked labels; class 4 has no positive,
  class 5 no negative among its unmasked rows."""
  rng = np.random.default_rng(seed)
  labels = (rng.random((n, K)) < rng.uniform(0.1, 0.5, K)).astype(np.float32)
  probs = 1 / (1 + np.exp(-(1.5 * labels - 0.7 + rng.normal(size=(n, K)))))
  if quantize:  # many ties
    probs = np.round(probs * 10) / 10
  mask = (rng.random((n, K)) > 0.2).astype(np.float32)
  labels[:, 4] = 0
  labels[mask[:, 5] == 1, 5] = 1
  return probs.astype(np.float32), labels, mask


def _sk_per_class(fn, probs, labels, mask, k):
  m = mask[:, k] == 1
  return fn(labels[m, k], probs[m, k])


@pytest.mark.parametrize("quantize", [False, True])
def test_auroc_auprc_match_sklearn_per_class(quantize):
  probs, labels, mask = _data(quantize=quantize)
  roc, ap = metrics.auroc(probs, labels, mask), metrics.auprc(probs, labels, mask)
  for k in range(4):
    assert roc[k] == pytest.approx(_sk_per_class(skm.roc_auc_score, probs, labels, mask, k), abs=1e-12)
    assert ap[k] == pytest.approx(
        _sk_per_class(skm.average_precision_score, probs, labels, mask, k), abs=1e-12)
  assert np.isnan(roc[4]) and np.isnan(roc[5])   # no positive / no negative
  assert np.isnan(ap[4])                         # no positive
  assert ap[5] == pytest.approx(1.0)             # all positive: precision 1 everywhere
  # The mask matters: ignoring it changes the values.
  assert not np.allclose(roc[:4], metrics.auroc(probs, labels, None)[:4])


def test_auroc_without_mask_is_sklearn_on_all_rows():
  probs, labels, _ = _data(seed=3)
  roc = metrics.auroc(probs[:, :4], labels[:, :4])
  np.testing.assert_allclose(roc, [skm.roc_auc_score(labels[:, k], probs[:, k]) for k in range(4)])


@pytest.mark.parametrize("quantize", [False, True])
def test_best_f1_thresholds_maximize_f1_by_brute_force(quantize):
  probs, labels, mask = _data(seed=1, quantize=quantize)
  thresholds = metrics.best_f1_thresholds(probs, labels, mask)
  for k in range(4):
    m = mask[:, k] == 1
    y, p = labels[m, k], probs[m, k].astype(np.float64)
    candidates = np.r_[np.unique(p), p.max() + 1.0]
    tp = np.array([np.sum((p >= t) & (y == 1)) for t in candidates])
    predicted = np.array([np.sum(p >= t) for t in candidates])
    f1s = 2 * tp / (predicted + y.sum())  # 2TP / (2TP + FP + FN)
    best = f1s.max()
    assert skm.f1_score(y, p >= thresholds[k]) == pytest.approx(best, abs=1e-12)
    assert thresholds[k] == candidates[np.flatnonzero(np.isclose(f1s, best, atol=1e-12))].max()
  assert np.isnan(thresholds[4])


def test_best_f1_threshold_can_be_the_lowest_score():
  """Mostly positive, uninformative scores: predicting every row positive is best."""
  y = np.array([[1], [1], [1], [0], [1]], np.float32)
  p = np.array([[0.1], [0.2], [0.3], [0.4], [0.5]], np.float32)
  t = metrics.best_f1_thresholds(p, y)[0]
  assert t == pytest.approx(0.1)
  assert metrics.f1(p, y, None, [t])[0] == pytest.approx(skm.f1_score(y[:, 0], p[:, 0] >= 0.0))


def test_f1_matches_sklearn_at_given_thresholds():
  probs, labels, mask = _data(seed=2)
  thresholds = np.random.default_rng(0).uniform(0.2, 0.8, K)
  out = metrics.f1(probs, labels, mask, thresholds)
  for k in (0, 1, 2, 3, 5):
    m = mask[:, k] == 1
    assert out[k] == pytest.approx(skm.f1_score(labels[m, k], probs[m, k] >= thresholds[k]))
  assert np.isnan(out[4])
  with pytest.raises(ValueError, match="thresholds"):
    metrics.f1(probs, labels, mask, thresholds[:3])


def _auc_or_nan(y, p):
  return skm.roc_auc_score(y, p) if 0 < y.sum() < len(y) else np.nan


def test_w_auc_is_prevalence_weighted_sum():
  probs, labels, mask = _data(seed=4)
  weights, weighted, weight_sum = [], 0.0, 0.0
  for k in range(K):
    rows = [i for i in range(len(labels)) if mask[i, k] == 1]
    prevalence = sum(labels[i, k] for i in rows) / len(rows)
    weights.append(prevalence)
    auc = _auc_or_nan(labels[rows, k], probs[rows, k])
    if not np.isnan(auc):
      weighted += prevalence * auc
      weight_sum += prevalence
  np.testing.assert_allclose(metrics.prevalence(labels, mask), weights)
  assert metrics.w_auc(probs, labels, mask) == pytest.approx(weighted)
  assert metrics.w_auc(probs, labels, mask, normalize=True) == pytest.approx(weighted / weight_sum)


def _data_with_normal_rows(seed):
  probs, labels, mask = _data(seed=seed, n=400)
  mask[::3] = 1  # fully observed rows ...
  labels[::7] = 0  # ... some of them normal
  mask[::7] = 1
  return probs, labels, mask


def _reference_d_n_auc(probs, labels, mask, disease):
  n = len(labels)
  diseased = [any(labels[i, c] == 1 and mask[i, c] == 1 for c in disease) for i in range(n)]
  normal = [all(mask[i, c] == 1 and labels[i, c] == 0 for c in disease) for i in range(n)]
  d, nn = [], []
  for c in disease:
    d_rows = [i for i in range(n) if diseased[i] and mask[i, c] == 1]
    n_rows = [i for i in range(n) if normal[i] or (labels[i, c] == 1 and mask[i, c] == 1)]
    d.append(_auc_or_nan(labels[d_rows, c], probs[d_rows, c]))
    nn.append(_auc_or_nan(labels[n_rows, c], probs[n_rows, c]))
  return np.nanmean(d), np.nanmean(nn)


@pytest.mark.parametrize("disease", [None, [0, 1, 3, 5]])
def test_d_auc_n_auc_match_direct_construction(disease):
  probs, labels, mask = _data_with_normal_rows(seed=5)
  columns = list(range(K)) if disease is None else disease
  ref_d, ref_n = _reference_d_n_auc(probs, labels, mask, columns)
  assert metrics.d_auc(probs, labels, mask, disease) == pytest.approx(ref_d, abs=1e-12)
  assert metrics.n_auc(probs, labels, mask, disease) == pytest.approx(ref_n, abs=1e-12)


def test_d_auc_and_n_auc_separate_two_kinds_of_skill():
  """A model that knows normal from abnormal but not which disease: N-AUC ~1, D-AUC ~0.5."""
  rng = np.random.default_rng(6)
  n = 2000
  labels = (rng.random((n, 4)) < 0.3).astype(np.float32)
  abnormal = labels.any(1, keepdims=True)
  probs = np.where(abnormal, 0.6 + 0.4 * rng.random((n, 4)), 0.4 * rng.random((n, 4)))
  assert metrics.n_auc(probs, labels) == pytest.approx(1.0)
  assert metrics.d_auc(probs, labels) == pytest.approx(0.5, abs=0.05)


def test_report_excludes_undefined_classes_and_is_strict_json():
  probs, labels, mask = _data(seed=7)
  names = [f"c{k}" for k in range(K)]
  rep = metrics.classification_report(probs, labels, mask, names)
  roc = metrics.auroc(probs, labels, mask)
  assert rep["auroc"]["mean"] == pytest.approx(np.mean(roc[:4]))
  assert rep["auroc"]["excluded"] == ["c4", "c5"]
  assert rep["auroc"]["per_class"]["c4"] is None and rep["auroc"]["per_class"]["c5"] is None
  assert rep["auprc"]["excluded"] == ["c4"]
  assert rep["f1"]["threshold_source"] == "self"
  assert rep["f1"]["default_threshold_classes"] == ["c4"]
  assert rep["f1"]["thresholds"]["c4"] == metrics.DEFAULT_THRESHOLD
  np.testing.assert_allclose(
      [rep["f1"]["thresholds"][n] for n in names[:4]],
      metrics.best_f1_thresholds(probs, labels, mask)[:4])
  assert rep["w_auc"] == pytest.approx(metrics.w_auc(probs, labels, mask))
  json.dumps(rep, allow_nan=False)  # raises on NaN


def test_report_uses_given_thresholds_and_skips_no_finding_for_d_n_auc():
  probs, labels, mask = _data_with_normal_rows(seed=8)
  names = ["No Finding"] + [f"c{k}" for k in range(1, K)]
  thresholds = np.full(K, 0.5)
  rep = metrics.classification_report(probs, labels, mask, names, thresholds, "val")
  assert rep["f1"]["threshold_source"] == "val"
  f1 = metrics.f1(probs, labels, mask, thresholds)
  assert rep["f1"]["per_class"]["c1"] == pytest.approx(f1[1])
  disease = list(range(1, K))
  assert rep["d_auc"] == pytest.approx(metrics.d_auc(probs, labels, mask, disease))
  assert rep["n_auc"] == pytest.approx(metrics.n_auc(probs, labels, mask, disease))
  assert rep["d_auc"] != pytest.approx(metrics.d_auc(probs, labels, mask))
  assert rep["n_auc"] != pytest.approx(metrics.n_auc(probs, labels, mask))


def test_bad_inputs_raise_clear_errors():
  probs, labels, mask = _data()
  with pytest.raises(ValueError, match="must all be"):
    metrics.auroc(probs[:, :3], labels, mask)
  bad = labels.copy()
  bad[0, 0] = 0.5
  with pytest.raises(ValueError, match="labels must be 0/1"):
    metrics.auroc(probs, bad, mask)
  nan_probs = probs.copy()
  nan_probs[7, 1] = np.nan
  with pytest.raises(ValueError, match=r"rows \[7\]"):
    metrics.auroc(nan_probs, labels, mask)
