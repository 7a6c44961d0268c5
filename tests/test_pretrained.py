"""Pretrained weights: torchvision parity, channel adaptation, key checks, files, init_from."""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _trainer_worker as w
from cxr_jax.cli import convert_weights
from cxr_jax.methods.baseline import Baseline
from cxr_jax.models import pretrained
from cxr_jax.models.backbones import get_backbone
from cxr_jax.train import parallel, trainer
from cxr_jax.train import step as train_step

SIZE = 64


def _torch():
  torch = pytest.importorskip("torch")
  pytest.importorskip("torchvision")
  return torch


def _randomize_bn(torch, model, seed=1):
  """Non-trivial BN: running stats and affine params far from (0, 1), so skipping BN would show."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        n = m.num_features
        m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
        m.running_var.copy_(0.3 + 1.5 * torch.rand(n, generator=g))
        m.weight.copy_(0.5 + torch.rand(n, generator=g))
        m.bias.copy_(0.2 * torch.randn(n, generator=g))


def _torchvision_model(arch, seed=0):
  """A random-init torchvision model in eval mode, and its feature extractor (NCHW -> NCHW).

  VGG: only ``features`` is built (``make_layers``; the 100M-weight classifier
  is not needed), its keys prefixed 'features.' as in ``vgg16().state_dict()``.
  """
  torch = _torch()
  import torchvision  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  if arch.startswith("vgg"):
    from torchvision.models import vgg  # pylint: disable=g-import-not-at-top
    model = torch.nn.Module()
    model.features = vgg.make_layers(vgg.cfgs["D"], batch_norm=arch.endswith("_bn"))
    features = model.features
  else:
    model = getattr(torchvision.models, arch)()
    if arch.startswith("resnet"):
      features = torch.nn.Sequential(*list(model.children())[:-2])  # up to layer4
    else:
      features = lambda x: torch.relu(model.features(x))  # as DenseNet.forward
  _randomize_bn(torch, model, seed + 1)
  return model.eval(), features


@functools.cache
def _jit_apply(arch):
  module = get_backbone(arch)
  return jax.jit(lambda v, x: module.apply(v, x, train=False))


def _nhwc(t):
  return t.detach().permute(0, 2, 3, 1).numpy()


def _relative_error(ours, ref):
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "densenet121", "vgg16", "vgg16_bn"])
def test_forward_matches_torchvision(arch):
  torch = _torch()
  model, features = _torchvision_model(arch)
  x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
  with torch.no_grad():
    ref = _nhwc(features(x))
  variables = pretrained.convert_torchvision(arch, model.state_dict())
  ours = np.asarray(_jit_apply(arch)(variables, _nhwc(x)))
  assert ours.shape == ref.shape == (2, SIZE // 32, SIZE // 32, get_backbone(arch).num_features)
  err = _relative_error(ours, ref)
  print(f"{arch}: max abs {np.max(np.abs(ours - ref)):.3g}, relative {err:.3g}")
  assert err < 1e-4
  # The converted BN statistics matter: with mean 0 / var 1 instead the output is far off.
  if variables["batch_stats"]:
    trivial = jax.tree_util.tree_map_with_path(
        lambda path, s: np.zeros_like(s) if path[-1].key == "mean" else np.ones_like(s),
        variables["batch_stats"])
    off = np.asarray(_jit_apply(arch)({**variables, "batch_stats": trivial}, _nhwc(x)))
    assert _relative_error(off, ref) > 1e-2


def test_resnet_head_reproduces_torchvision_logits():
  torch = _torch()
  model, _ = _torchvision_model("resnet18")
  x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
  with torch.no_grad():
    ref = model(x).numpy()
  variables = pretrained.convert_torchvision("resnet18", model.state_dict(), head=True)
  head = variables.pop("head")
  features = np.asarray(_jit_apply("resnet18")(variables, _nhwc(x)))
  logits = features.mean(axis=(1, 2)) @ head["kernel"] + head["bias"]
  assert _relative_error(logits, ref) < 1e-4


def test_vgg_head_uses_torch_flatten_order():
  torch = _torch()
  model, _ = _torchvision_model("vgg16")
  classifier = torch.nn.Sequential(torch.nn.Linear(512 * 49, 16), torch.nn.ReLU(), torch.nn.Dropout(),
                                   torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Dropout(),
                                   torch.nn.Linear(16, 5)).eval()
  state = dict(model.state_dict())
  state.update({f"classifier.{k}": v for k, v in classifier.state_dict().items()})
  head = pretrained.convert_torchvision("vgg16", state, head=True)["head"]
  assert sorted(head) == ["classifier_0", "classifier_3", "classifier_6"]
  pooled = torch.randn(2, 512, 7, 7, generator=torch.Generator().manual_seed(4))  # torch avgpool output
  with torch.no_grad():
    ref = classifier(torch.flatten(pooled, 1)).numpy()
  y = _nhwc(pooled).reshape(2, -1)  # our [N,7,7,512] map, flattened H,W,C
  for i, name in enumerate(("classifier_0", "classifier_3", "classifier_6")):
    y = y @ head[name]["kernel"] + head[name]["bias"]
    y = np.maximum(y, 0) if i < 2 else y
  assert _relative_error(y, ref) < 1e-5


def test_one_channel_conversion_equals_torch_on_replicated_grey():
  torch = _torch()
  model, features = _torchvision_model("resnet18")
  grey = torch.randn(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
  with torch.no_grad():
    ref = _nhwc(features(grey.repeat(1, 3, 1, 1)))
  variables = pretrained.convert_torchvision("resnet18", model.state_dict(), in_channels=1)
  assert variables["params"]["conv1"]["kernel"].shape == (7, 7, 1, 64)
  ours = np.asarray(_jit_apply("resnet18")(variables, _nhwc(grey)))
  err = _relative_error(ours, ref)
  print(f"resnet18, 1 channel: max abs {np.max(np.abs(ours - ref)):.3g}, relative {err:.3g}")
  assert err < 1e-4


def test_xrv_layout_converts_like_torchvision():
  """torchxrayvision's DenseNet: legacy 'norm.1' names, 1-channel conv0, 18 outputs, op_threshs."""
  torch = _torch()
  model, _ = _torchvision_model("densenet121")
  state = {k: v for k, v in model.state_dict().items() if not k.startswith("classifier.")}
  expected = pretrained.convert_torchvision("densenet121", state, in_channels=1)
  xrv = {}
  for key, value in state.items():
    for name in ("norm1", "relu1", "conv1", "norm2", "relu2", "conv2"):
      key = key.replace(f".{name}.", f".{name[:-1]}.{name[-1]}.")
    xrv[key] = value
  assert "features.denseblock1.denselayer1.norm.1.weight" in xrv
  xrv["features.conv0.weight"] = state["features.conv0.weight"].sum(1, keepdim=True)
  xrv["classifier.weight"], xrv["classifier.bias"] = torch.randn(18, 1024), torch.randn(18)
  xrv["op_threshs"] = torch.rand(18)
  got = pretrained.convert_xrv_densenet121(xrv, head=True)
  np.testing.assert_allclose(got["head"]["kernel"], xrv["classifier.weight"].numpy().T)
  got.pop("head")
  flat_got = jax.tree_util.tree_leaves_with_path(got)
  flat_expected = dict(jax.tree_util.tree_leaves_with_path(expected))
  assert len(flat_got) == len(flat_expected)
  for path, value in flat_got:
    np.testing.assert_allclose(value, flat_expected[path], rtol=1e-6, atol=1e-6, err_msg=str(path))
  # 1 -> 3 channels spreads the grey kernel: an RGB copy of a grey image gives the same conv0.
  rgb = pretrained.convert_xrv_densenet121(xrv, in_channels=3)["params"]["conv0"]["kernel"]
  np.testing.assert_allclose(rgb.sum(axis=2, keepdims=True), got["params"]["conv0"]["kernel"], rtol=1e-5)


def test_conversion_errors_list_every_bad_key():
  _torch()
  model, _ = _torchvision_model("resnet18")
  state = dict(model.state_dict())
  del state["layer1.0.bn1.running_var"]
  state["layer2.0.conv1.weight"] = state["layer2.0.conv1.weight"][:, :32]
  state["layer5.0.conv1.weight"] = state["layer4.0.conv1.weight"]
  with pytest.raises(ValueError) as e:
    pretrained.convert_torchvision("resnet18", state)
  message = str(e.value)
  assert "missing (1): batch_stats/layer1_0/bn1/var" in message
  assert "params/layer2_0/conv1/kernel: expected (3, 3, 64, 128), got (3, 3, 32, 128)" in message
  assert "unexpected (1): params/layer5_0/conv1/kernel" in message
  with pytest.raises(KeyError, match="known"):
    pretrained.convert_torchvision("resnet101", state)


def test_merge_into_baseline_backbone_and_its_errors():
  converted = {"params": {"conv": {"kernel": np.full((3, 3, 1, 8), 2.0)}, "bn": {"scale": np.ones(8)}},
               "batch_stats": {"bn": {"mean": np.full(8, 0.5), "var": np.full(8, 3.0)}}}
  params = {"backbone": {"conv": {"kernel": jnp.zeros((3, 3, 1, 8))}, "bn": {"scale": jnp.zeros(8)}},
            "head": {"kernel": jnp.ones((8, 2)), "bias": jnp.zeros(2)}}
  batch_stats = {"backbone": {"bn": {"mean": jnp.zeros(8), "var": jnp.ones(8)}}}
  new_params, new_stats = pretrained.merge_into(params, batch_stats, converted)
  np.testing.assert_array_equal(new_params["backbone"]["conv"]["kernel"], 2.0)
  np.testing.assert_array_equal(new_stats["backbone"]["bn"]["var"], 3.0)
  assert new_params["backbone"]["conv"]["kernel"].dtype == np.float32
  np.testing.assert_array_equal(new_params["head"]["kernel"], 1.0)
  np.testing.assert_array_equal(params["backbone"]["conv"]["kernel"], 0.0)  # inputs untouched

  bad = {"params": {"conv": {"kernel": np.zeros((3, 3, 3, 8))}, "extra": {"bias": np.zeros(8)}},
         "batch_stats": converted["batch_stats"]}
  with pytest.raises(ValueError) as e:
    pretrained.merge_into(params, batch_stats, bad)
  message = str(e.value)
  assert "missing (1): bn/scale" in message
  assert "unexpected (1): extra/bias" in message
  assert "conv/kernel: expected (3, 3, 1, 8), got (3, 3, 3, 8)" in message
  with pytest.raises(ValueError, match=r"no 'encoder/backbone' subtree; its top level: \['backbone', 'head'\]"):
    pretrained.merge_into(params, batch_stats, converted, prefix="encoder/backbone")

  # The real baseline model keeps its backbone under 'backbone': a full-width resnet18 fits.
  config = w.tiny_config()
  config.model.backbone, config.model.width, config.data.channels = "resnet18", 1.0, 1
  shapes = jax.eval_shape(Baseline().model(config).init, jax.random.key(0), jnp.zeros((1, 32, 32, 1)))
  fake = jax.tree.map(lambda s: np.ones(s, np.float32), pretrained.expected_shapes("resnet18", 1),
                      is_leaf=lambda x: isinstance(x, tuple))
  merged, _ = pretrained.merge_into(shapes["params"], shapes["batch_stats"], fake)
  np.testing.assert_array_equal(merged["backbone"]["layer4_1"]["conv2"]["kernel"], 1.0)
  assert isinstance(merged["head"]["kernel"], jax.ShapeDtypeStruct)


def test_files_round_trip(tmp_path):
  torch = _torch()
  model, _ = _torchvision_model("resnet18")
  torch.save(model.state_dict(), tmp_path / "resnet18.pth")
  state = pretrained.load_state_dict(tmp_path / "resnet18.pth")
  for key, value in model.state_dict().items():
    np.testing.assert_array_equal(state[key], value.numpy(), err_msg=key)
  np.savez(tmp_path / "resnet18_state.npz", **state)
  from_npz = pretrained.load_state_dict(tmp_path / "resnet18_state.npz")
  assert sorted(from_npz) == sorted(state)
  from safetensors.numpy import save_file
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(tmp_path / "r18.safetensors"))
  from_safetensors = pretrained.load_state_dict(tmp_path / "r18.safetensors")
  for key, value in state.items():
    np.testing.assert_array_equal(from_safetensors[key], value, err_msg=key)
  os.remove(tmp_path / "r18.safetensors")

  written = convert_weights.convert("resnet18", str(tmp_path / "resnet18.pth"), str(tmp_path / "out.npz"),
                                    in_channels=1)
  loaded = pretrained.load_flax(tmp_path / "out.npz")
  assert jax.tree.structure(loaded) == jax.tree.structure(written)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(written)):
    np.testing.assert_array_equal(a, b)
  assert sorted(os.listdir(tmp_path)) == ["out.npz", "resnet18.pth", "resnet18_state.npz"]  # no temp left
  (tmp_path / "weights.ckpt").write_bytes(b"")
  with pytest.raises(ValueError, match="unknown weights format"):
    pretrained.load_state_dict(tmp_path / "weights.ckpt")


class _FrozenBackboneBaseline(w.TinyBaseline):
  """TinyBaseline whose only stage trains the head: backbone params and BN stats stay as loaded."""

  def stages(self, config):
    return [dataclasses.replace(stage, trainable=(r"head/.*",), apply_kwargs={"train_backbone": False})
            for stage in super().stages(config)]


def test_trainer_init_from_loads_backbone_keeps_fresh_head(tmp_path):
  method = _FrozenBackboneBaseline()
  config = w.tiny_config(steps=1)
  stage = method.stages(config)[0]
  fresh, fresh_stats = train_step.init_variables(method.model(config), stage, config, jax.random.key(0))
  rng = np.random.default_rng(0)
  converted = {"params": jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), fresh["backbone"]),
               "batch_stats": jax.tree.map(lambda a: rng.uniform(0.5, 2, size=a.shape).astype(np.float32),
                                           fresh_stats["backbone"])}
  pretrained.save_flax(converted, tmp_path / "tiny.npz")
  mesh = parallel.make_mesh(jax.devices()[:1])
  no_eval = lambda *args, **kwargs: {"classification": {}}
  run = functools.partial(trainer.train_and_evaluate, method=method, make_iterator=w.make_iterator_factory(0.0),
                          evaluate=no_eval, mesh=mesh)
  config.optimizer.learning_rate = 0.0
  plain = run(config, str(tmp_path / "plain"))
  config.model.init_from = str(tmp_path / "tiny.npz")
  loaded = run(config, str(tmp_path / "loaded"))
  for collection in ("params", "batch_stats"):
    got = jax.device_get(getattr(loaded, collection)["backbone"])
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(converted[collection])):
      np.testing.assert_array_equal(a, b)
  assert not np.allclose(jax.device_get(plain.params["backbone"]["conv0"]["kernel"]),
                         converted["params"]["conv0"]["kernel"])
  for a, b in zip(jax.tree.leaves(jax.device_get(loaded.params["head"])),
                  jax.tree.leaves(jax.device_get(plain.params["head"]))):
    np.testing.assert_array_equal(a, b)  # the head is the same fresh init as without init_from

  converted["params"]["conv0"]["kernel"] = converted["params"]["conv0"]["kernel"][..., :4]
  pretrained.save_flax(converted, tmp_path / "bad.npz")
  config.model.init_from = str(tmp_path / "bad.npz")
  with pytest.raises(ValueError, match="conv0/kernel: expected"):
    run(config, str(tmp_path / "bad"))
