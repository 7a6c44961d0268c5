"""Runs a method's stages: init / carry-over, one jitted step, eval, checkpoints.

``train_and_evaluate(config, workdir)`` is the whole of ``cxr-train``:

  for each stage of ``method.stages(config)``:
    init the model with the stage's ``apply_kwargs`` on a [1,H,W,C] batch and
      carry the previous stage's params / batch_stats over it (new leaves fresh,
      carried leaves shape-checked),
    build the optimizer with the stage's freeze mask, one jitted step (state
      donated, batch sharded over 'data', state replicated or FSDP),
    train ``stage.steps`` steps; every ``eval_every`` steps evaluate on
      ``eval_split``, keep the best state (WORKDIR/best/<stage>), feed a plateau
      schedule (the monitored metric, or the mean training loss since the
      previous evaluation: ``stage.plateau_signal``), stop early; checkpoint
      every ``config.checkpoint_every`` steps
      and at the stage's end,
  then evaluate on 'val' and 'test' (WORKDIR/eval/<split>.json), then run the
  method's optional ``after_training`` (e.g. a report over its stages' checkpoints).

A run whose WORKDIR/checkpoints holds a checkpoint resumes from it: the train
state, the data iterators' positions (one per process), the stage and the step
within it, and the early-stopping bookkeeping, so it ends with the params of an
uninterrupted run. On SIGTERM (``parallel.preemption_requested``, checked after
every step) it checkpoints and raises ``parallel.Preempted``.

With several processes all of them run this same code: each feeds its shard of
the batch, all take part in Orbax checkpointing, only process 0 writes the
TensorBoard events, the eval JSON and the report.

Metrics stay on device, summed over the log interval; the host reads them (and
the first step whose loss was not finite) only at log, eval and checkpoint
steps. A non-finite loss raises ``FloatingPointError`` naming the step and the
stage; no checkpoint is written after it.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util

from cxr_jax.methods.base import (PLATEAU_SIGNALS, EarlyStopping, LossContext, Method,
                                  PrepareContext, Stage)
from cxr_jax.models import pretrained
from cxr_jax.train import optim, parallel
from cxr_jax.train.checkpoint import RunCheckpoints
from cxr_jax.train.state import TrainState


def _default_make_iterator(*args, **kwargs):
  from cxr_jax.data import pipeline
  return pipeline.make_iterator(*args, **kwargs)


def _default_evaluate(*args, **kwargs):
  from cxr_jax.evaluation import evaluator
  return evaluator.evaluate(*args, **kwargs)


def flatten_scalars(payload: dict, prefix: str = "") -> dict[str, float]:
  """Numeric leaves of a nested dict as {'a/b/c': value}."""
  flat = traverse_util.flatten_dict(payload, sep="/")
  return {prefix + k: float(v) for k, v in flat.items()
          if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)}


def monitor(stage: Stage) -> EarlyStopping:
  """The metric a stage selects its best state / feeds its plateau schedule with."""
  return stage.early_stopping or EarlyStopping()


def _metric(payload: dict, metric: str, stage: Stage) -> float:
  scalars = flatten_scalars(payload)
  if metric not in scalars:
    raise KeyError(f"stage {stage.name!r}: metric {metric!r} not in the evaluation payload; "
                   f"available: {sorted(scalars)[:20]}")
  return scalars[metric]


def _improved(value: float, best: float | None, mode: str, tolerance: float = 0.0) -> bool:
  if best is None or math.isnan(best):
    return not math.isnan(value)
  margin = tolerance * abs(best)
  return value > best + margin if mode == "max" else value < best - margin


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
    if stage.update_extras is not None:
      state = stage.update_extras(state)
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


# --------------------------------------------------------------------------- the run


class _Run:
  """The state of one ``train_and_evaluate`` call shared by its stages."""

  def __init__(self, config, workdir, method, model, make_iterator, evaluate, mesh, stages):
    # clu's writers import TensorFlow: only a run needs them, not the step (cxr-bench on a
    # machine without TensorFlow builds steps from this module).
    from clu import metric_writers, periodic_actions  # pylint: disable=import-outside-toplevel
    self.config, self.workdir, self.method, self.model = config, workdir, method, model
    self.make_iterator, self.evaluate, self.mesh, self.stages = make_iterator, evaluate, mesh, stages
    self.writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    self.checkpoints = RunCheckpoints(workdir, config.keep_checkpoints)
    self.total_steps = sum(s.steps for s in stages)
    self.progress = periodic_actions.ReportProgress(
        num_train_steps=self.total_steps, writer=self.writer, every_steps=config.log_every)
    self.tty = sys.stdout.isatty() and jax.process_index() == 0

  def shard_state(self, state: TrainState) -> TrainState:
    return jax.device_put(state, parallel.tree_shardings(state, self.mesh, self.config.get("fsdp", False)))

  def check_finite(self, acc, stage: Stage, stage_start: int) -> None:
    """Raises if a step since the last log had a non-finite loss (``stage_start``:
    the global step at which the stage began)."""
    first = int(jax.device_get(acc["nonfinite_step"]))
    if first >= 0:
      raise FloatingPointError(
          f"non-finite loss at step {first} (stage {stage.name!r}, its step "
          f"{first - stage_start}); the last good checkpoint is kept in "
          f"{os.path.join(self.workdir, 'checkpoints')}")

  def log(self, step: int, stage: Stage, acc, images: int, seconds: float) -> tuple[float, int]:
    """Writes the interval's mean metrics; returns (loss sum, step count) of the interval."""
    host = jax.device_get(acc)
    count = max(int(host["count"]), 1)
    scalars = {f"{stage.name}/{k}": float(v) / count for k, v in host["sums"].items()}
    scalars[f"{stage.name}/images_per_sec"] = images / max(seconds, 1e-9)
    self.writer.write_scalars(step, scalars)
    if self.tty:
      rate = scalars[f"{stage.name}/images_per_sec"]
      steps_per_sec = count / max(seconds, 1e-9)
      eta = (self.total_steps - step) / max(steps_per_sec, 1e-9)
      print(f"\r[{stage.name}] step {step}/{self.total_steps} "
            f"loss {scalars[f'{stage.name}/loss']:.4f} {rate:.0f} img/s "
            f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}", end="", flush=True)
    return float(host["sums"]["loss"]), int(host["count"])

  def eval(self, state: TrainState, split: str, stage: Stage, step: int, workdir: str | None,
           **kwargs):
    payload = self.evaluate(self.method, self.model, state.variables(), self.config, split,
                            workdir, stage=stage.name, mesh=self.mesh, **kwargs)
    # Summary figures only; per-class values, thresholds and counts are in the eval JSON.
    self.writer.write_scalars(step, {
        k: v for k, v in flatten_scalars(payload, prefix=f"{split}/").items()
        if not any(part in k for part in ("/per_class/", "/thresholds/", "/num_positives/",
                                          "/prevalence/"))})
    return payload

  def run_stage(self, index: int, stage: Stage, state: TrainState, tx, labels, bs_labels,
                progress: dict) -> TrainState:
    """Trains ``stage`` from ``progress`` (its step, iterator state, bookkeeping)."""
    config, mesh = self.config, self.mesh
    mon = monitor(stage)
    batch_size = stage.batch_size or config.batch_size
    iterator = self.make_iterator(
        stage_data_config(config.data, stage), stage.data.split, batch_size=batch_size,
        sharding=parallel.data_sharding(mesh), seed=config.seed + index, shuffle=True,
        num_epochs=None, drop_remainder=True, maps=stage.data.maps, augment=stage.data.augment,
        **({"views": stage.data.views} if stage.data.views else {}))
    if progress.get("data") is not None:
      iterator.set_state(parallel.process_state(progress["data"]))
    state_sh = parallel.tree_shardings(state, mesh, config.get("fsdp", False))
    step_fn = make_train_step(self.model, stage, tx, labels, bs_labels)
    train_step = jit_train_step(step_fn, state_sh, mesh)
    feed = jax.jit(functools.partial(optim.feed_plateau, stage.optimizer))
    plateau = stage.optimizer.get("schedule", "constant") == "plateau"

    stage_step, step = progress["stage_step"], progress["step"]
    stage_start = step - stage_step
    best, es_best, bad_evals = progress.get("best"), progress.get("es_best"), progress.get("bad_evals", 0)
    self.checkpoints.drop_best_after(stage.name, mon.mode, step)
    evaluated = progress.get("evaluated", False)
    # Training loss (sum, steps) since the previous evaluation, read at log steps.
    loss_since_eval = tuple(progress.get("loss_since_eval") or (0.0, 0))
    acc = zeros = None
    last_log, last_log_step = time.time(), step
    try:
      while stage_step < stage.steps:
        batch = next(iterator)
        if acc is None:
          zeros = zero_accumulator(jax.eval_shape(step_fn, state, batch)[1])
          acc = jax.device_put(zeros, parallel.replicated(mesh))
        state, acc = train_step(state, acc, batch)
        stage_step, step = stage_step + 1, step + 1
        self.progress(step)
        preempted = parallel.preemption_requested(step)  # at every step (multi-process sync)
        end = stage_step == stage.steps
        evaluate_now = bool(stage.eval_every) and (stage_step % stage.eval_every == 0 or end)
        checkpoint_now = step % config.checkpoint_every == 0 or preempted
        # Eval and checkpoint steps log too: the plateau's training loss is then exact on resume.
        if step % config.log_every == 0 or end or evaluate_now or checkpoint_now:
          self.check_finite(acc, stage, stage_start)
          now = time.time()
          loss_sum, count = self.log(step, stage, acc, batch_size * (step - last_log_step),
                                     now - last_log)
          loss_since_eval = (loss_since_eval[0] + loss_sum, loss_since_eval[1] + count)
          acc, last_log, last_log_step = jax.device_put(zeros, parallel.replicated(mesh)), now, step
        stop = False
        if evaluate_now:
          payload = self.eval(state, stage.eval_split, stage, step, None)
          value = _metric(payload, mon.metric, stage)
          evaluated = True
          logging.info("stage %r step %d: %s = %.5f", stage.name, step, mon.metric, value)
          if _improved(value, best, mon.mode):
            best = value
            if stage.select_best:
              self.checkpoints.save_best(stage.name, mon.mode, step, state, value)
          if _improved(value, es_best, mon.mode, mon.tolerance):
            es_best, bad_evals = value, 0
          else:
            bad_evals += 1
          if plateau:
            if stage.plateau_signal == "train_loss":
              signed = loss_since_eval[0] / max(loss_since_eval[1], 1)
            else:
              signed = -value if mon.mode == "max" else value
            state = state.replace(opt_state=feed(state.opt_state, jnp.float32(signed)))
          loss_since_eval = (0.0, 0)
          if stage.early_stopping and bad_evals >= stage.early_stopping.patience:
            logging.info("stage %r: early stop at step %d (no %.1f%% improvement of %s in %d evals)",
                         stage.name, step, 100 * mon.tolerance, mon.metric, bad_evals)
            stop = True
        if stop or end:
          break
        if checkpoint_now:
          self.checkpoints.save(step, state, dict(
              stage=index, stage_name=stage.name, stage_step=stage_step, step=step, done=False,
              data=parallel.gather_process_states(iterator.get_state()), best=best,
              es_best=es_best, bad_evals=bad_evals, evaluated=evaluated,
              loss_since_eval=list(loss_since_eval)))
        if preempted:
          self.checkpoints.wait()
          raise parallel.Preempted(step, self.workdir)
      if acc is not None:
        self.check_finite(acc, stage, stage_start)
      if evaluated and stage.select_best:
        restored = self.checkpoints.restore_best(stage.name, mon.mode, state)
        if restored is not None:
          best_step, best_state = restored
          logging.info("stage %r: ending with its best state, step %d (%s = %s)",
                       stage.name, best_step, mon.metric, best)
          state = state.replace(params=best_state.params, batch_stats=best_state.batch_stats,
                                extras=best_state.extras)
      self.checkpoints.save(step, state, dict(
          stage=index, stage_name=stage.name, stage_step=stage_step, step=step, done=True,
          data=None, best=best, es_best=es_best, bad_evals=bad_evals, evaluated=evaluated))
    finally:
      close = getattr(iterator, "close", None)
      if close is not None:
        close()
    return state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       method: Method | None = None,
                       make_iterator: Callable[..., Any] | None = None,
                       evaluate: Callable[..., dict] | None = None,
                       mesh: jax.sharding.Mesh | None = None) -> TrainState:
  """Trains ``method`` (default: ``get_method(config.method)``) and evaluates it.

  Args:
    config: the locked method config (configs/common.py layout).
    workdir: checkpoints, TensorBoard events, eval JSON; resumed if it holds a checkpoint.
    make_iterator: ``cxr_jax.data.pipeline.make_iterator`` unless given.
    evaluate: ``cxr_jax.evaluation.evaluator.evaluate`` unless given.
    mesh: default ``parallel.make_mesh()`` (all devices).
  Returns:
    The final TrainState (each evaluating stage ends with its best params).
  Raises:
    FloatingPointError: a non-finite loss (names the step and the stage).
    parallel.Preempted: SIGTERM; a checkpoint to resume from was written.
  """
  if method is None:
    from cxr_jax.methods import get_method
    method = get_method(config.method)
  make_iterator = make_iterator or _default_make_iterator
  evaluate = evaluate or _default_evaluate
  mesh = mesh or parallel.make_mesh()
  workdir = os.path.abspath(workdir)
  model = method.model(config)
  stages = list(method.stages(config))
  names = [s.name for s in stages]
  if not stages or len(set(names)) != len(names):
    raise ValueError(f"method {method.name!r}: stages must be a non-empty list of unique names, got {names}")
  for s in stages:
    if s.steps < 1:
      raise ValueError(f"method {method.name!r}: stage {s.name!r} has steps={s.steps}; need >= 1")
    if s.plateau_signal not in PLATEAU_SIGNALS:
      raise ValueError(f"method {method.name!r}: stage {s.name!r} has plateau_signal "
                       f"{s.plateau_signal!r}; known: {list(PLATEAU_SIGNALS)}")

  run = _Run(config, workdir, method, model, make_iterator, evaluate, mesh, stages)
  resume = run.checkpoints.latest_meta()
  if resume is not None:
    resume_step, meta = resume
    if meta["stage"] >= len(stages) or stages[meta["stage"]].name != meta["stage_name"]:
      raise ValueError(f"{workdir}/checkpoints/{resume_step} belongs to stage "
                       f"{meta['stage_name']!r} #{meta['stage']}; this method's stages are {names}")
    logging.info("resuming from %s/checkpoints/%d (stage %r, its step %d)",
                 workdir, resume_step, meta["stage_name"], meta["stage_step"])

  init_rng, state_rng = jax.random.split(jax.random.key(config.seed))
  rng_data = np.asarray(jax.random.key_data(state_rng))  # host copy: donation never aliases it
  params, batch_stats, extras, step, state = {}, {}, {}, 0, None
  try:
    for index, stage in enumerate(stages):
      fresh_params, fresh_stats = init_variables(model, stage, config, jax.random.fold_in(init_rng, index))
      params, passengers = carry_over(fresh_params, params, stage=stage.name)
      batch_stats, _ = carry_over(fresh_stats, batch_stats, stage=stage.name, collection="batch_stats")
      if index == 0 and resume is None and config.model.get("init_from"):
        # Converted weights (cxr-convert-weights) into the backbone; heads stay fresh.
        params, batch_stats = pretrained.init_from(
            config.model.init_from, params, batch_stats,
            getattr(method, "pretrained_prefixes", ("backbone",)))
      if stage.init_extras is not None:
        extras = stage.init_extras(params, extras)
      starts_fresh = resume is None or index > resume[1]["stage"]
      if stage.prepare is not None and starts_fresh:
        params, extras = stage.prepare(PrepareContext(
            config=config, workdir=workdir, model=model, params=params, batch_stats=batch_stats,
            extras=extras, mesh=mesh, make_iterator=make_iterator,
            batch_sharding=parallel.data_sharding(mesh)))
      labels = optim.param_labels(params, stage.trainable, stage=stage.name, frozen=passengers)
      bs_labels = optim.batch_stats_labels(batch_stats, labels, stage.trainable)
      tx = optim.make_optimizer(stage.optimizer, params, stage.trainable, stage.steps,
                                stage=stage.name, frozen=passengers)
      state = run.shard_state(TrainState(
          step=jnp.asarray(step, jnp.int32), params=params, batch_stats=batch_stats,
          opt_state=tx.init(params), extras=extras, rng=rng_data))
      progress = {"stage_step": 0, "step": step}
      if resume is not None and index <= resume[1]["stage"]:
        if index < resume[1]["stage"]:
          continue
        state = run.checkpoints.restore(resume[0], state)
        progress = resume[1]
      if not progress.get("done"):
        state = run.run_stage(index, stage, state, tx, labels, bs_labels, progress)
      step = int(jax.device_get(state.step))
      params, batch_stats, extras = state.params, state.batch_stats, state.extras
    run.checkpoints.wait()
    if run.tty:
      print()
    if parallel.stop_due():
      raise parallel.Preempted(step, workdir)
    for split in ("val", "test"):
      payload = run.eval(state, split, stages[-1], step, workdir, write_curves=True)
      scalars = flatten_scalars(payload)
      logging.info("final %s: %s", split,
                   {k: v for k, v in scalars.items() if k.endswith("/mean")})
    after_training = getattr(method, "after_training", None)
    if after_training is not None:
      after_training(config, workdir, mesh=mesh, make_iterator=make_iterator, evaluate=evaluate)
    return state
  finally:
    run.checkpoints.wait()
    run.checkpoints.close()
    run.writer.flush()


def restore_for_eval(config: ml_collections.ConfigDict, workdir: str):
  """(method, model, variables, mesh) from the newest checkpoint in WORKDIR/checkpoints.

  The newest checkpoint of a finished run holds the final state (each
  evaluating stage ends with its best params). Raises FileNotFoundError when
  the workdir has no checkpoint.
  """
  from cxr_jax.methods import get_method
  method = get_method(config.method)
  model = method.model(config)
  mesh = parallel.make_mesh()
  workdir = os.path.abspath(workdir)
  checkpoints = RunCheckpoints(workdir, config.keep_checkpoints)
  try:
    latest = checkpoints.latest_meta()
    if latest is None:
      raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints: train with cxr-train first")
    step, meta = latest
    if not meta.get("done"):
      logging.warning("%s/checkpoints/%d is mid-stage (stage %r, its step %d): evaluating it as is",
                      workdir, step, meta["stage_name"], meta["stage_step"])
    restored = checkpoints.restore_replicated(step, parallel.replicated(mesh))
  finally:
    checkpoints.close()
  variables = {"params": restored["params"], "batch_stats": restored.get("batch_stats") or {}}
  return method, model, variables, mesh
