"""The PyTorch side of the side-by-side figures (needs the 'parity' extra: torch, torchvision;
Grad-CAM also pytorch-grad-cam). Without them the figure reports ``skipped``.

The reference train step is what a PyTorch user would write for the baseline:
the torchvision model with a GAP + Linear(K) head (``torch_model``),
channels_last, Adam, BCE with logits, ``zero_grad(set_to_none=True)``; on GPU
under ``torch.autocast`` (bfloat16) when the JAX figure computes in bfloat16
(AMP), on CPU in float32 (or CPU autocast for bfloat16).
"""

from __future__ import annotations

import time

import numpy as np

from cxr_jax.bench import timing
from cxr_jax.bench.configs import load_config


def torch_model(backbone: str, num_classes: int, channels: int, seed: int = 0):
  """The torchvision ``backbone`` with ``channels`` input channels and a GAP + Linear(K) head,
  seeded: the same weights in every process. None without torch."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
    import torchvision  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  torch.manual_seed(seed)
  model = getattr(torchvision.models, backbone)(num_classes=num_classes)
  first = {"resnet": ("conv1",), "densenet": ("features", "conv0"), "vgg": ("features", "0")}
  family = next(f for f in first if backbone.startswith(f))
  parent = model
  for name in first[family][:-1]:
    parent = getattr(parent, name)
  old = getattr(parent, first[family][-1])
  setattr(parent, first[family][-1], torch.nn.Conv2d(
      channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=old.bias is not None))
  if family == "vgg":  # GAP + Linear, like our backbone + head (torchvision: 7x7 pool + 3 FC)
    model.avgpool = torch.nn.AdaptiveAvgPool2d(1)
    model.classifier = torch.nn.Linear(512, num_classes)
  return model.eval()


def _setup(spec: dict, config_root: str):
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  config = load_config(config_root, spec.get("config", "baseline"), spec.get("arg", ""),
                       spec.get("overrides"))
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = torch_model(config.model.backbone, spec.get("classes", 14), config.data.channels)
  model = model.to(device, memory_format=torch.channels_last)
  size, batch = config.data.image_size, spec["batch"]
  gen = torch.Generator().manual_seed(0)
  images = [torch.randn(batch, config.data.channels, size, size, generator=gen)
            .to(device, memory_format=torch.channels_last) for _ in range(2)]
  amp = config.model.dtype == "bfloat16"
  return torch, model, images, device, amp, batch, size


def _sync(torch, device):
  if device == "cuda":
    torch.cuda.synchronize()


def train_step(spec: dict, config_root: str) -> dict:
  """images/s of the PyTorch train step (see the module docstring)."""
  setup = _setup(spec, config_root)
  if setup is None:
    return {"skipped": "torch is not installed"}
  torch, model, images, device, amp, batch, size = setup
  model.train()
  labels = [(torch.rand(batch, spec.get("classes", 14), generator=torch.Generator().manual_seed(i))
             < 0.2).float().to(device) for i in range(2)]
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

  def step(i):
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
      logits = model(images[i % 2])
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), labels[i % 2])
    loss.backward()
    optimizer.step()
    return loss

  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
  t = timing.time_steps(step, lambda _: _sync(torch, device), warmup=spec.get("warmup", 2),
                        repeats=spec.get("repeats", 3), steps=spec.get("steps", 5))
  out = {"img_per_s": batch / t["step_s"], "step_ms": 1e3 * t["step_s"],
         "round_ms": [1e3 * r for r in t["round_step_s"]], "batch": batch, "image_size": size,
         "amp": amp, "device": device, "threads": torch.get_num_threads()}
  if device == "cuda":
    out["device_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
  return out


def gradcam(spec: dict, config_root: str) -> dict:
  """images/s of pytorch-grad-cam's GradCAM over all K classes, one call per class (its API
  explains one target per image per call), on the weights ``figures.gradcam`` converts."""
  setup = _setup(spec, config_root)
  if setup is None:
    return {"skipped": "torch is not installed"}
  try:
    from pytorch_grad_cam import GradCAM  # pylint: disable=import-outside-toplevel
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # pylint: disable=import-outside-toplevel
  except ImportError:
    return {"skipped": "pytorch-grad-cam is not installed"}
  torch, model, images, device, _, batch, size = setup
  model.eval()
  layer = model.layer4[-1] if hasattr(model, "layer4") else model.features
  classes = spec.get("classes", 14)
  explainer = GradCAM(model=model, target_layers=[layer])

  def all_classes(i):
    return [explainer(input_tensor=images[i % 2],
                      targets=[ClassifierOutputTarget(k)] * batch) for k in range(classes)]

  start = time.perf_counter()
  all_classes(0)
  first_s = time.perf_counter() - start
  t = timing.time_steps(all_classes, lambda _: _sync(torch, device), warmup=0,
                        repeats=spec.get("repeats", 3), steps=spec.get("steps", 2))
  maps = np.stack(all_classes(0), axis=1)
  return {"img_per_s": batch / t["step_s"], "step_ms": 1e3 * t["step_s"], "first_call_s": first_s,
          "batch": batch, "classes": classes, "image_size": size, "maps_shape": list(maps.shape),
          "device": device}


FIGURES = {"torch_train_step": train_step, "torch_gradcam": gradcam}
