"""The preflight (cxr_jax.train.preflight): counts, checks, every real-data preset, the CLI."""

import dataclasses
import importlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

import fixtures_real
from cxr_jax.cli import sweep
from cxr_jax.data import counts, pipeline, prepared, schema
from cxr_jax.methods import get_method
from cxr_jax.methods.baseline import Baseline
from cxr_jax.train import preflight, trainer
from cxr_jax.train.stage import DataSpec

REPO = pathlib.Path(__file__).resolve().parents[1]


def _config(module: str, arg: str | None = None, **overrides) -> ml_collections.ConfigDict:
  config = importlib.import_module(f"configs.{module}").get_config(arg)
  return sweep.apply_overrides(config, overrides, f"configs/{module}.py:{arg}")


def _plan(config, method=None, **kwargs) -> preflight.Plan:
  return preflight.make_plan(config, method or get_method(config.method), **kwargs)


# --------------------------------------------------------------------------- counts


@pytest.fixture(scope="session")
def real_data(tmp_path_factory) -> str:
  """The five datasets' official-layout fixtures, prepared (cxr-prepare) into a data_dir."""
  root = tmp_path_factory.mktemp("real")
  fixtures_real.prepare_all(root / "raw", root / "prepared")
  return str(root / "prepared")


def _brute_force(data_config, split):
  """Counts of a split from every example read in full (images decoded)."""
  source = pipeline.make_source(data_config, split)
  k = len(schema.get_label_space(data_config.label_space))
  positives, labelled, boxes = np.zeros(k, int), np.zeros(k, int), np.zeros(k, int)
  boxed = gaze = 0
  for i in range(len(source)):
    e = source[i]
    positives += (e["labels"] > 0.5) & (e["label_mask"] > 0)
    labelled += e["label_mask"] > 0
    kept = e["box_labels"][e["box_labels"] >= 0]
    boxes += np.bincount(kept, minlength=k)
    boxed += bool(len(kept))
    gaze += bool((e["gaze"][:, 2] > 0).any())
  return len(source), positives, labelled, boxes, boxed, gaze


@pytest.mark.parametrize("name,label_space,split", [
    ("nih", "nih14", "test"), ("nih", "chexpert14", "test"), ("reflacx", "reflacx", "train"),
    ("reflacx", "chexpert14", "test"), ("reflacx:gaze+chexpert", "chexpert14", "train"),
    ("chexpert", "chexpert14", "val"), ("mimic", "chexpert14", "train")])
def test_index_counts_match_the_examples(real_data, name, label_space, split):
  data = _config("baseline", "dataset=nih", **{"data.data_dir": real_data,
                                                "data.prepared_size": 64}).data
  data.name, data.label_space = name, label_space
  got = counts.split_counts(data, split)
  images, positives, labelled, boxes, boxed, gaze = _brute_force(data, split)
  assert (got.images, got.read, got.boxed_images, got.gaze_images) == (images, images, boxed, gaze)
  np.testing.assert_array_equal(got.positives, positives)
  np.testing.assert_array_equal(got.labelled, labelled)
  np.testing.assert_array_equal(got.boxes, boxes)
  assert positives.any() and (name != "nih" or boxed) and (name == "chexpert" or got.patients)


def test_old_index_is_sampled_from_the_records(real_data, tmp_path):
  folder = tmp_path / "cxr_reflacx" / "64" / "1.0.0"
  shutil.copytree(os.path.join(real_data, "cxr_reflacx", "64", "1.0.0"), folder)
  index = json.loads((folder / "cxr_index.json").read_text())
  for part in index["splits"].values():
    for column in counts.INDEX_COLUMNS:
      del part[column]
  (folder / "cxr_index.json").write_text(json.dumps(index))
  prepared.load_index.cache_clear()
  data = _config("baseline", "dataset=reflacx", **{"data.data_dir": str(tmp_path),
                                                    "data.prepared_size": 64}).data
  full = counts.split_counts(data, "train")
  expected = _brute_force(data, "train")
  assert (full.images, full.read, full.boxed_images, full.gaze_images) == (
      expected[0], expected[0], expected[4], expected[5])
  sampled = counts.split_counts(data, "train", max_read=5)
  assert sampled.sampled and sampled.read == 5 and sampled.images == full.images
  assert "prepare again" in sampled.note


def test_phantom_counts_follow_the_label_model():
  data = _config("quickstart", None).data
  data.synthetic.num_train, data.image_size = 40, 32
  got = counts.split_counts(data, "train")
  source = pipeline.make_source(data, "train")
  rendered = [source[i] for i in range(len(source))]
  labels = np.stack([e["labels"] for e in rendered])
  np.testing.assert_array_equal(got.positives, labels.sum(0))
  assert got.patients == len({e["patient_id"] for e in rendered}) == 20
  kept = [e["box_labels"][e["box_labels"] >= 0] for e in rendered]
  assert got.boxed_images >= sum(len(k) > 0 for k in kept) > 0   # a box per drawn finding
  assert got.boxed_images == sum(e["has_boxes"] > 0 and e["labels"].any() for e in rendered)
  assert got.gaze_images == len(rendered)


# --------------------------------------------------------------------------- the checks


def test_plan_of_the_runlocal_baseline():
  config = _config("baseline", "runlocal")
  plan = _plan(config)
  assert not plan.errors, plan.errors
  (stage,) = plan.stages
  assert (stage.name, stage.use.split, stage.steps, stage.batch_size) == ("train", "train", 20, 16)
  assert stage.use.counts.images == 256 and stage.use.counts.patients == 128
  assert stage.epochs == pytest.approx(20 * 16 / 256)
  t = stage.trainable
  assert t.regexes[0][0] == ".*" and t.leaves == t.total_leaves == t.regexes[0][1] > 0
  text = plan.format()
  for expected in ("stage 'train': 20 steps x batch 16", "split 'train' of synthetic: 256 images",
                   "eval 'classification'", "preflight: ok"):
    assert expected in text


def test_stage_needing_boxes_on_a_split_without_any_is_an_error():
  config = _config("byol_cam", "runlocal", **{"data.synthetic.annotated_fraction": 0.0})
  plan = _plan(config, params=False)
  assert any("stage 'pretrain'" in e and "split 'train'" in e and "boxes" in e
             for e in plan.errors), plan.errors
  with pytest.raises(preflight.PreflightError, match=r"stage 'pretrain'.*split 'train'.*boxes"):
    preflight.check(plan)
  # Without the CAM loss the stage needs no boxes.
  config.byol.cam_weight = 0.0
  assert not [e for e in _plan(config, params=False).errors if "stage 'pretrain'" in e]


def test_stage_needs_come_from_maps_and_from_needs():
  assert DataSpec(maps=("box_grid", "gaze_map")).required() == ("boxes", "gaze")
  assert DataSpec(needs=("gaze",)).required() == ("gaze",)
  with pytest.raises(ValueError, match="masks"):
    DataSpec(needs=("masks",))


def test_empty_split_is_an_error():
  config = _config("baseline", "runlocal", **{"data.synthetic.num_val": 0})
  plan = _plan(config, params=False)
  assert any("split 'val' of synthetic has 0 images" in e and "stage 'train' validation" in e
             for e in plan.errors), plan.errors
  with pytest.raises(preflight.PreflightError, match="split 'val' of synthetic has 0 images"):
    preflight.check(plan)


def test_evaluator_needing_boxes_on_a_split_without_any_is_an_error():
  config = _config("byol_cam", "runlocal", **{"evals.cam_kinds.splits": ("unannotated_train",)})
  plan = _plan(config, params=False)
  assert plan.errors == [
      "evals.cam_kinds (byol_cam_kinds): split 'unannotated_train' of synthetic has no image "
      "with boxes, and it needs boxes"]
  # The classification evaluator's boxes are optional: a note, not an error.
  config.evals.classification.splits = ("unannotated_train",)
  notes = _plan(config, params=False).of_level("note")
  assert any("evals.classification" in n and "unannotated_train" in n for n in notes), notes


def test_zero_positives_of_a_class_is_a_warning_and_of_every_class_an_error():
  config = _config("baseline", "runlocal")
  plan = _plan(config, params=False)
  hernia = [w for w in plan.warnings if "0 positives of" in w and "Hernia" in w]
  assert hernia and not plan.errors
  preflight.check(plan)   # warnings do not fail
  base = plan.stages[0].validation
  k = len(base.counts.classes)
  none = dataclasses.replace(base.counts, positives=np.zeros(k, np.int64))
  found = preflight.use_problems(dataclasses.replace(base, counts=none))
  assert [level for level, *_ in found] == ["error"] and "no positive label" in found[0][-1]
  unlabelled = dataclasses.replace(none, labelled=np.zeros(k, np.int64))
  found = preflight.use_problems(dataclasses.replace(base, counts=unlabelled))
  assert [level for level, *_ in found] == ["error"] and "no labelled class" in found[0][-1]


def test_gaze_need_on_a_split_without_gaze_is_an_error():
  use = _plan(_config("baseline", "runlocal"), params=False).stages[0].use
  no_gaze = dataclasses.replace(use.counts, gaze_images=0)
  found = preflight.use_problems(dataclasses.replace(use, needs=("gaze",), counts=no_gaze))
  assert [(level, text) for level, _, _, _, text in found] == [
      ("error", "has no image with gaze, and it needs gaze")]


class _FrozenTypo(Baseline):
  def stages(self, config):
    return [dataclasses.replace(s, trainable=("haed/.*",)) for s in super().stages(config)]


def test_trainable_regex_matching_nothing_is_an_error():
  plan = _plan(_config("baseline", "runlocal"), _FrozenTypo())
  assert len(plan.errors) == 1 and "'haed/.*' matches no parameter" in plan.errors[0]


def test_trainer_runs_the_preflight_before_anything(tmp_path):
  config = _config("byol_cam", "runlocal", **{"data.synthetic.annotated_fraction": 0.0})
  with pytest.raises(preflight.PreflightError, match="stage 'pretrain'"):
    trainer.train_and_evaluate(config, str(tmp_path / "run"), method=get_method("byol_cam"))
  assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- presets

# (config, arg, sweep row or None): every real-data preset of configs/*.py and its sweep rows.
PRESETS = [("baseline", f"dataset={d}", None) for d in ("nih", "chexpert", "mimic", "reflacx",
                                                          "egd")]
PRESETS += [("msml", "dataset=nih", None)] + [("msml", "dataset=nih", r) for r in range(3)]
PRESETS += [("disease_masks", "dataset=nih", None)]
PRESETS += [("disease_masks", "dataset=nih", r) for r in range(4)]
PRESETS += [("patch_loc", "dataset=nih", None)]
PRESETS += [("patch_loc", "dataset=nih,folds=5", r) for r in range(10)]
PRESETS += [("vkd", "dataset=nih,fold=0", None)] + [("vkd", "dataset=nih", r) for r in range(20)]
PRESETS += [("vkd", f"dataset=mimic,subset={s},annotation={a}", None)
            for s, kinds in (("reflacx", ("boxes", "gaze", "gaze+boxes")), ("egd", ("gaze",)),
                             ("egd+reflacx", ("gaze",)),
                             ("egd:gaze+reflacx:boxes", ("gaze+boxes",))) for a in kinds]
PRESETS += [("vkd", "dataset=mimic,subset=reflacx", r) for r in range(5)]
PRESETS += [("byol_cam", "dataset=nih", None),
            ("byol_cam", "dataset=chexpert,backbone=resnet50,pretrain=nih", None)]
PRESETS += [("byol_cam", "dataset=chexpert,backbone=resnet50,pretrain=nih,xrv=/w/xrv.npz", r)
            for r in range(5)]

# Presets the fixtures show to be broken: (reason, the pattern every error of theirs matches).
# Such a preset xfails; it fails the test once it passes (remove it here) or fails otherwise.
KNOWN: dict[tuple, tuple[str, str]] = {}


def _preset_params(presets):
  return [pytest.param(*p, id=f"{p[0]}:{p[1]}" + ("" if p[2] is None else f"#{p[2]}"))
          for p in presets]


def _preset_config(module, arg, row, overrides):
  spec = str(REPO / "configs" / f"{module}.py") + f":{arg}"
  if row is not None:
    return sweep.plan(spec, "/nonexistent", [f"{k}={v}" for k, v in overrides.items()])[row][
        "config"]
  return _config(module, arg, **overrides)


def test_every_method_config_has_real_data_presets_here():
  methods = {p.stem for p in (REPO / "configs").glob("*.py")} - {"__init__", "common",
                                                                  "quickstart"}
  assert methods == {m for m, _, _ in PRESETS}
  for module, arg, row in PRESETS:
    if row is not None:   # the sweep has that many rows
      rows = importlib.import_module(f"configs.{module}").get_sweep(arg)
      assert row < len(rows)
  for module in methods:   # every sweep row of the presets listed is listed
    for arg in {a for m, a, r in PRESETS if m == module and r is not None}:
      listed = {r for m, a, r in PRESETS if (m, a) == (module, arg) and r is not None}
      assert listed == set(range(len(importlib.import_module(f"configs.{module}")
                                     .get_sweep(arg))))


@pytest.mark.parametrize("module,arg,row", _preset_params(PRESETS))
def test_real_data_preset_passes_the_preflight(real_data, module, arg, row):
  config = _preset_config(module, arg, row, {"data.data_dir": real_data,
                                             "data.prepared_size": fixtures_real.PREPARED_SIZE})
  plan = _plan(config)
  if (module, arg, row) in KNOWN:
    reason, pattern = KNOWN[(module, arg, row)]
    assert plan.errors, f"passes now: take it out of KNOWN ({reason})"
    assert all(re.search(pattern, e) for e in plan.errors), plan.errors
    pytest.xfail(reason)
  assert not plan.errors, "\n".join(plan.errors)
  assert all(s.use.counts.images for s in plan.stages)


NIH_SAMPLE_PRESETS = [p for p in PRESETS if "dataset=nih" in p[1] and "pretrain" not in p[1]
                      and (p[2] is None or p[2] < 2)]


@pytest.mark.parametrize("module,arg,row", _preset_params(NIH_SAMPLE_PRESETS))
def test_nih_presets_pass_on_the_real_nih_sample(nih_sample_dir, module, arg, row):
  # One image size for all: the sample is then read once (prepared._read_directly_cached).
  config = _preset_config(module, arg, row, {"data.manual_dir": str(nih_sample_dir),
                                             "data.image_size": 64})
  plan = _plan(config, params=False)
  assert not plan.errors, "\n".join(plan.errors)
  assert plan.stages[0].use.counts.boxed_images > 0   # the sample's images are all boxed


# --------------------------------------------------------------------------- commands


def _cli(*args, timeout=120):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                        env=env, timeout=timeout)


def test_train_dry_run_prints_the_plan_and_trains_nothing(tmp_path):
  out = _cli("cxr_jax.cli.train", "--config=configs/baseline.py:runlocal", "--dry_run")
  assert out.returncode == 0, out.stderr
  assert "stage 'train': 20 steps x batch 16" in out.stdout and "preflight: ok" in out.stdout
  out = _cli("cxr_jax.cli.train", "--config=configs/byol_cam.py:runlocal", "--dry_run",
             "--config.data.synthetic.annotated_fraction=0.0")
  assert out.returncode == 2 and "errors:" in out.stdout
  (line,) = out.stderr.strip().splitlines()[-1:]
  assert line.startswith("cxr-train: error: preflight") and "stage 'pretrain'" in line


def test_dry_run_bad_input_is_one_line(tmp_path):
  out = _cli("cxr_jax.cli.train", "--config=configs/baseline.py:dataset=nih", "--dry_run",
             f"--config.data.data_dir={tmp_path}")
  assert out.returncode == 2
  (line,) = out.stderr.strip().splitlines()
  assert f"config.data.data_dir='{tmp_path}' holds no prepared 'nih' dataset" in line
  assert "cxr-prepare --dataset=nih" in line
  out = _cli("cxr_jax.cli.train", "--config=configs/baseline.py:dataset=nhi", "--dry_run")
  assert out.returncode == 2
  (line,) = out.stderr.strip().splitlines()
  assert "unknown dataset 'nhi'" in line


def test_sweep_dry_run_preflights_every_row(capsys):
  runs = sweep.plan(str(REPO / "configs" / "quickstart.py") + ":runlocal", "/nonexistent",
                    ["data.synthetic.num_val=0"])
  failed = sweep.preflight_rows(runs)
  assert sorted(failed) == [r["name"] for r in runs]
  assert all("split 'val' of synthetic has 0 images" in e for e in failed.values())
  runs = sweep.plan(str(REPO / "configs" / "quickstart.py") + ":runlocal", "/nonexistent")
  assert sweep.preflight_rows(runs) == {}
  assert capsys.readouterr().err.count(": ok (") == len(runs)
