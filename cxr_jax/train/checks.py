"""Checks of a run's config against its method, in milliseconds, before anything is read or
written: the stages' shape, batch sizes the devices divide, data names and split names the
datasets know, and the ``config.evals`` entries. Every failure is an ``errors.UserError``
naming the key (the CLI prints it as one line)."""

from __future__ import annotations

import jax
import ml_collections

from cxr_jax import errors
from cxr_jax.data import layout
from cxr_jax.data import splits as splits_lib
from cxr_jax.evaluation import evaluators
from cxr_jax.train.stage import PLATEAU_SIGNALS, Method, Stage
from cxr_jax.train.step import stage_data_config


def check_stages(method: Method, stages: list[Stage]) -> None:
  """Raises errors.UserError (a ValueError) for an empty or ill-formed stage list (names the
  stage and field)."""
  names = [s.name for s in stages]
  if not stages or len(set(names)) != len(names):
    raise errors.UserError(f"method {method.name!r}: stages must be a non-empty list of unique names, "
                     f"got {names}")
  for s in stages:
    if s.steps < 1:
      raise errors.UserError(f"method {method.name!r}: stage {s.name!r} has steps={s.steps}; need >= 1")
    if s.validation.plateau_signal not in PLATEAU_SIGNALS:
      raise errors.UserError(f"method {method.name!r}: stage {s.name!r} has plateau_signal "
                       f"{s.validation.plateau_signal!r}; known: {list(PLATEAU_SIGNALS)}")


def check_inputs(config: ml_collections.ConfigDict, stages: list[Stage], evals: list,
                 mesh: jax.sharding.Mesh) -> None:
  """Raises errors.UserError for what a run would otherwise meet only after its first writes:
  a batch size the devices and processes do not divide, an unknown data.name or split name
  (of a stage, its validation or a ``config.evals`` entry)."""
  shards, processes = int(mesh.shape["data"]), jax.process_count()
  sizes = [("config.batch_size", config.batch_size),
           ("config.eval_batch_size", config.eval_batch_size)]
  sizes += [(f"the batch size of stage {s.name!r}", s.batch_size) for s in stages if s.batch_size]
  for key, size in sizes:
    if size < 1 or size % shards or size % processes:
      raise errors.UserError(f"{key}={size} must be a positive multiple of the {shards} devices "
                             f"and {processes} process(es) the batch is sharded over")
  reads = [(f"stage {s.name!r}: split", stage_data_config(config.data, s).name, s.data.split)
           for s in stages]
  reads += [(f"stage {s.name!r}: validation split", config.data.name, s.validation.split)
            for s in stages if s.validation.every]
  reads += [(f"config.evals.{d.name}.splits", _eval_data(d.evaluator, config).name, split)
            for d in evals for split in d.evaluator.splits]
  for where, name, split in reads:
    try:
      layout.check_data_name(name)
    except KeyError as e:
      raise errors.UnknownKey(f"config.{e.args[0]}" if name == config.data.name
                              else f"{where.split(':')[0].removesuffix('.splits')} (its own "
                                   f"data): {e.args[0]}") from None
    try:
      splits_lib.parse_split(split, name)
    except KeyError as e:
      raise errors.UnknownKey(f"{where}: {e.args[0]}") from None


def _eval_data(evaluator, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The ``config.data`` an evaluator reads (its own where its entry overrides ``data``)."""
  return getattr(getattr(evaluator, "ctx", None), "config", config).data


def check_config(config: ml_collections.ConfigDict, method: Method,
                 mesh: jax.sharding.Mesh) -> None:
  """``check_stages`` and ``check_inputs`` of the method's stages and the config's evaluators:
  the config's errors as ``errors.UserError``, in milliseconds, before anything is read or
  written."""
  stages = list(method.stages(config))
  check_stages(method, stages)
  ctx = evaluators.EvalContext(config=config, workdir=None, method=method,
                               model=method.model(config), mesh=mesh, make_iterator=None,
                               evaluate=None)
  try:
    evals = evaluators.build_evals(ctx, [s.name for s in stages])
  except KeyError as e:  # a config.evals entry's data override naming no field
    raise errors.UnknownKey(e.args[0] if e.args else str(e)) from None
  except ValueError as e:  # a config.evals entry's type, when or keyword arguments
    raise errors.UserError(str(e)) from None
  check_inputs(config, stages, evals, mesh)
