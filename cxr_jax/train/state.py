"""The one pytree a training step reads and writes."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
  """Everything a step needs; checkpointed as a whole.

  step: int32 scalar, global step over all stages.
  params, batch_stats: the model's Flax collections (batch_stats may be {}).
  opt_state: the stage's optax state (rebuilt at every stage start).
  extras: method state outside the gradient (EMA target params, thresholds...).
  rng: uint32 [2] key data; step ``t`` uses ``fold_in(rng, t)``, so a resumed
    run draws the same randomness as an uninterrupted one.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  extras: Any
  rng: jax.Array

  def variables(self) -> dict[str, Any]:
    """Flax variables for ``model.apply`` / the evaluator."""
    out = {"params": self.params}
    if self.batch_stats:
      out["batch_stats"] = self.batch_stats
    return out
