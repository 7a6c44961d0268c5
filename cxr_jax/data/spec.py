"""What a training stage reads from the data: ``DataSpec``.

Declared by methods in their stages, read by the trainer and
``cxr_jax.data.pipeline.make_iterator``; it names splits, maps and views, never a model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

# Annotations a stage can need (``DataSpec.needs``), and the one each annotation map is drawn from.
NEEDS = ("boxes", "gaze")
MAP_NEEDS = {"box_map": "boxes", "box_grid": "boxes", "gaze_map": "gaze"}


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """What a stage reads.

  split: a split name the dataset provides ('train', 'val', 'test',
    'annotated_train', 'annotated_val', ...).
  maps: annotation maps rendered on the host into the batch as [N,H,W,1]
    float32 in [0,1] ('gaze_map', 'box_map') or [N,P,P,K] ('box_grid').
  augment: apply the config's training augmentations.
  views: extra independently augmented copies of each image, batch keys
    'view0', 'view1', ...: each a dict of augmentation fields merged over
    ``config.data.augment`` (e.g. BYOL's asymmetric views).
  overrides: '.'-paths into ``config.data`` replaced for this stage's data
    (e.g. ``{'synthetic.seed': 1}``: pretraining on another dataset);
    evaluation always reads ``config.data``.
  needs: annotations the stage's loss cannot do without, of ``NEEDS`` ('boxes',
    'gaze'): its split must hold some (``cxr_jax.train.preflight`` checks it before
    training). The maps imply theirs ('box_map', 'box_grid': boxes; 'gaze_map':
    gaze); a loss that reads boxes or gaze without a map (e.g. BYOL's CAM loss)
    says so here.
  """
  split: str = "train"
  maps: tuple[str, ...] = ()
  augment: bool = True
  views: tuple[Mapping[str, Any], ...] = ()
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  needs: tuple[str, ...] = ()

  def __post_init__(self):
    unknown = sorted(set(self.needs) - set(NEEDS))
    if unknown:
      raise ValueError(f"DataSpec.needs {unknown}; known: {list(NEEDS)}")

  def required(self) -> tuple[str, ...]:
    """``needs`` and the annotations its ``maps`` are rendered from, in ``NEEDS`` order."""
    implied = {MAP_NEEDS[m] for m in self.maps if m in MAP_NEEDS}
    return tuple(n for n in NEEDS if n in implied or n in self.needs)
