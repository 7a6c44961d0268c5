"""The config contract: one preset grammar for every config, every field the code reads
declared (with a comment in configs/common.py), overrides of the declared fields accepted on
the locked configs, and evaluators declared under ``config.evals``."""

import importlib
import pathlib
import re

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from configs import common
from cxr_jax.evaluation import evaluators
from cxr_jax.train import optim
from tests.conftest import REPO

CONFIG_DIR = pathlib.Path(REPO) / "configs"
CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem not in ("__init__", "common"))
# Fields the code reads on every config (data, trainer, evaluator).
READ_EVERYWHERE = ("data.split_seed", "data.cv.num_folds", "data.manual_dir", "data.prepared_size",
                   "data.mimic_dir", "data.skip_bad_examples", "fsdp", "model.init_from", "cam",
                   "cam_threshold", "cam_threshold_mode", "cam_largest_only",
                   "evals.classification.type")


def get_config(name, arg=None):
  return importlib.import_module(f"configs.{name}").get_config(arg)


def leaf(config, dotted):
  for part in dotted.split("."):
    config = config[part]
  return config


def optimizers(config, path=""):
  """(path, ConfigDict) of every optimizer config inside ``config``."""
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      if "learning_rate" in value:
        yield path + key, value
      else:
        yield from optimizers(value, path + key + ".")


def test_every_method_config_is_found():
  assert {"baseline", "quickstart", "msml", "patch_loc", "vkd", "byol_cam",
          "disease_masks"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_runlocal_spellings_give_one_config(name):
  want = get_config(name, "runlocal").to_dict()
  for spelling in ("runlocal=True", "runlocal=1", "runlocal=yes", " runlocal = true "):
    assert get_config(name, spelling).to_dict() == want, spelling
  off = get_config(name).to_dict()
  for spelling in ("runlocal=0", "runlocal=False", "runlocal=no"):
    assert get_config(name, spelling).to_dict() == off, spelling


@pytest.mark.parametrize("name", CONFIGS)
def test_unknown_and_malformed_preset_keys_are_errors_naming_them(name):
  with pytest.raises(KeyError, match=r"'bogus'.*known: \[.*'runlocal'"):
    get_config(name, "runlocal,bogus=1")
  with pytest.raises(ValueError, match="size"):
    get_config(name, "size=abc")
  with pytest.raises(ValueError, match="runlocal"):
    get_config(name, "runlocal=maybe")
  with pytest.raises(ValueError, match="'dataset' needs a value"):
    get_config(name, "dataset")


def test_method_presets_share_the_grammar():
  assert get_config("patch_loc", "crf").patch_loc.crf is True
  assert get_config("patch_loc", "crf=yes").patch_loc.crf is True
  assert get_config("patch_loc", "crf=0").patch_loc.crf is False
  assert get_config("disease_masks", "noalign=1").dm.align is False
  with pytest.raises(ValueError, match="folds"):
    get_config("patch_loc", "folds=two")
  with pytest.raises(ValueError, match="cam"):
    get_config("byol_cam", "cam=big")
  assert get_config("patch_loc").model.backbone == "preact_resnet50"
  assert get_config("disease_masks", "backbone=resnet18").model.backbone == "resnet18"


@pytest.mark.parametrize("name", CONFIGS)
def test_fields_the_code_reads_are_declared(name):
  config = get_config(name, "runlocal")
  for dotted in READ_EVERYWHERE:
    leaf(config, dotted)
  found = dict(optimizers(config))
  assert "optimizer" in found
  for path, opt in found.items():
    assert set(opt) == {"learning_rate", *optim.FIELDS}, path
    assert optim.resolve(opt).to_dict() == opt.to_dict(), path


def test_common_optimizer_defaults_are_optims():
  declared = common.optimizer().to_dict()
  assert declared == {"learning_rate": 1e-3, **optim.FIELDS}
  with pytest.raises(KeyError, match="momentun"):
    common.optimizer(momentun=0.5)
  with pytest.raises(KeyError, match="momentun"):
    optim.resolve(dict(learning_rate=0.1, momentun=0.5))


def test_every_field_of_common_has_a_comment():
  """Every assignment of a field in configs/common.py (before the runlocal preset) has a
  comment on its line or a comment line right above it."""
  lines = (CONFIG_DIR / "common.py").read_text().splitlines()
  missing = []
  for i, line in enumerate(lines):
    if line.strip() == "if a.runlocal:":
      break
    match = re.match(r"\s+[co]\.[\w.]+ = (.*)", line)
    if not match or match.group(1) == "ml_collections.ConfigDict()":
      continue
    if "#" not in line and not lines[i - 1].strip().startswith("#"):
      missing.append(line.strip())
  assert not missing


@pytest.mark.parametrize("name", CONFIGS)
def test_cam_overrides_on_the_locked_config(name):
  config = get_config(name, "runlocal")
  config.cam = "gradcam++"
  config.cam_threshold = 0.5
  config.cam_threshold_mode = "fraction_of_max"
  config.cam_largest_only = True
  with pytest.raises(AttributeError):
    config.cam_treshold = 0.5


@pytest.mark.parametrize("name", CONFIGS)
def test_command_line_overrides_of_cam_and_evals(name):
  """The flags the README gives (``--config.cam=...``), through ml_collections' parser."""
  argv = ["prog", f"--config={CONFIG_DIR / name}.py:runlocal", "--config.cam=scorecam",
          "--config.cam_threshold=0.25", "--config.cam_threshold_mode=fraction_of_max",
          "--config.cam_largest_only=True", "--config.evals.classification.when=every:5"]
  if name == "vkd":
    argv.append("--config.evals.cam_shift.max_images=4")
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
  values(argv)
  c = values.config
  assert (c.cam, c.cam_threshold, c.cam_threshold_mode, c.cam_largest_only) == (
      "scorecam", 0.25, "fraction_of_max", True)
  assert c.evals.classification.when == "every:5"
  if name == "vkd":
    assert c.evals.cam_shift.max_images == 4


@pytest.mark.parametrize("name", CONFIGS)
def test_evals_are_declared_evaluators(name):
  for arg in ("", "runlocal"):
    config = get_config(name, arg)
    assert "classification" in config.evals
    for eval_name, spec in config.evals.items():
      assert isinstance(spec, ml_collections.ConfigDict), eval_name
      assert spec.type in evaluators.TYPES, eval_name
      evaluators.parse_when(spec.when, name=eval_name)
      assert isinstance(spec.splits, tuple), eval_name


def test_method_evals_and_their_moved_fields():
  assert get_config("patch_loc").evals.patch_grid.splits == ("val", "test")
  vkd = get_config("vkd")
  assert vkd.evals.cam_shift.to_dict() == dict(type="vkd_cam_shift", splits=("test",), when="end",
                                               max_images=1024, relu=False)
  assert get_config("vkd", "runlocal").evals.cam_shift.max_images == 16
  assert get_config("vkd", "dataset=nih,fold=1").evals.cam_shift.splits == ("test",)
  assert not {"cam_split", "cam_max_images", "cam_relu"} & set(vkd.vkd)
  byol = get_config("byol_cam")
  assert (byol.evals.cam_kinds.splits, byol.evals.cam_kinds.max_images) == (("test",), 8)
  assert get_config("byol_cam", "runlocal").evals.cam_kinds.max_images == 4
  assert not {"cam_split", "cam_panel_images"} & set(byol.byol)
  dm = get_config("disease_masks")
  assert (dm.evals.alignment.when, dm.evals.alignment.pose_images) == ("stage:align", 500)
  assert (dm.evals.masks.when, dm.evals.masks.splits) == ("stage:dm_classify", ())
  assert "pose_images" not in dm.dm
  assert "alignment" not in get_config("disease_masks", "noalign").evals
  assert "masks" not in get_config("disease_masks", "masks=none").evals
