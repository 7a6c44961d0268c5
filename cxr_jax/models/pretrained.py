"""Pretrained weights: torchvision / torchxrayvision state dicts -> our Flax variables.

  state = load_state_dict("resnet50-0676ba61.pth")            # torch, .safetensors or .npz
  variables = convert_torchvision("resnet50", state, in_channels=1)
  save_flax(variables, "resnet50.npz")                         # or: cxr-convert-weights
  params, batch_stats = merge_into(params, batch_stats, load_flax("resnet50.npz"))

The backbones name their variables after torchvision's state_dict keys (see
the docstrings of ``cxr_jax/models/backbones``), so conversion is a renaming
plus layout changes:
  conv weight  [O,I,kh,kw] -> kernel [kh,kw,I,O]
  BN weight / bias          -> params scale / bias
  BN running_mean / _var    -> batch_stats mean / var
  Linear weight [K,D]       -> Dense kernel [D,K] (heads only)
``num_batches_tracked`` is dropped; the legacy DenseNet names ``norm.1`` /
``conv.1`` (old torchvision, torchxrayvision checkpoints) read as ``norm1`` /
``conv1``. The result is checked leaf by leaf against the shapes our module
creates: a missing, unexpected or mis-shaped key is an error that lists them.

The classifier (``fc.*`` for ResNets, ``classifier.*`` for DenseNet / VGG) is
not part of a backbone; ``head=True`` converts it to a separate ``'head'``
entry (VGG's first classifier layer reordered from torch's C,H,W flatten to
our H,W,C one).

Files written by ``save_flax`` are ``.npz`` archives with one array per leaf,
named ``'<collection>/<path>'`` (e.g. ``params/layer1_0/conv1/kernel``).
"""

from __future__ import annotations

import functools
import logging
import os
import pickle
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cxr_jax import errors, files
from cxr_jax.models.backbones import get_backbone

TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "densenet121", "vgg16", "vgg16_bn")
COLLECTIONS = ("params", "batch_stats")

# First conv (the one whose input channels follow the images) and head keys, per family.
_FIRST_CONV = {"resnet": "conv1.weight", "densenet": "features.conv0.weight", "vgg": "features.0.weight"}
_HEAD_PREFIX = {"resnet": "fc.", "densenet": "classifier.", "vgg": "classifier."}
# torchxrayvision's DenseNet also stores its operating thresholds as a buffer.
_XRV_EXTRA = ("op_threshs",)
_LEGACY_DENSE = re.compile(r"(denselayer\d+\.(?:norm|relu|conv))\.([12])\.")
_RESNET_BLOCK = re.compile(r"^layer(\d+)\.(\d+)\.")

Flat = dict[tuple[str, ...], np.ndarray]


def _family(arch: str) -> str:
  if arch not in TORCHVISION_ARCHS:
    raise KeyError(f"no torchvision conversion for {arch!r}; known: {list(TORCHVISION_ARCHS)}")
  return "vgg" if arch.startswith("vgg") else re.sub(r"\d+$", "", arch)


def _module_path(family: str, key: str) -> tuple[str, ...]:
  """torch module path (key without the tensor name) -> our module path.

  'layer2.0.downsample.1' -> ('layer2_0', 'downsample_bn'); 'features.denseblock1.denselayer1.norm1'
  -> ('denseblock1', 'denselayer1', 'norm1'); 'features.28' -> ('features_28',).
  """
  if family == "resnet":
    key = _RESNET_BLOCK.sub(r"layer\1_\2.", key)
    key = key.replace("downsample.0", "downsample_conv").replace("downsample.1", "downsample_bn")
    return tuple(key.split("."))
  if not key.startswith("features."):
    raise KeyError(f"{family} key {key!r} is outside 'features.'")
  if family == "vgg":
    return (key.replace(".", "_"),)
  return tuple(key[len("features."):].split("."))


def _leaf(key: str, tensor_name: str, value: np.ndarray) -> tuple[str, str, np.ndarray]:
  """(collection, leaf name, value in our layout) of the torch tensor ``key`` (named ``tensor_name``)."""
  if tensor_name == "weight" and value.ndim == 4:
    return "params", "kernel", value.transpose(2, 3, 1, 0)
  if tensor_name == "weight" and value.ndim == 1:
    return "params", "scale", value
  if tensor_name == "bias":
    return "params", "bias", value
  if tensor_name == "running_mean":
    return "batch_stats", "mean", value
  if tensor_name == "running_var":
    return "batch_stats", "var", value
  raise KeyError(f"{key!r} of shape {value.shape} has no counterpart in our backbone")


def adapt_input_channels(kernel: np.ndarray, in_channels: int, key: str) -> np.ndarray:
  """First conv kernel [kh,kw,I,O] for ``in_channels`` inputs.

  3 -> 1 sums over the input channels (a grey image replicated to RGB gives
  the same response); 1 -> 3 spreads the kernel equally (kernel / 3 per channel).
  """
  have = kernel.shape[2]
  if have == in_channels:
    return kernel
  if in_channels == 1:
    return kernel.sum(axis=2, keepdims=True)
  if have == 1:
    return np.repeat(kernel / in_channels, in_channels, axis=2)
  raise ValueError(f"{key}: cannot adapt a conv with {have} input channels to in_channels={in_channels} "
                   f"(only {have} -> 1 and 1 -> N)")


def _to_numpy(value) -> np.ndarray:
  """A torch tensor or array as numpy; floating tensors as float32."""
  if hasattr(value, "detach"):
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()
    value = value.numpy()
  return np.asarray(value)


def _convert_head(family: str, head: Mapping[str, np.ndarray]) -> dict:
  """Classifier tensors -> Dense params. ResNet/DenseNet: {'kernel','bias'}; VGG: {'classifier_N': ...}.

  VGG's first Linear sees torch's flatten of [512,7,7] (C,H,W order); its rows
  are reordered to the flatten of our [7,7,512] map (H,W,C order).
  """
  if family != "vgg":
    return {"kernel": head["weight"].T, "bias": head["bias"]}
  out = {}
  indices = sorted({int(k.split(".")[0]) for k in head})
  for n, index in enumerate(indices):
    weight, bias = head[f"{index}.weight"], head[f"{index}.bias"]
    if n == 0:
      channels = weight.shape[1] // 49
      if channels * 49 != weight.shape[1]:
        raise ValueError(f"classifier.{index}.weight: {weight.shape[1]} inputs is not C * 7 * 7")
      weight = weight.reshape(-1, channels, 7, 7).transpose(0, 2, 3, 1).reshape(weight.shape[0], -1)
    out[f"classifier_{index}"] = {"kernel": weight.T, "bias": bias}
  return out


@functools.cache
def expected_shapes(arch: str, in_channels: int = 3) -> dict[str, dict]:
  """Shapes of our ``get_backbone(arch)`` variables at width 1: {'params': tree, 'batch_stats': tree}.

  Cached: treat the result as read-only.
  """
  module = get_backbone(arch)
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 32, 32, in_channels)))
  return {c: jax.tree.map(lambda s: tuple(s.shape), dict(shapes.get(c, {})),
                          is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct)) for c in COLLECTIONS}


def check_keys(expected: Mapping[str, Any], got: Mapping[str, Any], what: str) -> None:
  """Raises ValueError listing missing / unexpected / mis-shaped leaves of two nested dicts.

  ``expected`` leaves are shapes or arrays; ``got`` leaves are arrays.
  """
  want = {"/".join(k): tuple(np.shape(v)) if not isinstance(v, tuple) else v
          for k, v in traverse_util.flatten_dict(dict(expected)).items()}
  have = {"/".join(k): np.shape(v) for k, v in traverse_util.flatten_dict(dict(got)).items()}
  missing = sorted(set(want) - set(have))
  unexpected = sorted(set(have) - set(want))
  misshaped = sorted(f"{k}: expected {want[k]}, got {have[k]}"
                     for k in set(want) & set(have) if want[k] != have[k])
  if missing or unexpected or misshaped:
    lines = [f"{what}: the variables do not match"]
    for title, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
      if keys:
        lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys))
    raise ValueError("\n".join(lines))


def convert_torchvision(name: str, state_dict: Mapping[str, Any], *, in_channels: int = 3,
                        head: bool = False, ignore: tuple[str, ...] = ()) -> dict:
  """torchvision ``name`` state dict -> {'params', 'batch_stats'[, 'head']} for ``get_backbone(name)``.

  Args:
    name: one of ``TORCHVISION_ARCHS``.
    state_dict: torch key -> tensor or array (``model.state_dict()`` or ``load_state_dict``).
    in_channels: image channels of our model; the first conv is adapted by
      ``adapt_input_channels`` (3 -> 1 sums its kernel).
    head: also convert the classifier into ``'head'`` (see the module docstring).
    ignore: further top-level keys to drop (e.g. torchxrayvision's 'op_threshs').
  Returns:
    Nested dicts of float32 numpy arrays, every leaf checked against our module.
  Raises:
    KeyError: unknown ``name`` or a key with no counterpart.
    ValueError: missing / unexpected / mis-shaped keys (all listed).
  """
  family = _family(name)
  converted: dict[str, Flat] = {c: {} for c in COLLECTIONS}
  head_tensors, skipped, num_batches_tracked = {}, [], 0
  for key, value in state_dict.items():
    if key.endswith("num_batches_tracked"):
      num_batches_tracked += 1
      continue
    if key in ignore:
      skipped.append(key)
      continue
    value = _to_numpy(value)
    if key.startswith(_HEAD_PREFIX[family]):
      head_tensors[key[len(_HEAD_PREFIX[family]):]] = value.astype(np.float32)
      continue
    module_key, _, tensor_name = _LEGACY_DENSE.sub(r"\1\2.", key).rpartition(".")
    collection, leaf, value = _leaf(key, tensor_name, value)
    if key == _FIRST_CONV[family]:
      value = adapt_input_channels(value, in_channels, key)
    path = _module_path(family, module_key) + (leaf,)
    if path in converted[collection]:
      raise ValueError(f"{name}: {key!r} and another key both map to {collection}/{'/'.join(path)}")
    converted[collection][path] = np.ascontiguousarray(value, np.float32)
  variables = {c: traverse_util.unflatten_dict(converted[c]) for c in COLLECTIONS}
  check_keys(expected_shapes(name, in_channels), variables, f"converting {name}")
  if head_tensors:
    if head:
      variables["head"] = _convert_head(family, head_tensors)
    else:
      skipped.extend(_HEAD_PREFIX[family] + k for k in sorted(head_tensors))
  elif head:
    raise ValueError(f"{name}: head=True but the state dict has no {_HEAD_PREFIX[family]!r} keys")
  logging.info("converted %s (%d num_batches_tracked dropped); not converted: %s", name, num_batches_tracked,
               skipped)
  return variables


def convert_xrv_densenet121(state_dict: Mapping[str, Any], *, in_channels: int = 1,
                            head: bool = False) -> dict:
  """torchxrayvision ``xrv.models.DenseNet`` (DenseNet-121, 1 input channel, 18 outputs) -> our variables.

  Its ``features`` are torchvision's DenseNet-121 (old checkpoints with the
  legacy ``norm.1`` names), its head a Linear 1024 -> 18 ('classifier.*'), and
  it carries its operating thresholds 'op_threshs' (dropped). Like
  torchvision, its forward applies ReLU after ``features.norm5``, as ours does.
  """
  return convert_torchvision("densenet121", state_dict, in_channels=in_channels, head=head,
                             ignore=_XRV_EXTRA)


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Tensors of a weights file as {key: numpy array}.

  '.pth' / '.pt' / '.bin': ``torch.load(weights_only=True)`` (needs torch; a
  pickled whole module cannot be read this way: save its ``state_dict()``);
  a dict wrapping it under 'state_dict' or 'model' and DataParallel's
  'module.' prefixes are unwrapped. '.safetensors': ``safetensors.numpy``.
  '.npz': numpy.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"weights file {path!r} does not exist")
  suffix = os.path.splitext(path)[1].lower()
  if suffix == ".npz":
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  if suffix == ".safetensors":
    try:
      from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f"reading {path!r} needs the 'safetensors' package (pip install safetensors)") from e
    return dict(load_file(path))
  if suffix in (".pth", ".pt", ".bin"):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f"reading {path!r} needs torch (pip install 'cxr_jax[parity]'), or convert it "
                        "to .safetensors / .npz elsewhere") from e
    try:
      state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
      raise errors.UserError(
          f"{path}: not a plain state dict, refused: torch.load(weights_only=True) reads tensors "
          "and containers only, and this file asks for other objects or code (a pickled module "
          "or something malicious); save the model's state_dict() instead") from None
    for wrapper in ("state_dict", "model"):
      if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
        state = state[wrapper]
    if not isinstance(state, Mapping):
      raise ValueError(f"{path!r} holds a {type(state).__name__}, not a state dict")
    return {k.removeprefix("module."): _to_numpy(v) for k, v in state.items()}
  raise ValueError(f"{path!r}: unknown weights format {suffix!r}; expected .pth, .pt, .bin, "
                   ".safetensors or .npz")


def save_flax(variables: Mapping[str, Any], path: str | os.PathLike) -> None:
  """Writes nested variables ({'params', 'batch_stats', ...}) to an .npz archive, atomically."""
  path = os.fspath(path)
  flat = {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(dict(variables)).items()}
  files.write_npz_atomic(path, **flat)


def load_flax(path: str | os.PathLike) -> dict[str, dict]:
  """Variables written by ``save_flax``: {'params': ..., 'batch_stats': ... (maybe {}), ...}."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"converted weights {path!r} do not exist (write them with cxr-convert-weights)")
  with np.load(path, allow_pickle=False) as f:
    flat = {tuple(k.split("/")): f[k] for k in f.files}
  variables = traverse_util.unflatten_dict(flat)
  if "params" not in variables:
    raise ValueError(f"{path!r} has no 'params/...' arrays; keys: {sorted(f'{k[0]}/...' for k in flat)}")
  variables.setdefault("batch_stats", {})
  return variables


def _subtree(tree: Mapping[str, Any], prefix: tuple[str, ...]) -> Any:
  for part in prefix:
    tree = tree.get(part, {}) if isinstance(tree, Mapping) else {}
  return tree


def merge_into(params: Mapping[str, Any], batch_stats: Mapping[str, Any], converted: Mapping[str, Any],
               prefix: str = "backbone") -> tuple[dict, dict]:
  """Replaces the ``prefix`` subtree ('/'-joined path) of params / batch_stats with ``converted``.

  Every leaf of the subtree must come from ``converted`` with the same shape
  and vice versa (no partial loads); leaves outside it (heads) are untouched.
  Values are cast to the dtype of the leaf they replace.

  Returns:
    New (params, batch_stats) nested dicts.
  Raises:
    ValueError: listing the missing / unexpected / mis-shaped keys.
  """
  parts = tuple(p for p in prefix.split("/") if p)
  out = []
  for collection, tree in (("params", params), ("batch_stats", batch_stats)):
    target = _subtree(tree, parts)
    source = converted.get(collection, {})
    if source and not target:
      raise ValueError(f"loading {collection}: the model has no {prefix!r} subtree; its top level: "
                       f"{sorted(tree)}")
    check_keys(target, source, f"loading {collection} into {prefix!r}")
    flat = traverse_util.flatten_dict(dict(tree)) if tree else {}
    for path, value in traverse_util.flatten_dict(dict(source)).items():
      flat[parts + path] = np.asarray(value, flat[parts + path].dtype)
    out.append(traverse_util.unflatten_dict(flat) if flat else {})
  return out[0], out[1]


def init_from(path: str | os.PathLike, params: Mapping[str, Any], batch_stats: Mapping[str, Any],
              prefixes: tuple[str, ...] = ("backbone",)) -> tuple[dict, dict]:
  """``config.model.init_from``: converted weights at ``path`` merged into each of ``prefixes``.

  The trainer calls it once, after initialising the first stage, with the
  method's ``pretrained_prefixes`` (default ``('backbone',)``, the baseline's
  backbone submodule).
  """
  converted = load_flax(path)
  for prefix in prefixes:
    params, batch_stats = merge_into(params, batch_stats, converted, prefix)
  logging.info("initialised %s from %s", list(prefixes), path)
  return params, batch_stats
