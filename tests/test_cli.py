"""The console scripts as a user meets them: --help, --print_config, one-line user errors,
and WORKDIR/config.json (written by cxr-train, read and checked by cxr-eval / cxr-train).

Each command runs as its installed console script in a subprocess (absl flags are
process-global, and --help depends on the entry-point script being __main__).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from cxr_jax import errors, run_config

REPO = pathlib.Path(__file__).resolve().parents[1]
BIN = pathlib.Path(sys.executable).parent
# A run of seconds: 2 steps at 32 px, 32 val / test phantoms, no CAMs.
TINY = ["--config=configs/baseline.py:runlocal", "--config.train_steps=2", "--config.eval_every=0",
        "--config.checkpoint_every=2", "--config.data.synthetic.num_val=32",
        "--config.data.synthetic.num_test=32", "--config.cam=none"]


def _run(command: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
  script = BIN / command
  assert script.exists(), f"{script} is not installed (pip install -e .)"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.run([str(script), *args], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=timeout)


def _one_line_error(out: subprocess.CompletedProcess, command: str) -> str:
  """The error line of a user error: exit status 2, no traceback, one line on stderr."""
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
  assert "Traceback" not in out.stderr and len(lines) == 1, out.stderr[-3000:]
  assert lines[0].startswith(f"{command}: error: "), lines
  return lines[0]


@pytest.mark.parametrize("command, description, own_flags", [
    ("cxr-train", "train and evaluate a method from a config file",
     ["config", "workdir", "print_config", "force", "verbose"]),
    ("cxr-eval", "evaluate a trained method's checkpoint on a split",
     ["config", "workdir", "split", "print_config", "force", "verbose"]),
    ("cxr-sweep", "run every row of a config's sweep",
     ["config", "workdir_root", "override", "print_config", "verbose"]),
    ("cxr-table", "the eval JSONs of many runs as one results table",
     ["workdirs", "split", "metrics", "verbose"]),
    ("cxr-bench", "throughput and memory figures", ["suite", "tiny", "only", "verbose"]),
])
def test_help_prints_the_description_and_the_commands_flags(command, description, own_flags):
  out = _run(command, "--help", timeout=120)
  assert description in out.stdout, out.stdout[:2000]
  for name in own_flags:
    assert re.search(rf"^\s+--(\[no\])?{name}:", out.stdout, re.M), (name, out.stdout[-3000:])
  if "print_config" in own_flags:  # --help says how to list the config's fields
    assert "--print_config" in out.stdout.split("flags:")[0]


def test_print_config_lists_fields_with_values_and_comments(tmp_path):
  out = _run("cxr-train", "--config=configs/vkd.py:runlocal", "--config.data.image_size=48",
             "--print_config", timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.splitlines()

  def line(key):
    found = [l for l in lines if l.startswith(f"{key} = ")]
    assert len(found) == 1, (key, out.stdout[:3000])
    return re.sub(r"\s+", " ", found[0])

  # Common fields (configs/common.py), the optimizer's (common.optimizer) and the method's own.
  assert line("data.image_size") == ("data.image_size = 48 # square side the images are "
                                     "resized to, pixels")
  assert line("optimizer.learning_rate") == "optimizer.learning_rate = 0.001 # peak learning rate"
  assert line("vkd.latent_dim") == "vkd.latent_dim = 8 # L, size of z"
  assert line("evals.cam_shift.max_images").startswith("evals.cam_shift.max_images = 16 # all ")
  assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def evil_pth(tmp_path_factory):
  """A .pth whose pickle would run ``touch MARKER`` if loaded without weights_only."""
  torch = pytest.importorskip("torch")
  folder = tmp_path_factory.mktemp("evil")

  class Evil:
    def __reduce__(self):
      return (os.system, (f"touch {folder / 'ran'}",))

  torch.save({"conv1.weight": torch.zeros(1), "x": Evil()}, folder / "evil.pth")
  return folder


# (command, its arguments ({tmp}: a fresh folder), text the one line must hold)
USER_ERRORS = {
    "config typo": ("cxr-train", ["--config=configs/baseline.py:runlocal", "--workdir={tmp}/w",
                                  "--config.optimizer.learing_rate=1"],
                    "--config.optimizer.learing_rate: the config has no field 'learing_rate' "
                    "(did you mean 'learning_rate'?)"),
    "preset key": ("cxr-train", ["--config=configs/baseline.py:sizee=64", "--workdir={tmp}/w"],
                   "--config=configs/baseline.py:sizee=64: unknown config arg 'sizee'"),
    "unknown split": ("cxr-train", ["--config=configs/baseline.py:runlocal", "--workdir={tmp}/w",
                                    "--config.evals.classification.splits=('vall',)"],
                      "config.evals.classification.splits: unknown split 'vall'"),
    "unknown data.name": ("cxr-train", ["--config=configs/baseline.py:runlocal",
                                        "--workdir={tmp}/w", "--config.data.name=nihh"],
                          "config.data.name='nihh'"),
    "batch over 8 devices": ("cxr-train", ["--config=configs/baseline.py:runlocal",
                                           "--workdir={tmp}/w", "--config.batch_size=15"],
                             "config.batch_size=15 must be a positive multiple of the 8 devices"),
    "sweep override typo": ("cxr-sweep", ["--config=configs/quickstart.py",
                                          "--workdir_root={tmp}/w", "--override=train_stpes=4"],
                            "--override=train_stpes=4: config has no field 'train_stpes'"),
    "eval workdir typo": ("cxr-eval", ["--workdir={tmp}/w"], "--workdir={tmp}/w: no such folder"),
    "eval workdir typo, --config": ("cxr-eval", ["--config=configs/baseline.py",
                                                 "--workdir={tmp}/w"],
                                    "no checkpoint in {tmp}/w/checkpoints"),
}


@pytest.mark.parametrize("case", list(USER_ERRORS))
def test_user_errors_are_one_line_and_leave_nothing_behind(case, tmp_path):
  command, args, expected = USER_ERRORS[case]
  out = _run(command, *[a.format(tmp=tmp_path) for a in args], timeout=120)
  assert expected.format(tmp=tmp_path) in _one_line_error(out, command)
  assert not (tmp_path / "w").exists()  # no workdir, checkpoints/ or events file


def test_verbose_adds_the_traceback(tmp_path):
  out = _run("cxr-train", "--config=configs/baseline.py:sizee=64", f"--workdir={tmp_path}/w",
             "--verbose", timeout=120)
  assert out.returncode == 2 and "Traceback" in out.stderr
  assert out.stderr.strip().splitlines()[-1].startswith("cxr-train: error: --config=")


def test_convert_weights_refuses_a_pickle_that_is_not_a_state_dict(evil_pth):
  out = _run("cxr-convert-weights", "--arch=resnet18", f"--input={evil_pth / 'evil.pth'}",
             f"--output={evil_pth / 'out.npz'}", timeout=120)
  line = _one_line_error(out, "cxr-convert-weights")
  assert "evil.pth: not a plain state dict, refused" in line
  assert not (evil_pth / "ran").exists() and not (evil_pth / "out.npz").exists()


def test_run_config_round_trip_and_differences(tmp_path):
  import ml_collections
  config = ml_collections.ConfigDict(dict(a=1.5, b=dict(c=("x", "y"), d="s")))
  run_config.write(str(tmp_path), config)
  loaded = run_config.load(str(tmp_path))
  assert loaded.b.c == ("x", "y") and loaded.a == 1.5  # tuples come back as tuples
  assert run_config.differences(run_config.read(str(tmp_path)), config) == {}
  config.b.d = "t"
  assert run_config.differences(run_config.read(str(tmp_path)), config) == {"b.d": ("s", "t")}
  with pytest.raises(errors.UserError, match=r"in 1 field\(s\): b.d \(saved \"s\", given \"t\"\)"):
    run_config.check(str(tmp_path), config)
  run_config.check(str(tmp_path), config, force=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished tiny cxr-train run."""
  workdir = tmp_path_factory.mktemp("run") / "w"
  out = _run("cxr-train", *TINY, f"--workdir={workdir}")
  assert out.returncode == 0, out.stderr[-3000:]
  return workdir


def test_train_writes_its_config_and_eval_reads_it(trained):
  saved = json.loads((trained / run_config.CONFIG_FILE).read_text())
  assert saved["train_steps"] == 2 and saved["data"]["image_size"] == 32
  assert saved["data"]["augment"]["crop_scale"] == [0.7, 1.0]
  out = _run("cxr-eval", f"--workdir={trained}", "--split=val", "--nocurves")  # no --config
  assert out.returncode == 0, out.stderr[-3000:]
  assert "baseline on val (32 images)" in out.stdout


def test_a_config_that_differs_from_the_workdirs_is_one_line(trained):
  # cxr-eval with the 64 px default config on the 32 px run (a ScopeParamShapeError otherwise).
  line = _one_line_error(_run("cxr-eval", "--config=configs/baseline.py", f"--workdir={trained}"),
                         "cxr-eval")
  assert "data.image_size (saved 32, given 64)" in line and "leave out --config" in line
  # cxr-train resuming the run with another width (an Orbax shape error otherwise).
  line = _one_line_error(_run("cxr-train", *TINY, "--config.model.width=0.25",
                              f"--workdir={trained}"), "cxr-train")
  assert "in 1 field(s): model.width (saved 0.125, given 0.25)" in line
  # --force goes on where the shapes allow.
  other = [a for a in TINY if "train_steps" not in a] + ["--config.train_steps=3"]
  out = _run("cxr-eval", *other, f"--workdir={trained}", "--split=val", "--nocurves", "--force")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "train_steps (saved 2, given 3)" in out.stderr and "baseline on val" in out.stdout


def test_rejoin_paths_puts_back_the_commas_of_sweep_workdir_names(tmp_path):
  """absl list flags split '--workdirs a,b'; cxr-sweep names workdirs '00-lr=0.1,seed=0'."""
  from cxr_jax.cli import flags as cli_flags
  (tmp_path / "00-lr=0.1,seed=0").mkdir()
  (tmp_path / "01-lr=0.1,seed=1").mkdir()
  (tmp_path / "plain").mkdir()
  first, second = str(tmp_path / "00-lr=0.1"), str(tmp_path / "01-lr=0.1")
  pieces = [first, "seed=0", second, "seed=1", str(tmp_path / "plain"), "missing"]
  assert cli_flags.rejoin_paths(pieces) == [
      str(tmp_path / "00-lr=0.1,seed=0"), str(tmp_path / "01-lr=0.1,seed=1"),
      str(tmp_path / "plain"), "missing"]
