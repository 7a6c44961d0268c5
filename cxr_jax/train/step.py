"""The pieces of one stage's training step: init, carry-over, the jitted step.

``init_variables`` builds a stage's fresh variables, ``carry_over`` lays the
previous stage's over them, ``make_train_step`` is one pure optimizer step of a
stage and ``jit_train_step`` its jitted, donated form (the hot path). cxr-bench
times steps built from here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util

from cxr_jax.train import parallel
from cxr_jax.train.stage import LossContext, Stage
from cxr_jax.train.state import TrainState


# --------------------------------------------------------------------------- init / carry-over


def stage_data_config(data: ml_collections.ConfigDict, stage: Stage) -> ml_collections.ConfigDict:
  """``config.data`` with the stage's ``DataSpec.overrides`` ('.'-paths) applied."""
  if not stage.data.overrides:
    return data
  out = data.copy_and_resolve_references()
  with out.unlocked():
    for path, value in stage.data.overrides.items():
      *parents, leaf = path.split(".")
      node = out
      for key in parents:
        node = node.get(key) if isinstance(node, ml_collections.ConfigDict) else None
      if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        raise KeyError(f"stage {stage.name!r}: DataSpec.overrides key {path!r} is not a field "
                       f"of config.data")
      node[leaf] = value
  return out


def _init(rng, *, model, shape, kwargs):
  variables = model.init({"params": rng, "dropout": rng}, jnp.zeros(shape, jnp.float32),
                         train=False, **dict(kwargs))
  return variables["params"], variables.get("batch_stats", {})


# Init runs once per stage and takes milliseconds, but XLA:CPU's optimizing backend spends
# seconds compiling it (a threefry per initializer): ResNet-18 w0.125 at 32 px 13.6 s vs 2.1 s
# at optimization level 0, DenseNet-121 w0.25 at 64 px 22.5 s vs 13.4 s (2-core AMD EPYC).
# The values differ from the optimized build's by at most 1.2e-7 (float rounding in the
# initializers' transforms of the same random bits).
INIT_COMPILER_OPTIONS = {"cpu": {"xla_backend_optimization_level": 0}}


@functools.cache
def _jitted_init(platform: str):
  return jax.jit(_init, static_argnames=("model", "shape", "kwargs"),
                 compiler_options=INIT_COMPILER_OPTIONS.get(platform))


def init_variables(model, stage: Stage, config: ml_collections.ConfigDict, rng: jax.Array):
  """model.init on a zero [1,H,W,C] batch with the stage's apply_kwargs -> (params, batch_stats).

  Jitted with the (hashable) module and kwargs static, so equal models share one compilation;
  compiled with ``INIT_COMPILER_OPTIONS`` of the default backend.
  """
  shape = (1, config.data.image_size, config.data.image_size, config.data.channels)
  return _jitted_init(jax.default_backend())(
      rng, model=model, shape=shape, kwargs=tuple(sorted(stage.apply_kwargs.items())))


def carry_over(fresh, carried, *, stage: str, collection: str = "params"):
  """``fresh`` overlaid with ``carried`` -> (merged, paths only in ``carried``).

  Leaves present in both take the carried value and must have the same shape;
  carried leaves the new stage's model does not create are kept (frozen).
  """
  if not carried:
    return fresh, set()
  new = traverse_util.flatten_dict(fresh, sep="/")
  old = traverse_util.flatten_dict(carried, sep="/")
  for path, value in old.items():
    if path in new and np.shape(new[path]) != np.shape(value):
      raise ValueError(f"stage {stage!r}: {collection} {path!r} carried from the previous stage "
                       f"has shape {np.shape(value)}, the model now creates {np.shape(new[path])}")
  passengers = set(old) - set(new)
  new.update(old)
  return traverse_util.unflatten_dict(new, sep="/"), passengers


# --------------------------------------------------------------------------- the step


def make_train_step(model, stage: Stage, tx: optax.GradientTransformation, labels, bs_labels):
  """(state, batch) -> (state, metrics): one optimizer step of ``stage``; pure.

  Frozen leaves (labels 'frozen') enter the loss under stop_gradient, are
  returned unchanged bit for bit, and so are their modules' batch_stats.
  """
  keep_frozen = lambda lab, old, new: old if lab == "frozen" else new

  def step(state: TrainState, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    loss_rng, dropout_rng = jax.random.split(rng)

    def apply(params, *args, **kwargs):
      kw = {"train": True, **stage.apply_kwargs, **kwargs}
      kw.setdefault("rngs", {"dropout": dropout_rng})
      if not state.batch_stats:
        return model.apply({"params": params}, *args, **kw), None
      out, updated = model.apply({"params": params, "batch_stats": state.batch_stats}, *args,
                                 mutable=["batch_stats"], **kw)
      return out, updated["batch_stats"]

    def loss_fn(params):
      params = jax.tree.map(lambda lab, p: jax.lax.stop_gradient(p) if lab == "frozen" else p,
                            labels, params)
      ctx = LossContext(apply=apply, extras=state.extras, step=state.step)
      return stage.loss(ctx, params, batch, loss_rng)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = jax.tree.map(keep_frozen, labels, state.params,
                          optax.apply_updates(state.params, updates))
    batch_stats = aux.get("batch_stats")
    if batch_stats is None or not state.batch_stats:
      batch_stats = state.batch_stats
    else:
      batch_stats = jax.tree.map(keep_frozen, bs_labels, state.batch_stats, batch_stats)
    state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                          opt_state=opt_state)
    if stage.hooks.update_extras is not None:
      state = stage.hooks.update_extras(state)
    metrics = {"loss": loss, **aux.get("metrics", {})}
    return state, jax.tree.map(lambda m: jnp.asarray(m, jnp.float32), metrics)

  return step


def accumulate(step_fn):
  """Wraps a step to sum its metrics into ``acc`` on device and remember the
  first (1-based global) step whose loss was not finite (-1: none)."""

  def step(state, acc, batch):
    state, metrics = step_fn(state, batch)
    bad = ~jnp.isfinite(metrics["loss"])
    first = jnp.where((acc["nonfinite_step"] < 0) & bad, state.step, acc["nonfinite_step"])
    sums = jax.tree.map(jnp.add, acc["sums"], metrics)
    return state, {"sums": sums, "count": acc["count"] + 1, "nonfinite_step": first}

  return step


def jit_train_step(step_fn, state_shardings, mesh: jax.sharding.Mesh):
  """The hot path: ``(state, acc, batch) -> (state, acc)`` as one jit, state and metrics donated."""
  return jax.jit(accumulate(step_fn), donate_argnums=(0, 1),
                 in_shardings=(state_shardings, parallel.replicated(mesh),
                               parallel.data_sharding(mesh)),
                 out_shardings=(state_shardings, parallel.replicated(mesh)))


def zero_accumulator(metric_shapes) -> dict:
  return {"sums": jax.tree.map(lambda s: np.zeros(s.shape, np.float32), metric_shapes),
          "count": np.zeros((), np.int32), "nonfinite_step": np.full((), -1, np.int32)}


