"""Li 2018 / Rozenberg 2020: log-space Li loss, Eq. 12, threshold alternation, method end to end."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import patch_loc as patch_loc_config
from cxr_jax import losses
from cxr_jax.data import schema
from cxr_jax.evaluation import evaluator, evaluators, patch_grid
from cxr_jax.methods import get_method
from cxr_jax.methods import patch_loc
from cxr_jax.train import parallel, trainer

P = 20  # the paper's grid: 400 patches

# --------------------------------------------------------------------------- Li loss (Eq. 1-3)


def li_reference(logits, grid, labels, annotated, unannotated, lambda_ann):
  """Float64, straight from Eq. 1-3: products of probabilities, then -log."""
  l = np.asarray(logits, np.float64)
  p = 1.0 / (1.0 + np.exp(-l))
  g = np.asarray(grid, np.float64)
  n, _, _, k = l.shape
  out = np.zeros(n)
  for i in range(n):
    for c in range(k):
      pc, gc = p[i, :, :, c].ravel(), g[i, :, :, c].ravel()
      if annotated[i, c]:
        prob_box = np.prod(np.where(gc > 0, pc, 1.0 - pc))                   # Eq. 1
        out[i] += lambda_ann * -np.log(prob_box)
      if unannotated[i, c]:
        prob_none = np.exp(np.sum(np.log1p(-pc)))                             # prod (1 - p)
        prob_any = -np.expm1(np.sum(np.log1p(-pc)))                           # Eq. 2
        out[i] += -labels[i, c] * np.log(prob_any) - (1 - labels[i, c]) * np.log(prob_none)
  return out


def confident_case():
  """Logits for which float32 products underflow: a big box of p = 0.7 and all-negative
  patches with p ~ 2e-9 (1 - p rounds to 1 in float32)."""
  rng = np.random.default_rng(0)
  k = 3
  grid = np.zeros((2, P, P, k), np.float32)
  grid[0, 2:17, 3:18, 0] = 1                                   # 225-patch box, class 0
  logits = rng.normal(0, 0.2, (2, P, P, k)).astype(np.float32)
  logits[0, ..., 0] = np.where(grid[0, ..., 0] > 0, 0.85, -0.85)  # p = 0.7 in, 0.3 out
  logits[1, ..., 1] = -20.0 + rng.normal(0, 0.5, (P, P))          # confidently nothing ...
  labels = np.array([[1, 0, 0], [0, 1, 0]], np.float32)           # ... but labelled positive
  annotated = np.array([[1, 0, 0], [0, 0, 0]], np.float32)
  unannotated = np.array([[0, 1, 1], [1, 1, 1]], np.float32)
  return logits, grid, labels, annotated, unannotated


def test_li_loss_is_finite_where_the_naive_product_underflows():
  logits, grid, labels, annotated, unannotated = confident_case()
  p = jax.nn.sigmoid(jnp.asarray(logits))
  naive_box = jnp.prod(jnp.where(grid[0, ..., 0] > 0, p[0, ..., 0], 1 - p[0, ..., 0]))
  naive_any = 1 - jnp.prod(1 - p[1, ..., 1])
  assert float(naive_box) == 0.0 and float(naive_any) == 0.0   # float32 product underflows
  per_image, _ = losses.li_loss(jnp.asarray(logits), jnp.asarray(grid), jnp.asarray(labels),
                                   jnp.asarray(annotated), jnp.asarray(unannotated), 70.0)
  expected = li_reference(logits, grid, labels, annotated, unannotated, 70.0)
  assert np.all(np.isfinite(per_image))
  np.testing.assert_allclose(np.asarray(per_image), expected, rtol=2e-5)
  grads = jax.grad(lambda l: jnp.sum(losses.li_loss(
      l, jnp.asarray(grid), jnp.asarray(labels), jnp.asarray(annotated),
      jnp.asarray(unannotated), 70.0)[0]))(jnp.asarray(logits))
  assert np.all(np.isfinite(grads))
  # d/dl of -log(1 - prod(1 - p)) at p ~ 2e-9 on 400 patches: ~ -p_j / sum_j p_j, float64.
  p64 = 1 / (1 + np.exp(-logits[1, ..., 1].astype(np.float64)))
  a = -np.sum(np.log1p(-p64))
  ref = -np.exp(-a) / -np.expm1(-a) * p64  # d/dl_j of -log(1 - e^{-A}), dA/dl_j = p_j
  np.testing.assert_allclose(np.asarray(grads[1, ..., 1]), ref, rtol=1e-3)


def test_log_noisy_or_matches_float64_over_all_regimes():
  for scale, shift in ((1.0, 0.0), (0.5, -30.0), (0.5, -120.0), (3.0, 5.0)):
    logits = (np.random.default_rng(1).normal(0, scale, (3, 5, 5, 2)) + shift).astype(np.float32)
    log_pos, log_neg = losses.log_noisy_or(jnp.asarray(logits))
    l64 = logits.astype(np.float64)
    log_none = -np.sum(np.logaddexp(0, l64), axis=(1, 2))
    # log(1 - e^{log_none}); when p ~ e^l underflows even in float64's 1 - p, use log sum e^l.
    ref_pos = np.where(log_none < -1e-12, np.log(-np.expm1(log_none)),
                       np.log(np.sum(np.exp(l64), axis=(1, 2))))
    np.testing.assert_allclose(np.asarray(log_neg), log_none, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(log_pos), ref_pos, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- Rozenberg Eq. 12


def rozenberg_reference(z, grid, labels, annotated, unannotated, t, lam, gamma, form):
  """Float64 loop over (image, class) of Eq. 9 + 11 (relu) or Eq. 5 + 8 (sigmoid)."""
  z, grid = np.asarray(z, np.float64), np.asarray(grid, np.float64)
  sig = lambda v: 1 / (1 + np.exp(-v))
  relu = lambda v: max(v, 0.0)
  n, p, q, k = z.shape
  out = np.zeros(n)
  for i in range(n):
    for c in range(k):
      zc, gc = z[i, ..., c].ravel(), grid[i, ..., c].ravel()
      b = gc.sum()
      bbar = p * q - b
      sb, sbar, s = zc[gc > 0].sum(), zc[gc == 0].sum(), zc.sum()
      tau, rho, tau_hat, rho_hat = (float(t[name][c]) for name in ("tau", "rho", "tau_hat", "rho_hat"))
      y = labels[i, c]
      if form == "relu":
        ann = relu(tau * b - sb) / b + relu(sbar - rho * bbar) / bbar if b else 0.0
        un = y * relu(tau_hat - s) + gamma[c] * (1 - y) * relu(s - rho_hat)
      else:
        ann = -sig(sb - tau * b) * sig(rho * bbar - sbar)
        un = -y * sig(s - tau_hat) - (1 - y) * sig(rho_hat - s)
      out[i] += lam * annotated[i, c] * ann + unannotated[i, c] * un
  return out


@pytest.mark.parametrize("form", ["relu", "sigmoid"])
def test_rozenberg_loss_matches_float64_loop(form):
  rng = np.random.default_rng(2)
  n, k = 4, 3
  z = rng.random((n, P, P, k)).astype(np.float32) ** 3
  grid = np.zeros((n, P, P, k), np.float32)
  grid[0, 3:9, 4:12, 0] = 1
  grid[1, 10:20, 0:5, 2] = 1
  grid[2, 7, 7, 1] = 1                                          # a one-patch box
  labels = (rng.random((n, k)) < 0.5).astype(np.float32)
  annotated = (grid.max(axis=(1, 2)) > 0).astype(np.float32)
  unannotated = 1 - annotated
  t = {"tau": np.array([0.5, 0.9, 0.3], np.float32), "rho": np.array([0.05, 0.1, 0.2], np.float32),
       "tau_hat": np.array([4.0, 10.0, 2.0], np.float32),
       "rho_hat": np.array([1.0, 3.0, 30.0], np.float32)}
  gamma = np.array([0.5, 0.2, 1.0], np.float32)
  got, _ = losses.rozenberg_loss(jnp.asarray(z), jnp.asarray(grid), jnp.asarray(labels),
                                    jnp.asarray(annotated), jnp.asarray(unannotated),
                                    {a: jnp.asarray(b) for a, b in t.items()}, 70.0,
                                    jnp.asarray(gamma), form)
  want = rozenberg_reference(z, grid, labels, annotated, unannotated, t, 70.0, gamma, form)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)


def test_positive_negative_ratio():
  labels = np.array([[1, 0], [0, 0], [1, 1], [0, 1]], np.float32)
  weight = np.array([[1, 1], [1, 0], [0, 1], [1, 1]], np.float32)
  got = losses.positive_negative_ratio(jnp.asarray(labels), jnp.asarray(weight))
  # class 0: rows 0,1,3 weighted: 1 positive, 2 negatives; class 1: rows 0,2,3: 2 pos, 1 neg
  np.testing.assert_allclose(np.asarray(got), [0.5, 2.0])


def test_annotation_weights_use_only_kept_boxes_of_the_box_classes():
  grid = np.zeros((3, 4, 4, 3), np.float32)
  grid[0, 1, 1, 0] = grid[0, 2, 2, 2] = grid[1, 0, 0, 0] = 1
  has_boxes = np.array([1, 0, 1], np.float32)
  mask = np.ones((3, 3), np.float32)
  mask[2] = 0  # a padding row
  a, u = losses.annotation_weights(jnp.asarray(grid), jnp.asarray(has_boxes), jnp.asarray(mask),
                                      jnp.asarray([1.0, 1.0, 0.0]))
  np.testing.assert_array_equal(np.asarray(a), [[1, 0, 0], [0, 0, 0], [0, 0, 0]])
  np.testing.assert_array_equal(np.asarray(u), [[0, 1, 1], [1, 1, 1], [0, 0, 0]])


# --------------------------------------------------------------------------- threshold alternation


def test_joint_training_collapses_thresholds_and_alternation_does_not():
  """A 'network' of free patch logits that moves slower than the thresholds (logits = 0.2 w, as
  a deep network fits slowly), annotated boxes, Eq. 12. Trained jointly, tau runs to
  the degenerate 0 while the network is still unfit; alternating (network with the
  thresholds frozen, then the thresholds with the network frozen) keeps them: once the
  network meets the constraints, the ReLU terms give the thresholds no gradient."""
  rng = np.random.default_rng(3)
  n, p, k = 8, 8, 2
  grid = np.zeros((n, p, p, k), np.float32)
  for i in range(n):
    y0, x0 = rng.integers(0, 4, 2)
    grid[i, y0:y0 + 4, x0:x0 + 4, i % k] = 1
  annotated = (grid.max(axis=(1, 2)) > 0).astype(np.float32)
  labels = annotated
  zero = np.zeros_like(annotated)
  init = {"tau": 0.7, "rho": 0.1, "tau_hat": 4.0, "rho_hat": 1.0}
  scale = {"tau": 1.0, "rho": 1.0, "tau_hat": p * p, "rho_hat": p * p}

  def thresholds(raw):
    return {name: scale[name] * jax.nn.sigmoid(raw[name]) for name in raw}

  def loss(params):
    per_image, _ = losses.rozenberg_loss(
        jax.nn.sigmoid(0.2 * params["logits"]), jnp.asarray(grid), jnp.asarray(labels),
        jnp.asarray(annotated), jnp.asarray(zero), thresholds(params["raw"]), 70.0, 1.0)
    return jnp.mean(per_image)

  def fresh():
    raw = {name: jnp.full((k,), np.log(v / scale[name]) - np.log1p(-v / scale[name]))
           for name, v in init.items()}
    return {"logits": jnp.full((n, p, p, k), -15.0), "raw": raw}  # z = sigmoid(-3) = 0.05

  def train(params, steps, trainable):
    group = lambda part: "train" if trainable in ("all", part) else "frozen"
    labels = {"logits": group("network"), "raw": jax.tree.map(lambda _: group("thr"), params["raw"])}
    tx = optax.multi_transform({"train": optax.adam(0.05), "frozen": optax.set_to_zero()}, labels)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
      grads = jax.grad(loss)(params)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    for _ in range(steps):
      params, state = step(params, state)
    return params

  joint = thresholds(train(fresh(), 400, "all")["raw"])
  params = fresh()
  for _ in range(2):
    params = train(params, 500, "network")
    params = train(params, 50, "thr")
  alternated = thresholds(params["raw"])
  assert float(jnp.max(joint["tau"])) < 0.2
  np.testing.assert_allclose(np.asarray(alternated["tau"]), init["tau"], atol=0.05)
  np.testing.assert_allclose(np.asarray(alternated["rho"]), init["rho"], atol=0.05)
  # ... and the alternated network localizes: the box holds >= tau of its patches' mass.
  z = jax.nn.sigmoid(0.2 * params["logits"])
  inside = jnp.sum(z * grid, axis=(1, 2)) / jnp.maximum(grid.sum(axis=(1, 2)), 1)
  assert float(jnp.min(jnp.where(annotated > 0, inside, 1.0))) >= 0.65


# --------------------------------------------------------------------------- method


def tiny_config(arg, **overrides):
  config = patch_loc_config.get_config(arg)
  config.unlock()
  config.data.image_size = 32
  config.data.synthetic.update(num_train=96, num_val=16, num_test=16, annotated_fraction=0.5)
  config.model.width = 0.125
  config.patch_loc.update(head_hidden=8, crf_window=5, crf_iterations=2, guide_features=4,
                          threshold_steps=2, crf_steps=2, feature_stage="conv4_x")
  config.batch_size, config.eval_batch_size = 8, 16
  config.train_steps, config.log_every, config.checkpoint_every = 4, 2, 100
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = value
  config.lock()
  return config


def test_stages_alternate_thresholds_and_freeze_the_unary_model_for_the_crf():
  method = get_method("patch_loc")
  names = [s.name for s in method.stages(tiny_config("loss=rozenberg,crf=1"))]
  assert names == ["network0", "thresholds0", "network1", "thresholds1", "network2", "crf"]
  stages = {s.name: s for s in method.stages(tiny_config("loss=rozenberg,crf=1"))}
  assert stages["thresholds0"].trainable == ("thresholds/.*",)
  assert stages["network1"].trainable == patch_loc.NETWORK_PARAMS
  assert stages["crf"].apply_kwargs == {"train_unary": False, "use_crf": True}
  assert [s.name for s in method.stages(tiny_config("loss=li"))] == ["network"]
  with pytest.raises(ValueError, match="config.patch_loc.loss"):
    method.stages(tiny_config("loss=li", **{"patch_loc.loss": "nope"}))


def test_paper_preset_fixes_the_thresholds_and_turns_blurpool_on():
  """dataset=nih: BlurPool (Sec. 3.3) on, the thresholds fixed hyperparameters (one 'network'
  stage that trains no threshold); fixed_thresholds=False gives back the alternation."""
  from cxr_jax.train import optim  # pylint: disable=import-outside-toplevel
  method = get_method("patch_loc")
  config = tiny_config("dataset=nih,loss=rozenberg,crf=1")
  assert config.model.blurpool == 3 and config.patch_loc.fixed_thresholds
  assert tiny_config("loss=rozenberg").model.blurpool == 0      # phantoms: as measured
  stages = method.stages(config)
  assert [s.name for s in stages] == ["network", "crf"]
  assert stages[0].steps == config.train_steps
  size = config.data.image_size
  params = jax.eval_shape(lambda: method.model(config).init(
      jax.random.key(0), jnp.zeros((1, size, size, 1)), train=False))["params"]
  labels = optim.param_labels(params, stages[0].trainable, stage="network")
  assert set(jax.tree.leaves(labels["thresholds"])) == {"frozen"}
  assert set(jax.tree.leaves(labels["backbone"])) == {"train"}
  literal = tiny_config("dataset=nih,loss=rozenberg", **{"patch_loc.fixed_thresholds": False})
  assert [s.name for s in method.stages(literal)][:2] == ["network0", "thresholds0"]


@pytest.mark.slow
def test_rozenberg_with_crf_trains_and_writes_patch_accuracy(tmp_path):
  config = tiny_config(
      "loss=rozenberg,crf=1,grid=4,folds=2,fold=1,unannotated=0.2,backbone=resnet18",
      **{"patch_loc.alternations": 1})
  method = get_method(config.method)
  state = trainer.train_and_evaluate(config, str(tmp_path), method=method)
  params = jax.device_get(state.params)
  assert set(params) == {"backbone", "head", "thresholds", "guide", "crf"}
  with open(tmp_path / "eval" / "test.json") as f:
    payload = json.load(f)
  patch = payload["patch_grid"]
  # The config's evaluator, run by hand on the final state, gives the section the trainer wrote.
  ctx = evaluators.EvalContext(
      config=config, workdir=None, method=method, model=method.model(config),
      mesh=parallel.make_mesh(), make_iterator=evaluators.default_make_iterator,
      evaluate=evaluator.evaluate)
  (declared,) = [d for d in evaluators.build_evals(ctx) if d.name == "patch_grid"]
  assert isinstance(declared.evaluator, patch_grid.PatchGridEval)
  again = declared.evaluator.run(state.variables(), stage="crf")
  assert set(again) == {"val", "test"} and json.loads(json.dumps(again["test"])) == patch
  assert patch["grid_size"] == 4
  boxed = set(schema.NIH14.boxed)
  assert set(patch["iou@0.1"]["n"]) <= boxed and patch["iou@0.1"]["n"]
  assert set(patch["iou@0.1"]["per_class"]) == set(patch["iou@0.1"]["n"])
  assert all(0.0 <= v <= 1.0 for v in patch["ior@0.1"]["per_class"].values())
  assert 0.0 <= patch["ior@0.1"]["mean"] <= 1.0
  # The all-positive reference covers the same units; with every patch detected, IoU and IoR
  # are both |G| / P^2, and a larger T can only lower the accuracy.
  reference = patch["all_positive"]
  assert reference["iou@0.1"]["n"] == patch["iou@0.1"]["n"]
  for t in ("0.1", "0.3", "0.5", "0.7"):
    assert reference[f"iou@{t}"]["per_class"] == reference[f"ior@{t}"]["per_class"]
  assert all(reference["iou@0.1"]["per_class"][c] >= reference["iou@0.7"]["per_class"][c]
             for c in reference["iou@0.1"]["per_class"])


def test_nih_config_defaults_to_512_px_but_keeps_a_given_size():
  assert patch_loc_config.get_config("dataset=nih").data.image_size == 512
  assert patch_loc_config.get_config("dataset=nih,size=128").data.image_size == 128


def test_nih_config_is_rozenbergs_cross_validation_reported_on_the_held_out_fold():
  """Every NIH box is on an official-test image: dataset=nih runs 5-fold CV over the boxed
  images unless the arg gives folds, and evals.patch_grid reports the held-out fold only."""
  nih = patch_loc_config.get_config("dataset=nih")
  assert (nih.data.cv.num_folds, nih.data.cv.fold) == (5, 0)
  assert tuple(nih.evals.patch_grid.splits) == ("test",)
  given = patch_loc_config.get_config("dataset=nih,folds=3,fold=2").data.cv
  assert (given.num_folds, given.fold) == (3, 2)
  assert patch_loc_config.get_config("dataset=nih,folds=0").data.cv.num_folds == 0
  assert len(patch_loc_config.get_sweep("dataset=nih")) == 10
  phantoms = patch_loc_config.get_config(None)    # unchanged: no CV, val and test reported
  assert phantoms.data.cv.num_folds == 0
  assert tuple(phantoms.evals.patch_grid.splits) == ("val", "test")


def test_crf_run_starts_from_the_finished_base_runs_newest_checkpoint(tmp_path):
  """benchmarks/patch_loc_cv.py: rozenberg+crf reuses rozenberg's unary checkpoint, once."""
  spec = importlib.util.spec_from_file_location(
      "patch_loc_cv", os.path.join(os.path.dirname(__file__), "..", "benchmarks", "patch_loc_cv.py"))
  cv = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cv)
  base, crf = tmp_path / "rozenberg-un0-fold0", tmp_path / "rozenberg+crf-un0-fold0"
  for step in (200, 350):
    (base / "checkpoints" / str(step) / "state").mkdir(parents=True)
    (base / "checkpoints" / str(step) / "state" / "d").write_text(f"step {step}")
  assert not cv.start_from_base_run(str(crf), str(base))       # base run not evaluated yet
  (base / "eval").mkdir()
  (base / "eval" / "test.json").write_text(json.dumps({"patch_grid": {}}))
  assert cv.start_from_base_run(str(crf), str(base))
  assert os.listdir(crf / "checkpoints") == ["350"]
  assert (crf / "checkpoints" / "350" / "state" / "d").read_text() == "step 350"
  assert not cv.start_from_base_run(str(crf), str(base))       # never over its own checkpoints


def test_patch_report_metric_form_and_the_all_positive_reference():
  """patch_report's 'iou@T' / 'all_positive' entries against a direct numpy count."""
  rng = np.random.default_rng(0)
  space = schema.NIH14
  n, p, k = 6, 5, len(space)
  grid = (rng.uniform(size=(n, p, p, k)) < 0.15).astype(np.float32)
  z = rng.uniform(size=(n, p, p, k)).astype(np.float32)
  report = patch_grid.patch_report(z, grid, space)
  for c, name in zip(space.boxed_indices, space.boxed):
    units = [i for i in range(n) if grid[i, ..., c].any()]
    if not units:
      assert name not in report["iou@0.1"]["per_class"]
      continue
    area = np.array([grid[i, ..., c].sum() / p ** 2 for i in units])  # IoU = IoR = |G| / P^2
    detected = z[units][..., c] >= 0.5
    gt = grid[units][..., c] > 0
    inter = (detected & gt).sum(axis=(1, 2))
    union = (detected | gt).sum(axis=(1, 2))
    ours_iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    for t in (0.1, 0.3, 0.5, 0.7):
      assert report["all_positive"][f"iou@{t}"]["per_class"][name] == pytest.approx(np.mean(area >= t))
      assert report["all_positive"][f"ior@{t}"]["per_class"][name] == pytest.approx(np.mean(area >= t))
      assert report[f"iou@{t}"]["per_class"][name] == pytest.approx(np.mean(ours_iou >= t))
    assert report["iou@0.1"]["n"][name] == len(units)
