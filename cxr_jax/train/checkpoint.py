"""Orbax checkpoints of a run.

WORKDIR/checkpoints/<step>/   the latest ``keep`` checkpoints: 'state' (the
                              TrainState) and 'meta' (JSON: stage index and name,
                              step within the stage, data-iterator state,
                              early-stopping bookkeeping). Saved asynchronously.
WORKDIR/best/<stage>/<step>/  per stage, the best-evaluated TrainState
                              (orbax best_fn on the stage's metric, keep 1).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


@dataclasses.dataclass
class Progress:
  """Where a run is: the 'meta' item of every checkpoint.

  stage, stage_name: index and name of the stage; stage_step: steps done in it;
  step: global step; done: the stage has ended (its final state is saved);
  data: every process's data-iterator state (None once the stage is done);
  best / es_best: the best monitored value (best-state selection / early stopping);
  bad_evals: evaluations since early stopping's last improvement; evaluated: the
  stage has evaluated at least once; loss_since_eval: (sum, count) of the training
  loss since the previous evaluation (a 'train_loss' plateau signal); early_losses: the
  stage's first logged mean losses (the divergence guard's reference).
  """
  stage: int = 0
  stage_name: str = ""
  stage_step: int = 0
  step: int = 0
  done: bool = False
  data: Any = None
  best: float | None = None
  es_best: float | None = None
  bad_evals: int = 0
  evaluated: bool = False
  loss_since_eval: tuple[float, int] = (0.0, 0)
  early_losses: list[float] = dataclasses.field(default_factory=list)

  def to_meta(self) -> dict[str, Any]:
    meta = dataclasses.asdict(self)
    meta["loss_since_eval"] = list(self.loss_since_eval)
    return meta

  @classmethod
  def from_meta(cls, meta: dict[str, Any]) -> "Progress":
    known = {f.name for f in dataclasses.fields(cls)}
    out = cls(**{k: v for k, v in meta.items() if k in known})
    out.loss_since_eval = tuple(out.loss_since_eval or (0.0, 0))
    return out


def abstract(tree):
  """ShapeDtypeStructs carrying each leaf's sharding: the restore target."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _is_leaf_metadata(x) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype")


class RunCheckpoints:
  """The latest-N and best-per-stage checkpoint managers of one workdir."""

  def __init__(self, workdir: str, keep: int):
    self.workdir = workdir
    self.latest = ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"), item_names=("state", "meta"),
        options=ocp.CheckpointManagerOptions(max_to_keep=max(int(keep), 1), create=True,
                                             cleanup_tmp_directories=True))
    self._best: dict[str, ocp.CheckpointManager] = {}

  def latest_progress(self) -> tuple[int, Progress] | None:
    """(step, Progress) of the newest finished checkpoint, or None."""
    step = self.latest.latest_step()
    if step is None:
      return None
    restored = self.latest.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return step, Progress.from_meta(restored["meta"])

  def save(self, step: int, state, progress: Progress) -> None:
    self.latest.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                   meta=ocp.args.JsonSave(progress.to_meta())))

  def restore(self, step: int, like):
    """The TrainState saved at ``step``, with the structure and shardings of ``like``.

    ``extras`` follow the checkpoint when their structure differs from ``like``'s
    (a stage's ``prepare`` may have added some), replicated like ``like.step``.
    """
    saved = self._metadata(step).get("extras") or {}
    target = abstract(like)
    if jax.tree.structure(saved, is_leaf=_is_leaf_metadata) != jax.tree.structure(like.extras):
      replicated = like.step.sharding
      target = target.replace(extras=jax.tree.map(
          lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated), saved,
          is_leaf=_is_leaf_metadata))
    restored = self.latest.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    return restored["state"]

  def _metadata(self, step: int):
    """The saved state's tree of leaf metadata (shape, dtype) at ``step``.

    Read by the item's handler: a Checkpointer would also look for step metadata
    (_CHECKPOINT_METADATA), which lives one folder up, and warn that it is missing.
    """
    metadata = ocp.StandardCheckpointHandler().metadata(
        pathlib.Path(self.workdir, "checkpoints", str(step), "state"))
    tree = getattr(metadata, "item_metadata", metadata)
    return getattr(tree, "tree", tree)

  def restore_replicated(self, step: int, sharding: jax.sharding.Sharding):
    """The TrainState saved at ``step`` as a nested dict, every leaf placed with ``sharding``.

    The target is built from the checkpoint's own metadata, so a state saved by a
    run on another topology (e.g. several processes) restores on this one.
    """
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                          self._metadata(step), is_leaf=_is_leaf_metadata)
    restored = self.latest.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    return restored["state"]

  def best(self, stage: str, mode: str) -> ocp.CheckpointManager:
    if stage not in self._best:
      self._best[stage] = ocp.CheckpointManager(
          os.path.join(self.workdir, "best", stage),
          options=ocp.CheckpointManagerOptions(
              max_to_keep=1, best_fn=lambda m: m["value"], best_mode=mode,
              keep_checkpoints_without_metrics=False, create=True, cleanup_tmp_directories=True))
    return self._best[stage]

  def save_best(self, stage: str, mode: str, step: int, state, value: float) -> None:
    manager = self.best(stage, mode)
    if step in manager.all_steps():
      manager.delete(step)
    manager.save(step, args=ocp.args.StandardSave(state), metrics={"value": float(value)})

  def drop_best_after(self, stage: str, mode: str, step: int) -> None:
    """Forget best checkpoints newer than ``step`` (written by a run that was killed)."""
    manager = self.best(stage, mode)
    for s in manager.all_steps():
      if s > step:
        manager.delete(s)

  def restore_best(self, stage: str, mode: str, like) -> tuple[int, Any] | None:
    manager = self.best(stage, mode)
    manager.wait_until_finished()
    step = manager.best_step()
    if step is None:
      return None
    return step, manager.restore(step, args=ocp.args.StandardRestore(abstract(like)))

  def best_variables(self, stage: str, mode: str = "max") -> dict[str, Any]:
    """{'params', 'batch_stats'} of stage ``stage``'s best state (WORKDIR/best/<stage>)."""
    manager = self.best(stage, mode)
    manager.wait_until_finished()
    step = manager.best_step()
    if step is None:
      raise FileNotFoundError(f"{self.workdir}/best/{stage} holds no checkpoint: train the stage "
                              f"with validation (Validation.every > 0) first")
    restored = manager.restore(step, args=ocp.args.StandardRestore())
    return {"params": restored["params"], "batch_stats": restored.get("batch_stats") or {}}

  def kept(self) -> str:
    """Which checkpoint a run stopped by an error leaves to resume from (for its message)."""
    self.wait()
    step = self.latest.latest_step()
    if step is None:
      return "no checkpoint was written before it, so there is none to resume from"
    return (f"the last checkpoint before it, step {step}, is kept in "
            f"{os.path.join(self.workdir, 'checkpoints')}")

  def wait(self) -> None:
    self.latest.wait_until_finished()
    for manager in self._best.values():
      manager.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    for manager in self._best.values():
      manager.close()
