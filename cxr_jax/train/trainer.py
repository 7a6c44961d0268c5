"""Runs a method's stages, then the config's evaluators.

``train_and_evaluate(config, workdir, method=...)`` is the whole of ``cxr-train``
(the CLI resolves ``config.method`` to a ``Method``; this module knows no paper):

  check the plan first (``cxr_jax.train.preflight``: every stage's and evaluator's split
    holds images and the boxes, gaze and positives they need; seconds),
  for each stage of ``method.stages(config)``:
    init the model with the stage's ``apply_kwargs`` and carry the previous stage's
      params / batch_stats over it (``cxr_jax.train.step``), run its hooks,
    build the optimizer with the stage's freeze mask and one jitted, donated step,
    train ``stage.steps`` steps; every ``stage.validation.every`` steps evaluate on
      ``validation.split``, keep the best state (WORKDIR/best/<stage>), feed a plateau
      schedule, stop early; checkpoint every ``config.checkpoint_every`` steps and at
      the stage's end; run the ``config.evals`` due every N steps or at the stage's end,
  then run the ``config.evals`` due at the end (``cxr_jax.evaluation.evaluators``:
  WORKDIR/eval/<split>.json, WORKDIR/report/).

A run whose WORKDIR/checkpoints holds a checkpoint resumes from it: the train
state, the data iterators' positions (one per process), the stage and the step
within it, and the early-stopping bookkeeping (``checkpoint.Progress``), so it
ends with the params of an uninterrupted run. On SIGTERM
(``parallel.preemption_requested``, checked after every step) it checkpoints and
raises ``parallel.Preempted``; as the host runs at most ``config.max_steps_in_flight``
steps ahead of the devices (``parallel.StepsInFlight``), that waits for a few steps.

With several processes all of them run this same code: each feeds its shard of
the batch, all take part in Orbax checkpointing, only process 0 writes the
TensorBoard events, the eval JSON and the report.

Metrics stay on device, summed over the log interval; the host reads them (and
the first step whose loss was not finite) only at log, eval and checkpoint
steps, and at each stage's first ``config.divergence.window`` steps. A non-finite
loss raises ``FloatingPointError``, a diverged one ``progress.Diverged``, naming the step,
the stage and the checkpoint kept; no checkpoint is written after either. The console
gets ``progress``'s lines; TensorBoard (process 0) every scalar.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cxr_jax import errors, run_config
from cxr_jax.evaluation import evaluators
from cxr_jax.models import pretrained
from cxr_jax.train import checks, optim, parallel, preflight, progress
from cxr_jax.train.checkpoint import Progress, RunCheckpoints
from cxr_jax.train.stage import Method, PrepareContext, Stage
from cxr_jax.train.state import TrainState
from cxr_jax.train.step import (carry_over, init_variables, jit_train_step, make_train_step,
                                stage_data_config, zero_accumulator)


def _default_make_iterator(*args, **kwargs):
  from cxr_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  return pipeline.make_iterator(*args, **kwargs)


def _default_evaluate(*args, **kwargs):
  from cxr_jax.evaluation import evaluator  # pylint: disable=import-outside-toplevel
  return evaluator.evaluate(*args, **kwargs)


def _metric(payload: dict, metric: str, stage: Stage) -> float:
  scalars = progress.flatten_scalars(payload)
  if metric not in scalars:
    raise KeyError(f"stage {stage.name!r}: metric {metric!r} not in the evaluation payload; "
                   f"available: {sorted(scalars)[:20]}")
  return scalars[metric]


def _improved(value: float, best: float | None, mode: str, tolerance: float = 0.0) -> bool:
  if best is None or math.isnan(best):
    return not math.isnan(value)
  margin = tolerance * abs(best)
  return value > best + margin if mode == "max" else value < best - margin


@dataclasses.dataclass
class _Loop:
  """What one stage's training loop holds besides the state; ``acc``: the metrics summed on
  device since the last log (``zeros`` resets them), logged at host time ``time``, step ``step``."""
  stage: Stage
  iterator: Any
  step_fn: Callable
  train_step: Callable
  feed: Callable
  every_evals: list
  batch_size: int
  in_flight: parallel.StepsInFlight
  time: float
  step: int
  zeros: Any = None
  acc: Any = None


@dataclasses.dataclass
class StageSetup:
  """A stage ready to train: its sharded start state and its optimizer's pieces."""
  state: TrainState
  tx: Any
  labels: Any
  bs_labels: Any
  passengers: set


class _Run:
  """The state of one ``train_and_evaluate`` call shared by its stages."""

  def __init__(self, config, workdir, method, make_iterator, evaluate, mesh):
    self.config, self.workdir, self.method, self.mesh = config, workdir, method, mesh
    self.model = method.model(config)
    self.stages = list(method.stages(config))
    checks.check_stages(method, self.stages)
    self.make_iterator, self.evaluate = make_iterator, evaluate
    self.eval_ctx = evaluators.EvalContext(
        config=config, workdir=workdir, method=method, model=self.model, mesh=mesh,
        make_iterator=make_iterator, evaluate=evaluate, stage_variables=self.stage_variables)
    self.evals = evaluators.build_evals(self.eval_ctx, [s.name for s in self.stages])
    # The config is checked (check_config): only now does anything go into the workdir.
    if jax.process_index() == 0:
      logging.info("config: %s", run_config.write(workdir, config))
    # clu's writers import TensorFlow: only a run needs them, not the step (cxr-bench on a
    # machine without TensorFlow builds steps from cxr_jax.train.step).
    from clu import metric_writers  # pylint: disable=import-outside-toplevel
    lead = jax.process_index() == 0
    # Scalars go to TensorBoard only (process 0); the console gets the progress and summaries.
    self.writer = metric_writers.AsyncMultiWriter(
        [metric_writers.SummaryWriter(workdir)] if lead else [])
    self.checkpoints = RunCheckpoints(workdir, config.keep_checkpoints)
    self.progress = progress.ProgressReport(
        sum(s.steps for s in self.stages), config.progress_every_secs,
        bar=lead and progress.is_terminal(), log=logging.info if lead else lambda *args: None)

  def stage_variables(self, name: str) -> dict:
    stage = next((s for s in self.stages if s.name == name), None)
    if stage is None:
      raise KeyError(f"no stage {name!r}; this method's stages are "
                     f"{[s.name for s in self.stages]}")
    return self.checkpoints.best_variables(name, stage.monitor().mode)

  def shard_state(self, state: TrainState) -> TrainState:
    return jax.device_put(state, parallel.tree_shardings(state, self.mesh, self.config.fsdp))

  def log(self, loop: _Loop, p: Progress) -> None:
    """Reads the interval's metrics (waiting for step ``p.step``), checks them (non-finite,
    diverged: ``progress``), writes their means, adds the loss to the plateau signal's, and
    starts the next interval."""
    stage = loop.stage
    host = jax.device_get(loop.acc)
    self.progress.completed(p.step)
    start = p.step - p.stage_step
    progress.check_finite(int(host["nonfinite_step"]), stage.name, start, self.checkpoints.kept)
    now, count = time.time(), max(int(host["count"]), 1)
    scalars = {f"{stage.name}/{k}": float(v) / count for k, v in host["sums"].items()}
    scalars[f"{stage.name}/images_per_sec"] = (
        loop.batch_size * (p.step - loop.step) / max(now - loop.time, 1e-9))
    self.writer.write_scalars(p.step, scalars)
    self.progress.loss = scalars[f"{stage.name}/loss"]
    progress.check_divergence(self.progress.loss, p.early_losses, self.config.divergence,
                              stage.name, p.step, start, self.checkpoints.kept)
    p.loss_since_eval = (p.loss_since_eval[0] + float(host["sums"]["loss"]),
                         p.loss_since_eval[1] + int(host["count"]))
    loop.acc = jax.device_put(loop.zeros, parallel.replicated(self.mesh))
    loop.time, loop.step = now, p.step

  def validate(self, state: TrainState, stage: Stage, step: int) -> dict:
    """The stage's own evaluation on ``validation.split`` (nothing written but scalars)."""
    split = stage.validation.split
    payload = self.evaluate(self.method, self.model, state.variables(), self.config, split, None,
                            stage=stage.name, mesh=self.mesh, make_iterator=self.make_iterator)
    self.writer.write_scalars(step, progress.summary_scalars(payload, f"{split}/"))
    return payload

  def run_evals(self, due, state: TrainState, stage: Stage, step: int) -> dict:
    """Runs the declared evaluators ``due`` on ``state`` and logs their summary figures."""
    results = evaluators.run_evals(self.eval_ctx, due, state.variables(), stage=stage.name)
    for name, sections in results.items():
      for split, payload in sections.items():
        prefix = f"{split}/" if name == "classification" else f"{split}/{name}/"
        self.writer.write_scalars(step, progress.summary_scalars(payload, prefix))
        logging.info("%s", progress.eval_summary(name, self.config.evals[name].get("type", name),
                                                 split, progress.flatten_scalars(payload)))
    return results

  # -- one stage ------------------------------------------------------------------------

  def setup_stage(self, index: int, stage: Stage, carried: tuple, init_rng, rng_data,
                  step: int, starts_fresh: bool) -> StageSetup:
    """Fresh variables with ``carried`` (params, batch_stats, extras) laid over them, the
    stage's hooks, and its optimizer; the state sharded over the mesh."""
    config = self.config
    params, batch_stats, extras = carried
    fresh_params, fresh_stats = init_variables(self.model, stage, config,
                                               jax.random.fold_in(init_rng, index))
    params, passengers = carry_over(fresh_params, params, stage=stage.name)
    batch_stats, _ = carry_over(fresh_stats, batch_stats, stage=stage.name,
                                collection="batch_stats")
    if index == 0 and starts_fresh and config.model.init_from:
      # Converted weights (cxr-convert-weights) into the method's prefixes; heads stay fresh.
      params, batch_stats = pretrained.init_from(config.model.init_from, params, batch_stats,
                                                 self.method.pretrained_prefixes)
    hooks = stage.hooks
    if hooks.init_extras is not None:
      extras = hooks.init_extras(params, extras)
    if hooks.prepare is not None and starts_fresh:
      params, extras = hooks.prepare(PrepareContext(
          config=config, workdir=self.workdir, model=self.model, params=params,
          batch_stats=batch_stats, extras=extras, mesh=self.mesh,
          make_iterator=self.make_iterator, batch_sharding=parallel.data_sharding(self.mesh)))
    labels = optim.param_labels(params, stage.trainable, stage=stage.name, frozen=passengers)
    bs_labels = optim.batch_stats_labels(batch_stats, labels, stage.trainable)
    tx = optim.make_optimizer(stage.optimizer, params, stage.trainable, stage.steps,
                              stage=stage.name, frozen=passengers)
    state = self.shard_state(TrainState(
        step=jnp.asarray(step, jnp.int32), params=params, batch_stats=batch_stats,
        opt_state=tx.init(params), extras=extras, rng=rng_data))
    return StageSetup(state, tx, labels, bs_labels, passengers)

  def stage_iterator(self, index: int, stage: Stage, progress: Progress):
    batch_size = stage.batch_size or self.config.batch_size
    iterator = self.make_iterator(
        stage_data_config(self.config.data, stage), stage.data.split, batch_size=batch_size,
        sharding=parallel.data_sharding(self.mesh), seed=self.config.seed + index, shuffle=True,
        num_epochs=None, drop_remainder=True, maps=stage.data.maps, augment=stage.data.augment,
        **({"views": stage.data.views} if stage.data.views else {}))
    if progress.data is not None:
      iterator.set_state(parallel.process_state(progress.data))
    return iterator

  def after_validation(self, state: TrainState, stage: Stage, p: Progress, feed) -> tuple:
    """Validates, keeps the best state, counts bad evaluations, feeds the plateau schedule.

    Returns (state, stop): stop when early stopping's patience is used up.
    """
    mon, v = stage.monitor(), stage.validation
    value = _metric(self.validate(state, stage, p.step), mon.metric, stage)
    p.evaluated = True
    logging.info("stage %r step %d: %s = %.5f", stage.name, p.step, mon.metric, value)
    if _improved(value, p.best, mon.mode):
      p.best = value
      if v.select_best:
        self.checkpoints.save_best(stage.name, mon.mode, p.step, state, value)
    if _improved(value, p.es_best, mon.mode, mon.tolerance):
      p.es_best, p.bad_evals = value, 0
    else:
      p.bad_evals += 1
    if stage.optimizer.schedule == "plateau":
      if v.plateau_signal == "train_loss":
        signal = p.loss_since_eval[0] / max(p.loss_since_eval[1], 1)
      else:
        signal = -value if mon.mode == "max" else value
      state = state.replace(opt_state=feed(state.opt_state, jnp.float32(signal)))
    p.loss_since_eval = (0.0, 0)
    stop = bool(v.early_stopping) and p.bad_evals >= v.early_stopping.patience
    if stop:
      logging.info("stage %r: early stop at step %d (no %.1f%% improvement of %s in %d evals)",
                   stage.name, p.step, 100 * mon.tolerance, mon.metric, p.bad_evals)
    return state, stop

  def end_stage(self, state: TrainState, stage: Stage, p: Progress) -> TrainState:
    """The stage's best-evaluated state when it selects one; the final checkpoint."""
    mon = stage.monitor()
    if p.evaluated and stage.validation.select_best:
      restored = self.checkpoints.restore_best(stage.name, mon.mode, state)
      if restored is not None:
        best_step, best_state = restored
        logging.info("stage %r: ending with its best state, step %d (%s = %s)",
                     stage.name, best_step, mon.metric, p.best)
        state = state.replace(params=best_state.params, batch_stats=best_state.batch_stats,
                              extras=best_state.extras)
    p.done, p.data = True, None
    self.checkpoints.save(p.step, state, p)
    return state

  def stage_loop(self, stage: Stage, setup: StageSetup, p: Progress) -> _Loop:
    """The jitted step, the data and the bookkeeping of ``stage``'s loop from ``p``."""
    config = self.config
    step_fn = make_train_step(self.model, stage, setup.tx, setup.labels, setup.bs_labels)
    state_sh = parallel.tree_shardings(setup.state, self.mesh, config.fsdp)
    batch_size = stage.batch_size or config.batch_size
    self.progress.start_stage(stage.name, p.step, p.stage_step, stage.steps, batch_size)
    return _Loop(stage=stage, iterator=self.stage_iterator(p.stage, stage, p), step_fn=step_fn,
                 train_step=jit_train_step(step_fn, state_sh, self.mesh), batch_size=batch_size,
                 feed=jax.jit(functools.partial(optim.feed_plateau, stage.optimizer)),
                 every_evals=[d for d in self.evals if d.when[0] == "every"],
                 in_flight=parallel.StepsInFlight(config.max_steps_in_flight),
                 time=time.time(), step=p.step)

  def after_step(self, state: TrainState, loop: _Loop, p: Progress) -> tuple[TrainState, bool]:
    """Logs, validates, runs the evals due, checkpoints, and stops on SIGTERM, as far as
    step ``p.step`` asks for each; returns (state, whether the stage is over)."""
    config, stage = self.config, loop.stage
    preempted = parallel.preemption_requested(p.step)  # every step (multi-process sync)
    end = p.stage_step == stage.steps
    every = stage.validation.every
    validate_now = bool(every) and (p.stage_step % every == 0 or end)
    checkpoint_now = p.step % config.checkpoint_every == 0 or preempted
    early = config.divergence.factor > 0 and p.stage_step <= config.divergence.window
    # Eval and checkpoint steps log too: the plateau's training loss is then exact on resume.
    if p.step % config.log_every == 0 or end or validate_now or checkpoint_now or early:
      self.log(loop, p)
    stop = False
    if validate_now:
      state, stop = self.after_validation(state, stage, p, loop.feed)
    if due := evaluators.due(loop.every_evals, step=p.step):
      self.run_evals(due, state, stage, p.step)
    if stop or end:
      return state, True
    if checkpoint_now:
      p.data = parallel.gather_process_states(loop.iterator.get_state())
      self.checkpoints.save(p.step, state, p)
    if preempted:
      self.checkpoints.wait()
      raise parallel.Preempted(p.step, self.workdir)
    return state, False

  def run_stage(self, stage: Stage, setup: StageSetup, p: Progress) -> TrainState:
    """Trains ``stage`` from ``p`` (its step, iterator state, bookkeeping) to its end; at most
    ``config.max_steps_in_flight`` steps unfinished. Every exit logs (checks) its interval."""
    self.checkpoints.drop_best_after(stage.name, stage.monitor().mode, p.step)
    loop, state, over = self.stage_loop(stage, setup, p), setup.state, False
    try:
      while not over and p.stage_step < stage.steps:
        batch = next(loop.iterator)
        self.progress.completed(loop.in_flight.finished(room=True))
        if loop.acc is None:
          loop.zeros = zero_accumulator(jax.eval_shape(loop.step_fn, state, batch)[1])
          loop.acc = jax.device_put(loop.zeros, parallel.replicated(self.mesh))
        state, loop.acc = loop.train_step(state, loop.acc, batch)
        p.stage_step, p.step = p.stage_step + 1, p.step + 1
        loop.in_flight.add(p.step, state.step)
        self.progress.maybe_report()
        state, over = self.after_step(state, loop, p)
      self.progress.maybe_report(force=True)
      return self.end_stage(state, stage, p)
    finally:
      close = getattr(loop.iterator, "close", None)
      if close is not None:
        close()

  # -- the run ------------------------------------------------------------------------

  def resume_point(self) -> tuple[int, Progress] | None:
    """(step, Progress) of the checkpoint to resume from, checked against the stages."""
    resume = self.checkpoints.latest_progress()
    if resume is None:
      return None
    step, p = resume
    names = [s.name for s in self.stages]
    if p.stage >= len(self.stages) or self.stages[p.stage].name != p.stage_name:
      raise ValueError(f"{self.workdir}/checkpoints/{step} belongs to stage {p.stage_name!r} "
                       f"#{p.stage}; this method's stages are {names}")
    logging.info("resuming from %s/checkpoints/%d (stage %r, its step %d)",
                 self.workdir, step, p.stage_name, p.stage_step)
    return resume

  def train(self) -> TrainState:
    """Every stage in order (resumed where a checkpoint says); returns the final state."""
    resume = self.resume_point()
    init_rng, state_rng = jax.random.split(jax.random.key(self.config.seed))
    rng_data = np.asarray(jax.random.key_data(state_rng))  # host copy: donation never aliases it
    carried, step, state = ({}, {}, {}), 0, None
    for index, stage in enumerate(self.stages):
      starts_fresh = resume is None or index > resume[1].stage
      setup = self.setup_stage(index, stage, carried, init_rng, rng_data, step, starts_fresh)
      state, p = setup.state, Progress(stage=index, stage_name=stage.name, step=step)
      if not starts_fresh:
        if index < resume[1].stage:  # a finished stage: its leaves shape the restore target
          carried = (state.params, state.batch_stats, state.extras)
          continue
        state, p = self.checkpoints.restore(resume[0], state), resume[1]
      if not p.done:
        state = self.run_stage(stage, dataclasses.replace(setup, state=state), p)
        self.run_evals(evaluators.due(self.evals, stage=stage.name), state, stage, p.step)
      step = int(jax.device_get(state.step))
      carried = (state.params, state.batch_stats, state.extras)
    return state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, method: Method,
                       make_iterator: Callable[..., Any] | None = None,
                       evaluate: Callable[..., dict] | None = None,
                       mesh: jax.sharding.Mesh | None = None) -> TrainState:
  """Trains ``method`` and runs the config's evaluators.

  Args:
    config: the locked method config (configs/common.py layout).
    workdir: checkpoints, TensorBoard events, eval JSON; resumed if it holds a checkpoint.
    method: the ``Method`` to train (``cxr_jax.methods.get_method(config.method)``).
    make_iterator: ``cxr_jax.data.pipeline.make_iterator`` unless given.
    evaluate: ``cxr_jax.evaluation.evaluator.evaluate`` unless given (the stages' validation
      and the 'classification' evaluators).
    mesh: default ``parallel.make_mesh()`` (all devices).
  Returns:
    The final TrainState (each validating stage ends with its best params).
  Raises:
    FloatingPointError: a non-finite loss (names the step and the stage).
    parallel.Preempted: SIGTERM; a checkpoint to resume from was written.
    preflight.PreflightError: the config's stages or evaluators need data their splits lack
      (checked in seconds before anything is built; skipped for an injected ``make_iterator``,
      whose data are not ``make_source``'s).
  """
  mesh = mesh or parallel.make_mesh()
  checks.check_config(config, method, mesh)
  if make_iterator is None:
    preflight.run(config, method, log=logging.info if jax.process_index() == 0 else None)
  run = _Run(config, os.path.abspath(workdir), method, make_iterator or _default_make_iterator,
             evaluate or _default_evaluate, mesh)
  try:
    state = run.train()
    run.checkpoints.wait()
    if parallel.stop_due():
      raise parallel.Preempted(int(jax.device_get(state.step)), run.workdir)
    run.run_evals(evaluators.due(run.evals, end=True), state, run.stages[-1],
                  int(jax.device_get(state.step)))
    return state
  finally:
    run.checkpoints.wait()
    run.checkpoints.close()
    run.writer.flush()


def restore_for_eval(config: ml_collections.ConfigDict, workdir: str, method: Method):
  """(model, variables, mesh) from the newest checkpoint in WORKDIR/checkpoints.

  The newest checkpoint of a finished run holds the final state (each
  validating stage ends with its best params). Raises FileNotFoundError when
  the workdir has no checkpoint.
  """
  model = method.model(config)
  mesh = parallel.make_mesh()
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):  # Orbax would create it
    raise errors.MissingPath(f"no checkpoint in {workdir}/checkpoints: train with cxr-train first")
  checkpoints = RunCheckpoints(os.path.abspath(workdir), config.keep_checkpoints)
  try:
    latest = checkpoints.latest_progress()
    if latest is None:
      raise errors.MissingPath(f"no checkpoint in {workdir}/checkpoints: train with cxr-train first")
    step, p = latest
    if not p.done:
      logging.warning("%s/checkpoints/%d is mid-stage (stage %r, its step %d): evaluating it as is",
                      workdir, step, p.stage_name, p.stage_step)
    restored = checkpoints.restore_replicated(step, parallel.replicated(mesh))
  finally:
    checkpoints.close()
  variables = {"params": restored["params"], "batch_stats": restored.get("batch_stats") or {}}
  return model, variables, mesh
