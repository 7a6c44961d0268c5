"""Suites of figures, the runner (one process per figure) and the JSON / markdown output.

A figure is a spec dict: 'name' (unique in its suite), 'kind' (``figures.FIGURES``,
``input_figures.FIGURES`` or ``torch_ref.FIGURES``), the figure's own keys (see ``figures``),
and optionally
  devices    N > 1: the first N devices (on CPU, N simulated host devices)
  xla_flags  extra XLA_FLAGS for this figure's process
  xla_defaults  False: without the console scripts' XLA:CPU defaults
             (``xla_cpu.CPU_XLA_FLAGS``), i.e. XLA's own; default True
  ratio_to   (name, 'img_per_s' | 'step_time'): the markdown's ratio column,
             this figure's images/s over that one's, or its step time over that one's
  what       a short description for the table

Suites: ``cpu-small`` (minutes on a 2-core CPU), ``gpu`` (ResNet-50 / DenseNet-121 at 224,
bf16, batch 256: the issue 11 targets), ``memory`` (issue 13 budgets). ``scale_down`` shrinks
any suite to tiny sizes, so the GPU suite's code paths run on a CPU.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
import tempfile

from cxr_jax import files
from cxr_jax.bench import machine, memory
from cxr_jax import xla_cpu


# The CPU fast-path experiment (issue 11), compiled in a process without our defaults: XLA's
# own default (jaxlib 0.10: YNNPACK fusions for dots, convolutions and reductions), our
# default (YNNPACK for dots only: ``xla_cpu.CPU_XLA_FLAGS``), YNNPACK off (XLA's own
# kernels). YNNPACK for convolutions alone measured as slow as XLA's default (RESULTS.md).
CPU_VARIANTS = ({}, dict(xla_cpu.CPU_XLA_FLAGS), {"xla_cpu_experimental_ynn_fusion_type": ""})


def model_arg(backbone: str, size: int, width: float, extra: str = "") -> str:
  return ",".join(filter(None, [f"backbone={backbone},size={size},width={width}", extra]))


def train(name: str, config: str, backbone: str, size: int, width: float, batch: int,
          dtype: str = "float32", *, extra: str = "", stage: str | None = None, **kw) -> dict:
  """A train-step figure of ``configs/<config>.py`` (its first stage unless ``stage``)."""
  spec = {"name": name, "kind": "train_step", "config": config,
          "arg": model_arg(backbone, size, width, extra), "batch": batch,
          "overrides": {"model.dtype": dtype},
          "what": f"{config}{'/' + stage if stage else ''} {backbone} w{width} {size}px "
                  f"b{batch} {dtype}"}
  if stage:
    spec["stage"] = stage
  spec.update(kw)
  return spec


def torch_train(name: str, backbone: str, size: int, batch: int, dtype: str = "float32") -> dict:
  return {"name": name, "kind": "torch_train_step", "config": "baseline",
          "arg": model_arg(backbone, size, 1.0), "batch": batch,
          "overrides": {"model.dtype": dtype},
          "what": f"PyTorch {backbone} {size}px b{batch} {'AMP bf16' if dtype == 'bfloat16' else dtype}"}


def paired(tag: str, backbone: str, size: int, batch: int, dtype: str, **kw) -> list[dict]:
  """The baseline's train step at full width and the PyTorch one, with the ratio JAX / PyTorch."""
  torch_name = f"torch/{tag}"
  return [train(f"baseline/{tag}", "baseline", backbone, size, 1.0, batch, dtype,
                ratio_to=(torch_name, "img_per_s"), **kw),
          torch_train(torch_name, backbone, size, batch, dtype)]


def gradcam_pair(tag: str, backbone: str, size: int, batch: int, **kw) -> list[dict]:
  torch_name = f"torch_gradcam/{tag}"
  return [{"name": f"gradcam/{tag}", "kind": "gradcam", "config": "baseline",
           "arg": model_arg(backbone, size, 1.0), "batch": batch, "ratio_to": (torch_name, "img_per_s"),
           "what": f"jitted all-class Grad-CAM {backbone} {size}px b{batch}", **kw},
          {"name": torch_name, "kind": "torch_gradcam", "config": "baseline",
           "arg": model_arg(backbone, size, 1.0), "batch": batch,
           "what": f"pytorch-grad-cam, 14 calls (one per class) {backbone} {size}px b{batch}", **kw}]


def vkd_stages(backbone: str, size: int, width: float, batch: int, dtype: str, **kw) -> dict:
  """VKD stage 1 ('base'), with stage 2 ('prior': encoder and CH1 frozen, the prior encoder
  trained on the annotation map at 1/4 of the image side) and stage 2 with the paper's
  full-side prior interleaved in the same process; same batch each. The pooled latent (the
  real-data presets' reading), also where the phantom preset sets the spatial one."""
  spec = train(f"vkd/stages/{backbone}-{size}", "vkd", backbone, size, width, batch, dtype,
               stage="base", interleave=[
                   {"label": "prior", "stage": "prior"},
                   {"label": "prior_full_side", "stage": "prior",
                    "overrides": {"vkd.prior_scale": 1.0}}], **kw)
  spec["overrides"].update({"vkd.spatial_latent": False, "vkd.prior_scale": 0.25})
  return spec


def frozen_pairs(backbone: str, size: int, width: float, batch: int, dtype: str, *,
                 vkd: bool = True, **kw) -> list[dict]:
  """Frozen-stage cost, each frozen step interleaved with its full step in one process:
  VKD's stages (``vkd_stages``, unless ``vkd`` is False), MSML local_fixed 'bilinear' (both
  streams frozen) with 'streams', and the baseline with a frozen backbone (head only) with
  the full step; same batch each."""
  return [
      *([vkd_stages(backbone, size, width, batch, dtype, **kw)] if vkd else []),
      train(f"msml/stages/{backbone}-{size}", "msml", backbone, size, width, batch, dtype,
            extra="strategy=local_fixed", stage="streams",
            interleave=[{"label": "bilinear", "stage": "bilinear"}], **kw),
      train(f"baseline/frozen_backbone/{backbone}-{size}", "baseline", backbone, size, width, batch,
            dtype, stage="train", interleave=[
                {"label": "head_only", "trainable": ["head/.*"],
                 "apply_kwargs": {"train_backbone": False}}], **kw),
  ]


def pipeline_figures(size: int, batch: int, workers: tuple[int, ...], data_dir: str = "",
                     dataset: str = "nih", **kw) -> list[dict]:
  """Input pipeline images/s per worker count: synthetic phantoms, and prepared shards when
  ``data_dir`` is given (``cxr-prepare`` output of ``dataset``)."""
  out = []
  sources = [("synthetic", f"size={size}", {})]
  if data_dir:
    sources.append((dataset, f"dataset={dataset},size={size}", {"data.data_dir": data_dir}))
  for label, arg, overrides in sources:
    for w in workers:
      out.append({"name": f"pipeline/{label}/{size}/w{w}", "kind": "pipeline", "config": "baseline",
                  "arg": arg, "overrides": overrides, "batch": batch, "workers": w,
                  "what": f"input pipeline {label} {size}px b{batch}, {w} workers", **kw})
  return out


def idle(size: int, batch: int, workers: int, backbone: str, width: float, dtype: str,
         data_dir: str = "", dataset: str = "nih", **kw) -> dict:
  """Whether the step waits on input: synthetic phantoms (rendered on the fly), or the
  prepared ``data_dir`` shards of ``dataset`` (both the step and its feed read them)."""
  source = f"/{dataset}" if data_dir else ""
  spec = train(f"input_idle/{backbone}-{size}{source}/w{workers}", "baseline", backbone, size,
               width, batch, dtype, extra=f"dataset={dataset}" if data_dir else "", **kw)
  if data_dir:
    spec["overrides"] = {**spec["overrides"], "data.data_dir": data_dir}
  feed = f"prepared {dataset} shards" if data_dir else "the pipeline"
  return {**spec, "kind": "input_idle", "workers": workers,
          "what": f"train step fed by {feed}, {workers} workers, {backbone} w{width} "
                  f"{size}px b{batch}"}


def eval_memory(num: int, size: int, width: float, batch: int, **kw) -> dict:
  return {"name": f"eval_memory/{size}px/N{num}", "kind": "eval_memory", "config": "baseline",
          "arg": model_arg("resnet18", size, width), "num": num, "batch": batch,
          "what": f"evaluate + Grad-CAM boxes, N={num} phantoms {size}px", **kw}


def bilinear(size: int, batch: int, reduce_dim: int) -> dict:
  return {"name": f"msml_bilinear/densenet121-{size}/r{reduce_dim}", "kind": "bilinear_memory",
          "backbone": "densenet121", "size": size, "batch": batch, "reduce_dim": reduce_dim,
          "what": f"MSML bilinear head fwd+bwd, DenseNet-121 {size}px (d=1024), "
                  f"reduce_dim={reduce_dim or 'none'}, b{batch}"}


def cpu_small(data_dir: str = "") -> list[dict]:
  """Minutes on a 2-core CPU: the issue 11 CPU comparison (ResNet-18 128 px b16 vs PyTorch),
  the CPU fast-path variants, tiny method / frozen / device-count / bf16 figures, Grad-CAM,
  the input pipeline and the cheap memory figures."""
  quick = {"warmup": 1, "repeats": 3, "steps": 3}
  tiny = dict(backbone="resnet18", size=32, width=0.125, batch=16, dtype="float32")
  # VKD at 128 px, width 0.5: its prior encoder reads a 32 px map (at 32 px it would read
  # 32 px), and the convolutions are wide enough that FLOPs, not per-op overhead, set the
  # step time.
  vkd = dict(tiny, size=128, width=0.5)
  return [
      *paired("resnet18-128-b16-f32", "resnet18", 128, 16, "float32", **quick),
      train("baseline/resnet18-128-b16-f32/xla-cpu-variants", "baseline", "resnet18", 128, 1.0, 16,
            variants=list(CPU_VARIANTS), xla_defaults=False, **quick,
            what="baseline resnet18 w1.0 128px b16: XLA:CPU variants vs XLA's own default, interleaved"),
      train("baseline/tiny-f32", "baseline", "resnet18", 64, 0.25, 32, **quick),
      train("baseline/tiny-bf16", "baseline", "resnet18", 64, 0.25, 32, "bfloat16",
            ratio_to=("baseline/tiny-f32", "img_per_s"), **quick),
      train("baseline/tiny-f32-2dev", "baseline", "resnet18", 64, 0.25, 32, devices=2,
            ratio_to=("baseline/tiny-f32", "img_per_s"), **quick),
      train("msml/train/tiny", "msml", **tiny, **quick),
      vkd_stages(**vkd, **quick),
      *frozen_pairs(**tiny, vkd=False, **quick),
      *gradcam_pair("resnet18-64-b8", "resnet18", 64, 8, repeats=2, steps=1),
      *pipeline_figures(64, 64, (0, 2), data_dir, repeats=2, steps=4),
      idle(64, 32, 0, "resnet18", 0.25, "float32", **quick),
      eval_memory(250, 32, 0.125, 64),
      eval_memory(1000, 32, 0.125, 64),
      bilinear(224, 16, 0),
      bilinear(224, 16, 256),
  ]


def gpu(data_dir: str = "") -> list[dict]:
  """One accelerator: ResNet-50 / DenseNet-121 at 224 px, bf16, batch 256 vs PyTorch AMP (MFU
  next to each), ResNet-18 / VGG-16, float32, every method's first stage, frozen stages,
  Grad-CAM vs pytorch-grad-cam, the input pipeline and whether the step waits on it."""
  r = {"warmup": 3, "repeats": 5, "steps": 10}
  return [
      *paired("resnet50-224-b256-bf16", "resnet50", 224, 256, "bfloat16", **r),
      *paired("densenet121-224-b256-bf16", "densenet121", 224, 256, "bfloat16", **r),
      *paired("resnet18-224-b256-bf16", "resnet18", 224, 256, "bfloat16", **r),
      *paired("vgg16-224-b128-bf16", "vgg16", 224, 128, "bfloat16", **r),
      *paired("resnet50-224-b128-f32", "resnet50", 224, 128, "float32", **r),
      train("msml/train/resnet50-224", "msml", "resnet50", 224, 1.0, 64, "bfloat16", **r),
      *frozen_pairs("resnet50", 224, 1.0, 128, "bfloat16", **r),
      *gradcam_pair("resnet50-224-b64", "resnet50", 224, 64),
      *pipeline_figures(256, 256, (0, 4, 8, 16), data_dir),
      idle(256, 256, 8, "resnet50", 1.0, "bfloat16", **r),
      *([idle(256, 256, w, "resnet50", 1.0, "bfloat16", data_dir, **r) for w in (8, 16)]
        if data_dir else []),
  ]


def memory_suite(data_dir: str = "") -> list[dict]:
  """Issue 13's budgets: the quickstart's peak RSS (all processes), evaluation with CAMs at
  N = 1,000 vs 10,000 phantoms of 128 px, the MSML bilinear head at 224 px (d = 1024)."""
  del data_dir
  return [
      {"name": "quickstart", "kind": "quickstart", "config": "quickstart",
       "what": "README quickstart (cxr-train --config=configs/quickstart.py)"},
      eval_memory(1000, 128, 0.25, 128),
      {**eval_memory(10000, 128, 0.25, 128), "ratio_to": ("eval_memory/128px/N1000", "rss")},
      bilinear(224, 64, 0),
      bilinear(224, 64, 256),
  ]


SUITES = {"cpu-small": cpu_small, "gpu": gpu, "memory": memory_suite}


def scale_down(spec: dict) -> dict:
  """The same figure at tiny sizes (32 px, width <= 0.125 where no PyTorch twin needs 1.0,
  batch <= 8, one timing round of two steps, N <= 256): exercises a suite's code paths on CPU."""
  spec = dict(spec)
  if "arg" in spec:
    spec["arg"] = re.sub(r"size=\d+", "size=32", spec["arg"])
    twin = spec["kind"] in ("gradcam", "torch_train_step", "torch_gradcam") or str(
        spec.get("ratio_to", ("",))[0]).startswith("torch")
    if not twin:
      spec["arg"] = re.sub(r"width=[\d.]+", "width=0.125", spec["arg"])
  if "size" in spec:
    spec["size"] = 32
  for key, cap in (("batch", 8), ("num", 256), ("warmup", 1), ("repeats", 1), ("steps", 2)):
    spec[key] = min(spec.get(key, cap), cap)
  if spec["kind"] == "quickstart":  # configs/quickstart.py fixes its sizes: the runlocal baseline
    spec["config"], spec["arg"] = "baseline", "runlocal"
  spec["what"] = f"{spec.get('what', '')} [tiny: {spec.get('arg', '')} b{spec['batch']}]"
  return spec


# --------------------------------------------------------------------------- running


def default_config_root() -> str:
  """The repository root (the folder holding configs/) of this checkout."""
  return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _env(spec: dict) -> dict:
  env = dict(os.environ)
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).split()
  if spec.get("devices", 1) > 1:
    flags.append(f"--xla_force_host_platform_device_count={spec['devices']}")
  flags += spec.get("xla_flags", "").split()
  env["XLA_FLAGS"] = " ".join(flags)
  if spec.get("xla_defaults", True):
    xla_cpu.set_cpu_xla_defaults(env)
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  return env


def run_figure(spec: dict, config_root: str, timeout: float, workdir: str) -> dict:
  """Runs ``spec`` in a fresh process; its result with 'rss_tree_peak_mb' (the summed RSS of
  the process and its children, sampled), 'wall_s', and 'error' when it failed."""
  out_path = os.path.join(workdir, re.sub(r"[^\w.-]+", "_", spec["name"]) + ".json")
  cmd = [sys.executable, "-m", "cxr_jax.bench.worker", json.dumps(spec), out_path, config_root]
  start = datetime.datetime.now()
  proc = subprocess.Popen(cmd, env=_env(spec), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  sampler = memory.TreeSampler(proc.pid).start()
  try:
    log, _ = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    log, _ = proc.communicate()
    log += f"\ntimed out after {timeout} s"
  finally:
    if proc.poll() is None:  # interrupted: leave no figure process behind
      proc.kill()
      proc.wait()
  peak = sampler.stop()
  result = {}
  if os.path.exists(out_path):
    with open(out_path) as f:
      result = json.load(f)
  elif proc.returncode:
    result = {"error": "\n".join(log.splitlines()[-15:]) +
                       f"\nexit status {proc.returncode}, no result written"}
  if peak is not None:
    result["rss_tree_peak_mb"] = peak
  result["wall_s"] = (datetime.datetime.now() - start).total_seconds()
  return {"spec": spec, **result}


def _ratio(fig: dict, by_name: dict) -> str:
  target = fig["spec"].get("ratio_to")
  if not target:
    return ""
  other = by_name.get(target[0], {})
  kind = target[1]
  if kind == "img_per_s" and fig.get("img_per_s") and other.get("img_per_s"):
    return f"{fig['img_per_s'] / other['img_per_s']:.2f}x img/s of {target[0]}"
  if kind == "step_time" and fig.get("step_ms") and other.get("step_ms"):
    return f"{fig['step_ms'] / other['step_ms']:.2f}x step time of {target[0]}"
  if kind == "rss" and fig.get("rss_tree_peak_mb") and other.get("rss_tree_peak_mb"):
    return f"{fig['rss_tree_peak_mb'] / other['rss_tree_peak_mb']:.2f}x peak RSS of {target[0]}"
  return ""


def _fmt(value, digits: int = 1) -> str:
  return "" if value is None else f"{value:,.{digits}f}"


def _notes(fig: dict) -> str:
  if "error" in fig:
    return "ERROR: " + fig["error"].strip().splitlines()[-1][:160]
  if "skipped" in fig:
    return "skipped: " + fig["skipped"]
  notes = []
  for v in fig.get("variants", [])[1:]:
    base = fig["variants"][0]
    notes.append(f"{json.dumps(v['options'])}: {v['img_per_s'] / base['img_per_s']:.2f}x")
  for v in fig.get("interleaved", []):
    notes.append(f"{v['label']} ({v['stage']}): {v['step_ms']:,.1f} ms, "
                 f"{v['step_ratio']:.2f}x step time")
  for key, label in (("idle_fraction", "device idle {:.0%}"),
                     ("next_wait_fraction", "in next() {:.0%}"),
                     ("main_cpu_ms_per_img", "consumer CPU {:.2f} ms/img"),
                     ("temp_mb", "XLA temp {:,.0f} MB"),
                     ("naive_outer_product_mb", "[N,L,d,d] would be {:,.0f} MB"),
                     ("seconds", "{:,.0f} s"), ("compile_s", "compile {:.0f} s")):
    if fig.get(key) is not None:
      notes.append(label.format(fig[key]))
  return "; ".join(notes)


def markdown(run: dict) -> str:
  """The run's section for RESULTS.md: heading, command, machine, one table row per figure."""
  m = run["machine"]
  device = next((f["machine"].get("device") for f in run["figures"]
                 if f.get("machine", {}).get("device")), "?")
  lines = [f"### cxr-bench --suite={run['suite']}{' --tiny' if run.get('tiny') else ''} "
           f"({run['date']})", "",
           f"Machine: {machine.one_line(m)}; JAX device: {device}. Load average at start: "
           f"{run.get('load_average', '?')}.", "",
           f"    {run['command']}", "",
           "| figure | what | img/s | step ms | ratio | MFU | peak RSS MB (all procs) "
           "| peak device MB | notes |",
           "|---|---|---:|---:|---|---:|---:|---:|---|"]
  by_name = {f["spec"]["name"]: f for f in run["figures"]}
  for f in run["figures"]:
    mfu = f"{f['mfu']:.1%}" if f.get("mfu") is not None else ""
    rss = f.get("rss_tree_peak_mb") or f.get("maxrss_self_mb")
    lines.append(f"| {f['spec']['name']} | {f['spec'].get('what', '')} | {_fmt(f.get('img_per_s'))} "
                 f"| {_fmt(f.get('step_ms'))} | {_ratio(f, by_name)} | {mfu} | {_fmt(rss, 0)} "
                 f"| {_fmt(f.get('device_peak_mb'), 0)} | {_notes(f)} |")
  return "\n".join(lines) + "\n"


def append_atomic(path: str, text: str) -> None:
  """Appends ``text`` to ``path`` by writing old + new atomically (``files.write_text_atomic``)."""
  old = ""
  if os.path.exists(path):
    with open(path) as f:
      old = f.read()
  if old and not old.endswith("\n\n"):
    old += "\n" if old.endswith("\n") else "\n\n"
  files.write_text_atomic(path, old + text)


def run_suite(specs: list[dict], *, suite: str, results: str, json_dir: str, config_root: str,
              timeout: float = 900, command: str = "", tiny: bool = False, log=print) -> dict:
  """Runs every spec in its own process, writes JSON_DIR/<suite>-<time>.json (all figures)
  and appends the markdown table to ``results``. Returns the run dict."""
  names = [s["name"] for s in specs]
  if len(set(names)) != len(names):
    raise ValueError(f"figure names must be unique: {sorted(n for n in names if names.count(n) > 1)}")
  now = datetime.datetime.now(datetime.timezone.utc)
  run = {"suite": suite, "tiny": tiny, "date": now.strftime("%Y-%m-%d %H:%M UTC"),
         "command": command, "machine": machine.describe(devices=False),
         "load_average": " ".join(f"{x:.1f}" for x in os.getloadavg()), "figures": []}
  os.makedirs(json_dir, exist_ok=True)
  with tempfile.TemporaryDirectory() as workdir:
    for spec in specs:
      fig = run_figure(spec, config_root, timeout, workdir)
      run["figures"].append(fig)
      status = fig.get("error", "").strip().splitlines()[-1:] or [
          f"{_fmt(fig.get('img_per_s'))} img/s" if fig.get("img_per_s") else "done"]
      notes = "" if "error" in fig else _notes(fig)
      log(f"[{len(run['figures'])}/{len(specs)}] {spec['name']}: {status[0]} ({fig['wall_s']:.0f} s)"
          + (f"; {notes}" if notes else ""))
  path = os.path.join(json_dir, f"{suite}-{now.strftime('%Y%m%dT%H%M%S')}.json")
  files.write_json_atomic(path, run, indent=1, default=float)
  run["json"] = path
  append_atomic(results, markdown(run))
  return run
