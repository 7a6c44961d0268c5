"""The console of a run: progress from finished steps, the steps in flight, the divergence
guard's reference, the eval summary lines."""

import logging
import os
import pathlib
import re
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import pytest

import _trainer_worker as w
from cxr_jax.cli import flags as cli_flags
from cxr_jax.train import parallel, progress, trainer

REPO = pathlib.Path(__file__).resolve().parents[1]


class FakeClock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def test_rate_and_eta_come_from_finished_steps():
  clock, lines = FakeClock(), []
  report = progress.ProgressReport(1000, 60.0, clock=clock, log=lambda fmt, text: lines.append(text))
  report.start_stage("train", 0, 0, 1000, 16)
  clock.now = 30.0
  report.completed(1)  # the first step (compilation) starts the rate
  clock.now = 50.0
  report.completed(11)
  report.loss = 0.25
  assert report.steps_per_sec() == pytest.approx(0.5)
  assert report.maybe_report() is None  # 50 s since the start
  clock.now = 60.0
  # Now due: step 11 of 1000 at 0.5 steps/s x 16 images.
  assert report.maybe_report() == ("[train] step 11/1000 (stage 11/1000), loss 0.25, "
                                   "8.0 img/s, ETA 0:32:58")
  assert lines == [report.line()]
  clock.now = 110.0
  assert report.maybe_report() is None  # 50 s since the last line
  assert report.maybe_report(force=True) is not None and len(lines) == 2


def test_a_resumed_stage_counts_from_its_own_start():
  clock = FakeClock()
  report = progress.ProgressReport(300, 60.0, clock=clock, bar=True, log=lambda *args: None)
  report.start_stage("finetune", 250, 50, 100, 8)  # stage 'finetune' began at global step 200
  assert report.line() == ("|################....|  83% [finetune] step 250/300 "
                           "(stage 50/100), loss -, - img/s, ETA -")
  clock.now = 10.0
  report.completed(251)
  clock.now = 14.0
  report.completed(253)
  report.completed(252)  # an older step told late changes nothing
  assert report.steps_per_sec() == pytest.approx(0.5)
  assert "step 253/300 (stage 53/100)" in report.line() and "ETA 0:01:34" in report.line()


def _busy(count: int) -> jax.Array:
  """A scalar that takes ``count`` products of 128 x 128 matrices to compute."""
  m = jnp.full((128, 128), 1.0 / 128)
  return jax.lax.fori_loop(0, count, lambda i, m: jnp.tanh(m @ m), m)[0, 0]


_busy_jit = jax.jit(_busy)


def test_steps_in_flight_tells_finished_steps_and_bounds_the_queue():
  window = parallel.StepsInFlight(2)
  window.add(1, _busy_jit(1).block_until_ready())
  window.add(2, _busy_jit(20000))  # dispatched, still running for a while
  assert window.finished(room=True) == 1  # one step in flight: room without waiting
  assert [step for step, _ in window.pending] == [2]
  window.add(3, _busy_jit(1))
  assert window.finished(room=True) in (2, 3)  # two in flight: waits for step 2
  assert len(window.pending) <= 1
  unbounded = parallel.StepsInFlight(0)
  unbounded.add(4, _busy_jit(20000))
  unbounded.add(5, _busy_jit(20000))
  assert unbounded.finished(room=True) is None and len(unbounded.pending) == 2  # never waits


def test_the_progress_line_counts_finished_steps_not_dispatched_ones(tmp_path, caplog):
  """No bound on the steps in flight, device-slow steps: the host queues steps 6-16 at once
  (1-5 are read one by one), but the lines logged meanwhile name the steps finished."""
  config = w.tiny_config(16, log_every=1000, checkpoint_every=1000, max_steps_in_flight=0,
                         progress_every_secs=0.0)
  dispatched = []
  step = trainer.jit_train_step

  def counting(*args, **kwargs):
    jitted = step(*args, **kwargs)
    return lambda *a: (dispatched.append(len(dispatched) + 1), jitted(*a))[1]

  caplog.set_level(logging.INFO)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(trainer, "jit_train_step", counting)
    trainer.train_and_evaluate(config, str(tmp_path), method=w.SlowBaseline(),
                               make_iterator=w.make_iterator_factory(spin=4000),
                               evaluate=w.fake_evaluate,
                               mesh=parallel.make_mesh(jax.devices()[:1]))
  shown = [int(m.group(1)) for r in caplog.records
           if (m := re.search(r"\] step (\d+)/16 ", r.getMessage()))]
  assert len(dispatched) == 16 and shown[-1] == 16
  # A line per dispatched step; while steps 6-16 were queued, the finished ones were <= 6 or so.
  assert len(shown) >= 16 and sorted(shown) == shown
  assert sum(s >= 12 for s in shown) <= 3, shown


def test_divergence_reference_is_the_smallest_of_the_first_logs():
  assert progress.divergence_reference([3.0, 1.0], 3) is None  # too few logs yet
  assert progress.divergence_reference([0.7, 5e3, 4e6], 3) == 0.7
  assert progress.diverged(80.0, [0.7, 5e3, 4e6], 100.0, 3) == 0.7
  assert progress.diverged(60.0, [0.7, 5e3, 4e6], 100.0, 3) is None
  assert progress.diverged(1e9, [0.7, 5e3, 4e6], 0.0, 3) is None  # factor 0: off
  assert progress.diverged(1e9, [0.0, 0.0, 0.0], 100.0, 3) is None  # no scale


def test_check_divergence_keeps_the_first_losses_and_names_everything():
  early, guard = [], types.SimpleNamespace(factor=100.0, window=2)
  for loss in (0.5, 0.7):
    progress.check_divergence(loss, early, guard, "train", 3, 0, lambda: "kept")
  progress.check_divergence(49.0, early, guard, "train", 10, 0, lambda: "kept")
  assert early == [0.5, 0.7]
  with pytest.raises(progress.Diverged, match=r"step 12 \(stage 'train', its step 2\): mean loss "
                     r"51 .* divergence.factor=100 x 0.5, the smallest .* first 2 .*; kept\."):
    progress.check_divergence(51.0, early, guard, "train", 12, 10, lambda: "kept")


def test_eval_summary_lines():
  payload = {"num_examples": 64, "auroc_mean": 0.8712,
             "classification": {"auroc": {"mean": 0.8712, "per_class": {"A": 0.9}},
                                "auprc": {"mean": 0.41}, "f1": {"mean": 0.45}, "d_auc": 0.6},
             "localization": {"iou@0.1": {"mean": 0.5, "per_class": {"A": 0.5}},
                              "mean_iou": {"mean": 0.25}}}
  assert progress.eval_summary("classification", "classification", "val",
                               progress.flatten_scalars(payload)) == (
      "classification val: AUROC 0.871 AUPRC 0.410 F1 0.450 loc acc@IoU>0.1 0.500 "
      "loc mean IoU 0.250")
  other = {"x": {"mean": 1.0, "per_class": {"A": 2.0}}, "y": {"mean": 2.0}, "n": 3}
  assert progress.eval_summary("mine", "custom", "test", progress.flatten_scalars(other)) == (
      "mine test: x 1.000 y 2.000")
  assert progress.eval_summary("masks", "dm_masks", "val", {}) == "masks val: no summary figures"


def test_tf_env_defaults_leave_the_users_values():
  environ = {"TF_CPP_MIN_LOG_LEVEL": "0"}
  assert cli_flags.set_tf_env_defaults(environ) == {"TF_ENABLE_ONEDNN_OPTS": "0"}
  assert environ == {"TF_CPP_MIN_LOG_LEVEL": "0", "TF_ENABLE_ONEDNN_OPTS": "0"}


def test_the_console_of_a_cxr_train_run(tmp_path):
  """No TensorFlow banner, short lines, one summary line per eval, and a last line that says
  where the outputs are."""
  workdir = tmp_path / "w"
  env = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  out = subprocess.run(
      [str(pathlib.Path(sys.executable).parent / "cxr-train"), "--config=configs/baseline.py:runlocal",
       "--config.train_steps=2", "--config.eval_every=0", "--config.data.synthetic.num_val=32",
       "--config.data.synthetic.num_test=32", "--config.cam=none", f"--workdir={workdir}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
  assert not [line for line in lines if "oneDNN" in line or "_CHECKPOINT_METADATA" in line]
  ours = [line for line in lines if re.search(r" (trainer|progress)\.py:\d+\] ", line)]
  assert ours and max(len(line) for line in ours) < 200, ours
  summaries = [m.group(1) for line in ours
               if (m := re.search(r"\] (classification (val|test): .*)$", line))]
  assert len(summaries) == 2 and all(
      re.fullmatch(r"classification (val|test): AUROC [01]\.\d{3} AUPRC [01]\.\d{3} F1 [01]\.\d{3}",
                   line) for line in summaries), summaries
  assert out.stderr.splitlines()[-1].endswith(
      f"done: results in {workdir}/eval/test.json, {workdir}/eval/val.json; plots in "
      f"{workdir}/report/; TensorBoard: tensorboard --logdir={workdir}")
