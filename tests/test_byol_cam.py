"""Talasila 2023 (BYOL + CAM loss): Eq. 3, Eq. 5, Eq. 6-7 and its gradient, stages, report."""

import json
import types

import cv2
import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as skm
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from configs import byol_cam as byol_config
from tests import fixtures_real
from cxr_jax import cam, losses
from cxr_jax.cli import sweep
from cxr_jax.data import annotations, schema
from cxr_jax.evaluation import byol_report, evaluator, evaluators
from cxr_jax.methods import byol_cam, get_method
from cxr_jax.train.stage import LossContext
from cxr_jax.models import byol, classifier
from cxr_jax.models.byol import BYOLNetwork
from cxr_jax.train import parallel, trainer
from cxr_jax.train.state import TrainState


def test_symmetrised_byol_loss_matches_float64_reference():
  rng = np.random.default_rng(0)
  n, p = 3, 5
  predictions, targets = rng.normal(size=(2 * n, p)), rng.normal(size=(2 * n, p))

  def nmse(a, b):
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    return np.sum((a - b) ** 2)

  # view0's prediction against view1's target projection and vice versa (Eq. 3, symmetrised).
  expected = np.mean([nmse(predictions[i], targets[n + i]) + nmse(predictions[n + i], targets[i])
                      for i in range(n)])
  got = float(losses.symmetrised_byol_loss(jnp.asarray(predictions, jnp.float32),
                                             jnp.asarray(targets, jnp.float32)))
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  cos = np.sum(predictions * targets, -1) / np.linalg.norm(predictions, axis=-1) / np.linalg.norm(
      targets, axis=-1)
  np.testing.assert_allclose(losses.normalized_mse(predictions, targets), 2 - 2 * cos, rtol=1e-5)
  # No gradient reaches the target projections.
  grad = jax.grad(lambda t: losses.symmetrised_byol_loss(jnp.asarray(predictions), t))(
      jnp.asarray(targets))
  assert not np.any(np.asarray(grad))


def test_boxes_to_mask_matches_annotations():
  rng = np.random.default_rng(1)
  corners = np.sort(rng.uniform(0, 1, size=(4, 5, 2, 2)), axis=2)   # [N,B,(lo,hi),(x,y)]
  boxes = np.concatenate([corners[:, :, 0], corners[:, :, 1]], axis=-1).astype(np.float32)
  labels = rng.integers(-1, 8, size=(4, 5))
  labels[0] = -1                                                    # an image without boxes
  expected = annotations.boxes_to_mask(boxes, labels, 24, 20)
  got = np.asarray(losses.boxes_to_mask(jnp.asarray(boxes), jnp.asarray(labels), 24, 20))
  np.testing.assert_array_equal(got, expected)
  assert not got[0].any() and got[1:].any()


def numpy_cam_loss(features, kernel, bias, boxes, box_labels, weights, size, logit="gradcam"):
  """Float64 loop: Grad-CAM of a GAP + linear head (alpha_dc = W_dc / (h w)), signed, upsampled
  with OpenCV (bilinear, half-pixel centres), BCE against the union of the boxes (Eq. 6-7).
  logit 'cell': the sigmoid reads the class activation map A . W_c + b_c instead."""
  n, h, w, _ = features.shape
  mask = annotations.boxes_to_mask(boxes, box_labels, size, size)
  total, pairs = 0.0, 0
  for i in range(n):
    if not weights[i]:
      continue
    for c in sorted(set(box_labels[i][box_labels[i] >= 0].tolist())):
      gc = features[i] @ (kernel[:, c] / (h * w))
      if logit == "cell":
        gc = features[i] @ kernel[:, c] + bias[c]
      up = cv2.resize(gc.astype(np.float64), (size, size), interpolation=cv2.INTER_LINEAR)
      sig = 1 / (1 + np.exp(-up))
      total += np.mean(-mask[i] * np.log(sig) - (1 - mask[i]) * np.log(1 - sig))
      pairs += 1
  return total / max(pairs, 1)


@pytest.mark.parametrize("logit", ["gradcam", "cell"])
def test_cam_loss_matches_float64_reference(logit):
  rng = np.random.default_rng(2)
  features = rng.normal(size=(3, 4, 4, 6))
  kernel, bias = rng.normal(size=(6, 5)), rng.normal(size=5)
  boxes = np.array([[[0.1, 0.2, 0.6, 0.7], [0.5, 0.5, 0.9, 0.9]],
                    [[0.0, 0.0, 0.5, 0.5], [0, 0, 0, 0]],
                    [[0.2, 0.2, 0.8, 0.8], [0, 0, 0, 0]]], np.float32)
  box_labels = np.array([[1, 3], [2, -1], [4, -1]])
  weights = np.array([1.0, 1.0, 0.0])          # the third image is not annotated
  head = classifier.linear_head_fn({"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)})
  with jax.enable_x64(True):
    got = float(losses.cam_loss(head, jnp.asarray(features), jnp.asarray(boxes),
                                  jnp.asarray(box_labels), jnp.asarray(weights), (16, 16),
                                  logit=logit))
  expected = numpy_cam_loss(features, kernel, bias, boxes, box_labels, weights, 16, logit)
  np.testing.assert_allclose(got, expected, rtol=1e-7)  # OpenCV's bilinear weights: ~5e-9
  if logit == "cell":  # the cells' logits average to the head's logit
    cells = 16 * cam.grad_cam(head, jnp.asarray(features), relu=False) + bias[:, None, None]
    np.testing.assert_allclose(np.mean(cells, axis=(2, 3)), head(jnp.asarray(features)),
                               rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="'logits'"):
    losses.cam_loss(head, jnp.asarray(features), jnp.asarray(boxes), jnp.asarray(box_labels),
                      jnp.asarray(weights), (16, 16), logit="logits")


class TinyEncoder(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Conv(4, (3, 3), strides=(2, 2), param_dtype=jnp.float64)(x))
    return jnp.tanh(nn.Conv(5, (3, 3), strides=(2, 2), param_dtype=jnp.float64)(x))


@pytest.mark.parametrize("logit", ["gradcam", "cell"])
def test_cam_loss_gradient_through_grad_cam_matches_finite_differences(logit):
  """d L_CAM / d encoder params, second order through Grad-CAM, against central differences
  in float64 (step 1e-6: truncation O(h^2) ~ 1e-12, rounding ~ 1e-16 / 1e-6 = 1e-10)."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(3)
    images = jnp.asarray(rng.normal(size=(2, 16, 16, 1)))
    encoder = TinyEncoder()
    params = encoder.init(jax.random.key(0), images)
    # A non-linear head: its Grad-CAM weights depend on the features (second-order terms).
    w1, w2 = jnp.asarray(rng.normal(size=(5, 7))), jnp.asarray(rng.normal(size=(7, 3)))
    head = lambda f: jnp.tanh(jnp.mean(f, axis=(1, 2)) @ w1) @ w2
    boxes = jnp.asarray([[[0.1, 0.1, 0.6, 0.5]], [[0.3, 0.4, 0.9, 1.0]]])
    box_labels = jnp.asarray([[0], [2]])
    weights = jnp.ones(2)

    def loss(p):
      return losses.cam_loss(head, encoder.apply(p, images), boxes, box_labels, weights, (16, 16),
                               logit=logit)

    loss = jax.jit(loss)
    grads = jax.jit(jax.grad(loss))(params)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    grad_flat = jax.flatten_util.ravel_pytree(grads)[0]
    picks = np.random.default_rng(4).choice(flat.size, size=12, replace=False)
    h = 1e-6
    for i in picks:
      e = jnp.zeros_like(flat).at[i].set(h)
      numeric = (loss(unravel(flat + e)) - loss(unravel(flat - e))) / (2 * h)
      np.testing.assert_allclose(float(grad_flat[i]), float(numeric), rtol=1e-5, atol=1e-9)
    assert np.abs(np.asarray(grad_flat)).max() > 1e-4


def test_ema_update_constant_and_cosine_tau():
  params = {"backbone": {"w": jnp.full((2,), 1.0)}, "projector": {"w": jnp.full((3,), 2.0)},
            "probe": {"w": jnp.zeros(1)}}
  extras = byol.init_target(params, {})
  assert set(extras["target"]) == {"backbone", "projector"}
  moved = {**params, "backbone": {"w": jnp.full((2,), 3.0)}}
  state = TrainState(step=jnp.int32(0), params=moved, batch_stats={}, opt_state=(),
                     extras=extras, rng=np.zeros(2, np.uint32))
  out = byol.ema_update(0.99, "constant", 10, state)
  np.testing.assert_allclose(out.extras["target"]["backbone"]["w"], 0.99 * 1 + 0.01 * 3)
  np.testing.assert_allclose(out.extras["target"]["projector"]["w"], 2.0)
  assert int(out.extras["ema_step"]) == 1
  for k, expected in ((0, 0.99), (5, 1 - 0.01 * 0.5), (10, 1.0)):
    np.testing.assert_allclose(byol.tau_at(jnp.int32(k), 0.99, "cosine", 10), expected,
                               rtol=1e-6)
  with pytest.raises(ValueError, match="tau_schedule"):
    byol.tau_at(jnp.int32(0), 0.99, "linear", 10)


def _context(model, variables, extras):
  def apply(params, *args, **kwargs):
    out, updated = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, *args,
                               train=True, mutable=["batch_stats"], **kwargs)
    return out, updated["batch_stats"]
  return LossContext(apply=apply, extras=extras, step=jnp.int32(0))


class TinyBackbone(nn.Module):
  """Two strided convs with BatchNorm: [N,32,32,1] -> [N,4,4,8] (a fast stand-in for a ResNet)."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(8, (3, 3), strides=(4, 4))(x)))
    return nn.relu(nn.Conv(8, (3, 3), strides=(2, 2))(x))


def _tiny(arg=""):
  c = byol_config.get_config("runlocal" + arg)
  with c.unlocked():
    c.data.image_size = 32
  return c


def test_pretrain_loss_label_path_follows_probe_variant():
  """With probe_into_encoder False and no CAM loss the labels cannot reach the encoder;
  with either turned on they do."""
  rng = np.random.default_rng(5)
  n = 4
  batch = {k: jnp.asarray(rng.normal(size=(n, 32, 32, 1)), jnp.float32)
           for k in ("image", "view0", "view1")}
  batch.update(labels=jnp.asarray(rng.integers(0, 2, size=(n, 14)), jnp.float32),
               label_mask=jnp.ones((n, 14)), has_boxes=jnp.ones(n), valid=jnp.ones(n),
               boxes=jnp.tile(jnp.asarray([[0.1, 0.1, 0.5, 0.6]]), (n, 1, 1)),
               box_labels=jnp.asarray([[0], [1], [2], [3]]))
  flipped = {**batch, "labels": 1.0 - batch["labels"]}

  both = jax.tree.map(lambda a, b: jnp.stack([a, b]), batch, flipped)

  def backbone_grads(cam_weight, into_encoder):
    """Backbone gradients on ``batch`` and on ``flipped`` (one jit, vmapped over the two)."""
    c = _tiny(f",cam={cam_weight}")
    with c.unlocked():
      c.byol.probe_into_encoder = into_encoder
    model = BYOLNetwork(backbone=TinyBackbone(), num_classes=14, hidden_dim=16, projection_dim=8)
    variables = model.init(jax.random.key(0), batch["image"], mode="byol")
    ctx = _context(model, variables, byol.init_target(variables["params"], {}))
    grad = lambda data: jax.flatten_util.ravel_pytree(jax.grad(
        lambda p: byol_cam.pretrain_loss(c.byol, ctx, p, data, jax.random.key(1))[0])(
            variables["params"])["backbone"])[0]
    return np.asarray(jax.jit(jax.vmap(grad))(both))

  plain, supervised, with_cam = backbone_grads(0.0, False), backbone_grads(0.0, True), backbone_grads(2.0, False)
  np.testing.assert_allclose(plain[0], plain[1], rtol=1e-5, atol=1e-7)
  assert not np.allclose(supervised[0], supervised[1], rtol=1e-3, atol=1e-5)
  # The CAM term reaches the encoder: the gradient differs from the BYOL-only one.
  assert not np.allclose(with_cam[0], plain[0], rtol=1e-3, atol=1e-5)


def test_stages_and_sweep():
  method = get_method("byol_cam")
  c = byol_config.get_config("runlocal")
  pretrain, finetune = method.stages(c)
  assert (pretrain.name, finetune.name) == ("pretrain", "finetune")
  assert len(pretrain.data.views) == 2
  assert pretrain.data.views[1]["blur"] > pretrain.data.views[0]["blur"]
  assert pretrain.data.overrides == {"synthetic.seed": 1}
  assert pretrain.apply_kwargs == {"mode": "byol"} and pretrain.hooks.update_extras is not None
  assert finetune.validation.select_best and finetune.validation.every > 0
  assert finetune.validation.plateau_signal == "train_loss"  # Sec. IV-b
  bad = byol_config.get_config("runlocal")
  with bad.unlocked():
    bad.byol.finetune.plateau_signal = "val_loss"
  with pytest.raises(ValueError, match="config.byol.finetune.plateau_signal 'val_loss'"):
    method.stages(bad)
  with bad.unlocked():
    bad.byol.finetune.plateau_signal, bad.byol.cam_logit = "train_loss", "logits"
  with pytest.raises(ValueError, match="config.byol.cam_logit 'logits'"):
    method.stages(bad)
  opt = finetune.optimizer
  assert opt.schedule == "plateau" and opt.decay_rate == 0.1 and opt.plateau_patience == 4
  np.testing.assert_allclose(opt.learning_rate * opt.plateau_min_scale, 1e-6)

  no_ssl = byol_config.get_config("runlocal")
  with no_ssl.unlocked():
    no_ssl.byol.ssl = False
  assert [s.name for s in method.stages(no_ssl)] == ["finetune"]

  rows = byol_config.get_sweep("")
  assert [(r["byol.ssl"], r["byol.cam_weight"]) for r in rows] == [(False, 0.0), (True, 0.0),
                                                                   (True, 2.0)]
  assert rows[0]["model.backbone"] == "resnet50"
  xrv = byol_config.get_sweep("xrv=/w/xrv.npz")[3:]
  assert [r["byol.finetune.cam_weight"] for r in xrv] == [0.0, 2.0]
  assert all(r["model.init_from"] == "/w/xrv.npz" and r["model.backbone"] == "densenet121"
             for r in xrv)
  # Pretraining on another real dataset: its name and label space replace config.data's, and
  # on NIH a fold of cross-validation over its boxed images is its 'train' (byol.pretrain_cv).
  other = byol_config.get_config("dataset=chexpert,pretrain=nih")
  assert byol_cam.pretrain_overrides(other) == {
      "name": "nih", "label_space": "nih14", "manual_dir": "", "cv.num_folds": 5, "cv.fold": 0,
      "cv.unannotated_fraction": 1.0}
  assert "cv.num_folds" not in byol_cam.pretrain_overrides(byol_config.get_config("runlocal"))
  # The held-out fold is the NIH IoU test set; command-line overrides of byol reach it.
  other.byol.pretrain_manual_dir, other.byol.pretrain_cv.fold = "/data/nih", 3
  assert other.evals.nih_boxes.data.to_dict() == {
      "name": "nih", "manual_dir": "/data/nih", "label_space": "chexpert14",
      "cv": {"num_folds": 5, "fold": 3}}
  assert other.evals.cam_kinds.data.to_dict() == other.evals.nih_boxes.data.to_dict()
  assert "nih_boxes" not in byol_config.get_config("runlocal").evals
  # "XRV + CAM loss" fine-tunes on NIH with the CAM loss ('cam_finetune') before CheXpert.
  xrv_rows = byol_config.get_sweep("dataset=chexpert,pretrain=nih,xrv=/w/xrv.npz")[3:]
  assert "byol.finetune.cam_stage_steps" not in xrv_rows[0]
  xrv_cam = sweep.apply_overrides(other, xrv_rows[1], "row")
  cam_stage, finetune = method.stages(xrv_cam)
  assert (cam_stage.name, finetune.name) == ("cam_finetune", "finetune")
  assert cam_stage.steps == other.byol.steps and cam_stage.loss.args[0] == 2.0
  assert finetune.loss.args[0] == 0.0                  # CheXpert has no boxes: no CAM loss there
  assert cam_stage.data.overrides == {**byol_cam.pretrain_overrides(xrv_cam),
                                      "label_space": "chexpert14"}


def test_finetune_head_from_probe():
  """head_init='probe': fine-tuning's prepare copies the probe into the head and nothing else;
  'auto' picks it exactly when both stages share a label space; mismatched label spaces and a
  run without pretraining are refused, naming the key."""
  rng = np.random.default_rng(0)
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  params = {"probe": {"kernel": normal(8, 5), "bias": normal(5)},
            "head": {"kernel": np.zeros((8, 5), np.float32), "bias": np.zeros(5, np.float32)},
            "backbone": {"w": normal(3, 3)}}
  extras = {"marker": np.ones(2)}
  ctx = types.SimpleNamespace(params=params, extras=extras)
  new_params, new_extras = byol_cam.head_from_probe(ctx)
  for name in ("kernel", "bias"):
    np.testing.assert_array_equal(new_params["head"][name], params["probe"][name])
    np.testing.assert_array_equal(new_params["probe"][name], params["probe"][name])
  np.testing.assert_array_equal(new_params["backbone"]["w"], params["backbone"]["w"])
  assert new_extras is extras and not np.any(params["head"]["kernel"])   # input left as it was
  other = {**params, "head": {"kernel": np.zeros((8, 3)), "bias": np.zeros(3)}}
  with pytest.raises(ValueError, match="config.byol.finetune.head_init='probe'.*label spaces"):
    byol_cam.head_from_probe(types.SimpleNamespace(params=other, extras=extras))

  method = get_method("byol_cam")
  c = byol_config.get_config("runlocal")
  assert c.byol.finetune.head_init == "auto"
  assert method.stages(c)[-1].hooks.prepare is byol_cam.head_from_probe        # one label space: probe
  for pretrain, expected in (("nih", None), ("", byol_cam.head_from_probe)):
    other = byol_config.get_config(f"runlocal,dataset=chexpert,pretrain={pretrain}")
    assert method.stages(other)[-1].hooks.prepare is expected                   # NIH -> CheXpert: fresh
  with c.unlocked():
    c.byol.finetune.head_init = "probe"
  assert method.stages(c)[-1].hooks.prepare is byol_cam.head_from_probe
  with c.unlocked():
    c.byol.finetune.head_init = "fresh"
  assert method.stages(c)[-1].hooks.prepare is None
  with c.unlocked():
    c.byol.ssl, c.byol.finetune.head_init = False, "auto"
  assert method.stages(c)[-1].hooks.prepare is None                            # no probe without SSL
  with c.unlocked():
    c.byol.finetune.head_init = "probe"
  with pytest.raises(ValueError, match="config.byol.ssl=True"):
    method.stages(c)
  with c.unlocked():
    c.byol.ssl, c.byol.finetune.head_init = True, "linear"
  with pytest.raises(ValueError, match="config.byol.finetune.head_init 'linear'"):
    method.stages(c)


class IdentityCam:
  """features = the image itself, head = GAP x w (w > 0): every CAM kind shows the image."""

  def cam_target(self, model, variables):
    del model
    w = variables["w"]
    return (lambda x: x), (lambda f: jnp.mean(f, axis=(1, 2)) @ w)


def test_compare_cams_recovers_drawn_boxes(tmp_path):
  images = np.zeros((2, 32, 32, 1), np.float32)
  images[0, 4:12, 8:20] = 1.0
  images[1, 16:30, 2:10] = 1.0
  boxes = np.array([[[8 / 32, 4 / 32, 20 / 32, 12 / 32]], [[2 / 32, 16 / 32, 10 / 32, 30 / 32]]],
                   np.float32)
  box_labels = np.array([[1], [0]])
  compared = byol_report.compare_cams(IdentityCam(), None, {"w": jnp.ones((1, 2))}, images, boxes,
                                      box_labels, score_batch_size=4)
  for kind in cam.KINDS:
    assert compared[kind]["mean_iou"] > 0.99, kind
    np.testing.assert_allclose(compared[kind]["pred_boxes"][0], boxes[0], atol=1e-6)
  # An off-box image lowers the IoU: the metric is not constant.
  shifted = byol_report.compare_cams(IdentityCam(), None, {"w": jnp.ones((1, 2))},
                                     np.roll(images, 6, axis=2), boxes, box_labels,
                                     kinds=("gradcam",))
  assert shifted["gradcam"]["mean_iou"] < 0.7
  path = byol_report.write_cam_panel(images, boxes, box_labels, compared,
                                     str(tmp_path / "panel.png"))
  assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_micro_pr_average_precision_and_plot(tmp_path):
  rng = np.random.default_rng(6)
  labels = rng.integers(0, 2, size=(40, 3)).astype(np.float32)
  probs = np.clip(labels * 0.3 + rng.uniform(size=(40, 3)), 0, 1)
  mask = np.ones_like(labels)
  mask[:5, 0] = 0
  _, _, ap = byol_report.micro_pr(probs, labels, mask)
  # AP = sum over the ranked positives of the precision at each of them / #positives (no ties).
  keep = mask > 0
  y, p = labels[keep], probs[keep]
  order = np.argsort(-p)
  hits = y[order]
  precision_at = np.cumsum(hits) / np.arange(1, len(hits) + 1)
  np.testing.assert_allclose(ap, np.sum(precision_at * hits) / hits.sum(), rtol=1e-9)
  np.testing.assert_allclose(ap, skm.average_precision_score(y, p), rtol=1e-9)
  # Runs' saved predictions drawn on one panel (Fig. 5); a missing run names its file.
  for name, p_run in (("a", probs), ("b", 1 - probs)):
    byol_report.write_predictions(str(tmp_path / name / "eval" / "predictions_test.npz"),
                                  {"probs": p_run, "labels": labels, "label_mask": mask,
                                   "index": np.arange(40)})
  out = byol_report.compare_runs({"a": str(tmp_path / "a"), "b": str(tmp_path / "b")},
                                 str(tmp_path / "pr.png"))
  assert open(out, "rb").read(4) == b"\x89PNG"
  with pytest.raises(FileNotFoundError, match="predictions_test.npz"):
    byol_report.compare_runs({"c": str(tmp_path / "c")}, str(tmp_path / "pr2.png"))


def test_cam_kinds_eval_writes_its_section_panel_and_predictions(tmp_path):
  """The config's 'cam_kinds' evaluator on an initialized model over the runlocal phantoms."""
  config = byol_config.get_config("runlocal")
  method = get_method("byol_cam")
  model = method.model(config)
  size = config.data.image_size
  variables = model.init(jax.random.key(0), jnp.zeros((1, size, size, config.data.channels)))
  ctx = evaluators.EvalContext(
      config=config, workdir=str(tmp_path), method=method, model=model,
      mesh=parallel.make_mesh(), make_iterator=evaluators.default_make_iterator,
      evaluate=evaluator.evaluate)
  declared = [d for d in evaluators.build_evals(ctx) if d.name == "cam_kinds"]
  assert [type(d.evaluator) for d in declared] == [byol_report.CamKindsEval]
  section = evaluators.run_evals(ctx, declared, variables, stage="finetune")["cam_kinds"]["test"]
  with open(tmp_path / "eval" / "test.json") as f:
    assert json.load(f)["cam_kinds"] == json.loads(json.dumps(section))
  assert section["num_images"] == config.evals.cam_kinds.max_images
  assert section["num_boxes"] >= section["num_images"]
  assert set(section["mean_iou"]) == set(cam.KINDS) and 0.0 <= section["micro_ap"] <= 1.0
  for png in ("cam_comparison_test.png", "pr_micro_test.png"):
    assert (tmp_path / "report" / png).read_bytes()[:4] == b"\x89PNG"
  with np.load(tmp_path / "eval" / "predictions_test.npz") as f:
    assert set(f.files) == {"probs", "labels", "label_mask", "index"}
    assert len(f["probs"]) == config.data.synthetic.num_test


def tensorboard_scalars(workdir) -> dict[str, list[float]]:
  """{tag: [values in step order]} of the run's TensorBoard events (the trainer's scalars)."""
  events = event_accumulator.EventAccumulator(str(workdir), size_guidance={"tensors": 0})
  events.Reload()
  return {tag: [float(tensor_util.make_ndarray(e.tensor_proto)) for e in events.Tensors(tag)]
          for tag in events.Tags()["tensors"]}


def test_nih_pretraining_trains_with_boxes_and_reports_nih_iou(tmp_path):
  """The paper setting (pretrain=nih, fine-tune on CheXpert) on fixtures in the official
  layouts, the NIH one shaped like the full download: images in both official lists, every
  box on an official-test image, so NIH's official train split has no box. The pretraining
  stage still trains with a nonzero CAM loss (its data is a cross-validation fold over the
  boxed images), and the held-out fold's boxed images give the NIH IoU."""
  nih_dir = fixtures_real.nih_tree(tmp_path / "nih", num=96)
  chexpert_dir = fixtures_real.chexpert_tree(tmp_path / "chexpert")
  config = byol_config.get_config("dataset=chexpert,pretrain=nih,runlocal")
  assert config.byol.pretrain_cv.num_folds == 5
  config.byol.pretrain_manual_dir, config.data.manual_dir = nih_dir, chexpert_dir
  config.byol.steps, config.byol.finetune.steps, config.byol.finetune.eval_every = 4, 2, 2
  config.log_every, config.eval_batch_size = 2, 16
  config.evals.cam_kinds.when = "never"        # the same images as nih_boxes; its own test above
  trainer.train_and_evaluate(config, str(tmp_path / "run"), method=get_method("byol_cam"),
                             mesh=parallel.make_mesh(jax.devices()[:1]))
  cam_losses = tensorboard_scalars(tmp_path / "run")["pretrain/cam"]
  assert cam_losses and all(v > 0 for v in cam_losses), cam_losses
  with open(tmp_path / "run" / "eval" / "test.json") as f:
    written = json.load(f)
  assert written["dataset"] == "chexpert"               # the run's own header
  nih = written["nih_boxes"]
  assert (nih["dataset"], nih["split"]) == ("nih", "test") and nih["num_examples"] > 0
  iou = nih["localization"]["mean_iou"]
  assert 0.0 <= iou["mean"] <= 1.0 and sum(iou["n"].values()) > 0
  assert set(iou["n"]) <= set(schema.CHEXPERT14.boxed)
