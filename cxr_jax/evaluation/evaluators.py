"""Named evaluators declared in the config, built by one factory, run by the trainer.

A config declares which evaluators run and when (big_vision / kauldron style)::

  config.evals.classification = dict(type="classification", splits=("val", "test"),
                                     when="end")
  config.evals.patch_grid = dict(type="patch_grid", splits=("val", "test"), when="end")

``type`` names an entry of ``TYPES``; ``splits`` the splits it reports on; ``when``
is 'end' (after training, on the final state), 'stage:<name>' (when that stage
ends, on the state it ends with), 'every:<N>' (every N global steps during
training) or 'never' (declared but switched off, e.g. by a sweep row); ``data`` (optional)
is a dict of fields of ``config.data`` (nested dicts; '.'-paths in a plain dict) the evaluator reads
instead of the run's (``with_data``: e.g. Talasila's NIH boxes for a model fine-tuned on
CheXpert); every other key is the evaluator's own keyword argument.

Every evaluator is a class ``(ctx: EvalContext, name, *, splits, **kwargs)`` with
``run(variables, *, stage) -> {split: section}``; the runner (``run_evals``) writes
each section into ``WORKDIR/eval/<split>.json`` under the evaluator's name
(``EvalContext.write``; the classification evaluator, ``writes_itself``, writes the
file's header, 'classification' and 'localization' sections and the curves, except on
data of its own), so one reader finds any metric of any paper at
``<section>/<metric>`` (a number, or ``{'mean', 'per_class', 'ci95', 'n'}`` where
those apply). Figures go to ``WORKDIR/report/``. Inputs come from one helper,
``EvalContext.batches``; files are written through ``cxr_jax.files``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cxr_jax import files

# type -> 'module:class', imported on first use (an evaluator's plotting stack loads only
# when a config asks for it).
TYPES = {
    "classification": "cxr_jax.evaluation.evaluator:ClassificationEval",
    "patch_grid": "cxr_jax.evaluation.patch_grid:PatchGridEval",
    "vkd_cam_shift": "cxr_jax.evaluation.cam_shift:CamShiftEval",
    "byol_cam_kinds": "cxr_jax.evaluation.byol_report:CamKindsEval",
    "dm_alignment": "cxr_jax.evaluation.dm_report:AlignmentEval",
    "dm_masks": "cxr_jax.evaluation.dm_report:MasksEval",
}
WHEN = ("end", "stage:<name>", "every:<N>", "never")


@dataclasses.dataclass
class EvalContext:
  """What an evaluator sees of the run.

  make_iterator: ``cxr_jax.data.pipeline.make_iterator``'s signature.
  evaluate: the classification pass, ``cxr_jax.evaluation.evaluator.evaluate``'s
    signature (tests inject a stand-in).
  stage_variables: ``stage name -> {'params', 'batch_stats'}`` of that stage's best
    state (WORKDIR/best/<stage>), given by whoever owns the checkpoints; None
    where there are none.
  """
  config: ml_collections.ConfigDict
  workdir: str | None
  method: Any
  model: Any
  mesh: Mesh
  make_iterator: Callable[..., Any]
  evaluate: Callable[..., dict]
  stage_variables: Callable[[str], dict] | None = None
  # The '.'-path overrides of config.data this context's config has (an evaluator's own
  # ``data``); {} = the run's data.
  data_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def batches(self, split: str, *, data: ml_collections.ConfigDict | None = None,
              maps: Sequence[str] = (), batch_size: int | None = None):
    """``eval_batches`` of this run (a context manager)."""
    return eval_batches(self.config, split, mesh=self.mesh, make_iterator=self.make_iterator,
                        data=data, maps=maps, batch_size=batch_size)

  def replicated(self, tree):
    """``tree`` replicated over the mesh (variables for a jitted eval function)."""
    return jax.device_put(tree, NamedSharding(self.mesh, P()))

  @property
  def writes(self) -> bool:
    """Whether this process writes files (process 0 of a run with a workdir)."""
    return self.workdir is not None and jax.process_index() == 0

  def path(self, *parts: str) -> str:
    """A path under the workdir (e.g. ``path('report', 'cam_test.png')``)."""
    return os.path.join(self.workdir, *parts)

  def write(self, split: str, section: str, payload: Mapping[str, Any]) -> None:
    """Sets ``section`` of WORKDIR/eval/<split>.json to ``payload`` (process 0, atomically),
    keeping the file's other sections."""
    if self.writes:
      files.update_json_atomic(self.path("eval", f"{split}.json"), {section: dict(payload)})


def default_make_iterator(*args, **kwargs):
  """``cxr_jax.data.pipeline.make_iterator`` (imported on first use)."""
  from cxr_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  return pipeline.make_iterator(*args, **kwargs)


@contextlib.contextmanager
def eval_batches(config: ml_collections.ConfigDict, split: str, *, mesh: Mesh,
                 make_iterator: Callable[..., Any] | None = None,
                 data: ml_collections.ConfigDict | None = None, maps: Sequence[str] = (),
                 batch_size: int | None = None) -> Iterator[Any]:
  """The one eval-input helper: unshuffled, unaugmented, one-epoch batches of ``split``
  (the last batch padded with valid = 0 rows), sharded over 'data'; closed on exit.

  data: the ``config.data`` to read (default the run's); maps: annotation maps
  ('gaze_map', 'box_map', 'box_grid'); batch_size: default ``config.eval_batch_size``;
  make_iterator: default ``cxr_jax.data.pipeline.make_iterator``.
  """
  iterator = (make_iterator or default_make_iterator)(
      data if data is not None else config.data, split,
      batch_size=batch_size or config.eval_batch_size,
      sharding=NamedSharding(mesh, P("data")), seed=config.seed, shuffle=False,
      num_epochs=1, drop_remainder=False, maps=tuple(maps), augment=False)
  try:
    yield iterator
  finally:
    close = getattr(iterator, "close", None)  # the pipeline's prefetch thread
    if close is not None:
      close()


def parse_when(when: str, *, name: str) -> tuple[str, str | int | None]:
  """'end' -> ('end', None); 'stage:x' -> ('stage', 'x'); 'every:50' -> ('every', 50);
  'never' -> ('never', None)."""
  kind, _, arg = str(when).partition(":")
  if kind in ("end", "never") and not arg:
    return kind, None
  if kind == "stage" and arg:
    return "stage", arg
  if kind == "every" and arg.isdigit() and int(arg) > 0:
    return "every", int(arg)
  raise ValueError(f"config.evals.{name}.when={when!r}; known: {list(WHEN)}")


@dataclasses.dataclass
class Declared:
  """One entry of ``config.evals``, built; ``ctx`` is the context it was built with (its
  ``config.data`` is the data it reads)."""
  name: str
  when: tuple[str, str | int | None]
  evaluator: Any
  ctx: EvalContext | None = None


def flat_paths(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': 1}, 'c.d': 2} -> {'a.b': 1, 'c.d': 2} (ConfigDicts as dicts)."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, ml_collections.ConfigDict):
      value = value.to_dict()
    if isinstance(value, Mapping):
      out.update(flat_paths(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def with_data(ctx: EvalContext, overrides: Mapping[str, Any], *, name: str) -> EvalContext:
  """``ctx`` whose config reads ``config.data`` with ``overrides`` (nested dicts or '.'-paths)
  replaced: the context of an evaluator with its own ``data``. A path that is not a field of
  config.data is a KeyError naming config.evals.<name>.data and the path."""
  flat = flat_paths(overrides)
  config = ctx.config.copy_and_resolve_references()
  with config.unlocked():
    for path, value in flat.items():
      *parents, leaf = path.split(".")
      node = config.data
      for key in parents:
        node = node.get(key) if isinstance(node, ml_collections.ConfigDict) else None
      if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        raise KeyError(f"config.evals.{name}.data: {path!r} is not a field of config.data")
      node[leaf] = value
  return dataclasses.replace(ctx, config=config, data_overrides={**ctx.data_overrides, **flat})


def evaluator_class(kind: str, *, name: str) -> type:
  if kind not in TYPES:
    raise ValueError(f"config.evals.{name}.type={kind!r}; known: {sorted(TYPES)}")
  module, _, attr = TYPES[kind].partition(":")
  return getattr(importlib.import_module(module), attr)


def build_evals(ctx: EvalContext, stage_names: Sequence[str] = ()) -> list[Declared]:
  """Every evaluator of ``ctx.config.evals``, in name order (the factory). Each writes its own
  section, so the order changes no result.

  stage_names: the run's stages, so that a 'stage:<name>' naming none is an error.
  """
  out = []
  for name, spec in ctx.config.evals.items():
    spec = dict(spec.to_dict() if isinstance(spec, ml_collections.ConfigDict) else spec)
    kind = spec.pop("type", None)
    when = parse_when(spec.pop("when", "end"), name=name)
    if when[0] == "never":
      continue
    if when[0] == "stage" and stage_names and when[1] not in stage_names:
      raise ValueError(f"config.evals.{name}.when names stage {when[1]!r}; this method's stages "
                       f"are {list(stage_names)}")
    splits = tuple(spec.pop("splits", ()))
    data = spec.pop("data", None)
    own = with_data(ctx, data, name=name) if data else ctx
    cls = evaluator_class(kind, name=name)
    try:
      evaluator = cls(own, name, splits=splits, **spec)
    except TypeError as e:
      raise ValueError(f"config.evals.{name} (type {kind!r}): {e}") from None
    out.append(Declared(name, when, evaluator, own))
  return out


def due(declared: Sequence[Declared], *, end: bool = False, stage: str | None = None,
        step: int | None = None) -> list[Declared]:
  """The evaluators that run at this point: at the end, when ``stage`` ends, or at ``step``."""
  out = []
  for d in declared:
    kind, arg = d.when
    if (end and kind == "end") or (stage is not None and kind == "stage" and arg == stage) or (
        step is not None and kind == "every" and step % arg == 0):
      out.append(d)
  return out


def run_evals(ctx: EvalContext, declared: Sequence[Declared], variables, *,
              stage: str) -> dict[str, dict[str, Any]]:
  """Runs ``declared`` on ``variables`` and writes their sections.

  Returns {evaluator name: {split: section}}.
  """
  results = {}
  for d in declared:
    sections = d.evaluator.run(variables, stage=stage) or {}
    if not getattr(d.evaluator, "writes_itself", False):
      for split, payload in sections.items():
        ctx.write(split, d.name, payload)
    results[d.name] = sections
  return results
