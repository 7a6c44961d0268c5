"""What a run tells the console: progress, the loss checks, one line per evaluation.

``ProgressReport``: every ``config.progress_every_secs`` seconds (once the stage has a
finished step), and at the end of each stage, one absl log line

  [train] step 1200/2000 (stage 1200/2000), loss 0.2841, 812.0 img/s, ETA 0:03:51

The step, the images per second and the ETA count the steps the devices have finished
(``completed``), never the steps the host has dispatched ahead of them; the rate runs
from the first finished step the stage saw (so compilation is not in it) to the newest.
The loss is the newest logged mean. On a terminal the line starts with a bar; it is
the same log line, so it never shares a line with another one.

``diverged``: the divergence guard (``config.divergence``). A stage's reference is
the smallest of its first ``window`` logged mean losses (the trainer logs its first
``window`` steps one by one, so the first is the loss of the model the stage starts
from, before any update could blow it up); a later logged mean loss above ``factor``
times the reference is a divergence (``Diverged``). ``check_finite`` and
``check_divergence`` raise with the step, the stage and the checkpoint kept.

``eval_summary``: one line per evaluator and split with its headline figures
(``HEADLINES``); every figure is in the eval JSON and TensorBoard (``summary_scalars``).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from flax import traverse_util

BAR_WIDTH = 20

# Per evaluator type, the figures of its console line: (label, path in its flattened payload).
HEADLINES = {
    "classification": (("AUROC", "classification/auroc/mean"),
                       ("AUPRC", "classification/auprc/mean"), ("F1", "classification/f1/mean"),
                       ("loc acc@IoU>0.1", "localization/iou@0.1/mean"),
                       ("loc mean IoU", "localization/mean_iou/mean")),
    "patch_grid": (("acc@IoU>0.1", "iou@0.1/mean"), ("acc@IoU>0.5", "iou@0.5/mean"),
                   ("acc@IoR>0.1", "ior@0.1/mean")),
    "vkd_cam_shift": (("delta MSE", "delta_mse/mean"), ("delta Dice", "delta_dice/mean")),
    "byol_cam_kinds": (("mean IoU Grad-CAM", "mean_iou/gradcam"),
                       ("Grad-CAM++", "mean_iou/gradcam++"), ("Score-CAM", "mean_iou/scorecam")),
    "dm_alignment": (("|rotation| deg before", "before/rotation_deg_mean_abs"),
                     ("after", "after/rotation_deg_mean_abs"),
                     ("shift before", "before/shift_mean"), ("after", "after/shift_mean")),
}
FALLBACK_FIGURES = 4  # an unknown type's line: its first figures named '<metric>/mean'


def flatten_scalars(payload: Mapping, prefix: str = "") -> dict[str, float]:
  """Numeric leaves of a nested dict as {'a/b/c': value}."""
  flat = traverse_util.flatten_dict(dict(payload), sep="/")
  return {prefix + k: float(v) for k, v in flat.items()
          if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)}


def summary_scalars(payload: Mapping, prefix: str) -> dict[str, float]:
  """The figures of an eval payload that go to TensorBoard (per-class values, thresholds
  and counts are in the eval JSON only)."""
  return {k: v for k, v in flatten_scalars(payload, prefix).items()
          if not any(part in k for part in ("/per_class/", "/thresholds/", "/num_positives/",
                                            "/prevalence/"))}


def eval_summary(name: str, kind: str, split: str, scalars: Mapping[str, float]) -> str:
  """'classification val: AUROC 0.871 AUPRC 0.410 F1 0.450 ...': evaluator ``name`` of
  type ``kind`` on ``split``, from its flattened payload ``scalars``."""
  if kind in HEADLINES:
    figures = [(label, scalars[path]) for label, path in HEADLINES[kind] if path in scalars]
  else:
    figures = [(path[:-len("/mean")], value) for path, value in scalars.items()
               if path.count("/") == 1 and path.endswith("/mean")][:FALLBACK_FIGURES]
  text = " ".join(f"{label} {value:.3f}" for label, value in figures)
  return f"{name} {split}: {text or 'no summary figures'}"


def check_finite(first: int, stage: str, stage_start: int, kept: Callable[[], str]) -> None:
  """Raises FloatingPointError when ``first`` (the first global step of an interval whose loss
  was not finite, -1: none) is a step; ``kept()`` says which checkpoint is left."""
  if first >= 0:
    raise FloatingPointError(f"non-finite loss at step {first} (stage {stage!r}, its step "
                             f"{first - stage_start}); {kept()}")


def check_divergence(loss: float, early: list[float], guard, stage: str, step: int,
                     stage_start: int, kept: Callable[[], str]) -> None:
  """Adds ``loss`` to the stage's ``early`` logged losses while fewer than ``guard.window``;
  raises ``Diverged`` when it is past the guard (``config.divergence``: factor, window)."""
  reference = diverged(loss, early, guard.factor, guard.window)
  if len(early) < guard.window:
    early.append(loss)
  if reference is not None:
    raise Diverged(
        f"training diverged at step {step} (stage {stage!r}, its step {step - stage_start}): "
        f"mean loss {loss:.4g} since the previous log is above divergence.factor="
        f"{guard.factor:g} x {reference:.4g}, the smallest of the stage's first {guard.window} "
        f"logged losses; {kept()}. Lower the learning rate, or set divergence.factor=0 to "
        f"turn the guard off")


class Diverged(FloatingPointError):
  """The training loss rose above ``divergence.factor`` times the stage's reference."""


def divergence_reference(early: Sequence[float], window: int) -> float | None:
  """The reference of a stage whose first logged mean losses are ``early``: their
  minimum once there are ``window`` of them, else None."""
  if window < 1 or len(early) < window:
    return None
  return min(early[:window])


def diverged(loss: float, early: Sequence[float], factor: float, window: int) -> float | None:
  """The reference ``loss`` exceeds ``factor`` times, or None (``factor`` 0: off; a
  reference <= 0 gives no scale to compare with)."""
  reference = divergence_reference(early, window)
  if factor <= 0 or reference is None or reference <= 0:
    return None
  return reference if loss > factor * reference else None


def format_duration(seconds: float) -> str:
  hours, rest = divmod(int(round(seconds)), 3600)
  return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def is_terminal() -> bool:
  """Whether absl's log lines (stderr) reach a terminal."""
  return sys.stderr.isatty()


class ProgressReport:
  """The progress line of a run (see the module docstring).

  total_steps: global steps of the whole run; every_secs: seconds between lines;
  bar: start the line with a bar (a terminal); clock and log: time.monotonic and
  logging.info unless given (tests pass fakes).
  """

  def __init__(self, total_steps: int, every_secs: float, *, bar: bool = False,
               clock: Callable[[], float] = time.monotonic,
               log: Callable[..., None] = logging.info):
    self.total_steps, self.every_secs, self.bar = total_steps, every_secs, bar
    self.clock, self.log = clock, log
    self.last_report = clock()
    self.start_stage("", 0, 0, 0, 0)

  def start_stage(self, name: str, step: int, stage_step: int, stage_steps: int,
                  batch_size: int) -> None:
    """A stage begins (or resumes) at global ``step``, its own ``stage_step``."""
    self.stage, self.stage_steps, self.batch_size = name, stage_steps, batch_size
    self.stage_start = step - stage_step
    self.first = self.newest = (step, None)  # (global step, clock) of finished steps
    self.loss: float | None = None

  def completed(self, step: int | None) -> None:
    """Global step ``step`` (and every one before it) has finished on the devices."""
    if step is None or (self.newest[1] is not None and step <= self.newest[0]):
      return
    now = self.clock()
    if self.first[1] is None:
      self.first = (step, now)
    self.newest = (step, now)

  def steps_per_sec(self) -> float | None:
    """Finished steps per second since the stage's first finished step (None: too few)."""
    (first, t0), (newest, t1) = self.first, self.newest
    if t0 is None or newest <= first:
      return None
    return (newest - first) / max(t1 - t0, 1e-9)

  def line(self) -> str:
    step = self.newest[0]
    rate = self.steps_per_sec()
    text = (f"[{self.stage}] step {step}/{self.total_steps} "
            f"(stage {step - self.stage_start}/{self.stage_steps}), loss "
            + ("-" if self.loss is None else f"{self.loss:.4g}") + ", "
            + ("- img/s, ETA -" if rate is None else
               f"{rate * self.batch_size:.1f} img/s, "
               f"ETA {format_duration((self.total_steps - step) / rate)}"))
    if not self.bar:
      return text
    done = min(step / max(self.total_steps, 1), 1.0)
    filled = int(done * BAR_WIDTH)
    return f"|{'#' * filled}{'.' * (BAR_WIDTH - filled)}| {100 * done:3.0f}% {text}"

  def maybe_report(self, *, force: bool = False) -> str | None:
    """Logs the line when ``every_secs`` have passed since the last one and the stage has a
    finished step (or ``force``)."""
    now = self.clock()
    if not force and (now - self.last_report < self.every_secs or self.newest[1] is None):
      return None
    self.last_report = now
    text = self.line()
    self.log("%s", text)
    return text
