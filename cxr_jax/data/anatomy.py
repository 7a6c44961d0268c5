"""What the data layer knows of a dataset's anatomy and geometry, for the methods.

Both functions answer None for a dataset without such knowledge (every real
dataset), so that a method asks the data instead of testing ``data.name``:

  anatomy_regions  boolean region masks of a typical image (synthetic phantoms:
                   the mid-range anatomy in the canonical pose)
  true_poses       the ground-truth pose of given images of a split (synthetic
                   phantoms: the pose each was rendered in)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cxr_jax.data.sources import synthetic


def anatomy_regions(data_config: Any, side: int) -> dict[str, np.ndarray] | None:
  """bool [side, side] anatomical regions of ``data_config``'s dataset, or None.

  Synthetic phantoms: ``synthetic.anatomy_regions(side)``, i.e.
  'lung_image_left', 'lung_image_right', 'heart', 'below_heart'.
  """
  if data_config.name != "synthetic":
    return None
  return synthetic.anatomy_regions(side)


def true_poses(data_config: Any, split: str, indices: np.ndarray
               ) -> dict[str, np.ndarray] | None:
  """The ground-truth poses of images ``indices`` of ``split``, or None.

  Args:
    data_config: ``config.data``.
    split: a split name of ``pipeline.make_source``.
    indices: int [N] indices into that split's source (a batch's 'index').
  Returns:
    Synthetic phantoms (``synthetic.sample_pose``, canonical patient frame ->
    image frame, [-1, 1]^2 y down): 'matrix' float64 [N, 2, 3] (X = s R p + t),
    'angle' float64 [N] (radians), 'scale' float64 [N], 'shift' float64 [N, 2].
    None for other datasets.
  """
  if data_config.name != "synthetic":
    return None
  source = synthetic.split_source(data_config, split)
  poses = [source.source.pose(int(source.indices[i])) for i in np.asarray(indices).reshape(-1)]
  return {"matrix": np.array([p.matrix() for p in poses]).reshape(-1, 2, 3),
          "angle": np.array([p.angle for p in poses], np.float64),
          "scale": np.array([p.scale for p in poses], np.float64),
          "shift": np.array([p.shift for p in poses], np.float64).reshape(-1, 2)}
