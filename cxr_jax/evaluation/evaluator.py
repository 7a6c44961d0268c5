"""Inference over a split and the eval JSON (``WORKDIR/eval/<split>.json``).

One jitted predict function per (method, model, mesh): the batch is sharded
over the mesh's 'data' axis, variables are replicated. Batches of one shape
compile once; the eval iterator pads its last batch to full size with rows
marked ``valid = 0``, which are dropped here. Host transfers are one
``device_get`` per batch, issued after the next batch is dispatched so the
copy overlaps the device's work.

The JSON (DESIGN.md, "Evaluation output"):

  {"method", "dataset", "stage", "split", "num_examples", "auroc_mean",
   "classification": metrics.classification_report(...), "localization": {}}
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cxr_jax.data import schema
from cxr_jax.evaluation import metrics
from cxr_jax.evaluation import report

# Batch entries read on the host only; everything else numeric goes to predict.
HOST_KEYS = ("labels", "label_mask", "valid", "index")


def make_predict_fn(method, model, mesh: Mesh) -> Callable[[Any, Mapping[str, Any]], dict]:
  """jit((variables, batch) -> method.predict(model, variables, batch)).

  batch: dict of arrays with a leading batch axis, sharded over 'data' (its
  size must divide by the mesh's 'data' size); variables: replicated.
  Returns {'probs': [N,K], optionally 'heatmaps': [N,h,w,K]}, sharded over 'data'.
  """
  data = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())

  def predict(variables, batch):
    return method.predict(model, variables, batch)

  return jax.jit(predict, in_shardings=(replicated, data), out_shardings=data)


_PREDICT_FNS: dict[tuple[int, int, Mesh], tuple[Any, Any, Callable]] = {}


def cached_predict_fn(method, model, mesh: Mesh) -> Callable:
  """``make_predict_fn``, built once per (method, model, mesh) object, so that
  repeated evaluations during training reuse one compiled function."""
  key = (id(method), id(model), mesh)
  if key not in _PREDICT_FNS:  # the entry keeps method and model alive: ids stay unique
    _PREDICT_FNS[key] = (method, model, make_predict_fn(method, model, mesh))
  return _PREDICT_FNS[key][2]


def _fetch(tree):
  """Device -> host numpy; gathers the global arrays when there are several processes."""
  if jax.process_count() > 1:
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def _is_numeric(value) -> bool:
  dtype = getattr(value, "dtype", None)
  return dtype is not None and (jnp.issubdtype(dtype, jnp.number) or dtype == bool)


def _device_part(batch: Mapping[str, Any]) -> dict:
  """The numeric entries ``predict`` may read (strings such as image ids stay on the host)."""
  return {k: v for k, v in batch.items() if k not in HOST_KEYS and _is_numeric(v)}


def predict_split(predict_fn: Callable, variables, batches: Iterable[Mapping[str, Any]],
                  keep_heatmaps: bool = False) -> dict[str, np.ndarray]:
  """Runs ``predict_fn`` over ``batches`` and keeps the valid rows, in order.

  batches: dicts with 'image' [N,...], 'labels' [N,K], 'label_mask' [N,K],
    optionally 'valid' [N] (0 = padding row; absent = all valid) and
    'index' [N] (example index; absent = running row number).
  Returns numpy 'probs' [M,K] float32, 'labels' [M,K], 'label_mask' [M,K],
  'index' [M] over the M valid rows, and 'heatmaps' [M,h,w,K] when
  ``keep_heatmaps`` and the method returns them.
  """
  parts: dict[str, list[np.ndarray]] = {}
  seen = 0

  def collect(host):
    nonlocal seen
    outputs, batch_host = host
    n = len(batch_host["labels"])
    valid = np.asarray(batch_host.get("valid", np.ones(n)), bool)
    index = batch_host.get("index", np.arange(seen, seen + n))
    seen += n
    rows = {"probs": outputs["probs"], "labels": batch_host["labels"],
            "label_mask": batch_host["label_mask"], "index": index}
    if keep_heatmaps and "heatmaps" in outputs:
      rows["heatmaps"] = outputs["heatmaps"]
    for k, v in rows.items():
      parts.setdefault(k, []).append(np.asarray(v)[valid])

  pending = None
  for batch in batches:
    outputs = predict_fn(variables, _device_part(batch))
    wanted = {k: v for k, v in outputs.items() if keep_heatmaps or k != "heatmaps"}
    current = (wanted, {k: batch[k] for k in HOST_KEYS if k in batch})
    if pending is not None:
      collect(_fetch(pending))
    pending = current
  if pending is None:
    raise ValueError("predict_split: the batch iterator yielded no batch")
  collect(_fetch(pending))
  return {k: np.concatenate(v) for k, v in parts.items()}


def write_json_atomic(path: str, payload) -> None:
  """Writes ``payload`` as JSON to ``path`` via a temp file in the same folder + os.replace.

  The payload is serialized first (strict JSON: NaN is an error, metrics write
  undefined values as null), so one that does not serialize leaves an existing
  file untouched; readers see the old file or the new one, never a part.
  """
  report.write_bytes_atomic(path, json.dumps(payload, indent=2, allow_nan=False).encode())


def _default_make_iterator(*args, **kwargs):
  from cxr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.make_iterator(*args, **kwargs)


def predict_on(method, model, variables, config, split: str, *, mesh: Mesh,
               make_iterator: Callable | None = None, keep_heatmaps: bool = False) -> dict:
  """``predict_split`` over ``split`` of ``config.data`` (unshuffled, unaugmented, one epoch)."""
  make_iterator = make_iterator or _default_make_iterator
  batches = make_iterator(config.data, split, batch_size=config.eval_batch_size,
                          sharding=NamedSharding(mesh, P("data")), seed=config.seed,
                          shuffle=False, num_epochs=1, drop_remainder=False, augment=False)
  predict_fn = cached_predict_fn(method, model, mesh)
  variables = jax.device_put(variables, NamedSharding(mesh, P()))
  try:
    return predict_split(predict_fn, variables, batches, keep_heatmaps=keep_heatmaps)
  finally:
    close = getattr(batches, "close", None)  # the pipeline's prefetch thread
    if close is not None:
      close()


def evaluate(method, model, variables, config, split: str, workdir: str | None, *,
             stage: str, mesh: Mesh, make_iterator: Callable | None = None,
             thresholds=None, write_curves: bool = False) -> dict:
  """Predicts ``split``, computes every classification metric, writes the eval JSON.

  F1 thresholds: given ``thresholds`` [K] are used as they are; otherwise they
  are chosen to maximize F1 on the 'val' split (predicted here too when
  ``split`` is not 'val'; for 'val' itself they are chosen on val), and the
  JSON says so in classification.f1.threshold_source.
  Writes WORKDIR/eval/<split>.json (process 0, atomically) when ``workdir`` is
  given, and ROC / PR curves under WORKDIR/report/ when ``write_curves``.
  Returns the JSON payload.
  """
  class_names = schema.get_label_space(config.data.label_space).classes
  def run(s):
    return predict_on(method, model, variables, config, s, mesh=mesh, make_iterator=make_iterator)

  out = run(split)
  if out["probs"].shape[1] != len(class_names):
    raise ValueError(f"method {method.name!r} predicts {out['probs'].shape[1]} classes; label "
                     f"space {config.data.label_space!r} (config.data.label_space) has "
                     f"{len(class_names)}")
  source = "given"
  if thresholds is None:
    val = out if split == "val" else run("val")
    thresholds = metrics.best_f1_thresholds(val["probs"], val["labels"], val["label_mask"])
    source = "val"
  classification = metrics.classification_report(
      out["probs"], out["labels"], out["label_mask"], class_names, thresholds,
      threshold_source=source)
  payload = {
      "method": method.name,
      "dataset": config.data.name,
      "stage": stage,
      "split": split,
      "num_examples": int(len(out["probs"])),
      "auroc_mean": classification["auroc"]["mean"],
      "classification": classification,
      "localization": {},
  }
  if workdir is not None and jax.process_index() == 0:
    write_json_atomic(os.path.join(workdir, "eval", f"{split}.json"), payload)
    if write_curves:
      report.write_curves(out["probs"], out["labels"], out["label_mask"], class_names,
                          os.path.join(workdir, "report"), split)
  return payload
