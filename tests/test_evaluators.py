"""The evaluator registry: declared in the config, built by one factory, run when declared."""

import functools
import json

import ml_collections
import numpy as np
import pytest

import _trainer_worker as w
from cxr_jax.evaluation import evaluators
from cxr_jax.methods.baseline import classification_loss
from cxr_jax.train import parallel, trainer
from cxr_jax.train.stage import Stage, Validation

CALLS = []


class ProbeEval:
  """Records when it ran and reports the norm of the head kernel it was given."""

  def __init__(self, ctx, name, *, splits=("val",), scale=1.0):
    self.ctx, self.name, self.splits, self.scale = ctx, name, tuple(splits), scale

  def run(self, variables, *, stage):
    norm = float(np.linalg.norm(np.asarray(variables["params"]["head"]["kernel"])))
    CALLS.append((self.name, stage, norm))
    return {split: {"kernel_norm": {"mean": norm * self.scale, "n": 1}} for split in self.splits}


@pytest.fixture(autouse=True)
def probe_type(monkeypatch):
  monkeypatch.setitem(evaluators.TYPES, "probe", "test_evaluators:ProbeEval")
  CALLS.clear()


def _ctx(config, workdir=None):
  return evaluators.EvalContext(config=config, workdir=workdir, method=None, model=None,
                                mesh=parallel.make_mesh(),
                                make_iterator=w.make_iterator_factory(),
                                evaluate=w.fake_evaluate)


def _config(**evals):
  c = w.tiny_config()
  with c.unlocked():
    c.evals = ml_collections.ConfigDict({k: ml_collections.ConfigDict(v) for k, v in evals.items()})
  return c


@pytest.mark.parametrize("when, parsed", [("end", ("end", None)), ("stage:base", ("stage", "base")),
                                          ("every:4", ("every", 4))])
def test_parse_when(when, parsed):
  assert evaluators.parse_when(when, name="x") == parsed


@pytest.mark.parametrize("when", ["every:0", "every:x", "stage:", "later", "end:1"])
def test_parse_when_rejects_with_the_key(when):
  with pytest.raises(ValueError, match=r"config\.evals\.probe\.when"):
    evaluators.parse_when(when, name="probe")


def test_build_rejects_unknown_type_stage_and_argument():
  with pytest.raises(ValueError, match=r"config\.evals\.a\.type='nope'.*classification"):
    evaluators.build_evals(_ctx(_config(a=dict(type="nope"))))
  with pytest.raises(ValueError, match=r"config\.evals\.a\.when names stage 'third'"):
    evaluators.build_evals(_ctx(_config(a=dict(type="probe", when="stage:third"))), ["base"])
  with pytest.raises(ValueError, match=r"config\.evals\.a \(type 'probe'\).*colour"):
    evaluators.build_evals(_ctx(_config(a=dict(type="probe", colour=1))))


def test_due_picks_by_strategy():
  ctx = _ctx(_config(e=dict(type="probe"), s=dict(type="probe", when="stage:base"),
                     n=dict(type="probe", when="every:3"), off=dict(type="probe", when="never")))
  declared = evaluators.build_evals(ctx, ["base"])
  names = lambda ds: [d.name for d in ds]
  assert names(declared) == ["e", "n", "s"]  # by name; 'never' is not built
  assert names(evaluators.due(declared, end=True)) == ["e"]
  assert names(evaluators.due(declared, stage="base")) == ["s"]
  assert names(evaluators.due(declared, stage="other")) == []
  assert names(evaluators.due(declared, step=6)) == ["n"]
  assert names(evaluators.due(declared, step=7)) == []


def test_run_evals_writes_sections_and_keeps_the_others(tmp_path):
  (tmp_path / "eval").mkdir()
  (tmp_path / "eval" / "val.json").write_text(json.dumps({"method": "x", "old": {"a": 1}}))
  ctx = _ctx(_config(probe=dict(type="probe", splits=("val", "test"), scale=2.0)), str(tmp_path))
  declared = evaluators.build_evals(ctx)
  variables = {"params": {"head": {"kernel": np.full((2, 2), 0.5, np.float32)}}}
  results = evaluators.run_evals(ctx, declared, variables, stage="s")
  assert results["probe"]["val"]["kernel_norm"]["mean"] == pytest.approx(2.0)
  val = json.loads((tmp_path / "eval" / "val.json").read_text())
  assert val["method"] == "x" and val["old"] == {"a": 1}
  assert val["probe"]["kernel_norm"] == {"mean": pytest.approx(2.0), "n": 1}
  test = json.loads((tmp_path / "eval" / "test.json").read_text())
  assert set(test) == {"probe"}


def test_eval_batches_reads_one_unshuffled_epoch_and_closes():
  calls, closed = [], []

  class Iterator(list):
    def close(self):
      closed.append(True)

  def make_iterator(data, split, **kwargs):
    calls.append((data, split, kwargs))
    return Iterator([1, 2])

  config = w.tiny_config()
  with pytest.raises(RuntimeError):
    with evaluators.eval_batches(config, "val", mesh=parallel.make_mesh(),
                                 make_iterator=make_iterator, maps=["box_grid"]) as batches:
      assert list(batches) == [1, 2]
      raise RuntimeError("stop")
  assert closed == [True]
  data, split, kwargs = calls[0]
  assert data is config.data and split == "val"
  assert kwargs["shuffle"] is False and kwargs["num_epochs"] == 1 and kwargs["augment"] is False
  assert kwargs["drop_remainder"] is False and kwargs["maps"] == ("box_grid",)
  assert kwargs["batch_size"] == config.eval_batch_size and kwargs["seed"] == config.seed


class TwoStages(w.TinyBaseline):
  def stages(self, config):
    loss = functools.partial(classification_loss, "weighted_bce")
    return [Stage(name="base", loss=loss, steps=6, optimizer=config.optimizer),
            Stage(name="tune", loss=loss, steps=6, optimizer=config.optimizer,
                  trainable=(r"head/.*",), validation=Validation(every=3))]


def test_trainer_runs_each_evaluator_when_declared(tmp_path):
  config = _config(classification=dict(type="classification", splits=("val", "test")),
                   after_base=dict(type="probe", when="stage:base", splits=("val",)),
                   every=dict(type="probe", when="every:4", splits=("test",)),
                   final=dict(type="probe", splits=("test",)))
  state = trainer.train_and_evaluate(config, str(tmp_path), method=TwoStages(),
                                     make_iterator=w.make_iterator_factory(),
                                     evaluate=w.fake_evaluate, mesh=parallel.make_mesh())
  ran = [(name, stage) for name, stage, _ in CALLS]
  # every:4 at global steps 4 (stage 'base') and 8, 12 (stage 'tune'); the stage eval once,
  # when 'base' ends; the final one after the last stage.
  assert ran == [("every", "base"), ("after_base", "base"), ("every", "tune"), ("every", "tune"),
                 ("final", "tune")]
  final_norm = float(np.linalg.norm(np.asarray(state.params["head"]["kernel"])))
  assert CALLS[-1][2] == pytest.approx(final_norm)
  assert CALLS[1][2] != pytest.approx(final_norm)  # 'after_base' saw the state before 'tune'
  test = json.loads((tmp_path / "eval" / "test.json").read_text())
  val = json.loads((tmp_path / "eval" / "val.json").read_text())
  assert test["final"]["kernel_norm"]["mean"] == pytest.approx(final_norm)
  assert test["stage"] == "tune" and "every" in test and "classification" in test
  assert val["after_base"]["kernel_norm"]["mean"] == pytest.approx(CALLS[1][2])


def test_an_evaluator_with_its_own_data_reads_it_and_writes_a_section(tmp_path):
  """``data`` of an eval spec: nested (or '.'-path) overrides of config.data for that evaluator
  only; a classification evaluator on such data writes its payload as its own section, not
  over the run's header; a path config.data lacks is an error naming it."""
  from cxr_jax.evaluation import evaluator  # pylint: disable=import-outside-toplevel
  config = _config(probe=dict(type="probe", splits=("val",), data={"name": "nih",
                                                                   "cv": {"num_folds": 5}}),
                   plain=dict(type="probe", splits=("val",)),
                   other=dict(type="classification", splits=("test",),
                              data={"cv": {"fold": 2, "num_folds": 3}}))
  declared = {d.name: d for d in evaluators.build_evals(_ctx(config, str(tmp_path)))}
  own = declared["probe"].evaluator.ctx.config.data
  assert (own.name, own.cv.num_folds, own.cv.fold) == ("nih", 5, 0)
  assert declared["probe"].ctx.data_overrides == {"name": "nih", "cv.num_folds": 5}
  assert config.data.name == "synthetic" and config.data.cv.num_folds == 0   # the run's: as is
  assert declared["plain"].evaluator.ctx.config.data.name == "synthetic"
  other = declared["other"].evaluator
  assert isinstance(other, evaluator.ClassificationEval) and not other.writes_itself
  assert (other.ctx.config.data.cv.num_folds, other.ctx.config.data.cv.fold) == (3, 2)
  assert evaluator.ClassificationEval(_ctx(config), "classification").writes_itself
  bad = _config(probe=dict(type="probe", splits=("val",), data={"cv": {"folds": 5}}))
  with pytest.raises(KeyError, match=r"config.evals.probe.data: 'cv.folds'"):
    evaluators.build_evals(_ctx(bad))
  dotted = evaluators.with_data(_ctx(config), {"cv.fold": 1, "name": "nih"}, name="x")
  assert (dotted.config.data.cv.fold, dotted.config.data.name) == (1, "nih")
