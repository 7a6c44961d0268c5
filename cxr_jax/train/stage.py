"""The contract between a method and the trainer: ``Stage``, ``Method`` and their contexts.

A method (``cxr_jax.methods``) declares its model, its ordered stages and its
predictions; the trainer (``cxr_jax.train.trainer``) runs any ``Method`` it is
handed and knows no paper.

A stage's loss is a pure function

    loss(ctx: LossContext, params, batch, rng) -> (scalar loss, aux)

where ``params`` already has ``stop_gradient`` on the stage's frozen leaves,
``ctx.apply(params, *args, **kwargs) -> (outputs, new_batch_stats)`` is
``model.apply`` in training mode (``train=True``, the stage's ``apply_kwargs``,
then ``kwargs``, which win; ``method=`` and ``rngs=`` pass through to Flax) with
the state's batch statistics and a 'dropout' rng, returning ``None`` for the
statistics when the model has none, and ``aux`` is a dict with ``"metrics"``
(dict of float scalars, averaged over the log interval) and ``"batch_stats"``
(the updated statistics; missing or ``None`` keeps them). Statistics of frozen
modules are kept unchanged by the trainer whatever the loss returns.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import flax.linen as nn
import jax
import ml_collections

from cxr_jax.data.spec import DataSpec

Params = Any
Batch = Mapping[str, jax.Array]


class LossContext(NamedTuple):
  apply: Callable[..., tuple[Any, Any]]  # (params, *args, **kw) -> (outputs, new_batch_stats)
  extras: Any                            # TrainState.extras (e.g. BYOL target params)
  step: jax.Array                        # global step, int32 scalar


class PrepareContext(NamedTuple):
  """What ``Stage.prepare`` sees: the run and the state the stage starts from."""
  config: ml_collections.ConfigDict
  workdir: str
  model: nn.Module
  params: Any
  batch_stats: Any
  extras: Any
  mesh: jax.sharding.Mesh
  make_iterator: Callable[..., Any]   # cxr_jax.data.pipeline.make_iterator's signature
  batch_sharding: jax.sharding.NamedSharding  # the data sharding for make_iterator


LossFn = Callable[[LossContext, Params, Batch, jax.Array], tuple[jax.Array, dict]]


@dataclasses.dataclass(frozen=True)
class EarlyStopping:
  """Stop a stage when ``metric`` has not improved by ``tolerance`` (relative) for ``patience`` evals.

  metric: '/'-path into the evaluator's payload, e.g. 'classification/auroc/mean'.
  Improvement (mode 'max'): value > best + tolerance * |best| (mirrored for 'min').
  """
  metric: str = "classification/auroc/mean"
  mode: str = "max"
  patience: int = 3
  tolerance: float = 0.01


PLATEAU_SIGNALS = ("eval", "train_loss")  # Validation.plateau_signal


@dataclasses.dataclass(frozen=True)
class Validation:
  """How a stage evaluates itself while it trains (the trainer's own classification pass).

  every: evaluate on ``split`` every this many stage steps and at the stage's end
    (0 = never).
  split: the split evaluated.
  early_stopping: stop after ``patience`` evaluations without improvement (None: never).
  select_best: end the stage with the best-evaluated params (by ``early_stopping.metric``,
    or ``EarlyStopping().metric`` without it), kept in WORKDIR/best/<stage>.
  plateau_signal: what a 'plateau' schedule is fed at each evaluation: 'eval' (the
    monitored metric) or 'train_loss' (the mean training loss since the previous
    evaluation).
  """
  every: int = 0
  split: str = "val"
  early_stopping: EarlyStopping | None = None
  select_best: bool = True
  plateau_signal: str = "eval"


@dataclasses.dataclass(frozen=True)
class Hooks:
  """Optional functions a stage runs besides its loss.

  init_extras: ``(params, extras) -> extras`` when the stage starts.
  prepare: ``(PrepareContext) -> (params, extras)`` on the host when the stage starts
    (not when resuming inside it: its results are in the checkpoint), after
    ``init_extras``: passes over data between stages (e.g. an anchor image, disease
    masks from CAMs) stored in params leaves no stage trains, or in extras.
  update_extras: ``(state) -> state`` after each step, inside the jitted step (e.g. EMA).
  """
  init_extras: Callable[[Any, Any], Any] | None = None
  prepare: Callable[["PrepareContext"], tuple[Any, Any]] | None = None
  update_extras: Callable[[Any], Any] | None = None


@dataclasses.dataclass(frozen=True)
class Stage:
  """One training stage of a method.

  trainable: regexes over '/'-joined param paths (e.g. 'head/.*'); leaves that
    match none are frozen (optax.set_to_zero, stop_gradient, BatchNorm on
    running averages through ``apply_kwargs``).
  optimizer: ConfigDict read by ``cxr_jax.train.optim.make_optimizer``.
  data: what the stage reads (``cxr_jax.data.spec.DataSpec``).
  apply_kwargs: extra keyword arguments of the model's ``__call__`` in this
    stage (e.g. ``{'train_backbone': False}``).
  batch_size: global batch size of this stage (0 = ``config.batch_size``).
  validation: evaluations during the stage (``Validation``).
  hooks: ``Hooks`` (extras, host passes between stages).
  """
  name: str
  loss: LossFn
  steps: int
  optimizer: ml_collections.ConfigDict
  trainable: tuple[str, ...] = (".*",)
  data: DataSpec = DataSpec()
  apply_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  batch_size: int = 0
  validation: Validation = Validation()
  hooks: Hooks = Hooks()

  def monitor(self) -> EarlyStopping:
    """The metric the stage selects its best state / feeds its plateau schedule with."""
    return self.validation.early_stopping or EarlyStopping()


class Method(Protocol):
  """A paper, declared. See ``cxr_jax.methods.baseline`` for the smallest one.

  Reports (CAM boxes, patch grids, Eq. 5 shifts, ...) are not a method's: they are
  evaluators (``cxr_jax.evaluation.evaluators``) that the config declares in
  ``config.evals``.
  """
  name: str
  # The param subtrees that ``config.model.init_from`` weights are loaded into.
  pretrained_prefixes: tuple[str, ...]

  def model(self, config: ml_collections.ConfigDict) -> nn.Module:
    """The Flax module; ``init`` is called on a [1,H,W,C] image batch."""

  def stages(self, config: ml_collections.ConfigDict) -> Sequence[Stage]:
    """Ordered stages; params carry over from one to the next."""

  def predict(self, model: nn.Module, variables: Any, batch: Batch) -> dict[str, jax.Array]:
    """Inference outputs: 'probs' [N,K] in [0,1]; optionally 'heatmaps' [N,h,w,K]."""

  def cam_target(self, model: nn.Module, variables: Any
                 ) -> tuple[Callable[[jax.Array], jax.Array], Callable[[jax.Array], jax.Array]]:
    """(features_fn, head_fn) for CAMs (``cxr_jax.cam``), in inference mode.

    features_fn: images [N,H,W,C] -> the conv map CAMs explain [N,h,w,D];
    head_fn: that map -> class logits [N,K] (everything after it, pure).
    """
