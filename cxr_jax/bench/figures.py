"""The JAX figures of ``cxr-bench``; each is ``fn(spec, config_root) -> dict`` run in its own process.

spec keys shared by the figures (``suites.Figure`` fills defaults):
  config      'baseline' | 'msml' | 'vkd' | ... (configs/<config>.py at ``config_root``)
  arg         the config arg, e.g. 'backbone=resnet18,size=64,width=0.25'
  overrides   {'model.dtype': 'bfloat16', ...} dotted config fields
  batch       global batch size
  warmup, repeats, steps   timing (``timing.time_steps``)

Train-step figures time the product's step: ``cxr_jax.train.step.make_train_step`` of the
method's stage, wrapped in ``cxr_jax.train.step.accumulate`` and jitted with donated state
exactly as ``cxr_jax.train.trainer`` does, on two real batches from the
method's own input pipeline (alternated, so the data varies), compute only.

The input-pipeline figures are in ``input_figures``, the PyTorch ones in
``torch_ref``; ``worker.run`` runs any of them.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cxr_jax.bench import machine, memory, timing
from cxr_jax.bench.configs import load_config

MB = memory.MB


def _stage(stages, name: str | None):
  if not name:
    return stages[0]
  for s in stages:
    if s.name == name:
      return s
  raise KeyError(f"no stage {name!r}; stages: {[s.name for s in stages]}")


def host_flops(fn, *args) -> float | None:
  """FLOPs of ``fn(*args)`` per XLA's analysis of its unoptimized HLO lowered for the host CPU
  (the model's FLOPs: a GPU backend's analysis reports none through the PJRT plugin, and counts
  cuDNN convolutions as 0 once compiled); None where XLA gives none."""
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)
  try:
    with jax.default_device(jax.devices("cpu")[0]):
      cost = jax.jit(fn).trace(*shapes).lower(lowering_platforms=("cpu",)).cost_analysis()
  except Exception:  # pylint: disable=broad-except  (no cost analysis: no MFU)
    return None
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]) if cost and cost.get("flops") else None


def _cost(compiled, flops: float | None = None) -> dict:
  """``flops`` (``host_flops``) and XLA's memory of the compiled step (per device)."""
  out = {"flops": flops} if flops else {}
  try:
    mem = compiled.memory_analysis()
    out["temp_mb"] = mem.temp_size_in_bytes / MB
    out["argument_mb"] = mem.argument_size_in_bytes / MB
  except Exception:  # pylint: disable=broad-except
    pass
  return out


class StepBuild(NamedTuple):
  """A compiled-to-be train step of a spec and what timing it needs."""
  train_step: Callable     # jitted (state, acc, batch) -> (state, acc)
  make_state: Callable     # () -> a fresh, donatable TrainState on the mesh
  make_acc: Callable       # () -> a zero metric accumulator
  batches: list            # two device batches, alternated
  stage: Any               # methods.base.Stage
  config: Any              # the resolved ml_collections config
  batch_size: int
  flops: float | None      # XLA's FLOPs of one step, lowered for the CPU


def build_train_step(spec: dict, config_root: str) -> StepBuild:
  """The ``StepBuild`` of a train-step spec.

  spec: config/arg/overrides, 'stage' (name; default the first), 'batch',
  optional 'trainable' (regexes) and 'apply_kwargs' replacing the stage's
  (a frozen variant of a stage), 'devices' (use the first N devices).
  """
  from cxr_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  from cxr_jax.methods import get_method  # pylint: disable=import-outside-toplevel
  from cxr_jax.train import optim, parallel  # pylint: disable=import-outside-toplevel
  from cxr_jax.train import step as step_lib  # pylint: disable=import-outside-toplevel
  from cxr_jax.train.state import TrainState  # pylint: disable=import-outside-toplevel

  config = load_config(config_root, spec["config"], spec.get("arg", ""), spec.get("overrides"))
  method = get_method(config.method)
  model = method.model(config)
  stage = _stage(list(method.stages(config)), spec.get("stage"))
  if "trainable" in spec:
    stage = dataclasses.replace(stage, trainable=tuple(spec["trainable"]),
                                apply_kwargs=dict(spec.get("apply_kwargs", {})))
  batch_size = spec.get("batch") or stage.batch_size or config.batch_size
  devices = jax.devices()[:spec.get("devices") or jax.device_count()]
  mesh = parallel.make_mesh(devices)
  params, batch_stats = step_lib.init_variables(model, stage, config, jax.random.key(0))
  extras = stage.hooks.init_extras(params, {}) if stage.hooks.init_extras is not None else {}
  labels = optim.param_labels(params, stage.trainable, stage=stage.name)
  bs_labels = optim.batch_stats_labels(batch_stats, labels, stage.trainable)
  tx = optim.make_optimizer(stage.optimizer, params, stage.trainable, stage.steps, stage=stage.name)
  fsdp = config.get("fsdp", False)
  rng = np.asarray(jax.random.key_data(jax.random.key(1)))

  def make_state():
    state = TrainState(step=jnp.int32(0), params=params, batch_stats=batch_stats,
                       opt_state=tx.init(params), extras=extras, rng=rng)
    state = jax.tree.map(jnp.copy, state)  # fresh buffers: each copy may be donated
    return jax.device_put(state, parallel.tree_shardings(state, mesh, fsdp))

  views = getattr(stage.data, "views", ())
  iterator = pipeline.make_iterator(
      config.data, stage.data.split, batch_size=batch_size, sharding=parallel.data_sharding(mesh),
      seed=0, shuffle=True, num_epochs=None, drop_remainder=True, maps=stage.data.maps,
      augment=stage.data.augment, **({"views": views} if views else {}))
  try:
    batches = [next(iterator), next(iterator)]
  finally:
    iterator.close()

  step_fn = step_lib.make_train_step(model, stage, tx, labels, bs_labels)
  state_shape = jax.eval_shape(make_state)
  state_sh = parallel.tree_shardings(state_shape, mesh, fsdp)
  zeros = step_lib.zero_accumulator(jax.eval_shape(step_fn, state_shape, batches[0])[1])
  train_step = step_lib.jit_train_step(step_fn, state_sh, mesh)
  make_acc = lambda: jax.device_put(zeros, parallel.replicated(mesh))
  flops = host_flops(step_lib.accumulate(step_fn), state_shape, zeros, batches[0])
  return StepBuild(train_step, make_state, make_acc, batches, stage, config, batch_size, flops)


def _interleaved_spec(spec: dict, other: dict) -> dict:
  """``spec`` with an ``interleave`` entry's keys over it ('overrides' merged key by key)."""
  merged = {**spec, **other}
  merged["overrides"] = {**spec.get("overrides", {}), **other.get("overrides", {})}
  merged.pop("interleave", None)
  return merged


def train_step(spec: dict, config_root: str) -> dict:
  """Train-step images/s of a method's stage. Two optional lists add more steps, compiled in
  this same process and timed in alternating rounds with it, so load on the machine hits all
  alike:
    variants    a list of XLA compiler-option dicts (e.g. [{}, {'xla_cpu_experimental_ynn_fusion_type':
                ''}]): the same step compiled with each;
    interleave  a list of partial specs ({'label', 'stage', 'overrides', 'trainable',
                'apply_kwargs'} over this one): other steps of the same config, e.g. a frozen
                stage against the full one (separate processes moved such ratios by +-0.05).

  Returns {'img_per_s', 'step_ms', 'flops', 'mfu', 'compile_s', 'stage', 'batch', ...} of the
  first variant; with variants also 'variants': [{'options', 'img_per_s', 'step_ms', ...}] (the
  first is the figure), with interleave 'interleaved': [{'label', 'stage', 'img_per_s',
  'step_ms', 'step_ratio', ...}] (step_ratio: its step time over the figure's).
  """
  builds = [(None, build_train_step(spec, config_root))]
  builds += [(other["label"], build_train_step(_interleaved_spec(spec, other), config_root))
             for other in spec.get("interleave", [])]
  runs = []
  for label, b in builds:
    for options in (spec.get("variants") or [{}]) if label is None else [{}]:
      start = time.perf_counter()
      state, acc = b.make_state(), b.make_acc()
      compiled = b.train_step.lower(state, acc, b.batches[0]).compile(
          compiler_options=options or None)
      runs.append({"label": label, "options": options, "compiled": compiled, "state": state,
                   "acc": acc, "batches": b.batches, "stage": b.stage.name, "batch": b.batch_size,
                   "flops": b.flops, "compile_s": time.perf_counter() - start, "rounds": []})
  for run in runs:
    def one(i, run=run):
      run["state"], run["acc"] = run["compiled"](run["state"], run["acc"], run["batches"][i % 2])
      return run["acc"]
    run["one"] = one
    timing.time_steps(one, jax.block_until_ready, warmup=spec.get("warmup", 2), repeats=1, steps=1)
  for _ in range(spec.get("repeats", 3)):
    for run in runs:
      t = timing.time_steps(run["one"], jax.block_until_ready, warmup=0, repeats=1,
                            steps=spec.get("steps", 5))
      run["rounds"].append(t["step_s"])
  config = builds[0][1].config
  device = jax.devices()[0]
  dtype = config.model.dtype
  peak = machine.peak_flops(device.device_kind, dtype)
  entries = []
  for run in runs:
    step_s = float(np.median(run["rounds"]))
    cost = _cost(run["compiled"], run["flops"])
    entry = {"label": run["label"], "options": run["options"], "stage": run["stage"],
             "img_per_s": run["batch"] / step_s, "step_ms": 1e3 * step_s,
             "round_ms": [1e3 * r for r in run["rounds"]], "compile_s": run["compile_s"], **cost}
    if peak and "flops" in cost:
      entry["mfu"] = cost["flops"] / step_s / peak
    entries.append(entry)
  first = {k: v for k, v in entries[0].items() if k not in ("label", "options")}
  out = {**first, "batch": runs[0]["batch"], "dtype": dtype,
         "devices": len(jax.devices()[:spec.get("devices") or jax.device_count()]),
         "image_size": config.data.image_size}
  variants = [{k: v for k, v in e.items() if k != "label"} for e in entries if e["label"] is None]
  if len(variants) > 1:
    out["variants"] = variants
  interleaved = [{k: v for k, v in e.items() if k != "options"} for e in entries if e["label"]]
  for entry in interleaved:
    entry["step_ratio"] = entry["step_ms"] / out["step_ms"]
  if interleaved:
    out["interleaved"] = interleaved
  return out


# --------------------------------------------------------------------------- Grad-CAM eval


def gradcam(spec: dict, config_root: str) -> dict:
  """Jitted all-class Grad-CAM (``cam.class_heatmaps('gradcam', ..., image_size=True)``, the maps
  pytorch-grad-cam returns: upsampled, min-max normalized) of the baseline, maps fetched to the
  host; images/s. Weights: the seeded torchvision model converted (``pretrained``), as the
  PyTorch figure uses, or a random init without torch."""
  from cxr_jax import cam  # pylint: disable=import-outside-toplevel
  from cxr_jax.bench import torch_ref  # pylint: disable=import-outside-toplevel
  from cxr_jax.methods import get_method  # pylint: disable=import-outside-toplevel
  from cxr_jax.models import pretrained  # pylint: disable=import-outside-toplevel
  from cxr_jax.train import step as step_lib  # pylint: disable=import-outside-toplevel

  config = load_config(config_root, spec.get("config", "baseline"), spec.get("arg", ""),
                       spec.get("overrides"))
  method = get_method(config.method)
  model = method.model(config)
  stage = method.stages(config)[0]
  params, batch_stats = step_lib.init_variables(model, stage, config, jax.random.key(0))
  k, channels = params["head"]["bias"].shape[0], config.data.channels
  reference = torch_ref.torch_model(config.model.backbone, k, channels)
  weights = "random init (no torch)"
  if reference is not None:
    converted = pretrained.convert_torchvision(config.model.backbone, reference.state_dict(),
                                               in_channels=channels, head=True)
    params = {**params, "backbone": converted["params"], "head": converted["head"]}
    batch_stats = {**batch_stats, "backbone": converted["batch_stats"]}
    weights = "seeded torchvision weights, converted"
  variables = {"params": params, "batch_stats": batch_stats}
  batch, size = spec["batch"], config.data.image_size

  @jax.jit
  def heatmaps(variables, images):
    features_fn, head_fn = method.cam_target(model, variables)
    return cam.class_heatmaps("gradcam", features_fn, head_fn, images, image_size=True)

  images = [jnp.asarray(np.random.default_rng(i).standard_normal((batch, size, size, channels)),
                        jnp.float32) for i in range(2)]
  start = time.perf_counter()
  jax.block_until_ready(heatmaps(variables, images[0]))
  compile_s = time.perf_counter() - start
  t = timing.time_steps(lambda i: np.asarray(heatmaps(variables, images[i % 2])), lambda _: None,
                        warmup=spec.get("warmup", 1), repeats=spec.get("repeats", 3),
                        steps=spec.get("steps", 2))
  return {"img_per_s": batch / t["step_s"], "step_ms": 1e3 * t["step_s"], "compile_s": compile_s,
          "batch": batch, "classes": k, "image_size": size, "weights": weights}


# --------------------------------------------------------------------------- memory


def eval_memory(spec: dict, config_root: str) -> dict:
  """``evaluator.evaluate`` with Grad-CAM localization on ``num`` synthetic test phantoms
  (thresholds from ``num_val`` val phantoms); peak RSS is what this figure is for."""
  from cxr_jax.evaluation import evaluator  # pylint: disable=import-outside-toplevel
  from cxr_jax.methods import get_method  # pylint: disable=import-outside-toplevel
  from cxr_jax.train import parallel  # pylint: disable=import-outside-toplevel
  from cxr_jax.train import step as step_lib  # pylint: disable=import-outside-toplevel
  config = load_config(config_root, spec.get("config", "baseline"), spec.get("arg", ""),
                       spec.get("overrides"))
  with config.unlocked():
    config.data.synthetic.num_test = spec["num"]
    config.data.synthetic.num_val = spec.get("num_val", 64)
    config.eval_batch_size = spec.get("batch", 64)
    config.cam = "gradcam"
  method = get_method(config.method)
  model = method.model(config)
  params, batch_stats = step_lib.init_variables(model, method.stages(config)[0], config,
                                               jax.random.key(0))
  start = time.perf_counter()
  payload = evaluator.evaluate(method, model, {"params": params, "batch_stats": batch_stats},
                               config, "test", None, stage="bench", mesh=parallel.make_mesh())
  seconds = time.perf_counter() - start
  return {"img_per_s": payload["num_examples"] / seconds, "seconds": seconds,
          "num_examples": payload["num_examples"], "image_size": config.data.image_size,
          "boxes_scored": sum(payload["localization"].get("iou@0.1", {}).get("n", {}).values())}


def bilinear_memory(spec: dict, config_root: str) -> dict:
  """Memory of the MSML bilinear head's forward + backward (the streams' maps in, the FCE loss
  out) at ``backbone``'s feature size for ``size`` px, ``reduce_dim`` channels (0 = none).

  XLA's buffer assignment of the compiled head (temp = the largest live set; the same
  program on any device) and, on CPU, the process RSS increase over running it.
  """
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from cxr_jax import losses  # pylint: disable=import-outside-toplevel
  from cxr_jax.models import bilinear  # pylint: disable=import-outside-toplevel
  from cxr_jax.models.backbones import get_backbone  # pylint: disable=import-outside-toplevel
  size, batch, reduce_dim = spec["size"], spec["batch"], spec.get("reduce_dim", 0)
  backbone = get_backbone(spec.get("backbone", "densenet121"))
  feature = jax.eval_shape(lambda x: backbone.init_with_output(jax.random.key(0), x)[0],
                           jax.ShapeDtypeStruct((1, size, size, 1), jnp.float32))
  _, h, w, d = feature.shape

  class Head(nn.Module):
    @nn.compact
    def __call__(self, f1, f2):
      if reduce_dim:
        f1 = nn.Conv(reduce_dim, (1, 1), name="reduce1")(f1)
        f2 = nn.Conv(reduce_dim, (1, 1), name="reduce2")(f2)
      return nn.Dense(14, name="fce_head")(bilinear.bilinear_features(f1, f2))

  head = Head()
  f = jnp.ones((batch, h, w, d), jnp.float32)
  params = head.init(jax.random.key(0), f[:1], f[:1])
  labels = jnp.zeros((batch, 14), jnp.float32)

  @jax.jit
  def step(params, f1, f2):
    loss = lambda p, a, b: losses.bce(head.apply(p, a, b), labels, jnp.ones_like(labels))
    return jax.grad(loss, argnums=(0, 1, 2))(params, f1, f2)

  compiled = step.lower(params, f, f).compile()
  cost = _cost(compiled, host_flops(step, params, f, f))
  before = memory.host_peak()["maxrss_self_mb"]
  jax.block_until_ready(compiled(params, f, f))
  after = memory.host_peak()["maxrss_self_mb"]
  num_params = sum(x.size for x in jax.tree.leaves(params))
  naive_mb = batch * h * w * (reduce_dim or d) ** 2 * 4 / MB
  return {"feature_map": [h, w, d], "reduce_dim": reduce_dim, "batch": batch, "head_params": num_params,
          "naive_outer_product_mb": naive_mb, "rss_increase_mb": after - before, **cost}


def quickstart(spec: dict, config_root: str) -> dict:
  """The README quickstart (``cxr-train --config=configs/quickstart.py``) in this process, in a
  temporary workdir; the figure is its wall clock and peak memory (all its processes)."""
  from cxr_jax.methods import get_method  # pylint: disable=import-outside-toplevel
  from cxr_jax.train import trainer  # pylint: disable=import-outside-toplevel
  config = load_config(config_root, spec.get("config", "quickstart"), spec.get("arg", ""),
                       spec.get("overrides"))
  with tempfile.TemporaryDirectory() as workdir:
    start = time.perf_counter()
    trainer.train_and_evaluate(config, os.path.join(workdir, "run"),
                               method=get_method(config.method))
    seconds = time.perf_counter() - start
  return {"seconds": seconds, "train_steps": config.train_steps, "batch": config.batch_size,
          "image_size": config.data.image_size}


FIGURES = {
    "train_step": train_step,
    "gradcam": gradcam,
    "eval_memory": eval_memory,
    "bilinear_memory": bilinear_memory,
    "quickstart": quickstart,
}
