"""Peak memory: host RSS of a process and its children, and device memory.

``ru_maxrss`` of RUSAGE_CHILDREN is the largest single (waited-for) child, not
a sum, and Grain worker processes may still be alive when a figure ends, so
``TreeSampler`` also polls /proc for the summed RSS of a process and all its
descendants (what "all processes together" means in issue 13).
"""

from __future__ import annotations

import os
import resource
import sys
import threading

MB = 1024 * 1024


def _maxrss_bytes(who: int) -> int:
  # Linux reports kilobytes, macOS bytes.
  scale = 1 if sys.platform == "darwin" else 1024
  return resource.getrusage(who).ru_maxrss * scale


def host_peak() -> dict:
  """{'maxrss_self_mb', 'maxrss_children_mb'}: getrusage peaks of this process and of its
  largest terminated child."""
  return {"maxrss_self_mb": _maxrss_bytes(resource.RUSAGE_SELF) / MB,
          "maxrss_children_mb": _maxrss_bytes(resource.RUSAGE_CHILDREN) / MB}


def device_peak() -> dict:
  """{'device_peak_mb', 'device_limit_mb'} of device 0 where the backend reports them
  (GPU, TPU); {} on CPU."""
  import jax  # pylint: disable=import-outside-toplevel
  stats = jax.devices()[0].memory_stats() or {}
  out = {}
  if "peak_bytes_in_use" in stats:
    out["device_peak_mb"] = stats["peak_bytes_in_use"] / MB
  if "bytes_limit" in stats:
    out["device_limit_mb"] = stats["bytes_limit"] / MB
  return out


def _children() -> dict[int, list[int]]:
  tree: dict[int, list[int]] = {}
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/stat") as f:
        stat = f.read()
    except OSError:
      continue
    ppid = int(stat.rpartition(")")[2].split()[1])
    tree.setdefault(ppid, []).append(int(entry))
  return tree


def process_tree(pid: int) -> list[int]:
  """``pid`` and all its live descendants (Linux /proc)."""
  tree, out, todo = _children(), [], [pid]
  while todo:
    p = todo.pop()
    out.append(p)
    todo.extend(tree.get(p, ()))
  return out


def proc_field_kb(path: str, field: str) -> int:
  """'<field>: <n> kB' of a /proc file (status, smaps_rollup); 0 when gone or absent."""
  try:
    with open(path) as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1])
  except OSError:
    pass
  return 0


def tree_rss_bytes(pid: int) -> int:
  """Summed VmRSS of ``pid`` and all its descendants (0 when it is gone; Linux /proc)."""
  return 1024 * sum(proc_field_kb(f"/proc/{p}/status", "VmRSS") for p in process_tree(pid))


class TreeSampler:
  """Polls ``tree_rss_bytes(pid)`` every ``interval`` s in a thread; ``peak_mb`` after ``stop``."""

  def __init__(self, pid: int, interval: float = 0.1):
    self.pid, self.interval, self.peak = pid, interval, 0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, tree_rss_bytes(self.pid))
      self._stop.wait(self.interval)

  def start(self) -> TreeSampler:
    if os.path.isdir("/proc"):
      self._thread.start()
    return self

  def stop(self) -> float | None:
    """Stops polling; the peak in MB (None without /proc)."""
    if not self._thread.is_alive():
      return None
    self._stop.set()
    self._thread.join()
    return self.peak / MB
