"""Multi-process training on localhost CPU, and stopping on SIGTERM.

The 2-process test really runs two ``cxr-train`` processes (2 CPU devices
each) that meet through a loopback ``jax.distributed`` coordinator and all-reduce
over gloo, and compares them with one process that reads the same global
batches: the two per-process input pipelines rebuilt in one process (process
index and count patched while each is built), concatenated.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from unittest import mock

import jax
import numpy as np
from flax import traverse_util
from orbax import checkpoint as ocp

import _trainer_worker as w
from configs import baseline
from cxr_jax.data import pipeline
from cxr_jax.methods import get_method
from cxr_jax.train import parallel, trainer
from cxr_jax.train.checkpoint import RunCheckpoints

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 4
OVERRIDES = {"train_steps": STEPS, "eval_every": 0, "checkpoint_every": 2, "log_every": 2}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
              JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))


def _tail(path: pathlib.Path) -> str:
  return path.read_text()[-3000:] if path.exists() else ""


class _ConcatIterator:
  """Global batches = the per-process iterators' batches stacked in process order."""

  def __init__(self, parts, sharding):
    self.parts, self.sharding = parts, sharding

  def __iter__(self):
    return self

  def __next__(self):
    batches = [next(p) for p in self.parts]
    return jax.device_put({k: np.concatenate([np.asarray(b[k]) for b in batches])
                           for k in batches[0]}, self.sharding)

  def get_state(self):
    return [p.get_state() for p in self.parts]

  def close(self):
    for p in self.parts:
      p.close()


def _two_process_data(data_config, split, *, batch_size, sharding, **kwargs):
  """What two processes of ``pipeline.make_iterator`` feed together, built in one process."""
  one_device = parallel.data_sharding(parallel.make_mesh(jax.devices()[:1]))
  parts = []
  for index in range(2):
    with mock.patch.object(jax, "process_index", lambda: index), \
         mock.patch.object(jax, "process_count", lambda: 2):
      parts.append(pipeline.make_iterator(data_config, split, batch_size=batch_size,
                                          sharding=one_device, **kwargs))
  return _ConcatIterator(parts, sharding)


def _no_eval(method, model, variables, config, split, workdir, **kwargs):
  return {"classification": {}}


def _flat(tree) -> dict[str, np.ndarray]:
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(tree), sep="/").items()}


def test_two_processes_match_one_process(tmp_path):
  workdir, port = tmp_path / "two", _free_port()
  cmd = [sys.executable, "-m", "cxr_jax.cli.train", "--config=configs/baseline.py:runlocal",
         f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
  cmd += [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  logs = [tmp_path / f"process{i}.log" for i in range(2)]
  procs = [subprocess.Popen(cmd + [f"--process_id={i}"], cwd=REPO, env=_env(1), stdout=f,
                            stderr=subprocess.STDOUT)
           for i, f in enumerate(open(log, "w") for log in logs)]
  try:
    # Meanwhile, the reference: one process, the same global batches, 4 devices.
    config = baseline.get_config("runlocal")
    for k, v in OVERRIDES.items():
      config[k] = v
    mesh = parallel.make_mesh(jax.devices()[:2])
    reference = trainer.train_and_evaluate(config, str(tmp_path / "one"), mesh=mesh,
                                           method=get_method(config.method),
                                           make_iterator=_two_process_data, evaluate=_no_eval)
    for p in procs:
      p.wait(timeout=300)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, _tail(log)
  log0 = logs[0].read_text()
  assert "process 0 of 2, 2 global devices" in log0, _tail(logs[0])

  checkpoints = RunCheckpoints(str(workdir), keep=2)
  try:
    assert checkpoints.latest.all_steps() == [2, STEPS]
    final = checkpoints.restore(STEPS, reference)
    meta = checkpoints.latest.restore(2, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  finally:
    checkpoints.close()
  expected, got = _flat(reference.params), _flat(final.params)
  assert expected.keys() == got.keys()
  # The two topologies sum gradients in another order, and Adam divides each update by
  # sqrt(v): where a gradient is near zero that rounding can move an element's update by a
  # fraction of the learning rate (seen: 8 of 392 stem weights off by 1.2e-4 on an AMD
  # EPYC). Gradients not averaged over the processes would move most elements by ~lr per
  # step, so: every element within 0.1 lr per step, 99 % of all within float noise.
  lr = config.optimizer.learning_rate
  close = []
  for path, value in expected.items():
    np.testing.assert_allclose(got[path], value, rtol=0, atol=0.1 * lr * STEPS, err_msg=path)
    close.append(np.isclose(got[path], value, rtol=1e-4, atol=2e-5).ravel())
  # BatchNorm statistics inherit those parameter differences (a few 1e-5); statistics not
  # reduced over the processes would differ by ~1e-2 (half-batch means).
  for path, value in _flat(reference.batch_stats).items():
    got_stats = _flat(final.batch_stats)[path]
    np.testing.assert_allclose(got_stats, value, rtol=1e-3, atol=1e-4, err_msg=path)
    close.append(np.isclose(got_stats, value, rtol=1e-4, atol=1e-5).ravel())
  close = np.concatenate(close)
  assert close.mean() >= 0.99, (int((~close).sum()), close.size)

  # Each process saved its own data-iterator position (it reads its own shard).
  states = meta["data"]
  assert len(states) == 2 and states[0] != states[1]
  assert [s["step"] for s in states] == [2, 2]

  # Only process 0 wrote the TensorBoard events and the eval JSON, which covers every test
  # example once (each process predicted its shard; the prevalence is that of the whole split).
  assert len(list(workdir.glob("events.out.tfevents.*"))) == 1
  payload = json.loads((workdir / "eval" / "test.json").read_text())
  source = pipeline.make_source(config.data, "test")
  labels = np.stack([source[i]["labels"] for i in range(len(source))]).astype(bool)
  mask = np.stack([source[i]["label_mask"] for i in range(len(source))]).astype(bool)
  assert payload["num_examples"] == len(source) == config.data.synthetic.num_test
  assert list(payload["classification"]["num_positives"].values()) == (labels & mask).sum(0).tolist()


_SIGTERM_WORKER = """
import pathlib, sys, time
sys.path.insert(0, sys.argv[1])
import _trainer_worker as w
import jax
from cxr_jax.train import parallel, trainer

workdir, steps, spin = pathlib.Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
straight = sys.argv[5:]  # a folder: train an uninterrupted run there too

class Announcing(w.ArrayIterator):
  def __next__(self):
    batch = super().__next__()
    with open(workdir / "batch_times", "a") as f:
      f.write(f"{time.time()}\\n")
    if self.position == 8:
      (workdir / "eighth_batch").touch()
    return batch

def make_iterator(data_config, split, *, batch_size, sharding, seed, **kwargs):
  data = dict(w.SPLITS[split], spin=w.np.full(len(w.SPLITS[split]["index"]), spin, w.np.int32))
  return Announcing(data, batch_size=batch_size, sharding=sharding, seed=seed)

def train(folder):
  return trainer.train_and_evaluate(
      w.tiny_config(steps, log_every=1000, checkpoint_every=1000), str(folder),
      method=w.SlowBaseline(), make_iterator=make_iterator, evaluate=w.fake_evaluate,
      mesh=parallel.make_mesh(jax.devices()[:1]))

parallel.install_preemption_handler()
workdir.mkdir(parents=True, exist_ok=True)
try:
  state = train(workdir)
except parallel.Preempted as e:
  print(e)
  sys.exit(parallel.PREEMPTED_EXIT_CODE)
w.np.savez(workdir / "final_params.npz", **w.flat_params(state))
if straight:
  w.np.savez(workdir / "straight_params.npz", **w.flat_params(train(straight[0])))
"""


def test_sigterm_with_slow_steps_checkpoints_within_the_steps_in_flight(tmp_path):
  """Steps slow on the device (SlowBaseline), a host that could queue all of them: SIGTERM
  checkpoints after the steps in flight (config.max_steps_in_flight = 2), not after the whole
  stage, exits 143, and the resumed run ends with the params of an uninterrupted one."""
  steps, spin, workdir = 30, 6000, tmp_path / "run"
  env = dict(os.environ, PYTHONPATH=str(REPO),
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  worker = [sys.executable, "-c", _SIGTERM_WORKER, str(REPO / "tests"), str(workdir), str(steps)]
  proc = subprocess.Popen(worker + [str(spin)], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 180
  try:
    while not (workdir / "eighth_batch").exists():
      assert proc.poll() is None, proc.communicate()[0][-3000:]
      assert time.time() < deadline, "the worker did not reach its eighth batch within 180 s"
      time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    signalled = time.time()
    output = proc.communicate(timeout=300)[0]
    waited = time.time() - signalled
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == parallel.PREEMPTED_EXIT_CODE, output[-3000:]
  assert "preempted (SIGTERM)" in output
  checkpoints = RunCheckpoints(str(workdir), keep=2)
  try:
    stopped, meta = checkpoints.latest_progress()
  finally:
    checkpoints.close()
  # The host was waiting for step 6 when it took batch 8: it stops after step 8, or a step or
  # two later if the signal is slow to arrive; unbounded, it would have queued all 30 steps.
  assert 8 <= stopped <= 11 and not meta.done, (stopped, meta)
  assert meta.data == [{"position": stopped}]
  # Steps 1-5 are read one by one (divergence.window), so batches 2-5 came a step apart.
  step_secs = float(np.median(np.diff(np.loadtxt(workdir / "batch_times")[1:5])))
  assert waited < 3 * step_secs + 8.0, (waited, step_secs)  # the steps in flight + the write
  assert not (workdir / "eval").exists() and not (workdir / "final_params.npz").exists()

  resume = subprocess.run(worker + ["0", str(tmp_path / "straight")], env=env,
                          capture_output=True, text=True, timeout=300)
  assert resume.returncode == 0, resume.stderr[-3000:]
  resumed = dict(np.load(workdir / "final_params.npz"))
  straight = dict(np.load(workdir / "straight_params.npz"))
  for path, value in straight.items():
    np.testing.assert_allclose(resumed[path], value, rtol=1e-6, atol=1e-7, err_msg=path)


_SYNC_WORKER = """
import json, pathlib, sys, time
import jax
from cxr_jax.train import parallel

process_id, port, folder = int(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3])
parallel.maybe_initialize_distributed(f"127.0.0.1:{port}", 2, process_id)
parallel.install_preemption_handler()
(folder / f"ready{process_id}").touch()
stopped = None
for step in range(1, 2000):
  time.sleep(0.02)
  if parallel.preemption_requested(step):
    stopped = step
    break
states = parallel.gather_process_states({"process": process_id, "pad": "x" * 7 * process_id})
(folder / f"out{process_id}.json").write_text(json.dumps({"stopped": stopped, "states": states}))
"""


def test_sigterm_to_one_process_stops_all_at_the_same_step(tmp_path):
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, "-c", _SYNC_WORKER, str(i), str(port), str(tmp_path)],
                            env=_env(1), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  try:
    deadline = time.time() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
      assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs]
      assert time.time() < deadline, "workers did not start within 120 s"
      time.sleep(0.1)
    time.sleep(1.0)
    procs[1].send_signal(signal.SIGTERM)  # only process 1 is told
    for p in procs:
      assert p.wait(timeout=120) == 0, p.communicate()[1][-2000:]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  out = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
  assert out[0]["stopped"] is not None and out[0]["stopped"] == out[1]["stopped"]
  expected = [{"process": 0, "pad": ""}, {"process": 1, "pad": "x" * 7}]
  assert out[0]["states"] == out[1]["states"] == expected
