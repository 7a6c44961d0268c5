"""Configs: presets parse, configs are locked, and a misspelt key is an error naming it."""

import os
import subprocess
import sys

import pytest

from configs import baseline, common, quickstart
from tests.conftest import REPO


def test_parse_arg_types_flags_and_unknown_keys():
  a = common.parse_arg("size=128,backbone=resnet50,runlocal,width=0.5",
                       size=0, backbone="resnet18", runlocal=False, width=1.0)
  assert (a.size, a.backbone, a.runlocal, a.width) == (128, "resnet50", True, 0.5)
  with pytest.raises(KeyError, match="'sise'"):
    common.parse_arg("sise=1", size=0)


def test_presets_and_runlocal_shrink():
  nih = baseline.get_config("dataset=nih,backbone=densenet121")
  assert (nih.data.name, nih.data.image_size, nih.model.backbone) == ("nih", 256, "densenet121")
  small = baseline.get_config("runlocal")
  assert small.data.image_size <= 32 and small.train_steps <= 20 and small.model.width <= 0.125
  with pytest.raises(KeyError, match="dataset"):
    baseline.get_config("dataset=imagenet")
  with pytest.raises(KeyError, match="backbone"):
    baseline.get_config("backbone=resnet101")


def test_configs_are_locked():
  c = quickstart.get_config()
  with pytest.raises(AttributeError):
    c.optimizer.lerning_rate = 1e-3
  c.optimizer.learning_rate = 1e-3  # existing fields stay writable


def test_cli_rejects_a_misspelt_override_naming_it(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "cxr_jax.cli.train", "--config=configs/baseline.py:runlocal",
       f"--workdir={workdir}", "--config.optimizer.lerning_rate=0.1"],
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode != 0
  assert "lerning_rate" in proc.stderr
  assert not (workdir / "checkpoints").exists()  # nothing written
