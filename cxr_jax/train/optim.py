"""Optimizers, learning-rate schedules and freeze masks from a config.

Config keys (``config.optimizer`` or a stage's ``optimizer``; ``FIELDS`` and
configs/common.py ``optimizer()`` hold the defaults, and every optimizer in the
configs declares all of them):

  name           adam | adamw | sgd | lars
  learning_rate  peak learning rate
  b1, b2         Adam betas (adam, adamw)
  momentum       sgd / lars momentum; nesterov
  weight_decay   adam / sgd: L2 added to the gradient (torch semantics);
                 adamw: decoupled; lars: its own decoupled decay. Never applied
                 to 1-D leaves (biases, BatchNorm scale/offset).
  schedule       constant | cosine | step | exponential | plateau
  warmup_steps   linear warm-up from 0; the schedule then starts at its step 0
  decay_rate     step: lr * decay_rate ** floor(t / decay_steps)
                 exponential: lr * decay_rate ** (t / decay_steps)
                 plateau: the factor the lr is multiplied by on a plateau
  decay_steps    see above (step, exponential)
  plateau_patience, plateau_min_scale, plateau_rtol  (plateau)
  grad_clip      clip gradients to this global norm first (0 = off)

``t`` counts the steps of the stage (a new optimizer state per stage); cosine
decays to 0 over the stage's steps after warm-up.

Plateau (ReduceLROnPlateau, via ``optax.contrib.reduce_on_plateau``): the
per-step update only multiplies by the current scale; the trainer feeds, after
every evaluation with ``feed_plateau``, the stage's validation metric or its mean
training loss since the previous evaluation (``Stage.plateau_signal``; lower is
better, so a metric to maximise is passed negated), and the scale is
multiplied by ``decay_rate`` after ``plateau_patience`` evaluations without a
relative improvement of ``plateau_rtol``.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax
import optax.contrib
from flax import traverse_util

OPTIMIZERS = ("adam", "adamw", "sgd", "lars")
SCHEDULES = ("constant", "cosine", "step", "exponential", "plateau")
# Every field an optimizer config has and its default (learning_rate has none): the same
# fields configs/common.py ``optimizer()`` declares (tests/test_config_contract.py).
FIELDS = dict(name="adam", b1=0.9, b2=0.999, momentum=0.9, nesterov=False, weight_decay=0.0,
              schedule="constant", warmup_steps=0, decay_rate=0.1, decay_steps=0,
              plateau_patience=4, plateau_rtol=1e-4, plateau_min_scale=0.0, grad_clip=0.0)


def resolve(opt) -> ml_collections.ConfigDict:
  """``opt`` with every field of ``FIELDS`` (a hand-built config may leave some out: they
  take their defaults); a missing learning_rate or a field not read here is a KeyError."""
  given = opt.to_dict() if isinstance(opt, ml_collections.ConfigDict) else dict(opt)
  unknown = sorted(set(given) - set(FIELDS) - {"learning_rate"})
  if unknown:
    raise KeyError(f"optimizer fields {unknown} are not read by cxr_jax.train.optim; known: "
                   f"{sorted([*FIELDS, 'learning_rate'])}")
  if "learning_rate" not in given:
    raise KeyError("optimizer.learning_rate is missing")
  return ml_collections.ConfigDict({**FIELDS, **given})


def param_paths(params) -> list[str]:
  """'/'-joined paths of the leaves of a nested dict, in flatten order."""
  return list(traverse_util.flatten_dict(params, sep="/"))


def param_labels(params, trainable: Sequence[str], *, stage: str = "?",
                 frozen: Collection[str] = ()):
  """Pytree like ``params`` with 'train' where a path full-matches a regex of
  ``trainable`` (and is not in ``frozen``), else 'frozen'.

  Every regex must match at least one path: a typo would freeze silently.
  """
  flat = traverse_util.flatten_dict(params, sep="/")
  patterns = [re.compile(r) for r in trainable]
  for regex, pattern in zip(trainable, patterns):
    if not any(pattern.fullmatch(p) for p in flat):
      examples = ", ".join(list(flat)[:6])
      raise ValueError(f"stage {stage!r}: trainable regex {regex!r} matches no parameter "
                       f"(paths look like: {examples}, ...)")
  labels = {p: "train" if p not in frozen and any(q.fullmatch(p) for q in patterns) else "frozen"
            for p in flat}
  return traverse_util.unflatten_dict(labels, sep="/")


def batch_stats_labels(batch_stats, labels, trainable: Sequence[str]):
  """'train' | 'frozen' per batch_stats leaf: a BatchNorm's statistics follow
  its module's params (trainable if any of them is); a module without params
  is labelled by the regexes over the statistic's own path."""
  flat_labels = traverse_util.flatten_dict(labels, sep="/")
  module_trainable = {}
  for path, label in flat_labels.items():
    module = path.rpartition("/")[0]
    module_trainable[module] = module_trainable.get(module, False) or label == "train"
  patterns = [re.compile(r) for r in trainable]
  out = {}
  for path in traverse_util.flatten_dict(batch_stats, sep="/"):
    module = path.rpartition("/")[0]
    if module in module_trainable:
      out[path] = "train" if module_trainable[module] else "frozen"
    else:
      out[path] = "train" if any(q.fullmatch(path) for q in patterns) else "frozen"
  return traverse_util.unflatten_dict(out, sep="/") if out else {}


def make_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Learning rate as a function of the stage's step (see the module docstring)."""
  opt = resolve(opt)
  lr = float(opt.learning_rate)
  warmup = int(opt.warmup_steps)
  name = opt.schedule
  decay_steps = int(opt.decay_steps)
  decay_rate = float(opt.decay_rate)
  if name in ("step", "exponential") and decay_steps <= 0:
    raise ValueError(f"optimizer.schedule={name!r} needs optimizer.decay_steps > 0")
  if name in ("constant", "plateau"):
    main = optax.constant_schedule(lr)
  elif name == "cosine":
    main = optax.cosine_decay_schedule(lr, decay_steps=max(total_steps - warmup, 1))
  elif name in ("step", "exponential"):
    main = optax.exponential_decay(lr, transition_steps=decay_steps, decay_rate=decay_rate,
                                   staircase=name == "step")
  else:
    raise ValueError(f"unknown optimizer.schedule {name!r}; known: {list(SCHEDULES)}")
  if warmup <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def _decay_mask(params):
  return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def _plateau(opt: ml_collections.ConfigDict) -> optax.GradientTransformationExtraArgs:
  opt = resolve(opt)
  return optax.contrib.reduce_on_plateau(
      factor=float(opt.decay_rate), patience=int(opt.plateau_patience),
      rtol=float(opt.plateau_rtol), min_scale=float(opt.plateau_min_scale))


def _scale_by_plateau(opt: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Multiplies updates by the plateau scale; the state changes only in ``feed_plateau``."""
  plateau = _plateau(opt)

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda g: state.scale * g, updates), state

  return optax.GradientTransformation(plateau.init, update)


def feed_plateau(opt: ml_collections.ConfigDict, opt_state, value: jax.Array):
  """One ReduceLROnPlateau observation (``value``: lower is better) applied to
  every plateau state inside ``opt_state``. Pure; jit it."""
  plateau = _plateau(opt)
  is_plateau = lambda x: isinstance(x, optax.contrib.ReduceLROnPlateauState)
  return jax.tree.map(lambda s: plateau.update((), s, value=value)[1] if is_plateau(s) else s,
                      opt_state, is_leaf=is_plateau)


def _base_optimizer(opt: ml_collections.ConfigDict, schedule: optax.Schedule):
  name = opt.name
  wd = float(opt.weight_decay)
  momentum = float(opt.momentum)
  nesterov = bool(opt.nesterov)
  coupled_decay = [optax.add_decayed_weights(wd, mask=_decay_mask)] if wd else []
  if name == "adam":
    return optax.chain(*coupled_decay,
                       optax.scale_by_adam(b1=float(opt.b1), b2=float(opt.b2)),
                       optax.scale_by_learning_rate(schedule))
  if name == "adamw":
    return optax.adamw(schedule, b1=float(opt.b1), b2=float(opt.b2),
                       weight_decay=wd, mask=_decay_mask)
  if name == "sgd":
    return optax.chain(*coupled_decay,
                       optax.sgd(schedule, momentum=momentum or None, nesterov=nesterov))
  if name == "lars":
    return optax.lars(schedule, weight_decay=wd, weight_decay_mask=_decay_mask,
                      trust_ratio_mask=_decay_mask, momentum=momentum, nesterov=nesterov)
  raise ValueError(f"unknown optimizer.name {name!r}; known: {list(OPTIMIZERS)}")


def make_optimizer(opt: ml_collections.ConfigDict, params, trainable: Sequence[str],
                   total_steps: int, *, stage: str = "?",
                   frozen: Collection[str] = ()) -> optax.GradientTransformation:
  """The stage's optax transformation.

  Leaves labelled 'train' by ``param_labels(params, trainable, frozen=frozen)``
  get ``clip -> optimizer -> schedule (-> plateau scale)``; 'frozen' leaves get
  ``optax.set_to_zero()`` (no optimizer state is kept for them).
  ``frozen``: paths frozen whatever the regexes say (the trainer passes the
  params carried from earlier stages that this stage's model does not use).
  """
  opt = resolve(opt)
  tx = _base_optimizer(opt, make_schedule(opt, total_steps))
  clip = float(opt.grad_clip)
  parts = [optax.clip_by_global_norm(clip)] if clip > 0 else []
  parts.append(tx)
  if opt.schedule == "plateau":
    parts.append(_scale_by_plateau(opt))
  labels = param_labels(params, trainable, stage=stage, frozen=frozen)
  return optax.multi_transform({"train": optax.chain(*parts), "frozen": optax.set_to_zero()},
                               labels)
