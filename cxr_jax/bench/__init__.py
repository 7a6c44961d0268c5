"""Throughput and memory benchmarks behind ``cxr-bench`` (issues 11 and 13).

Each figure runs in its own process (``worker``) so that compilation caches,
XLA flags, device counts and peak-memory counters never leak between figures:

  timing    warm-up, repeats, median of per-step wall time
  memory    peak host RSS (process, its children, the sampled process tree)
            and peak device memory
  machine   what the figures ran on (CPU model / GPU name, versions), peak FLOPs
  configs   the configs a figure runs (configs/<name>.py with dotted overrides)
  figures   the JAX figures (train step, Grad-CAM eval, memory, quickstart)
  input_figures  the input-pipeline figures (images/s delivered, input idle time)
  torch_ref the same train step / Grad-CAM in PyTorch (skipped without torch)
  suites    the suites (cpu-small, gpu, memory), the runner, JSON and markdown
"""
