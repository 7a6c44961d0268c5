"""cxr-sweep, cxr-table and the launch scripts."""

from __future__ import annotations

import csv
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from configs import quickstart
from cxr_jax.cli import sweep, table

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = sorted((REPO / "launch").glob("*.sh")) + sorted((REPO / "launch").glob("*.sbatch"))
TINY = ["train_steps=4", "eval_every=0", "checkpoint_every=4", "log_every=2", "batch_size=16",
        "data.image_size=32", "model.width=0.125", "eval_batch_size=32",
        "data.synthetic.num_train=64", "data.synthetic.num_val=32", "data.synthetic.num_test=32"]


def _cli(module: str, *args: str, timeout: float = 120, **env) -> subprocess.CompletedProcess:
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
             PYTHONPATH=str(REPO), **env)
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_plan_resolves_rows_and_rejects_unknown_keys(tmp_path):
  runs = sweep.plan("configs/quickstart.py", str(tmp_path), ["train_steps=7", "seed=5"])
  rows = quickstart.get_sweep(None)
  assert len(runs) == len(rows) == 2
  for run, row in zip(runs, rows):
    assert run["config"].seed == row["seed"] and run["config"].train_steps == 7  # the row wins
    assert f"--config.seed={row['seed']}" == run["command"][-1] and "--config.train_steps=7" in run["command"]
    assert run["workdir"] == str(tmp_path / run["name"])
  assert len({r["name"] for r in runs}) == 2

  bad = tmp_path / "bad_sweep.py"
  bad.write_text("from configs import quickstart\nget_config = quickstart.get_config\n"
                 "def get_sweep(arg):\n  return [{'seed': 1}, {'config.optimizer.lerning_rate': 1.0}]\n")
  with pytest.raises(KeyError, match=r"row 1: config has no field 'optimizer.lerning_rate'"):
    sweep.plan(str(bad), str(tmp_path))


def test_dry_run_prints_commands_and_writes_nothing(tmp_path):
  root = tmp_path / "sweep"
  out = _cli("cxr_jax.cli.sweep", "--config=configs/quickstart.py", f"--workdir_root={root}",
             "--dry_run", *[f"--override={o}" for o in TINY])
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 2 and all("cxr_jax.cli.train" in l and "--config.train_steps=4" in l for l in lines)
  assert lines[0].endswith("--config.seed=0") and lines[1].endswith("--config.seed=1")
  assert not root.exists()


def test_emit_slurm_writes_an_array_script(tmp_path):
  root = tmp_path / "sweep"
  out = _cli("cxr_jax.cli.sweep", "--config=configs/quickstart.py", f"--workdir_root={root}",
             "--emit=slurm", "--parallel=2", "--slurm_options=--partition=gpu;--gres=gpu:1")
  assert out.returncode == 0, out.stderr[-2000:]
  script = (root / "sweep.sbatch").read_text()
  assert "#SBATCH --array=0-1%2" in script and "#SBATCH --gres=gpu:1" in script
  assert subprocess.run(["bash", "-n", str(root / "sweep.sbatch")]).returncode == 0
  for run in sweep.plan("configs/quickstart.py", str(root)):
    config = json.loads((pathlib.Path(run["workdir"]) / "config.json").read_text())
    assert config["seed"] == run["row"]["seed"]
  # The array task's command is row i's: run task 1 with cxr-train replaced by echo.
  fake = script.replace("eval \"exec ", "eval \"echo ")
  echoed = subprocess.run(["bash", "-c", fake], env=dict(os.environ, SLURM_ARRAY_TASK_ID="1"),
                          capture_output=True, text=True)
  assert echoed.stdout.splitlines()[-1].endswith("--config.seed=1")


def _eval_json(workdir: pathlib.Path, method: str, auroc: dict, seed_row: dict):
  (workdir / "eval").mkdir(parents=True)
  payload = {"method": method, "dataset": "synthetic", "classification": {
      "auroc": {"mean": float(np.mean([v for v in auroc.values() if v is not None])),
                "per_class": auroc},
      "auprc": {"mean": 0.5, "per_class": {}}, "f1": {"mean": 0.25, "per_class": {}}}}
  (workdir / "eval" / "test.json").write_text(json.dumps(payload))
  (workdir / "sweep.json").write_text(json.dumps({"row": seed_row}))


def test_table_aggregates_seeds_per_setting(tmp_path):
  rng = np.random.default_rng(0)
  values = rng.uniform(0.5, 1.0, size=(4, 2))
  for i in range(4):
    lr = 1e-3 if i < 2 else 1e-4
    _eval_json(tmp_path / f"r{i}", "baseline", {"A": values[i, 0], "B": values[i, 1] if i else None},
               {"optimizer.learning_rate": lr, "seed": i})
  (tmp_path / "unfinished").mkdir()
  rows, missing = table.collect(sorted(str(p) for p in tmp_path.iterdir()), "test",
                                ["auroc", "auprc"], ["seed"])
  assert missing == [str(tmp_path / "unfinished")]
  assert [(r["setting"], r["runs"]) for r in rows] == [
      ("optimizer.learning_rate=0.001", 2), ("optimizer.learning_rate=0.0001", 2)]
  text = table.render(rows, "csv")
  parsed = list(csv.DictReader(io.StringIO(text)))
  for row, group in zip(parsed, (values[:2], values[2:])):
    assert float(row["A"]) == pytest.approx(group[:, 0].mean(), rel=1e-5)
    assert float(row["A_std"]) == pytest.approx(np.std(group[:, 0], ddof=1), rel=1e-5)
  # Class B is undefined in run 0: the first setting's B is run 1's alone (no std).
  assert float(parsed[0]["B"]) == pytest.approx(values[1, 1], rel=1e-5) and parsed[0]["B_std"] == ""
  md = table.render(rows, "md")
  assert md.splitlines()[0].startswith("| method | dataset | setting | runs | auroc | auprc | A | B |")
  assert f"{values[2:, 0].mean():.3f} ± {np.std(values[2:, 0], ddof=1):.3f}" in md


def test_sweep_runs_two_rows_and_table_lists_both(tmp_path):
  """A real 2-row quickstart sweep (tiny overrides), then cxr-table over its runs."""
  root = tmp_path / "sweep"
  # One at a time: the second run (another seed, the same programs) reuses the first's compiles.
  out = _cli("cxr_jax.cli.sweep", "--config=configs/quickstart.py", f"--workdir_root={root}",
             *[f"--override={o}" for o in TINY], timeout=400,
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  runs = sorted(p for p in root.iterdir() if p.is_dir())
  assert out.returncode == 0, out.stderr[-2000:] + "".join(
      (p / "train.log").read_text()[-2000:] for p in runs if (p / "train.log").exists())
  assert len(runs) == 2
  for run in runs:
    assert json.loads((run / "config.json").read_text())["train_steps"] == 4
  aurocs = [json.loads((run / "eval" / "test.json").read_text())["auroc_mean"] for run in runs]
  # Seeds replicate a setting: one row, mean +- std over the two runs.
  pooled = _cli("cxr_jax.cli.table", "--workdirs", *map(str, runs))
  assert pooled.returncode == 0, pooled.stderr[-2000:]
  lines = pooled.stdout.strip().splitlines()
  assert len(lines) == 3 and lines[2].startswith("| baseline | synthetic | - | 2 | ")
  assert f"| {np.mean(aurocs):.3f} ± {np.std(aurocs, ddof=1):.3f} |" in lines[2]
  # Unless seed is not a replicate key: one row per run.
  listed = _cli("cxr_jax.cli.table", "--workdirs", *map(str, runs), "--replicate_keys=", "--format=csv")
  rows = list(csv.DictReader(io.StringIO(listed.stdout)))
  assert [r["setting"] for r in rows] == ["seed=0", "seed=1"]
  assert [float(r["auroc"]) for r in rows] == pytest.approx(aurocs, rel=1e-5)
  # Finished rows are skipped when the sweep is run again.
  again = _cli("cxr_jax.cli.sweep", "--config=configs/quickstart.py", f"--workdir_root={root}",
               *[f"--override={o}" for o in TINY])
  assert again.returncode == 0 and again.stdout.count("finished earlier, skipped") == 2


@pytest.mark.parametrize("script", LAUNCH, ids=lambda p: p.name)
def test_launch_scripts_parse(script):
  assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
  if shutil.which("shellcheck"):
    check = subprocess.run(["shellcheck", "-x", str(script)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout


def test_launch_scripts_exist():
  assert {p.name for p in LAUNCH} == {"local.sh", "tpu_vm.sh", "slurm.sbatch"}


def test_slurm_dry_run_prints_the_srun_command():
  env = dict(os.environ, DRY_RUN="1", SLURM_NNODES="3", SLURM_GPUS_ON_NODE="4")
  args = ["bash", str(REPO / "launch" / "slurm.sbatch"), "configs/quickstart.py", "/shared/w",
          "--config.batch_size=128"]
  per_gpu = subprocess.run(args, env=env, capture_output=True, text=True)
  assert per_gpu.returncode == 0, per_gpu.stderr
  assert per_gpu.stdout.strip() == (
      "srun --kill-on-bad-exit=1 --nodes=3 --ntasks-per-node=4 --ntasks=12 cxr-train "
      "--config=configs/quickstart.py --workdir=/shared/w --config.batch_size=128")
  per_node = subprocess.run(args, env=dict(env, PER="node"), capture_output=True, text=True)
  assert "--ntasks-per-node=1 --ntasks=3 cxr-train" in per_node.stdout
  assert subprocess.run(args[:3], env=env, capture_output=True).returncode == 2  # usage


def test_local_dry_run_gives_each_process_its_id():
  env = dict(os.environ, DRY_RUN="1", NUM_PROCESSES="2", PORT="4321")
  env["PATH"] = ":".join(p for p in env["PATH"].split(":") if not shutil.which("nvidia-smi", path=p))
  out = subprocess.run(["bash", str(REPO / "launch" / "local.sh"), "configs/quickstart.py", "/tmp/w"],
                       env=env, capture_output=True, text=True)
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 2
  for i, line in enumerate(lines):
    assert line.endswith(f"--coordinator_address=127.0.0.1:4321 --num_processes=2 --process_id={i}")
