"""van Sonsbeek 2023 Eq. 5: the Grad-CAM shift between VKD's two stages.

``config.evals.<name> = dict(type='vkd_cam_shift', splits=('test',), max_images=1024,
relu=False)``: on each split of the stage-2 dataset (``stage2_data_config``), the
first ``max_images`` images with a positive label and a non-empty annotation
map c (``config.vkd.annotation``), in split order; per image CAM(x) =
``positive_class_cams`` of the best state of stage 1 ('base') and of stage 2
('prior') (``EvalContext.stage_variables``). The section (eval/<split>.json under
the eval's name):

  {'protocol', 'annotation', 'release', 'num_images',
   'delta_mse', 'delta_dice': {'mean': Delta S (``localization.delta_s``: positive
       when the stage-2 CAMs are closer to c, the paper's Table 2 sign),
       'ci95': [low, high] (95 % paired bootstrap over the images), 'n'},
   'similarity': {stage: {'mse', 'dice'}},
   'classification': {stage: {'auroc_mean', 'f1_mean'}} (``EvalContext.evaluate`` of
       each stage's state on the split of ``config.data``)}

and, when the context writes, the before / after overlays (the paper's Fig. 3)
WORKDIR/report/vkd_cam_{annotation,base,prior}_<split>.png.

The annotation kinds (``ANNOTATIONS``), their map c (``annotation_map``) and the
stage-2 data (``stage2_overrides``) live here because both the method (its
stage-2 loss and data) and this evaluator read them.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from cxr_jax import cam
from cxr_jax.data import pipeline
from cxr_jax.evaluation import evaluators, localization, report

# Table 1 annotation kinds -> the pipeline maps stage 2 reads. With both, c is
# their pixelwise maximum (the union of the two pseudo-segmentations, in [0,1]).
ANNOTATIONS = {
    "gaze": ("gaze_map",),
    "boxes": ("box_map",),
    "gaze+boxes": ("gaze_map", "box_map"),
}
STAGES = ("base", "prior")
METRICS = ("mse", "dice")


def annotation_map(batch, maps: tuple[str, ...]) -> jax.Array:
  """c [N,H,W,1] in [0,1]: the requested map, or the pixelwise max of several."""
  missing = [m for m in maps if m not in batch]
  if missing:
    raise KeyError(f"batch lacks annotation maps {missing} (stage DataSpec.maps); has {sorted(batch)}")
  return functools.reduce(jnp.maximum, [batch[m].astype(jnp.float32) for m in maps])


def stage2_overrides(config: ml_collections.ConfigDict) -> dict[str, str]:
  """``DataSpec.overrides`` of stage 2: the dataset of its annotated subset."""
  dataset = config.vkd.stage2.dataset
  return {"name": dataset} if dataset and dataset != config.data.name else {}


def stage2_data_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config.data`` of the stage-2 dataset (where the annotation maps are)."""
  overrides = stage2_overrides(config)
  if not overrides:
    return config.data
  data = config.data.copy_and_resolve_references()
  with data.unlocked():
    data.update(overrides)
  return data


def positive_class_cams(features_fn, head_fn, images: jax.Array, labels: jax.Array,
                        relu: bool = True) -> jax.Array:
  """CAM(x) [N,H,W] in [0,1]: per image, the pixelwise max over its positive classes
  of the Grad-CAM maps (each upsampled to the image and min-max normalized);
  0 everywhere for an image without a positive label.

  relu=False keeps Grad-CAM's signed map before normalizing: on a coarse
  feature map (2 x 2 at 64 px) a class whose evidence is net negative over the
  whole image otherwise gets an all-zero map.
  """
  maps = cam.grad_cam(head_fn, features_fn(images), relu=relu)
  maps = cam.normalize(cam.upsample(maps, images.shape[1:3]))
  return jnp.max(maps * (labels > 0).astype(maps.dtype)[:, :, None, None], axis=1)


def collect_cams(method, model, stage_variables: dict, config: ml_collections.ConfigDict,
                 split: str, *, max_images: int, relu: bool, mesh: Mesh,
                 make_iterator: Callable | None = None) -> dict[str, np.ndarray]:
  """Grad-CAMs of each stage's variables on the annotated images of ``split`` of the
  stage-2 dataset (``stage2_data_config``).

  An image counts as annotated when its annotation map (``config.vkd.annotation``)
  is not all zero and it has a positive label; the first ``max_images`` such
  images, in split order, are kept.
  Returns numpy 'annotation' [M,H,W], 'index' [M], 'labels' [M,K], 'image' [M,H,W]
  (first channel), 'boxes' [M,B,4], 'box_labels' [M,B] and one [M,H,W] CAM per
  stage name of ``stage_variables``.
  """
  maps = ANNOTATIONS[config.vkd.annotation]

  @jax.jit
  def cams_fn(variables, images, labels):
    return positive_class_cams(*method.cam_target(model, variables), images, labels, relu=relu)

  size, channels = config.data.image_size, config.data.channels
  some_variables = next(iter(stage_variables.values()))
  feature_shape = jax.eval_shape(method.cam_target(model, some_variables)[0],
                                 jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)).shape
  if feature_shape[1] * feature_shape[2] < 2:
    raise ValueError(f"config.data.image_size={size} gives a {feature_shape[1]}x{feature_shape[2]} "
                     f"feature map: its Grad-CAM is constant over the image; use larger images")
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  stage_variables = {k: jax.device_put(v, replicated) for k, v in stage_variables.items()}

  def to_host(batch):
    c = annotation_map(batch, maps)[..., 0]
    outs = {name: cams_fn(v, batch["image"], batch["labels"]) for name, v in stage_variables.items()}
    return jax.device_get({"annotation": c, "index": batch["index"], "labels": batch["labels"],
                           "image": batch["image"][..., 0], "boxes": batch["boxes"],
                           "box_labels": batch["box_labels"], "valid": batch["valid"], **outs})

  with evaluators.eval_batches(config, split, mesh=mesh, make_iterator=make_iterator,
                               data=stage2_data_config(config), maps=maps) as batches:
    rows = pipeline.first_rows(
        batches, to_host,
        lambda host: (host["annotation"].max(axis=(1, 2)) > 0) & (host["labels"].max(axis=1) > 0),
        max_images)
  if not rows:
    raise ValueError(f"split {split!r} has no image with a positive label and a non-empty "
                     f"{config.vkd.annotation!r} map")
  return rows


OVERLAY_TITLES = {"annotation": "annotation map c", "base": "stage-1 ('base') Grad-CAM",
                  "prior": "stage-2 ('prior') Grad-CAM"}


def write_cam_overlays(cams: dict, out_dir: str, suffix: str = "", num: int = 16,
                       what: str = "") -> list[str]:
  """PNG grids of the first ``num`` images, OUT_DIR/vkd_cam_<map><suffix>.png: the
  annotation map c, then the CAMs after stage 1 and stage 2, each with the image's
  ground-truth boxes (red); each figure titled with its map and ``what`` (e.g. the
  annotation kind and split), with a colour bar."""
  n = min(num, len(cams["index"]))
  boxes = [b[l >= 0] for b, l in zip(cams["boxes"][:n], cams["box_labels"][:n])]
  titles = [f"#{i}" for i in cams["index"][:n]]
  suffix_text = f", {what}" if what else ""
  return [report.write_overlays(
      cams["image"][:n, ..., None], cams[name][:n], boxes, [np.zeros((0, 4))] * n,
      os.path.join(out_dir, f"vkd_cam_{name}{suffix}.png"), titles,
      title=f"VKD: {OVERLAY_TITLES[name]}{suffix_text}", pred_label=None,
      heat_label="annotation map c" if name == "annotation" else
                 "Grad-CAM, max over positive classes (min-max normalized)")
          for name in ("annotation",) + STAGES]


def cam_shift(cams: dict) -> dict:
  """Eq. 5 of ``collect_cams`` output: {'delta_mse', 'delta_dice': {'mean', 'ci95', 'n'},
  'similarity': {stage: {'mse', 'dice'}}}."""
  base, prior, c = cams["base"], cams["prior"], cams["annotation"]
  out = {f"delta_{metric}": {
      "mean": localization.delta_s(base, prior, c, metric=metric),
      "ci95": list(localization.delta_s_interval(base, prior, c, metric=metric)),
      "n": int(len(cams["index"]))} for metric in METRICS}
  out["similarity"] = {stage: {metric: localization.similarity(c, cams[stage], metric)
                               for metric in METRICS} for stage in STAGES}
  return out


class CamShiftEval:
  """``dict(type='vkd_cam_shift', splits=('test',), max_images=..., relu=...)``: the module
  docstring's section per split, from the best states of stages 'base' and 'prior'."""
  # What its splits of the stage-2 dataset (``data``) must hold (cxr_jax.train.preflight):
  # positives, and what c of config.vkd.annotation is drawn from ('gaze', 'boxes').
  needs = staticmethod(lambda config: ("positives",) + tuple(
      kind for kind in ("boxes", "gaze") if kind in config.vkd.annotation.split("+")))
  data = staticmethod(stage2_data_config)

  def __init__(self, ctx, name: str, *, splits: Sequence[str] = ("test",),
               max_images: int = 1024, relu: bool = False):
    if ctx.config.vkd.annotation not in ANNOTATIONS:
      raise ValueError(f"unknown config.vkd.annotation {ctx.config.vkd.annotation!r}; "
                       f"known: {list(ANNOTATIONS)}")
    self.ctx, self.name, self.splits = ctx, name, tuple(splits)
    self.max_images, self.relu = int(max_images), bool(relu)

  def run(self, variables, *, stage: str) -> dict[str, dict]:
    del variables, stage
    c = self.ctx
    if c.stage_variables is None:
      raise ValueError(f"config.evals.{self.name}: the Grad-CAM shift needs the best states of "
                       f"stages {list(STAGES)} (EvalContext.stage_variables)")
    stage_variables = {s: c.stage_variables(s) for s in STAGES}
    sections = {}
    for split in self.splits:
      cams = collect_cams(c.method, c.model, stage_variables, c.config, split,
                          max_images=self.max_images, relu=self.relu, mesh=c.mesh,
                          make_iterator=c.make_iterator)
      classification = {}
      for s, v in stage_variables.items():
        payload = c.evaluate(c.method, c.model, v, c.config, split, None, stage=s, mesh=c.mesh,
                             make_iterator=c.make_iterator)
        classification[s] = {"auroc_mean": payload["classification"]["auroc"]["mean"],
                             "f1_mean": payload["classification"]["f1"]["mean"]}
      sections[split] = {
          "protocol": "vansonsbeek2023 Eq. 5: Delta S of the stage-1 ('base') and stage-2 "
                      "('prior') Grad-CAMs against the annotation map, as % change "
                      "(positive: stage 2 closer)",
          "annotation": c.config.vkd.annotation, "release": c.config.vkd.release,
          "num_images": int(len(cams["index"])), **cam_shift(cams),
          "classification": classification}
      if c.writes:
        write_cam_overlays(cams, c.path("report"), f"_{split}",
                           what=f"{c.config.vkd.annotation} annotation, {split}")
    return sections
