"""Losses vs float64 numpy reference loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxr_jax import losses


def _log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def _weighted_bce_reference(logits, labels, mask):
  n, k = logits.shape
  total, count = 0.0, 0.0
  for c in range(k):
    pos = sum(mask[i, c] for i in range(n) if labels[i, c] == 1)
    neg = sum(mask[i, c] for i in range(n) if labels[i, c] == 0)
    for i in range(n):
      if not mask[i, c]:
        continue
      if labels[i, c] == 1:
        total += -(pos + neg) / pos * _log_sigmoid(logits[i, c])
      else:
        total += -(pos + neg) / neg * _log_sigmoid(-logits[i, c])
      count += 1
  return total / count


def _wang_weighted_bce_reference(logits, labels, mask):
  """Wang 2017 W-CEL: |P|, |N| = the known 1s and 0s of the whole batch label matrix."""
  n, k = logits.shape
  entries = [(i, c) for i in range(n) for c in range(k) if mask[i, c]]
  pos = sum(1.0 for i, c in entries if labels[i, c] == 1)
  neg = sum(1.0 for i, c in entries if labels[i, c] == 0)
  total = 0.0
  for i, c in entries:
    if labels[i, c] == 1:
      total += -(pos + neg) / pos * _log_sigmoid(logits[i, c])
    else:
      total += -(pos + neg) / neg * _log_sigmoid(-logits[i, c])
  return total / len(entries)


def _bce_reference(logits, labels, mask, pos_weight):
  # torch BCEWithLogitsLoss(pos_weight=pw, reduction='none'): -[pw*y*log s(x) + (1-y) log(1-s(x))]
  per = -(pos_weight[None] * labels * _log_sigmoid(logits) + (1 - labels) * _log_sigmoid(-logits))
  return (per * mask).sum() / mask.sum()


@pytest.fixture
def batch():
  rng = np.random.default_rng(0)
  logits = rng.normal(scale=3, size=(12, 5))
  labels = (rng.uniform(size=(12, 5)) < 0.3).astype(np.float64)
  labels[:, 3] = 0.0  # a class without positives in the batch
  labels[:, 4] = 1.0  # and one without negatives
  mask = (rng.uniform(size=(12, 5)) > 0.25).astype(np.float64)
  return logits, labels, mask


def test_weighted_bce_matches_reference(batch):
  logits, labels, mask = batch
  got = losses.weighted_bce(jnp.asarray(logits, jnp.float32), jnp.asarray(labels), jnp.asarray(mask))
  np.testing.assert_allclose(float(got), _weighted_bce_reference(logits, labels, mask), rtol=1e-5)


@pytest.mark.parametrize("counts, reference", [("per_class", _weighted_bce_reference),
                                               ("batch", _wang_weighted_bce_reference)])
def test_weighted_bce_counts_match_float64_reference_with_masks_and_padding(batch, counts,
                                                                           reference):
  """Both weightings of config.loss_weighting, on a batch with unknown labels and padding rows
  (valid = 0, as the eval / last training batch has): the padding rows' labels and logits,
  whatever they are, count nowhere."""
  logits, labels, mask = batch
  valid = np.ones(len(labels))
  valid[-3:] = 0.0
  padded_labels = labels.copy()
  padded_labels[-3:] = 1.0              # padding rows full of positives: counted, the loss moves
  arrays = {"label_mask": jnp.asarray(mask), "valid": jnp.asarray(valid)}
  got = losses.weighted_bce(jnp.asarray(logits, jnp.float32), jnp.asarray(padded_labels),
                            losses.label_mask(arrays), counts=counts)
  want = reference(logits, padded_labels, mask * valid[:, None])
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  assert float(got) != pytest.approx(reference(logits, padded_labels, mask), rel=1e-3)
  # The two weightings differ on this batch (its classes have different prevalences).
  other = _wang_weighted_bce_reference if counts == "per_class" else _weighted_bce_reference
  assert want != pytest.approx(other(logits, padded_labels, mask * valid[:, None]), rel=1e-3)
  with pytest.raises(ValueError, match="config.loss_weighting"):
    losses.weighted_bce(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask),
                        counts="global")


def test_bce_pos_weight_matches_torch_semantics(batch):
  logits, labels, mask = batch
  pos_weight = np.array([1.0, 2.0, 0.5, 3.0, 10.0])
  got = losses.bce(jnp.asarray(logits, jnp.float32), jnp.asarray(labels), jnp.asarray(mask),
                   pos_weight=jnp.asarray(pos_weight))
  np.testing.assert_allclose(float(got), _bce_reference(logits, labels, mask, pos_weight), rtol=1e-5)
  plain = losses.bce(jnp.asarray(logits, jnp.float32), jnp.asarray(labels), jnp.asarray(mask))
  np.testing.assert_allclose(float(plain), _bce_reference(logits, labels, mask, np.ones(5)), rtol=1e-5)


@pytest.mark.parametrize("loss", [losses.weighted_bce, losses.bce])
def test_masked_entries_do_not_matter(batch, loss):
  logits, labels, mask = batch
  noisy_logits = np.where(mask == 0, 1e3, logits)
  flipped = np.where(mask == 0, 1 - labels, labels)
  a = loss(jnp.asarray(logits, jnp.float32), jnp.asarray(labels), jnp.asarray(mask))
  b = loss(jnp.asarray(noisy_logits, jnp.float32), jnp.asarray(flipped), jnp.asarray(mask))
  np.testing.assert_allclose(float(a), float(b), rtol=1e-6)
  grads = jax.grad(lambda x: loss(x, jnp.asarray(labels), jnp.asarray(mask)))(jnp.asarray(logits, jnp.float32))
  assert np.all(np.asarray(grads)[mask == 0] == 0)


@pytest.mark.parametrize("loss", [losses.weighted_bce, losses.bce])
def test_extreme_logits_are_finite(loss):
  logits = np.array([[1e4, -1e4], [-1e4, 1e4], [80.0, -80.0]], np.float32)
  labels = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
  mask = np.ones_like(labels)
  value, grads = jax.value_and_grad(lambda x: loss(x, jnp.asarray(labels), jnp.asarray(mask)))(jnp.asarray(logits))
  assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grads)))
  reference = (_weighted_bce_reference if loss is losses.weighted_bce else
               lambda l, y, m: _bce_reference(l, y, m, np.ones(2)))(logits.astype(np.float64), labels, mask)
  np.testing.assert_allclose(float(value), reference, rtol=1e-5)


def test_everything_masked_gives_zero():
  zeros = jnp.zeros((4, 3))
  assert float(losses.weighted_bce(jnp.ones((4, 3)), zeros, zeros)) == 0.0
  assert float(losses.bce(jnp.ones((4, 3)), zeros, zeros)) == 0.0


@pytest.mark.parametrize("name, stage", [("baseline", "train"), ("disease_masks", "classify"),
                                         ("byol_cam", "finetune")])
def test_methods_using_weighted_bce_read_config_loss_weighting(name, stage):
  import importlib  # pylint: disable=import-outside-toplevel
  from cxr_jax.methods import get_method  # pylint: disable=import-outside-toplevel
  config = importlib.import_module(f"configs.{name}").get_config("runlocal")
  assert config.loss_weighting == "per_class"
  config.loss_weighting = "batch"
  stages = {s.name: s for s in get_method(config.method).stages(config)}
  assert stages[stage].loss.keywords["weighting"] == "batch"
