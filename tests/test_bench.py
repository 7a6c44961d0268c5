"""cxr-bench: the harness pieces and a tiny suite end to end (no speed is asserted)."""

import json
import os
import subprocess
import sys
import time

import pytest

from cxr_jax.bench import machine, memory, suites, timing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_time_steps_counts_calls_and_takes_the_median():
  calls, syncs = [], []
  durations = iter([0.0, 0.03, 0.01, 0.02])  # warm-up, then one sleep per round (steps=1)

  def step(i):
    calls.append(i)
    time.sleep(next(durations))
    return i

  out = timing.time_steps(step, syncs.append, warmup=1, repeats=3, steps=1)
  assert calls == [0, 1, 2, 3]
  assert syncs == [0, 1, 2, 3]  # after the warm-up and after every round
  assert len(out["round_step_s"]) == 3
  assert sorted(out["round_step_s"])[1] == out["step_s"]
  assert 0.015 < out["step_s"] < 0.03 + 0.05


def test_tree_sampler_sees_a_child_processes_memory():
  """A child allocating 200 MB (touched pages) raises the sampled tree peak by about that much."""
  code = "import time; b = bytearray(200 * 2**20); b[::4096] = b'x' * (len(b) // 4096); time.sleep(1.5)"
  proc = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; "
                           f"subprocess.run([sys.executable, '-c', {code!r}])"])
  sampler = memory.TreeSampler(proc.pid, interval=0.05).start()
  proc.wait()
  peak = sampler.stop()
  assert peak is not None and 200 < peak < 400, peak


def test_peak_flops_and_scale_down():
  assert machine.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
  assert machine.peak_flops("NVIDIA H100 PCIe", "float32") == 378e12
  assert machine.peak_flops("cpu", "float32") is None
  for spec in suites.gpu() + suites.memory_suite() + suites.cpu_small():
    small = suites.scale_down(spec)
    assert "size=224" not in small.get("arg", "") and small.get("size", 32) == 32
    assert small.get("batch", 8) <= 8
  names = [s["name"] for s in suites.cpu_small() + suites.gpu() + suites.memory_suite()]
  for suite in (suites.cpu_small(), suites.gpu(), suites.memory_suite()):
    targets = {s["ratio_to"][0] for s in suite if s.get("ratio_to")}
    assert targets <= {s["name"] for s in suite}, "a ratio refers to a figure of another suite"
  assert names


def test_markdown_ratios():
  run = {"suite": "t", "date": "d", "command": "c", "machine": machine.describe(devices=False),
         "figures": [
             {"spec": {"name": "a", "ratio_to": ("b", "img_per_s")}, "img_per_s": 30.0, "step_ms": 10.0},
             {"spec": {"name": "b"}, "img_per_s": 20.0, "step_ms": 15.0},
             {"spec": {"name": "c", "ratio_to": ("b", "step_time")}, "img_per_s": 1.0, "step_ms": 6.0},
             {"spec": {"name": "d"}, "error": "Traceback\nValueError: boom"}]}
  table = suites.markdown(run)
  assert "1.50x img/s of b" in table
  assert "0.40x step time of b" in table
  assert "ERROR: ValueError: boom" in table


def test_tiny_suite_end_to_end(tmp_path):
  """Two train-step figures (one with a frozen-backbone step interleaved) and one pipeline
  figure, each in its own process: a JSON with every figure's numbers and memory, and a
  markdown table appended to the results file."""
  results = tmp_path / "RESULTS.md"
  results.write_text("# Results\n")
  names = ("baseline/tiny-f32", "baseline/frozen_backbone/resnet18-32", "pipeline/synthetic/64/w0")
  specs = [suites.scale_down(s) for s in suites.cpu_small() if s["name"] in names]
  assert len(specs) == 3
  run = suites.run_suite(specs, suite="test", results=str(results), json_dir=str(tmp_path / "runs"),
                         config_root=REPO, timeout=600, command="pytest", tiny=True,
                         log=lambda *_: None)
  with open(run["json"]) as f:
    saved = json.load(f)
  assert [f["spec"]["name"] for f in saved["figures"]] == [s["name"] for s in specs]
  for fig in saved["figures"]:
    assert "error" not in fig, fig.get("error")
    assert fig["img_per_s"] > 0 and fig["step_ms"] > 0
    assert fig["rss_tree_peak_mb"] > 50 and fig["maxrss_self_mb"] > 50
    assert fig["machine"]["device"].startswith("cpu")
  train = saved["figures"][0]
  assert train["batch"] == 8 and train["image_size"] == 32 and train["flops"] > 0
  frozen = saved["figures"][1]
  (head_only,) = frozen["interleaved"]
  assert head_only["label"] == "head_only" and head_only["stage"] == frozen["stage"] == "train"
  assert 0 < head_only["flops"] < 0.6 * frozen["flops"]  # no backward through the backbone
  assert head_only["step_ratio"] == pytest.approx(head_only["step_ms"] / frozen["step_ms"])
  text = results.read_text()
  assert text.startswith("# Results\n")
  rows = [line for line in text.splitlines() if line.startswith(tuple(f"| {n} " for n in names))]
  assert len(rows) == 3 and all(row.count("|") == 10 for row in rows)
  assert "head_only (train): " in rows[1]


def test_gpu_suite_feeds_the_idle_step_from_the_prepared_shards():
  """With --data_dir the step of input_idle/.../nih/wN and its feed both read the shards."""
  by_name = {s["name"]: s for s in suites.gpu("/prepared")}
  for workers in (8, 16):
    spec = by_name[f"input_idle/resnet50-256/nih/w{workers}"]
    assert spec["kind"] == "input_idle" and spec["workers"] == workers
    assert "dataset=nih" in spec["arg"] and "size=256" in spec["arg"]
    assert spec["overrides"] == {"model.dtype": "bfloat16", "data.data_dir": "/prepared"}
  synthetic = by_name["input_idle/resnet50-256/w8"]
  assert "dataset=" not in synthetic["arg"] and "data.data_dir" not in synthetic["overrides"]
  assert not any("/nih/" in s["name"] for s in suites.gpu())


@pytest.mark.parametrize("name", ["cpu-small", "gpu", "memory"])
def test_suite_names_are_unique(name):
  specs = suites.SUITES[name]()
  assert len({s["name"] for s in specs}) == len(specs)


_YNN_PROBE = """
import re, sys
from cxr_jax.cli import flags
added = flags.set_cpu_xla_defaults() if sys.argv[1] == "ours" else []
import jax, jax.numpy as jnp
def loss(x, w):
  y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jax.nn.relu(y).sum()
text = jax.jit(jax.grad(loss)).lower(jnp.ones((2, 16, 16, 32)), jnp.ones((3, 3, 32, 32))).compile().as_text()
print(len(added), len(re.findall(r"%ynn_fusion[.0-9]* = ", text)))
"""


def test_cpu_xla_defaults_reach_xla_and_leave_user_flags_alone(monkeypatch):
  def probe(which):
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-c", _YNN_PROBE, which], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]  # XLA aborts on a flag it does not know
    return [int(v) for v in out.stdout.split()[-2:]]

  from cxr_jax import xla_cpu as cli_flags
  ours, xla = probe("ours"), probe("xla")
  if ours[0] == 0:
    pytest.skip("this jaxlib is not one CPU_XLA_FLAGS was measured on")
  assert ours[0] == len(cli_flags.CPU_XLA_FLAGS)
  assert ours[1] < xla[1]  # YNNPACK fusions of the convolution's reduction are gone

  env = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type= --xla_force_host_platform_device_count=2"}
  assert cli_flags.set_cpu_xla_defaults(env) == []  # the user's value (even empty) wins
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  assert cli_flags.set_cpu_xla_defaults(env) and cli_flags.set_cpu_xla_defaults(env) == []
  assert env["XLA_FLAGS"].split()[0] == "--xla_force_host_platform_device_count=2"
  monkeypatch.setattr(cli_flags.importlib.metadata, "version", lambda name: "0.99.0")
  assert cli_flags.set_cpu_xla_defaults({}) == []
