"""Step timing: warm-up, several repeats of several steps, the median step time."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def time_steps(step: Callable[[int], object], sync: Callable[[object], None], *,
               warmup: int, repeats: int, steps: int) -> dict:
  """Times ``step(i)`` (i = running call number) with ``sync`` on its last output.

  ``warmup`` calls first (synced), then ``repeats`` rounds of ``steps`` calls,
  each round synced once at its end (so asynchronous dispatch overlaps steps as
  in training). Returns {'step_s': median seconds per step over the rounds,
  'round_step_s': [per round], 'warmup_s': seconds of the warm-up}.
  """
  if repeats < 1 or steps < 1:
    raise ValueError(f"need repeats >= 1 and steps >= 1, got {repeats}, {steps}")
  calls = 0
  start = time.perf_counter()
  out = None
  for _ in range(warmup):
    out = step(calls)
    calls += 1
  if out is not None:
    sync(out)
  warmup_s = time.perf_counter() - start
  rounds = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      out = step(calls)
      calls += 1
    sync(out)
    rounds.append((time.perf_counter() - start) / steps)
  return {"step_s": float(np.median(rounds)), "round_step_s": [float(r) for r in rounds],
          "warmup_s": warmup_s}
