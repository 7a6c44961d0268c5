"""Preflight: what a run will train and evaluate on, checked before its first step.

``make_plan(config, method)`` builds the method's stages and the config's evaluators and
counts, without training and without decoding an image (``cxr_jax.data.counts``), what
each of them reads: per stage its split (images, patients, positives per class, images
with boxes and boxes per class, images with gaze), steps, batch and epochs, and the
params it trains (its ``trainable`` regexes, the leaves and params each matches,
``optim.param_labels``); per evaluator (``config.evals``, not 'never') each split it
reports on. ``check(plan)`` raises ``PreflightError``, one line naming the stage or
evaluator, the split and what is missing, when

* a split a stage or an evaluator reads has 0 images, or cannot be opened (a dataset
  that is not prepared, an unknown split);
* a stage needs boxes or gaze (``DataSpec.required()``: its ``needs`` and maps) and its
  split has none;
* an evaluator needs boxes or gaze (its class attribute ``needs``) on a split without any;
* a split whose classification metric runs (evaluators needing 'positives', a stage's
  validation) has no positive of any class;
* a stage's trainable regex matches no parameter.

Warnings do not fail: a class with 0 positives in such a split (its AUROC is undefined
and left out of the means, as for Hernia in some of the papers' splits), and
zero counts read off a sample of a large old-format index. Notes: an optional
annotation that is absent (CAM localization without boxes). ``run`` does both and
logs the plan; ``cxr-train --dry_run`` prints it, and ``trainer.train_and_evaluate``
runs it before training (seconds: the counts come from the index or the label model,
the params from ``jax.eval_shape``).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from cxr_jax import errors
from cxr_jax.data import counts as counts_lib
from cxr_jax.evaluation import evaluators
from cxr_jax.train import optim
from cxr_jax.train.stage import Method, Stage
from cxr_jax.train.step import stage_data_config

LEVELS = ("error", "warning", "note")


class PreflightError(errors.UserError):
  """A run that cannot do what its config says (one line: stage or evaluator, split, what)."""


@dataclasses.dataclass
class SplitUse:
  """A split read by a stage or an evaluator, and what it must hold.

  who: "stage 'x'", "stage 'x' validation" or "evals.y (type)"; needs: of 'boxes',
  'gaze', 'positives' (errors when absent); optional: absent gives a note.
  counts: None when the split could not be opened (``problem`` says why).
  """
  who: str
  data: str
  split: str
  needs: tuple[str, ...] = ()
  optional: tuple[str, ...] = ()
  counts: counts_lib.SplitCounts | None = None
  problem: str = ""


@dataclasses.dataclass
class Trainable:
  """A stage's ``trainable`` regexes: (regex, leaves, params) each matches; the totals."""
  regexes: list[tuple[str, int, int]]
  leaves: int
  params: int
  total_leaves: int
  total_params: int


@dataclasses.dataclass
class StagePlan:
  name: str
  use: SplitUse
  steps: int
  batch_size: int
  trainable: Trainable | None
  validation: SplitUse | None

  @property
  def epochs(self) -> float:
    images = self.use.counts.images if self.use.counts is not None else 0
    return self.steps * self.batch_size / images if images else float("nan")


@dataclasses.dataclass
class EvalPlan:
  name: str
  type: str
  when: str
  uses: list[SplitUse]


@dataclasses.dataclass
class Problem:
  level: str   # LEVELS
  text: str


@dataclasses.dataclass
class Plan:
  """What a run reads and trains, and what is wrong with it (``problems``)."""
  method: str
  data: str
  stages: list[StagePlan]
  evals: list[EvalPlan]
  problems: list[Problem] = dataclasses.field(default_factory=list)

  def of_level(self, level: str) -> list[str]:
    return [p.text for p in self.problems if p.level == level]

  @property
  def errors(self) -> list[str]:
    return self.of_level("error")

  @property
  def warnings(self) -> list[str]:
    return self.of_level("warning")

  def format(self) -> str:
    return format_plan(self)


# --------------------------------------------------------------------------- counting


def data_label(data_config: Any) -> str:
  """'nih', 'synthetic (seed 1)': the dataset a data config reads."""
  name = data_config.name
  if name == "synthetic" and data_config.synthetic.seed:
    name += f" (seed {data_config.synthetic.seed})"
  return name


def _one_line(error: BaseException) -> str:
  text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
  return " ".join(str(text).split())


class _Counter:
  """``counts.split_counts`` per (data config, split), each counted once."""

  def __init__(self, max_read: int):
    self.max_read, self.cache = max_read, {}

  def use(self, who: str, data_config: Any, split: str, needs: Sequence[str] = (),
          optional: Sequence[str] = ()) -> SplitUse:
    use = SplitUse(who=who, data=data_label(data_config), split=split, needs=tuple(needs),
                   optional=tuple(optional))
    key = (data_config.to_json_best_effort(sort_keys=True), split)
    if key not in self.cache:
      try:
        self.cache[key] = (counts_lib.split_counts(data_config, split, self.max_read), "")
      except (KeyError, ValueError, OSError) as e:
        self.cache[key] = (None, _one_line(e))
    use.counts, use.problem = self.cache[key]
    return use


# --------------------------------------------------------------------------- params


@functools.lru_cache(maxsize=64)
def _init_shapes(model, shape: tuple[int, ...], kwargs: tuple):
  """The params shapes ``step.init_variables`` creates (no compute), per (model, input shape,
  apply_kwargs): sweep rows that share a model trace it once."""
  init = lambda rng: model.init({"params": rng, "dropout": rng}, jnp.zeros(shape, jnp.float32),
                                train=False, **dict(kwargs))["params"]
  return jax.eval_shape(init, jax.random.key(0))


def stage_params(model, stage: Stage, config: ml_collections.ConfigDict):
  """The params shapes of ``stage``'s init (``step.init_variables``)."""
  shape = (1, config.data.image_size, config.data.image_size, config.data.channels)
  kwargs = tuple(sorted(stage.apply_kwargs.items()))
  try:
    return _init_shapes(model, shape, kwargs)
  except TypeError:  # an unhashable model or kwargs: traced each time
    return _init_shapes.__wrapped__(model, shape, kwargs)


def trainable_of(params, stage: Stage) -> Trainable:
  """What ``stage.trainable`` selects of ``params`` (raises ``optim.param_labels``'s
  ValueError for a regex matching nothing)."""
  labels = traverse_util.flatten_dict(optim.param_labels(params, stage.trainable,
                                                          stage=stage.name), sep="/")
  sizes = {p: int(np.prod(v.shape)) for p, v in
           traverse_util.flatten_dict(params, sep="/").items()}
  regexes = []
  for regex in stage.trainable:
    matched = [p for p in sizes if re.fullmatch(regex, p)]
    regexes.append((regex, len(matched), sum(sizes[p] for p in matched)))
  train = [p for p, label in labels.items() if label == "train"]
  return Trainable(regexes, len(train), sum(sizes[p] for p in train), len(sizes),
                   sum(sizes.values()))


# --------------------------------------------------------------------------- the plan


def _declared(cls: type, attr: str, config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """An evaluator class's ``needs`` / ``optional``: a tuple, or a function of the config."""
  value = getattr(cls, attr, ())
  return tuple(value(config) if callable(value) else value)


def _eval_plans(config: ml_collections.ConfigDict, stage_names: Sequence[str],
                counter: _Counter, problems: list[Problem]) -> list[EvalPlan]:
  plans = []
  for name, spec in config.evals.items():
    spec = spec.to_dict() if isinstance(spec, ml_collections.ConfigDict) else dict(spec)
    kind, when = spec.get("type"), spec.get("when", "end")
    try:
      parsed = evaluators.parse_when(when, name=name)
      cls = evaluators.evaluator_class(kind, name=name)
    except ValueError as e:
      problems.append(Problem("error", _one_line(e)))
      continue
    if parsed[0] == "never":
      continue
    if parsed[0] == "stage" and parsed[1] not in stage_names:
      problems.append(Problem("error", f"config.evals.{name}.when names stage {parsed[1]!r}; "
                                       f"this method's stages are {list(stage_names)}"))
    own = config
    if spec.get("data"):  # the evaluator's own data (evaluators.with_data)
      context = evaluators.EvalContext(config=config, workdir=None, method=None, model=None,
                                       mesh=None, make_iterator=None, evaluate=None)
      try:
        own = evaluators.with_data(context, spec["data"], name=name).config
      except KeyError as e:
        problems.append(Problem("error", _one_line(e)))
        continue
    data_fn = getattr(cls, "data", None)
    data_config = data_fn(own) if callable(data_fn) else own.data
    needs, optional = _declared(cls, "needs", own), _declared(cls, "optional", own)
    splits = tuple(spec.get("splits", ()))
    uses = [counter.use(f"evals.{name} ({kind})", data_config, s, needs, optional)
            for s in splits]
    if "positives" in needs and "val" not in splits and splits:
      # F1 thresholds are chosen on 'val' of the evaluator's config.data
      # (evaluation.evaluator.evaluate).
      uses.append(counter.use(f"evals.{name} ({kind}) F1 thresholds", own.data, "val",
                              ("positives",)))
    plans.append(EvalPlan(name, kind, str(when), uses))
  return plans


def make_plan(config: ml_collections.ConfigDict, method: Method, *, params: bool = True,
              max_read: int = counts_lib.MAX_READ) -> Plan:
  """The plan of ``config`` run by ``method`` with its problems (module docstring).

  params: count the trainable params (``jax.eval_shape`` of each stage's init).
  max_read: images read at most per split where annotations are not indexed.
  """
  stages = list(method.stages(config))
  model = method.model(config) if params else None
  counter = _Counter(max_read)
  problems: list[Problem] = []
  stage_plans = []
  for stage in stages:
    data_config = stage_data_config(config.data, stage)
    use = counter.use(f"stage {stage.name!r}", data_config, stage.data.split,
                      stage.data.required())
    validation = None
    if stage.validation.every:
      validation = counter.use(f"stage {stage.name!r} validation", config.data,
                               stage.validation.split, ("positives",))
    trainable = None
    if params:
      try:
        trainable = trainable_of(stage_params(model, stage, config), stage)
      except ValueError as e:
        problems.append(Problem("error", _one_line(e)))
    stage_plans.append(StagePlan(stage.name, use, stage.steps,
                                 stage.batch_size or config.batch_size, trainable, validation))
  eval_plans = _eval_plans(config, [s.name for s in stages], counter, problems)
  plan = Plan(method=getattr(method, "name", type(method).__name__),
              data=data_label(config.data), stages=stage_plans, evals=eval_plans)
  uses = [u for s in stage_plans for u in (s.use, s.validation) if u is not None]
  uses += [u for e in eval_plans for u in e.uses]
  plan.problems = problems + merge(p for u in uses for p in use_problems(u))
  return plan


# --------------------------------------------------------------------------- the checks


def use_problems(use: SplitUse) -> list[tuple[str, str, str, str, str]]:
  """(level, who, dataset, split, what) of one split use: what it needs and the split lacks."""
  c = use.counts
  found = []
  add = lambda level, text: found.append((level, use.who, use.data, use.split, text))
  if c is None:
    add("error", f"cannot be read: {use.problem}")
    return found
  if c.images == 0:
    add("error", f"has 0 images ({' '.join(c.problem.split())})")
    return found
  sampled = f" (in a sample of {c.read} of {c.images} images)" if c.sampled else ""
  missing = {"boxes": c.boxed_images == 0, "gaze": c.gaze_images == 0}
  for need in ("boxes", "gaze"):
    if need in use.needs and missing[need]:
      add("warning" if c.sampled else "error",
          f"has no image with {need}{sampled}, and it needs {need}")
    elif need in use.optional and missing[need]:
      add("note", f"has no {need}: what needs them is not reported there (e.g. CAM "
                  f"localization)")
  if "positives" in use.needs:
    labelled = c.labelled > 0
    if not labelled.any():
      add("error", f"has no labelled class{sampled}")
    elif not (c.positives[labelled] > 0).any():
      add("warning" if c.sampled else "error",
          f"has no positive label of any class{sampled}: its classification metrics are "
          f"undefined")
    else:
      absent = [n for n, l, p in zip(c.classes, c.labelled, c.positives) if l and not p]
      if absent:
        add("warning", f"has 0 positives of {', '.join(absent)}{sampled}: their AUROC / AUPRC "
                       f"are undefined and left out of the means")
  return found


def merge(found) -> list[Problem]:
  """Problems, one per (level, dataset, what), naming every stage or evaluator and split
  that meets it."""
  merged: dict[tuple[str, str, str], tuple[list[str], list[str]]] = {}
  for level, who, data, split, text in found:
    whos, splits = merged.setdefault((level, data, text), ([], []))
    whos += [who] if who not in whos else []
    splits += [split] if split not in splits else []
  return [Problem(level, f"{', '.join(whos)}: split {', '.join(map(repr, splits))} of {data} "
                         f"{text}")
          for (level, data, text), (whos, splits) in merged.items()]


def check(plan: Plan) -> None:
  """Raises ``PreflightError`` (one line, every error) if the plan has errors."""
  if plan.errors:
    raise PreflightError(f"preflight of method {plan.method!r} on {plan.data}: "
                         + "; ".join(plan.errors))


def run(config: ml_collections.ConfigDict, method: Method, *, params: bool = True,
        log: Callable[[str], None] | None = None) -> Plan:
  """``make_plan`` + ``check``; ``log`` (e.g. print) receives the formatted plan first."""
  plan = make_plan(config, method, params=params)
  if log is not None:
    log(plan.format())
  check(plan)
  return plan


# --------------------------------------------------------------------------- formatting


def _number(n: float) -> str:
  for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
    if n >= size:
      return f"{n / size:.1f}{unit}"
  return str(int(n))


def _per_class(classes, values, keep) -> str:
  return ", ".join(f"{n} {int(v)}" for n, v, k in zip(classes, values, keep) if k) or "-"


def format_use(use: SplitUse, indent: str = "  ", seen: set | None = None) -> list[str]:
  """Lines describing one split use (its counts only the first time ``seen`` meets them)."""
  head = f"{indent}split {use.split!r} of {use.data}"
  c = use.counts
  needs = [f"needs {', '.join(use.needs)}"] if use.needs else []
  needs += [f"optional {', '.join(use.optional)}"] if use.optional else []
  needs = f" [{'; '.join(needs)}]" if needs else ""
  if c is None:
    return [f"{head}: cannot be read ({use.problem}){needs}"]
  if c.images == 0:
    return [f"{head}: 0 images{needs}"]
  if seen is not None and id(c) in seen:
    return [f"{head}: as above{needs}"]
  if seen is not None:
    seen.add(id(c))
  sampled = f" [annotations sampled: {c.read} of {c.images} images]" if c.sampled else ""
  lines = [f"{head}: {c.images} images, {c.patients} patients; {c.boxed_images} with boxes "
           f"({int(c.boxes.sum())} boxes), {c.gaze_images} with gaze{sampled}{needs}"]
  labelled = c.labelled > 0
  lines.append(f"{indent}  positives: {_per_class(c.classes, c.positives, labelled)}")
  if not labelled.all():
    lines.append(f"{indent}  unlabelled: "
                 f"{', '.join(n for n, k in zip(c.classes, labelled) if not k)}")
  if c.boxes.any():
    lines.append(f"{indent}  boxes: {_per_class(c.classes, c.boxes, c.boxes > 0)}")
  return lines


def format_plan(plan: Plan) -> str:
  """The plan as text: stages, evaluators, how the counts were made, then errors, warnings
  and notes."""
  lines = [f"preflight: method {plan.method!r} on {plan.data}: {len(plan.stages)} stage(s), "
           f"{len(plan.evals)} evaluator(s)"]
  seen: set = set()
  for s in plan.stages:
    lines.append(f"stage {s.name!r}: {s.steps} steps x batch {s.batch_size} = "
                 f"{s.epochs:.2f} epochs")
    lines += format_use(s.use, seen=seen)
    t = s.trainable
    if t is not None:
      regexes = ", ".join(f"{r!r} ({n} leaves, {_number(p)})" for r, n, p in t.regexes)
      lines.append(f"  trains {regexes}: {t.leaves} of {t.total_leaves} leaves, "
                   f"{_number(t.params)} of {_number(t.total_params)} params")
    if s.validation is not None:
      lines.append("  validation:")
      lines += format_use(s.validation, "    ", seen)
  for e in plan.evals:
    lines.append(f"eval {e.name!r} ({e.type}, when {e.when}):")
    for use in e.uses:
      lines += format_use(use, seen=seen)
  uses = [u for s in plan.stages for u in (s.use, s.validation) if u is not None]
  uses += [u for e in plan.evals for u in e.uses]
  notes = dict.fromkeys(u.counts.note for u in uses if u.counts is not None and u.counts.note)
  lines += [f"counts: {note}" for note in notes]
  for level in LEVELS:
    found = plan.of_level(level)
    if found:
      lines.append(f"{level}s:")
      lines += [f"  - {text}" for text in found]
  lines.append("preflight: ok" if not plan.errors else
               f"preflight: {len(plan.errors)} error(s): the run would fail, or train and "
               f"evaluate something other than the config says")
  return "\n".join(lines)
