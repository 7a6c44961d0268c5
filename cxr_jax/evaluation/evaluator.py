"""Inference over a split and the eval JSON (``WORKDIR/eval/<split>.json``).

One jitted predict function per (method, model, mesh): the batch is sharded
over the mesh's 'data' axis, variables are replicated. Batches of one shape
compile once; the eval iterator pads its last batch to full size with rows
marked ``valid = 0``, which are dropped here. Host transfers are one
``device_get`` per batch, issued after the next batch is dispatched so the
copy overlaps the device's work.

The JSON (DESIGN.md, "Evaluation output"):

  {"method", "dataset", "split_policy", "stage", "split", "num_examples", "auroc_mean",
   "classification": metrics.classification_report(...),
   "localization": BoxLocalizer.result() for splits with boxes, else {}}

Localization (Kim 2022 / Wang 2017 / Talasila 2023 box protocol, see
``localization.box_scores``) runs in the same pass as prediction: for a batch
that carries boxes, one more jitted call computes the class heat maps of the
label space's boxed classes at feature resolution; on the host only the maps
of the classes boxed in each row are upsampled, scored and dropped, so memory
stays at one batch. A few overlays are kept for the report.

Ensembles (``evaluate_ensemble``, cxr-eval --ensemble_workdirs): the mean of
several runs' probabilities, rows matched by example index
(``average_predictions``), scored as above without localization.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cxr_jax import cam, files
from cxr_jax.data import schema, splits
from cxr_jax.evaluation import evaluators
from cxr_jax.evaluation import localization
from cxr_jax.evaluation import metrics
from cxr_jax.evaluation import report

# Batch entries read on the host only; everything else numeric goes to predict.
HOST_KEYS = ("labels", "label_mask", "valid", "index")


def split_policy_used(data_config) -> str:
  """The header's 'split_policy': how the real data's splits were cut (``data.split_policy``,
  ``splits.split_indices``), or 'phantom' for the synthetic phantoms' fixed index ranges."""
  return "phantom" if data_config.name == "synthetic" else splits.split_policy(data_config)


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


def make_heatmap_fn(method, model, mesh: Mesh, kind: str, classes: tuple[int, ...]) -> Callable:
  """jit((variables, batch) -> heat maps [N,C,h,w] of ``classes``), sharded over 'data'.

  kind: one of ``cam.KINDS`` (from ``method.cam_target``), or 'predict': the
  method's own ``predict(...)['heatmaps']`` (the baseline's Zhou CAM).
  """
  if kind not in cam.KINDS + ("predict",):
    raise ValueError(f"unknown config.cam {kind!r}; known: {list(cam.KINDS + ('predict',))}")
  data = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())
  class_array = np.asarray(classes, np.int32)

  def heatmaps(variables, batch):
    if kind == "predict":
      maps = method.predict(model, variables, batch)["heatmaps"]  # [N,h,w,K]
      return jnp.moveaxis(maps.astype(jnp.float32), -1, 1)[:, class_array]
    features_fn, head_fn = method.cam_target(model, variables)
    return cam.class_heatmaps(kind, features_fn, head_fn, batch["image"], classes=class_array)

  return jax.jit(heatmaps, in_shardings=(replicated, data), out_shardings=data)


class BoxLocalizer:
  """Scores the batches that carry boxes (``localization.box_scores``) and keeps a few overlays.

  ``dispatch`` starts the heat map computation of a batch (or returns None
  when the batch has no box); ``collect`` receives its host copy with the
  batch's host entries; ``result`` is the eval JSON's 'localization' entry.
  """

  def __init__(self, heatmap_fn: Callable, classes: tuple[int, ...], class_names, *, kind: str,
               threshold: float, mode: str, largest_only: bool, num_overlays: int = 8):
    self.heatmap_fn, self.classes, self.class_names = heatmap_fn, classes, tuple(class_names)
    self.kind, self.threshold, self.mode, self.largest_only = kind, threshold, mode, largest_only
    self.num_overlays = num_overlays
    self.scores: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    self.overlays: dict[str, list] = {"images": [], "heatmaps": [], "gt": [], "pred": [],
                                      "titles": []}

  def dispatch(self, variables, batch: Mapping[str, Any]):
    if "box_labels" not in batch or "boxes" not in batch:
      return None
    if not _any_box(batch["box_labels"]):
      return None
    wants_images = len(self.overlays["images"]) < self.num_overlays
    return {"maps": self.heatmap_fn(variables, _device_part(batch)),
            **({"image": batch["image"]} if wants_images else {})}

  def collect(self, outputs: Mapping[str, np.ndarray], host: Mapping[str, Any],
              image_size: tuple[int, int]) -> None:
    maps = np.asarray(outputs["maps"])
    labels, boxes = np.asarray(host["box_labels"]), np.asarray(host["boxes"])
    valid = np.asarray(host.get("valid", np.ones(len(labels))), bool)
    channel_of = {k: c for c, k in enumerate(self.classes)}
    for row in np.nonzero(valid & np.any(labels >= 0, axis=1))[0]:
      present = [k for k in dict.fromkeys(labels[row][labels[row] >= 0].tolist()) if k in channel_of]
      if not present:
        continue
      full = localization.resize_normalized(maps[row, [channel_of[k] for k in present]], image_size)
      self.scores.append(localization.box_scores(
          full[None], boxes[row][None], labels[row][None], self.threshold, self.mode,
          self.largest_only, channel_classes=present))
      if "image" in outputs and len(self.overlays["images"]) < self.num_overlays:
        first = labels[row] == present[0]
        self.overlays["images"].append(np.asarray(outputs["image"][row]))
        self.overlays["heatmaps"].append(full[0])
        self.overlays["gt"].append(boxes[row][first])
        self.overlays["pred"].append(localization.heatmap_to_boxes(
            full[0], self.threshold, self.mode, self.largest_only))
        self.overlays["titles"].append(f"#{host['index'][row] if 'index' in host else row} "
                                       f"{self.class_names[present[0]]}")

  def result(self) -> dict:
    """{} without boxes; else the protocol and, in the eval JSON's metric form, the box
    accuracies 'iou@T' / 'ior@T' (IoU > T, T = 0.1/0.3/0.5/0.7; {mean, per_class, n}: n the
    boxes per class) and 'mean_iou' per class (Talasila 2023 reports the average IoU)."""
    if not self.scores:
      return {}
    cls, ious, iors = (np.concatenate(parts) for parts in zip(*self.scores))
    if not len(cls):
      return {}
    per_class = {self.class_names[k]: float(ious[cls == k].mean()) for k in np.unique(cls)}
    count = localization.counts(cls, self.class_names)
    thresholds = (0.1, 0.3, 0.5, 0.7)
    tables = {kind: localization.accuracy_table(cls, scores, thresholds, self.class_names, True)
              for kind, scores in (("iou", ious), ("ior", iors))}
    return {"protocol": "boxes from connected components of the binarized heat map; "
                        "a GT box is correct if its best-IoU predicted box has IoU > T",
            "cam": self.kind, "binarize_threshold": self.threshold, "binarize_mode": self.mode,
            "largest_only": self.largest_only,
            **localization.accuracy_metrics(tables, count),
            "mean_iou": {"mean": float(np.mean(list(per_class.values()))),
                         "per_class": per_class, "n": count}}

  def write_overlays(self, path: str, title: str | None = None) -> str | None:
    """The collected overlays as a PNG (``report.write_overlays``) under ``title`` (default:
    the CAM kind); the legend names the binarization that read the green boxes off the map."""
    if not self.overlays["images"]:
      return None
    o = self.overlays
    mode = "" if self.mode == "absolute" else f" {self.mode}"
    return report.write_overlays(
        np.stack(o["images"]), np.stack(o["heatmaps"]), o["gt"], o["pred"], path,
        titles=o["titles"], title=title or f"{self.kind} maps",
        pred_label=f"{report.PRED_LABEL} (threshold {self.threshold:.2f}{mode})")


def box_localizer(method, model, config, mesh: Mesh) -> BoxLocalizer | None:
  """The ``BoxLocalizer`` ``config`` asks for, or None (config.cam = 'none', no boxed class in
  the label space, or a method without ``cam_target`` for a gradient / score CAM).

  Config fields: cam ('gradcam', 'gradcam++', 'scorecam', 'predict', 'none'),
  cam_threshold (127/255: Talasila 2023), cam_threshold_mode ('absolute', on the min-max
  normalized map; or 'fraction_of_max'), cam_largest_only (False: every component).
  """
  kind = config.cam
  label_space = schema.get_label_space(config.data.label_space)
  classes = tuple(label_space.boxed_indices)
  if kind == "none" or not classes or (kind != "predict" and not hasattr(method, "cam_target")):
    return None
  key = (id(method), id(model), mesh, kind, classes)
  if key not in _HEATMAP_FNS:
    _HEATMAP_FNS[key] = (method, model, make_heatmap_fn(method, model, mesh, kind, classes))
  return BoxLocalizer(_HEATMAP_FNS[key][2], classes, label_space.classes, kind=kind,
                      threshold=float(config.cam_threshold), mode=config.cam_threshold_mode,
                      largest_only=bool(config.cam_largest_only))


_HEATMAP_FNS: dict[tuple, tuple[Any, Any, Callable]] = {}


def _any_box(box_labels) -> bool:
  """Whether any row of the batch has a box; the same answer on every process (the heat map
  jit is a collective). Reads input data only, so it never waits on device compute."""
  if isinstance(box_labels, jax.Array) and not box_labels.is_fully_addressable:
    local = any(np.any(np.asarray(shard.data) >= 0) for shard in box_labels.addressable_shards)
    return bool(np.any(multihost_utils.process_allgather(np.asarray(local))))
  return bool(np.any(np.asarray(box_labels) >= 0))


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
                  keep_heatmaps: bool = False,
                  localizer: BoxLocalizer | None = None) -> dict[str, np.ndarray]:
  """Runs ``predict_fn`` over ``batches`` and keeps the valid rows, in order.

  batches: dicts with 'image' [N,...], 'labels' [N,K], 'label_mask' [N,K],
    optionally 'valid' [N] (0 = padding row; absent = all valid) and
    'index' [N] (example index; absent = running row number).
  Returns numpy 'probs' [M,K] float32, 'labels' [M,K], 'label_mask' [M,K],
  'index' [M] over the M valid rows, and 'heatmaps' [M,h,w,K] when
  ``keep_heatmaps`` and the method returns them. A ``localizer`` also scores
  the batches that carry boxes (fetched with the same ``device_get``).
  """
  parts: dict[str, list[np.ndarray]] = {}
  seen = 0

  def collect(host, image_size):
    nonlocal seen
    outputs, batch_host, located = host
    if located is not None:
      localizer.collect(located, batch_host, image_size)
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
    located = localizer.dispatch(variables, batch) if localizer is not None else None
    host_keys = HOST_KEYS + (("boxes", "box_labels") if located is not None else ())
    # Only arrays go through _fetch (a multi-process allgather); the image size stays a tuple.
    current = ((wanted, {k: batch[k] for k in host_keys if k in batch}, located),
               tuple(batch["image"].shape[1:3]))
    if pending is not None:
      collect(_fetch(pending[0]), pending[1])
    pending = current
  if pending is None:
    raise ValueError("predict_split: the batch iterator yielded no batch")
  collect(_fetch(pending[0]), pending[1])
  return {k: np.concatenate(v) for k, v in parts.items()}


def predict_on(method, model, variables, config, split: str, *, mesh: Mesh,
               make_iterator: Callable | None = None, keep_heatmaps: bool = False,
               localizer: BoxLocalizer | None = None) -> dict:
  """``predict_split`` over ``split`` of ``config.data`` (unshuffled, unaugmented, one epoch)."""
  predict_fn = cached_predict_fn(method, model, mesh)
  variables = jax.device_put(variables, NamedSharding(mesh, P()))
  with evaluators.eval_batches(config, split, mesh=mesh, make_iterator=make_iterator) as batches:
    return predict_split(predict_fn, variables, batches, keep_heatmaps=keep_heatmaps,
                         localizer=localizer)


def _classification(out: dict, run: Callable[[str], dict], split: str, config,
                    thresholds, *, who: str) -> dict:
  """classification_report of ``out``; F1 thresholds chosen on 'val' (``run('val')``) unless given."""
  class_names = schema.get_label_space(config.data.label_space).classes
  if out["probs"].shape[1] != len(class_names):
    raise ValueError(f"{who} predicts {out['probs'].shape[1]} classes; label space "
                     f"{config.data.label_space!r} (config.data.label_space) has "
                     f"{len(class_names)}")
  source = "given"
  if thresholds is None:
    val = out if split == "val" else run("val")
    thresholds = metrics.best_f1_thresholds(val["probs"], val["labels"], val["label_mask"])
    source = "val"
  return metrics.classification_report(out["probs"], out["labels"], out["label_mask"],
                                       class_names, thresholds, threshold_source=source)


def evaluate(method, model, variables, config, split: str, workdir: str | None, *,
             stage: str, mesh: Mesh, make_iterator: Callable | None = None,
             thresholds=None, write_curves: bool = False) -> dict:
  """Predicts ``split``, computes every classification metric, writes the eval JSON.

  F1 thresholds: given ``thresholds`` [K] are used as they are; otherwise they
  are chosen to maximize F1 on the 'val' split (predicted here too when
  ``split`` is not 'val'; for 'val' itself they are chosen on val), and the
  JSON says so in classification.f1.threshold_source.
  Localization ('localization' entry, ``box_localizer``): on the rows of
  ``split`` that carry boxes, with config.cam heat maps; {} when none do.
  Writes WORKDIR/eval/<split>.json (process 0, atomically) when ``workdir`` is
  given, and ROC / PR curves and CAM overlays (cam_<split>.png) under
  WORKDIR/report/ when ``write_curves``.
  Returns the JSON payload.
  """
  class_names = schema.get_label_space(config.data.label_space).classes
  def run(s, localizer=None):
    return predict_on(method, model, variables, config, s, mesh=mesh, make_iterator=make_iterator,
                      localizer=localizer)

  localizer = box_localizer(method, model, config, mesh)
  out = run(split, localizer)
  classification = _classification(out, run, split, config, thresholds,
                                   who=f"method {method.name!r}")
  payload = {
      "method": method.name,
      "dataset": config.data.name,
      "split_policy": split_policy_used(config.data),
      "stage": stage,
      "split": split,
      "num_examples": int(len(out["probs"])),
      "auroc_mean": classification["auroc"]["mean"],
      "classification": classification,
      "localization": localizer.result() if localizer is not None else {},
  }
  if workdir is not None and jax.process_index() == 0:
    files.update_json_atomic(os.path.join(workdir, "eval", f"{split}.json"), payload)
    if write_curves:
      report.write_curves(out["probs"], out["labels"], out["label_mask"], class_names,
                          os.path.join(workdir, "report"), split, title=method.name)
      if localizer is not None:
        localizer.write_overlays(os.path.join(workdir, "report", f"cam_{split}.png"),
                                 title=f"{method.name}: {localizer.kind} maps of the first boxed "
                                       f"class, {split}")
  return payload


class ClassificationEval:
  """``config.evals.<name> = dict(type='classification', splits=('val', 'test'))``: ``evaluate``
  on each split with the final stage's name, writing WORKDIR/eval/<split>.json (header,
  'classification', 'localization') and the ROC / PR curves and CAM overlays under
  WORKDIR/report/ (``write_curves``)."""
  writes_itself = True
  # What its splits must hold (``cxr_jax.train.preflight``): positives of the classes (AUROC,
  # AUPRC, F1); boxes are optional (CAM localization, where ``config.cam`` is not 'none').
  needs = ("positives",)
  optional = staticmethod(lambda config: ("boxes",) if config.cam != "none" else ())

  def __init__(self, ctx, name: str, *, splits: Sequence[str] = ("val", "test"),
               write_curves: bool = True):
    self.ctx, self.name, self.splits, self.write_curves = ctx, name, tuple(splits), write_curves
    # On data of its own (config.evals.<name>.data) it writes no header, file or curves: its
    # payload is the section <name> of WORKDIR/eval/<split>.json, beside the run's own header.
    self.writes_itself = not getattr(ctx, "data_overrides", None)

  def run(self, variables, *, stage: str) -> dict[str, dict]:
    c = self.ctx
    workdir = c.workdir if self.writes_itself else None
    return {split: c.evaluate(c.method, c.model, variables, c.config, split, workdir,
                              stage=stage, mesh=c.mesh, make_iterator=c.make_iterator,
                              write_curves=self.write_curves)
            for split in self.splits}


def average_predictions(outputs: Sequence[Mapping[str, np.ndarray]],
                        names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
  """Score averaging of an ensemble (Ge 2018, Table 1's 'R18 + D121' rows).

  outputs: ``predict_split`` results of the members on one split, each with
    'probs' [M,K], 'labels' [M,K], 'label_mask' [M,K], 'index' [M].
  Rows are matched by 'index' and put in the first member's order; every
  member must cover exactly the same examples with the same labels (else a
  ValueError names the member, by ``names`` when given).
  Returns the first member's 'labels', 'label_mask', 'index' and 'probs' =
  the mean of the members' probs [M,K] (float32, averaged in float64).
  """
  if not outputs:
    raise ValueError("average_predictions: an ensemble needs at least one member")
  names = list(names) if names is not None else [f"member {i}" for i in range(len(outputs))]
  first = outputs[0]
  index = np.asarray(first["index"])
  if len(np.unique(index)) != len(index):
    raise ValueError(f"{names[0]}: its predictions repeat an example index")
  total = np.zeros(np.shape(first["probs"]), np.float64)
  for name, out in zip(names, outputs):
    other = np.asarray(out["index"])
    if len(other) != len(index) or not np.array_equal(np.sort(other), np.sort(index)):
      missing = np.setdiff1d(index, other)[:5].tolist()
      extra = np.setdiff1d(other, index)[:5].tolist()
      raise ValueError(f"{name}: predicts {len(other)} examples, {names[0]} {len(index)}; example "
                       f"indices only in {names[0]}: {missing}, only in {name}: {extra} "
                       f"(members must be evaluated on the same split of the same data)")
    order = np.argsort(other)[np.argsort(np.argsort(index))]  # other[order] == index
    for key in ("labels", "label_mask"):
      if not np.array_equal(np.asarray(out[key])[order], np.asarray(first[key])):
        raise ValueError(f"{name}: its '{key}' differ from {names[0]}'s on the same examples "
                         f"(members must be evaluated on the same data and label space)")
    if np.shape(out["probs"]) != total.shape:
      raise ValueError(f"{name}: probs of shape {np.shape(out['probs'])}, {names[0]}'s "
                       f"{total.shape}")
    total += np.asarray(out["probs"], np.float64)[order]
  return {"probs": (total / len(outputs)).astype(np.float32), "labels": first["labels"],
          "label_mask": first["label_mask"], "index": index}


def evaluate_ensemble(members: Sequence[tuple], split: str, path: str | None, *, mesh: Mesh,
                      names: Sequence[str] | None = None, make_iterator: Callable | None = None,
                      thresholds=None) -> dict:
  """``evaluate``'s classification report for the mean of several runs' probabilities.

  members: (method, model, variables, config) per run; each predicts with its
    own config (its data preprocessing), all on one label space.
  F1 thresholds as in ``evaluate``: given, or chosen on the ensemble's 'val'
  predictions. Writes the JSON to ``path`` (process 0, atomically) when given;
  it has no 'localization' (heat maps are not averaged): {}.
  Returns {'method': 'ensemble', 'members': [{'name', 'method'}], 'dataset',
  'split', 'num_examples', 'auroc_mean', 'classification', 'localization'}.
  """
  if not members:
    raise ValueError("evaluate_ensemble: no member")
  names = list(names) if names is not None else [f"member {i}" for i in range(len(members))]
  config = members[0][3]
  for name, (_, _, _, member_config) in zip(names, members):
    if member_config.data.label_space != config.data.label_space:
      raise ValueError(f"{name}: config.data.label_space {member_config.data.label_space!r}, "
                       f"{names[0]}'s {config.data.label_space!r}")

  def run(s):
    return average_predictions(
        [predict_on(method, model, variables, member_config, s, mesh=mesh,
                    make_iterator=make_iterator)
         for method, model, variables, member_config in members], names)

  out = run(split)
  classification = _classification(out, run, split, config, thresholds, who="the members")
  payload = {
      "method": "ensemble",
      "members": [{"name": name, "method": method.name}
                  for name, (method, *_) in zip(names, members)],
      "dataset": config.data.name,
      "split": split,
      "num_examples": int(len(out["probs"])),
      "auroc_mean": classification["auroc"]["mean"],
      "classification": classification,
      "localization": {},
  }
  if path is not None and jax.process_index() == 0:
    files.write_json_atomic(path, payload)
  return payload
