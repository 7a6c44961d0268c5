"""Evaluator: sharded jitted inference, valid-row bookkeeping, eval JSON, plots."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh
from sklearn import metrics as skm

from cxr_jax import files
from cxr_jax.data import schema
from cxr_jax.evaluation import evaluator
from cxr_jax.evaluation import metrics
from cxr_jax.evaluation import report

K = len(schema.NIH14)
BATCH = 8
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class ToyMethod:
  """probs = sigmoid(mean(image) * w + b), heat maps = image * w; counts its traces."""
  name = "toy"

  def __init__(self):
    self.traces = 0

  def predict(self, model, variables, batch):
    del model
    self.traces += 1  # python side effect: runs once per trace, never per call
    mean = batch["image"].mean(axis=(1, 2, 3))
    return {"probs": jax.nn.sigmoid(mean[:, None] * variables["w"] + variables["b"]),
            "heatmaps": batch["image"] * variables["w"]}


def _variables():
  rng = np.random.default_rng(0)
  return {"w": jnp.asarray(rng.normal(size=K) * 4, jnp.float32),
          "b": jnp.asarray(rng.normal(size=K), jnp.float32)}


def _reference_probs(images, variables):
  mean = images.astype(np.float64).mean(axis=(1, 2, 3))
  return 1 / (1 + np.exp(-(mean[:, None] * np.asarray(variables["w"]) + np.asarray(variables["b"]))))


def _split_data(seed, n):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(n, 4, 4, 1)).astype(np.float32)
  probs = _reference_probs(images, _variables())
  labels = (rng.random((n, K)) < 0.2 * probs).astype(np.float32)
  mask = (rng.random((n, K)) > 0.03).astype(np.float32)
  return images, labels, mask


def _batches(images, labels, mask, first_index=100):
  """Fixed-size batches; the last is padded with rows marked valid = 0."""
  n = len(images)
  for start in range(0, n, BATCH):
    stop = min(start + BATCH, n)
    pad = BATCH - (stop - start)
    take = lambda a: np.concatenate([a[start:stop], np.repeat(a[-1:], pad, 0)])
    yield {"image": take(images), "labels": take(labels), "label_mask": take(mask),
           "valid": np.r_[np.ones(stop - start), np.zeros(pad)].astype(np.int32),
           "index": np.r_[np.arange(start, stop) + first_index, np.full(pad, -1)],
           "image_id": np.array([f"img{i}" for i in range(BATCH)], object)}


@pytest.fixture(scope="module")
def mesh():
  return Mesh(np.array(jax.devices()), ("data",))


def test_predict_split_keeps_valid_rows_in_order_and_compiles_once(mesh):
  method, variables = ToyMethod(), _variables()
  images, labels, mask = _split_data(0, 21)  # 3 batches, the last with 5 padding rows
  predict_fn = evaluator.make_predict_fn(method, None, mesh)
  out = evaluator.predict_split(predict_fn, variables, _batches(images, labels, mask))
  assert method.traces == 1
  np.testing.assert_allclose(out["probs"], _reference_probs(images, variables), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out["labels"], labels)
  np.testing.assert_array_equal(out["label_mask"], mask)
  np.testing.assert_array_equal(out["index"], np.arange(21) + 100)
  assert "heatmaps" not in out
  with_maps = evaluator.predict_split(predict_fn, variables, _batches(images, labels, mask),
                                      keep_heatmaps=True)
  np.testing.assert_allclose(with_maps["heatmaps"], images * np.asarray(variables["w"]), rtol=1e-6)
  assert method.traces == 1  # a second pass over batches of the same shape reuses the executable


def test_predict_fn_output_is_sharded_over_data(mesh):
  method, variables = ToyMethod(), _variables()
  images, labels, mask = _split_data(1, BATCH)
  batch = next(_batches(images, labels, mask))
  out = evaluator.make_predict_fn(method, None, mesh)(variables, {"image": batch["image"]})
  assert out["probs"].sharding.spec[0] == "data"
  assert len(out["probs"].sharding.device_set) == len(jax.devices())


def _config():
  c = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict(dict(name="synthetic", label_space="nih14"))
  c.eval_batch_size = BATCH
  c.seed = 0
  c.cam, c.cam_threshold, c.cam_threshold_mode, c.cam_largest_only = "gradcam", 0.5, "absolute", False
  return c


SPLITS = {"val": _split_data(10, 30), "test": _split_data(11, 45)}


def _fake_make_iterator(calls):
  def make_iterator(data_config, split, **kwargs):
    calls.append((split, kwargs))
    assert data_config.label_space == "nih14"
    return _batches(*SPLITS[split])
  return make_iterator


@pytest.mark.parametrize("policy", ["random", "official"])
def test_header_names_the_real_data_split_policy(tmp_path, mesh, policy):
  config = _config()
  config.data.name, config.data.split_policy = "nih", policy
  payload = evaluator.evaluate(ToyMethod(), None, _variables(), config, "test", str(tmp_path),
                               stage="train", mesh=mesh, make_iterator=_fake_make_iterator([]))
  with open(tmp_path / "eval" / "test.json") as f:
    assert payload["split_policy"] == json.load(f)["split_policy"] == policy


def test_evaluate_writes_json_equal_to_direct_metrics(tmp_path, mesh):
  method, variables, calls = ToyMethod(), _variables(), []
  payload = evaluator.evaluate(method, None, variables, _config(), "test", str(tmp_path),
                               stage="train", mesh=mesh, make_iterator=_fake_make_iterator(calls))
  assert [c[0] for c in calls] == ["test", "val"]  # F1 thresholds chosen on val
  kw = calls[0][1]
  assert (kw["shuffle"], kw["num_epochs"], kw["drop_remainder"], kw["augment"]) == (False, 1, False, False)
  assert kw["batch_size"] == BATCH and kw["sharding"].spec == jax.sharding.PartitionSpec("data")

  with open(tmp_path / "eval" / "test.json") as f:
    written = json.load(f)
  assert written == json.loads(json.dumps(payload))
  assert (written["method"], written["dataset"], written["stage"], written["split"]) == (
      "toy", "synthetic", "train", "test")
  assert written["split_policy"] == "phantom"
  assert written["num_examples"] == 45
  assert written["localization"] == {}

  images, labels, mask = SPLITS["test"]
  probs = _reference_probs(images, variables)
  cls = written["classification"]
  for k, name in enumerate(schema.NIH14.classes):
    m = mask[:, k] == 1
    y, p = labels[m, k], probs[m, k]
    if 0 < y.sum() < len(y):
      assert cls["auroc"]["per_class"][name] == pytest.approx(skm.roc_auc_score(y, p), abs=1e-6)
      assert cls["auprc"]["per_class"][name] == pytest.approx(skm.average_precision_score(y, p), abs=1e-6)
    else:
      assert cls["auroc"]["per_class"][name] is None
  defined = [v for v in cls["auroc"]["per_class"].values() if v is not None]
  assert written["auroc_mean"] == pytest.approx(np.mean(defined))

  val_images, val_labels, val_mask = SPLITS["val"]
  thresholds = metrics.best_f1_thresholds(_reference_probs(val_images, variables), val_labels, val_mask)
  assert cls["f1"]["threshold_source"] == "val"
  for k, name in enumerate(schema.NIH14.classes):
    if np.isfinite(thresholds[k]):
      assert cls["f1"]["thresholds"][name] == pytest.approx(thresholds[k], rel=1e-5)
  assert None not in (cls["w_auc"], cls["d_auc"], cls["n_auc"])
  assert cls["w_auc"] == pytest.approx(metrics.w_auc(probs, labels, mask), abs=1e-6)
  assert cls["d_auc"] == pytest.approx(metrics.d_auc(probs, labels, mask), abs=1e-6)
  assert cls["n_auc"] == pytest.approx(metrics.n_auc(probs, labels, mask), abs=1e-6)
  assert method.traces == 1  # val and test batches share one shape: one compilation


def test_evaluate_val_chooses_thresholds_on_val_and_writes_curves(tmp_path, mesh):
  calls = []
  payload = evaluator.evaluate(ToyMethod(), None, _variables(), _config(), "val", str(tmp_path),
                               stage="s", mesh=mesh, make_iterator=_fake_make_iterator(calls),
                               write_curves=True)
  assert [c[0] for c in calls] == ["val"]
  assert payload["classification"]["f1"]["threshold_source"] == "val"
  for name in ("roc_val.png", "pr_val.png"):
    data = (tmp_path / "report" / name).read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 20_000


def test_evaluate_given_thresholds_and_no_workdir(mesh):
  calls = []
  thresholds = np.full(K, 0.5)
  payload = evaluator.evaluate(ToyMethod(), None, _variables(), _config(), "test", None,
                               stage="s", mesh=mesh, make_iterator=_fake_make_iterator(calls),
                               thresholds=thresholds)
  assert [c[0] for c in calls] == ["test"]
  images, labels, mask = SPLITS["test"]
  f1 = metrics.f1(_reference_probs(images, _variables()), labels, mask, thresholds)
  got = payload["classification"]["f1"]["per_class"]
  for k, name in enumerate(schema.NIH14.classes):
    assert got[name] == (None if np.isnan(f1[k]) else pytest.approx(f1[k]))


def _leftovers(folder):
  return [n for n in os.listdir(folder) if n.endswith(".tmp")]


def test_write_json_atomic_replaces_whole_file_and_keeps_old_on_failure(tmp_path):
  path = tmp_path / "eval" / "test.json"
  path.parent.mkdir()
  path.write_text("x" * 10_000)
  files.write_json_atomic(str(path), {"a": 1})
  assert json.loads(path.read_text()) == {"a": 1}
  before = path.read_text()
  with pytest.raises(TypeError):
    files.write_json_atomic(str(path), {"a": object()})
  with pytest.raises(ValueError):
    files.write_json_atomic(str(path), {"a": float("nan")})
  assert path.read_text() == before
  assert _leftovers(path.parent) == []


def test_write_curves_handles_undefined_classes(tmp_path):
  rng = np.random.default_rng(0)
  probs = rng.random((50, 3))
  labels = (rng.random((50, 3)) < 0.4).astype(np.float32)
  labels[:, 2] = 0  # no positive: empty panels
  paths = report.write_curves(probs, labels, None, ["a", "b", "c"], str(tmp_path / "r"), "test")
  assert [os.path.basename(p) for p in paths] == ["roc_test.png", "pr_test.png"]
  for p in paths:
    data = open(p, "rb").read()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
  assert _leftovers(tmp_path / "r") == []


CLI_DRIVER = """
import sys, types
import jax
from jax.sharding import Mesh
import numpy as np
sys.path.insert(0, {tests!r})
import test_evaluator as t
from cxr_jax.evaluation import evaluators
import cxr_jax.methods
import cxr_jax.train

class Method(t.ToyMethod):
  def stages(self, config):
    return [types.SimpleNamespace(name="pretrain"), types.SimpleNamespace(name="finetune")]

mesh = Mesh(np.array(jax.devices()), ("data",))
cxr_jax.methods.get_method = lambda name: Method()
trainer = types.ModuleType("cxr_jax.train.trainer")  # stub: no training stack needed
trainer.restore_for_eval = lambda config, workdir, method: (None, t._variables(), mesh)
sys.modules["cxr_jax.train.trainer"] = cxr_jax.train.trainer = trainer
evaluators.default_make_iterator = t._fake_make_iterator([])
from cxr_jax.cli import evaluate
sys.argv = ["cxr-eval", "--config={config}:runlocal", "--workdir={workdir}", "--split=test"]
evaluate.run()
"""


def test_cli_evaluates_the_restored_method(tmp_path):
  """cxr-eval in a subprocess (absl flags are process-global), restore stubbed."""
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  code = CLI_DRIVER.format(tests=os.path.join(repo, "tests"), workdir=tmp_path,
                           config=os.path.join(repo, "configs", "baseline.py"))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "toy on test (45 images)" in result.stdout
  written = json.loads((tmp_path / "eval" / "test.json").read_text())
  assert (written["stage"], written["num_examples"]) == ("finetune", 45)
  assert (tmp_path / "report" / "roc_test.png").read_bytes().startswith(PNG_MAGIC)
