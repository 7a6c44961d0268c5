"""Ensembles by score averaging (Ge 2018, Table 1): evaluator.average_predictions / evaluate_ensemble."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh

from cxr_jax.data import schema
from cxr_jax.evaluation import evaluator
from cxr_jax.evaluation import metrics

K = len(schema.NIH14)
BATCH = 8


class ScaleMethod:
  """probs = sigmoid(mean(image) * w + b): members differ by their variables."""
  name = "scale"

  def predict(self, model, variables, batch):
    del model
    mean = batch["image"].mean(axis=(1, 2, 3))
    return {"probs": jax.nn.sigmoid(mean[:, None] * variables["w"] + variables["b"])}


def _variables(seed):
  rng = np.random.default_rng(seed)
  return {"w": jnp.asarray(rng.normal(size=K) * 3, jnp.float32),
          "b": jnp.asarray(rng.normal(size=K), jnp.float32)}


def _reference_probs(images, variables):
  mean = images.astype(np.float64).mean(axis=(1, 2, 3))
  logits = mean[:, None] * np.asarray(variables["w"], np.float64) + np.asarray(variables["b"])
  return 1 / (1 + np.exp(-logits))


def _split(seed, n):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(n, 4, 4, 1)).astype(np.float32)
  labels = (rng.random((n, K)) < 0.3).astype(np.float32)
  mask = (rng.random((n, K)) > 0.05).astype(np.float32)
  return images, labels, mask


SPLITS = {"val": _split(20, 30), "test": _split(21, 37)}


def _batches(images, labels, mask, order):
  """Fixed-size batches of the rows in ``order``; the last is padded (valid = 0)."""
  for start in range(0, len(order), BATCH):
    rows = order[start:start + BATCH]
    pad = BATCH - len(rows)
    take = lambda a: np.concatenate([a[rows], np.repeat(a[rows[-1:]], pad, 0)])
    yield {"image": take(images), "labels": take(labels), "label_mask": take(mask),
           "valid": np.r_[np.ones(len(rows)), np.zeros(pad)].astype(np.int32),
           "index": np.r_[rows + 500, np.full(pad, -1)]}


def _config(reverse=False, drop_last=False):
  c = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict(dict(name="synthetic", label_space="nih14",
                                          reverse=reverse, drop_last=drop_last))
  c.eval_batch_size = BATCH
  c.seed = 0
  return c


def _make_iterator(data_config, split, **kwargs):
  """The member's config decides its row order (reverse) and coverage (drop_last)."""
  del kwargs
  n = len(SPLITS[split][0]) - int(data_config.get("drop_last", False))
  order = np.arange(n)[::-1] if data_config.get("reverse", False) else np.arange(n)
  return _batches(*SPLITS[split], order)


@pytest.fixture(scope="module")
def mesh():
  return Mesh(np.array(jax.devices()), ("data",))


def test_ensemble_probs_are_the_members_mean_and_report_matches(tmp_path, mesh):
  # Member 1 yields its rows in reverse order: averaging must align them by 'index'.
  members = [(ScaleMethod(), None, _variables(seed), _config(reverse=seed == 1))
             for seed in range(3)]
  path = tmp_path / "eval" / "test_ensemble.json"
  payload = evaluator.evaluate_ensemble(members, "test", str(path), mesh=mesh,
                                        names=["a", "b", "c"], make_iterator=_make_iterator)
  reference = {s: np.mean([_reference_probs(SPLITS[s][0], m[2]) for m in members], axis=0)
               for s in ("val", "test")}
  _, labels, mask = SPLITS["test"]
  thresholds = metrics.best_f1_thresholds(reference["val"], SPLITS["val"][1], SPLITS["val"][2])
  expected = metrics.classification_report(reference["test"], labels, mask,
                                           schema.NIH14.classes, thresholds,
                                           threshold_source="val")
  assert json.loads(path.read_text()) == payload
  assert payload["num_examples"] == 37
  assert [m["name"] for m in payload["members"]] == ["a", "b", "c"]
  np.testing.assert_allclose(payload["classification"]["auroc"]["mean"],
                             expected["auroc"]["mean"], rtol=1e-6)
  np.testing.assert_allclose(payload["classification"]["w_auc"], expected["w_auc"], rtol=1e-6)
  for name in schema.NIH14.classes:
    np.testing.assert_allclose(payload["classification"]["f1"]["per_class"][name] or 0.0,
                               expected["f1"]["per_class"][name] or 0.0, rtol=1e-5, atol=1e-7)

  outputs = [evaluator.predict_on(*m[:3], m[3], "test", mesh=mesh, make_iterator=_make_iterator)
             for m in members]
  averaged = evaluator.average_predictions(outputs)
  np.testing.assert_array_equal(averaged["index"], np.arange(37) + 500)
  np.testing.assert_allclose(averaged["probs"], reference["test"], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(averaged["labels"], labels)
  # The ensemble differs from every member (the test would pass trivially otherwise).
  assert all(np.abs(o["probs"] - averaged["probs"][o["index"] - 500]).max() > 1e-3
             for o in outputs)


def test_ensemble_rejects_members_on_different_examples(mesh):
  members = [(ScaleMethod(), None, _variables(0), _config()),
             (ScaleMethod(), None, _variables(1), _config(drop_last=True))]
  with pytest.raises(ValueError, match=r"second.*36 examples.*only in first: \[536\]"):
    evaluator.evaluate_ensemble(members, "test", None, mesh=mesh, names=["first", "second"],
                                make_iterator=_make_iterator)


def test_average_predictions_rejects_different_labels():
  rng = np.random.default_rng(0)
  out = {"probs": rng.random((5, 3)), "labels": np.eye(5, 3), "label_mask": np.ones((5, 3)),
         "index": np.arange(5)}
  other = dict(out, labels=np.roll(out["labels"], 1, axis=0))
  with pytest.raises(ValueError, match="member 1: its 'labels' differ"):
    evaluator.average_predictions([out, other])
  shuffled = {k: v[::-1] for k, v in out.items()}
  np.testing.assert_allclose(evaluator.average_predictions([out, shuffled])["probs"], out["probs"])


CLI_DRIVER = """
import os, sys, types
import jax
from jax.sharding import Mesh
import numpy as np
sys.path.insert(0, {tests!r})
import test_ensemble as t
from cxr_jax.evaluation import evaluators
import cxr_jax.methods
import cxr_jax.train

mesh = Mesh(np.array(jax.devices()), ("data",))
def restore_for_eval(config, workdir, method):  # stub: run 'runN' has the variables of seed N
  print("restored", os.path.basename(workdir), "width", config.model.width, "seed", config.seed)
  return None, t._variables(int(workdir[-1])), mesh
cxr_jax.methods.get_method = lambda name: t.ScaleMethod()
trainer = types.ModuleType("cxr_jax.train.trainer")
trainer.restore_for_eval = restore_for_eval
sys.modules["cxr_jax.train.trainer"] = cxr_jax.train.trainer = trainer
evaluators.default_make_iterator = t._make_iterator
from cxr_jax.cli import evaluate
sys.argv = ["cxr-eval", "--config={config}:runlocal", "--workdir={tmp}/run0", "--config.seed=7",
            "--ensemble_workdirs={tmp}/run1,{tmp}/run2",
            "--ensemble_configs={config}:runlocal,width=0.5", "--ensemble_configs={config}:width=0.25"]
evaluate.run()
"""


def test_cli_averages_the_restored_runs(tmp_path):
  """cxr-eval --ensemble_workdirs in a subprocess (absl flags are process-global), restore stubbed."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  code = CLI_DRIVER.format(tests=os.path.join(repo, "tests"), tmp=tmp_path,
                           config=os.path.join(repo, "configs", "baseline.py"))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  restored = [line for line in result.stdout.splitlines() if line.startswith("restored")]
  # Each run's own config (the arg reaches it whole, commas included), --config.* on all.
  assert restored == ["restored run0 width 0.125 seed 7", "restored run1 width 0.125 seed 7",
                      "restored run2 width 0.25 seed 7"]
  written = json.loads((tmp_path / "run0" / "eval" / "test_ensemble.json").read_text())
  assert [m["name"] for m in written["members"]] == [str(tmp_path / f"run{i}") for i in range(3)]
  reference = np.mean([_reference_probs(SPLITS["test"][0], _variables(i)) for i in range(3)], 0)
  expected = metrics.classification_report(reference, *SPLITS["test"][1:], schema.NIH14.classes)
  np.testing.assert_allclose(written["classification"]["auroc"]["mean"], expected["auroc"]["mean"],
                             rtol=1e-6)
