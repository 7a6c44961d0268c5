"""Per-example reading and mapping of the input pipeline (runs in grain workers).

``CheckedSource`` reads a process's part of a split source (decodes, validates),
``Preprocess`` turns each example into a numeric record (augmentation or a
plain resize, annotations, the requested maps, extra views), and
``padding_record`` is the record of a padding row. Record (per example):

  image       uint8 [H, W];  view0, view1, ...  uint8 [H, W]  (if requested)
  labels      float32 [K];  label_mask float32 [K]
  boxes       float32 [MAX_BOXES, 4];  box_labels int32 [MAX_BOXES]
  gaze        float32 [MAX_FIXATIONS, 3]
  has_boxes   float32 [];  index int32 [];  valid float32 []
  gaze_map    float32 [H, W, 1]  (if requested)  annotations.gaze_heatmap
  box_map     float32 [H, W, 1]  (if requested)  annotations.boxes_to_soft_mask
  box_grid    float32 [P, P, K]  (if requested)  annotations.boxes_to_patch_grid
"""

from __future__ import annotations

import types
from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging
import cv2
import grain.python as gp
import numpy as np

from cxr_jax.data import annotations, augment as augment_lib, schema

MAPS = ("gaze_map", "box_map", "box_grid")
NUMERIC_KEYS = ("labels", "label_mask", "boxes", "box_labels", "gaze")


class CheckedSource:
  """Reads ``source[start:stop]``: decodes PNG/JPEG bytes, validates; errors name source and index.

  Adds ``index`` (into ``source``) and a default ``has_boxes`` of 1. With
  ``skip_bad`` a bad example becomes ``{'error': message}``, which ``Preprocess``
  turns into a padding row.
  """

  def __init__(self, source: Any, start: int, stop: int, num_classes: int, skip_bad: bool):
    self.source = source
    self.start, self.stop = start, stop
    self.num_classes = num_classes
    self.skip_bad = skip_bad

  def __len__(self) -> int:
    return self.stop - self.start

  def __repr__(self) -> str:
    return f"{self.source!r} [{self.start}:{self.stop}]"

  def _read(self, index: int, origin: str) -> schema.Example:
    try:
      example = dict(self.source[index])
    except Exception as e:  # pylint: disable=broad-except
      raise schema.ExampleError(f"{origin}: could not read: {type(e).__name__}: {e}") from e
    if isinstance(example.get("image"), (bytes, np.bytes_)):
      image = cv2.imdecode(np.frombuffer(example["image"], np.uint8), cv2.IMREAD_GRAYSCALE)
      if image is None:
        raise schema.ExampleError(f"{origin}: unreadable image ({len(example['image'])} bytes "
                                  "that are not a PNG/JPEG)")
      example["image"] = image
    schema.validate_example(example, self.num_classes, origin=origin)
    return example

  def __getitem__(self, local_index: int) -> schema.Example:
    index = self.start + local_index
    origin = f"{self.source!r} index {index}"
    try:
      example = self._read(index, origin)
    except schema.ExampleError as e:
      if self.skip_bad:
        return {"error": str(e)}
      raise
    example["index"] = np.int32(index)
    example.setdefault("has_boxes", np.float32(1))
    return example



class Preprocess(gp.RandomMapTransform):
  """Example -> numeric record: augmented (or resized) uint8 image, annotations, maps, valid.

  A skipped bad example (``{'error': message}``) is logged and becomes ``padding``.
  """

  def __init__(self, data_config: Any, maps: Sequence[str], aug: Any | None,
               views: Sequence[Mapping[str, Any]], padding: dict):
    self.image_size = data_config.image_size
    self.maps = tuple(maps)
    self.grid = data_config.grid_size
    self.gaze_sigma = data_config.gaze_sigma_per_second
    self.box_sigma = data_config.box_sigma
    self.num_classes = len(schema.get_label_space(data_config.label_space))
    # A plain namespace: cheap to pickle into the worker processes.
    self.aug = None if aug is None else types.SimpleNamespace(**aug.to_dict())
    self.views = tuple(types.SimpleNamespace(**view) for view in views)
    self.padding = padding

  def random_map(self, example: dict, rng: np.random.Generator) -> dict:
    if "error" in example:
      logging.warning("skipping bad example: %s", example["error"])
      return self.padding
    original = example
    if self.aug is None:
      example = augment_lib.eval_transform(example, self.image_size)
    else:
      example = augment_lib.train_transform(example, rng, self.aug, self.image_size)
    size = self.image_size
    out = {key: example[key] for key in NUMERIC_KEYS}
    out["image"] = example["image"]
    for i, view in enumerate(self.views):
      out[f"view{i}"] = augment_lib.train_transform(original, rng, view, size)["image"]
    out["has_boxes"] = np.float32(example["has_boxes"])
    out["index"] = np.int32(example["index"])
    out["valid"] = np.float32(1)
    if "gaze_map" in self.maps:
      out["gaze_map"] = annotations.gaze_heatmap(example["gaze"], size, size,
                                                 self.gaze_sigma)[..., None]
    if "box_map" in self.maps:
      out["box_map"] = annotations.boxes_to_soft_mask(example["boxes"], example["box_labels"],
                                                      size, size, self.box_sigma)[..., None]
    if "box_grid" in self.maps:
      out["box_grid"] = annotations.boxes_to_patch_grid(example["boxes"], example["box_labels"],
                                                        self.grid, self.num_classes)
    return out



def padding_record(data_config: Any, maps: Sequence[str], num_views: int = 0) -> dict:
  """The record of a padding row: zeros, box_labels -1, index -1, valid 0."""
  size, grid = data_config.image_size, data_config.grid_size
  num_classes = len(schema.get_label_space(data_config.label_space))
  boxes, box_labels = schema.empty_boxes()
  record = {"labels": np.zeros(num_classes, np.float32),
            "label_mask": np.zeros(num_classes, np.float32),
            "boxes": boxes, "box_labels": box_labels, "gaze": schema.empty_gaze(),
            "image": np.zeros((size, size), np.uint8), "has_boxes": np.float32(0),
            "index": np.int32(-1), "valid": np.float32(0)}
  shapes = {"gaze_map": (size, size, 1), "box_map": (size, size, 1),
            "box_grid": (grid, grid, num_classes)}
  record.update({name: np.zeros(shapes[name], np.float32) for name in maps})
  record.update({f"view{i}": record["image"] for i in range(num_views)})
  return record
