"""Throughput and memory benchmarks behind ``cxr-bench`` (issues 11 and 13).

Each figure runs in its own process (``worker``) so that compilation caches,
XLA flags, device counts and peak-memory counters never leak between figures:

  timing    warm-up, repeats, median of per-step wall time
  memory    peak host RSS (process, its children, the sampled process tree)
            and peak device memory
  machine   what the figures ran on (CPU model / GPU name, versions), peak FLOPs
  figures   the JAX figures (train step, Grad-CAM eval, input pipeline, memory)
  torch_ref the same train step / Grad-CAM in PyTorch (skipped without torch)
  suites    the suites (cpu-small, gpu, memory), the runner, JSON and markdown
"""
