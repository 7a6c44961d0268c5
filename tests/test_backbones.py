"""Backbones: shapes/strides of every registered name, torchvision param counts and names,
BlurPool placement, pre-activation ordering, BatchNorm and bfloat16 behaviour."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxr_jax.models.backbones import BACKBONES, get_backbone
from cxr_jax.models.backbones import resnet

STAGE_STRIDES = {"conv2_x": 4, "conv3_x": 8, "conv4_x": 16, "conv5_x": 32}


def _shapes(model, x_shape, **kw):
  """(output shapes, variable shapes) by abstract evaluation: no compilation, no FLOPs."""
  return jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), jnp.zeros(x_shape), **kw))


def _num_params(variables) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(variables["params"]))


def _flat_names(tree) -> set[str]:
  return {"/".join(str(k.key) for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)}


def test_unknown_name_lists_known_names():
  with pytest.raises(KeyError, match="resnet50.*densenet121.*vgg16"):
    get_backbone("resnet51")
  with pytest.raises(ValueError, match="only implemented for the ResNets"):
    get_backbone("densenet121", blurpool=3)
  with pytest.raises(ValueError, match="1..7"):
    get_backbone("resnet18", blurpool=9)


@pytest.mark.parametrize("name", BACKBONES)
def test_shapes_strides_and_num_features(name):
  configs = [{}] + ([{"blurpool": 3}, {"blurpool": 4, "blur_stem_conv": False}] if "resnet" in name else [])
  for kw in configs:
    model = get_backbone(name, width=0.125, **kw)
    feats, variables = _shapes(model, (2, 64, 96, 1))
    assert feats.shape == (2, 2, 3, model.num_features), (name, kw)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
    stages, _ = _shapes(model, (2, 64, 64, 3), return_stages=True)
    assert set(stages) == set(STAGE_STRIDES)
    for stage, stride in STAGE_STRIDES.items():
      assert stages[stage].shape[:3] == (2, 64 // stride, 64 // stride), (name, kw, stage)
    assert stages["conv5_x"].shape == (2, 2, 2, model.num_features)


@pytest.mark.parametrize("name,count", [
    ("resnet18", 11_689_512 - 513_000),   # torchvision total minus fc (512*1000 + 1000)
    ("resnet34", 21_797_672 - 513_000),
    ("resnet50", 25_557_032 - 2_049_000),  # fc 2048*1000 + 1000
    # resnet50's BN params are 53,120 (stem bn1 128 + block norms 45,312 + downsample BNs 7,680);
    # pre-act has 45,440 (block input norms 41,344 + bn_final 4,096): 7,680 fewer. The result is
    # timm's resnetv2_50 (25.55 M) without its head.
    ("preact_resnet50", 25_557_032 - 2_049_000 - 7_680),
    ("densenet121", 7_978_856 - 1_025_000),  # classifier 1024*1000 + 1000
    ("vgg16", 14_714_688),                   # torchvision vgg16.features
    ("vgg16_bn", 14_714_688 + 2 * 4_224),    # + BN scale/bias over 4,224 conv channels
])
def test_param_counts_match_torchvision(name, count):
  _, variables = _shapes(get_backbone(name), (1, 32, 32, 3))
  assert _num_params(variables) == count
  if "resnet" in name:  # BlurPool adds no parameters
    _, blurred = _shapes(get_backbone(name, blurpool=4), (1, 32, 32, 3))
    assert _num_params(blurred) == count


def test_param_names_follow_torchvision_state_dict_keys():
  _, v = _shapes(get_backbone("resnet50"), (1, 32, 32, 3))
  p = v["params"]
  assert p["conv1"]["kernel"].shape == (7, 7, 3, 64)
  assert p["layer1_0"]["downsample_conv"]["kernel"].shape == (1, 1, 64, 256)
  assert p["layer2_0"]["conv2"]["kernel"].shape == (3, 3, 128, 128)  # stride on the 3x3 (v1.5)
  assert p["layer4_2"]["bn3"]["scale"].shape == (2048,)
  assert v["batch_stats"]["layer3_5"]["bn2"]["var"].shape == (256,)
  assert sorted(k for k in p if k.startswith("layer")) == sorted(
      f"layer{i + 1}_{j}" for i, n in enumerate((3, 4, 6, 3)) for j in range(n))

  _, v = _shapes(get_backbone("densenet121"), (1, 32, 32, 3))
  p = v["params"]
  assert sorted(p) == sorted(["conv0", "norm0", "norm5"] + [f"denseblock{i}" for i in range(1, 5)]
                             + [f"transition{i}" for i in range(1, 4)])
  assert len(p["denseblock3"]) == 24
  assert p["denseblock4"]["denselayer16"]["conv1"]["kernel"].shape == (1, 1, 992, 128)
  assert p["denseblock4"]["denselayer16"]["conv2"]["kernel"].shape == (3, 3, 128, 32)
  assert p["transition3"]["conv"]["kernel"].shape == (1, 1, 1024, 512)
  assert p["norm5"]["scale"].shape == (1024,)

  _, v = _shapes(get_backbone("vgg16"), (1, 32, 32, 3))
  assert sorted(v["params"], key=lambda k: int(k.split("_")[1])) == [
      f"features_{i}" for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)]
  assert v["params"]["features_28"]["bias"].shape == (512,)
  _, v = _shapes(get_backbone("vgg16_bn"), (1, 32, 32, 3))
  assert v["params"]["features_40"]["kernel"].shape == (3, 3, 512, 512)  # last conv of vgg16_bn
  assert v["batch_stats"]["features_41"]["mean"].shape == (512,)         # and its BN


def _random_variables(model, x, seed=0):
  """Variables of ``model`` filled from numpy (no init compilation): He-normal kernels,
  random BN affine params and running statistics, small biases."""
  _, shapes = _shapes(model, x.shape)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      return jnp.asarray(rng.normal(0.0, np.sqrt(2.0 / np.prod(leaf.shape[:-1])), leaf.shape), jnp.float32)
    if name in ("scale", "var"):
      return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), jnp.float32)
    return jnp.asarray(rng.normal(0.0, 0.2, leaf.shape), jnp.float32)  # bias, mean

  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.mark.parametrize("block", [resnet.BasicBlock, resnet.Bottleneck,
                                   resnet.PreActBasicBlock, resnet.PreActBottleneck])
def test_blurpool_sits_after_the_strided_conv(block):
  """With filter size 1 BlurPool is plain subsampling; placed after the 3x3 conv that lost its
  stride (and around the 1x1 projection), the block must equal the strided block exactly in
  eval mode; BlurPool before that 3x3 conv would not. A real filter (size 3) must change it."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 16)), jnp.float32)
  strided = block(8, stride=2)
  variables = _random_variables(strided, x)
  apply = jax.jit(lambda m, v, x: m.apply(v, x), static_argnums=0)
  want = apply(strided, variables, x)
  assert want.shape == (2, 4, 4, 8 * block.expansion)
  np.testing.assert_allclose(apply(block(8, stride=2, blurpool=1), variables, x), want, atol=1e-5)
  assert not np.allclose(apply(block(8, stride=2, blurpool=3), variables, x), want, atol=1e-3)


def _call_order(model, variables, x):
  """Names of the submodules of ``model`` in the order they are called."""
  order = []

  def record(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and len(context.module.scope.path) == 1:
      order.append(context.module.name)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(model.apply, variables, x)
  return order


def test_preact_block_normalises_its_input_first():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 4, 4, 32)), jnp.float32)
  preact, v1 = resnet.PreActBottleneck(8), resnet.Bottleneck(8)
  v_pre, v_v1 = _random_variables(preact, x), _random_variables(v1, x)
  assert v_pre["params"]["bn1"]["scale"].shape == (32,)  # BN over the block input
  assert v_v1["params"]["bn1"]["scale"].shape == (8,)    # BN over conv1's output
  assert _call_order(preact, v_pre, x) == ["bn1", "conv1", "bn2", "conv2", "bn3", "conv3"]
  assert _call_order(v1, v_v1, x) == ["conv1", "bn1", "conv2", "bn2", "conv3", "bn3"]

  # Identity mapping (He 2016b): with the last conv zeroed a pre-act block passes its input
  # through unchanged, negatives included; a v1 block still applies its final BN and ReLU.
  def zero_conv3(v):
    return {**v, "params": {**v["params"], "conv3": {"kernel": jnp.zeros_like(v["params"]["conv3"]["kernel"])}}}

  np.testing.assert_array_equal(jax.jit(preact.apply)(zero_conv3(v_pre), x), x)
  v1_out = jax.jit(v1.apply)(zero_conv3(v_v1), x)
  assert float(v1_out.min()) >= 0.0 and not np.allclose(v1_out, x)


def test_preact_model_structure():
  _, pre = _shapes(get_backbone("preact_resnet50", width=0.125), (1, 32, 32, 3))
  _, v1 = _shapes(get_backbone("resnet50", width=0.125), (1, 32, 32, 3))
  pre_names, v1_names = _flat_names(pre["params"]), _flat_names(v1["params"])
  assert "bn_final/scale" in pre_names and "bn1/scale" not in pre_names  # no stem norm
  assert "bn1/scale" in v1_names and "bn_final/scale" not in v1_names
  assert not any("downsample_bn" in n for n in pre_names)
  assert pre["params"]["layer2_0"]["bn1"]["scale"].shape == (32,)  # = layer1 output channels
  assert v1["params"]["layer2_0"]["bn1"]["scale"].shape == (16,)


def _tiny_resnet(**kw):
  return resnet.ResNet(resnet.BasicBlock, (1, 1, 1, 1), width=0.25, **kw)


def test_backbone_batch_norm_train_and_eval():
  """The stem BN of a ResNet: train=True normalises with batch statistics and moves the running
  averages by 0.1 (torch momentum 0.1) with the biased variance; train=False uses them."""
  model = _tiny_resnet()
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 32, 32, 1)), jnp.float32)
  variables = _random_variables(model, x)
  is_stem = lambda mdl, method: mdl.scope.path in (("conv1",), ("bn1",))  # noqa: E731

  apply = jax.jit(functools.partial(model.apply, capture_intermediates=is_stem),
                  static_argnames=("train", "mutable"))
  _, state = apply(variables, x, train=True, mutable=("batch_stats", "intermediates"))
  conv_out = np.asarray(state["intermediates"]["conv1"]["__call__"][0], np.float64).reshape(-1, 16)
  old = variables["batch_stats"]["bn1"]
  new = state["batch_stats"]["bn1"]
  np.testing.assert_allclose(new["mean"], 0.9 * np.asarray(old["mean"]) + 0.1 * conv_out.mean(0), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(new["var"], 0.9 * np.asarray(old["var"]) + 0.1 * conv_out.var(0), rtol=1e-4)

  _, state = apply(variables, x, train=False, mutable=("intermediates",))
  conv_out = np.asarray(state["intermediates"]["conv1"]["__call__"][0], np.float64)
  bn_out = np.asarray(state["intermediates"]["bn1"]["__call__"][0])
  p = variables["params"]["bn1"]
  want = (conv_out - np.asarray(old["mean"])) / np.sqrt(np.asarray(old["var"]) + 1e-5)
  np.testing.assert_allclose(bn_out, want * np.asarray(p["scale"]) + np.asarray(p["bias"]), atol=1e-4)


def test_bfloat16_compute_float32_params():
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 32, 32, 3)), jnp.float32)
  model32, model16 = _tiny_resnet(), _tiny_resnet(dtype=jnp.bfloat16)
  variables = _random_variables(model32, x)
  _, variables16 = _shapes(model16, x.shape)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables16))
  out32 = jax.jit(model32.apply)(variables, x)
  out16 = jax.jit(model16.apply)(variables, x)
  assert out16.dtype == jnp.bfloat16 and out32.dtype == jnp.float32
  err = np.linalg.norm(np.asarray(out16, np.float32) - out32) / np.linalg.norm(out32)
  assert err < 0.05, err
  assert get_backbone("resnet18", dtype="bfloat16").dtype == jnp.bfloat16


def test_antialiased_resnet_output_is_more_shift_stable():
  """A randomly initialised ResNet with BlurPool (filter 5) changes its output less under a
  one-pixel input shift than the same weights without it (Zhang 2019, Sec. 4)."""
  rng = np.random.default_rng(4)
  image = rng.normal(size=(4, 66, 66, 1)).astype(np.float32)
  x, shifted = jnp.asarray(image[:, 1:-1, 1:-1]), jnp.asarray(image[:, :-2, :-2])
  plain = _tiny_resnet()
  variables = _random_variables(plain, x)

  def change(model):
    a, b = jnp.split(jax.jit(model.apply)(variables, jnp.concatenate([x, shifted])), 2)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a))

  assert change(_tiny_resnet(blurpool=5)) < 0.5 * change(plain)


def test_densenet_block_keeps_its_input_channels():
  from cxr_jax.models.backbones import densenet
  x = jnp.asarray(np.random.default_rng(5).normal(size=(1, 4, 4, 16)), jnp.float32)
  block = densenet.DenseBlock(num_layers=3, growth_rate=8)
  variables = _random_variables(block, x)
  out = jax.jit(block.apply)(variables, x)
  assert out.shape == (1, 4, 4, 16 + 3 * 8)
  np.testing.assert_array_equal(out[..., :16], x)  # dense connectivity: concatenation
  assert sorted(variables["params"]) == ["denselayer1", "denselayer2", "denselayer3"]
  assert variables["params"]["denselayer3"]["conv1"]["kernel"].shape == (1, 1, 32, 32)
