"""The input-pipeline figures of ``cxr-bench``: what the training iterator delivers, and whether
the train step waits on it. Spec keys as in ``figures``, plus ``workers`` (Grain worker processes).
"""

from __future__ import annotations

import resource
import time

import jax

from cxr_jax.bench import timing
from cxr_jax.bench.configs import load_config
from cxr_jax.bench.figures import build_train_step


def _data_config(spec: dict, config_root: str):
  """The config of a pipeline spec with ``workers`` Grain workers (prepared shards: an arg
  'dataset=nih,...' and the override 'data.data_dir')."""
  config = load_config(config_root, spec.get("config", "baseline"), spec.get("arg", ""),
                       spec.get("overrides"))
  with config.unlocked():
    config.data.worker_count = spec.get("workers", 0)
  return config


def _cpu_seconds() -> float:
  """User + system CPU seconds of this process (all its threads, not its worker processes)."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def startup_batches(data_config) -> int:
  """Batches that can be ready before the timing starts: up to 3 per Grain worker (one being
  handed over in shared memory, one in grain's per-worker read-ahead, one finished and
  waiting) and ``data.prefetch`` on the devices. Timed after these are drained, a figure
  measures the rate the workers sustain, not a startup buffer."""
  return 3 * data_config.worker_count + data_config.prefetch


def pipeline(spec: dict, config_root: str) -> dict:
  """Images/s the training iterator delivers (augmented, on the devices), ``workers`` Grain
  worker processes; from synthetic phantoms or ``data_dir`` shards. main_cpu_ms_per_img: CPU
  time of the consuming process per image: with workers, 1 / it bounds the images/s that any
  number of workers can deliver."""
  from cxr_jax.data import pipeline as pipe  # pylint: disable=import-outside-toplevel
  from cxr_jax.train import parallel  # pylint: disable=import-outside-toplevel
  config = _data_config(spec, config_root)
  mesh = parallel.make_mesh()
  batch = spec["batch"]
  iterator = pipe.make_iterator(config.data, "train", batch_size=batch,
                                sharding=parallel.data_sharding(mesh), seed=0, shuffle=True,
                                num_epochs=None, drop_remainder=True)
  # Rounds of >= 3 startup buffers: workers deliver in bursts (each a few batches at once),
  # which a short round can fall inside.
  buffered = startup_batches(config.data)
  warmup = max(spec.get("warmup", 2), buffered)
  steps = max(spec.get("steps", 5), 3 * buffered)
  try:
    next(iterator)
    cpu_start = _cpu_seconds()
    t = timing.time_steps(lambda i: next(iterator)["image"], jax.block_until_ready,
                          warmup=warmup, repeats=spec.get("repeats", 3), steps=steps)
    cpu = _cpu_seconds() - cpu_start
  finally:
    iterator.close()
  batches_taken = warmup + spec.get("repeats", 3) * steps
  return {"img_per_s": batch / t["step_s"], "step_ms": 1e3 * t["step_s"], "batch": batch,
          "main_cpu_ms_per_img": 1e3 * cpu / (batches_taken * batch),
          "workers": spec.get("workers", 0), "image_size": config.data.image_size,
          "source": config.data.get("data_dir") or "synthetic phantoms"}


def input_idle(spec: dict, config_root: str) -> dict:
  """Whether the train step waits on input: the step's compute-only time on fixed batches
  (``t_c``) vs the same step fed by the iterator (``t_f`` per step).

  idle_fraction = max(0, 1 - t_c / t_f): the share of the fed loop's wall time the device
  would have been idle. next_wait_fraction: the share spent inside ``next(iterator)``.
  The fed loop is timed over >= 10 x ``startup_batches`` steps, so the batches buffered
  when it starts shorten t_f by at most ~10 % of a starved loop's time.
  """
  from cxr_jax.data import pipeline as pipe  # pylint: disable=import-outside-toplevel
  from cxr_jax.train import parallel  # pylint: disable=import-outside-toplevel
  step, make_state, make_acc, batches, _, config, batch_size, _ = build_train_step(spec, config_root)
  state, acc = make_state(), make_acc()
  compiled = step.lower(state, acc, batches[0]).compile()
  holder = {"state": state, "acc": acc}

  def fixed(i):
    holder["state"], holder["acc"] = compiled(holder["state"], holder["acc"], batches[i % 2])
    return holder["acc"]

  compute = timing.time_steps(fixed, jax.block_until_ready, warmup=spec.get("warmup", 2),
                              repeats=spec.get("repeats", 3), steps=spec.get("steps", 5))
  config = _data_config(spec, config_root)
  mesh = parallel.make_mesh(jax.devices()[:spec.get("devices") or jax.device_count()])
  iterator = pipe.make_iterator(config.data, "train", batch_size=batch_size,
                                sharding=parallel.data_sharding(mesh), seed=1, shuffle=True,
                                num_epochs=None, drop_remainder=True)
  waited = [0.0]

  def fed(i):
    del i
    start = time.perf_counter()
    batch = next(iterator)
    waited[0] += time.perf_counter() - start
    holder["state"], holder["acc"] = compiled(holder["state"], holder["acc"],
                                              {k: batch[k] for k in batches[0]})
    return holder["acc"]

  buffered = startup_batches(config.data)
  try:
    for _ in range(max(spec.get("warmup", 2), buffered)):
      fed(0)
    jax.block_until_ready(holder["acc"])
    waited[0] = 0.0
    n = max(spec.get("repeats", 3) * spec.get("steps", 5), 10 * buffered)
    start = time.perf_counter()
    for _ in range(n):
      fed(0)
    jax.block_until_ready(holder["acc"])
    total = time.perf_counter() - start
  finally:
    iterator.close()
  fed_s = total / n
  return {"img_per_s": batch_size / fed_s, "step_ms": 1e3 * fed_s,
          "compute_step_ms": 1e3 * compute["step_s"],
          "idle_fraction": max(0.0, 1.0 - compute["step_s"] / fed_s),
          "next_wait_fraction": waited[0] / total, "batch": batch_size,
          "workers": spec.get("workers", 0), "image_size": config.data.image_size}


FIGURES = {
    "pipeline": pipeline,
    "input_idle": input_idle,
}
