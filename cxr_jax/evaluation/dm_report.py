"""Kim 2022 reports: the alignment module (Fig. 4, pose residuals) and the disease masks (Fig. 3).

- ``AlignmentEval`` (``config.evals.<name> = dict(type='dm_alignment', splits=('val',),
  when='stage:align', pose_images=500)``): on the state the 'align' stage ends
  with, WORKDIR/report/alignment_<split>.png (the first 8 images of the split's
  first batch, original above aligned, the anchor on the right) and, where the
  data knows each image's true pose (``cxr_jax.data.anatomy.true_poses``: the
  phantoms), the section
  {'num_images', 'before', 'after'}: the residual pose (``alignment.residual_pose``)
  of the identity and of the aligner's transform over ``pose_images`` images.
- ``MasksEval`` (``dict(type='dm_masks', when='stage:dm_classify', splits=())``):
  the disease masks psi of the variables (params['psi'], set before 'dm_classify'
  and never trained) as WORKDIR/eval/disease_masks_<masks>.npz {'psi' [h,w,K],
  'class_names' [K]} and the panel WORKDIR/report/disease_masks_<masks>.png over
  the anchor image (params['anchor']); no section.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from cxr_jax import files
from cxr_jax.data import anatomy, schema
from cxr_jax.evaluation import report
from cxr_jax.models import alignment

NUM_EXAMPLES = 8
MASK_TITLES = {"dm": "disease masks (Eq. 3)", "pdm": "pseudo-disease masks"}
MASK_LABEL = "mask psi (0 = off, 1 = on)"


def _gray(image: np.ndarray) -> np.ndarray:
  """[H,W,C] -> [H,W] for display (channel mean)."""
  return np.asarray(image).mean(-1)


def mask_panel_figure(psi: np.ndarray, anchor: np.ndarray, class_names: Sequence[str],
                      title: str) -> Figure:
  """The figure of ``write_mask_panel`` (not written)."""
  k = psi.shape[-1]
  cols = min(k, 7)
  rows = -(-k // cols)
  fig = Figure(figsize=(2.2 * cols + 0.8, 2.4 * rows), dpi=100, layout="constrained")
  fig.suptitle(title)
  axes = fig.subplots(rows, cols, squeeze=False).ravel()
  size = anchor.shape[:2]
  for c, ax in enumerate(axes):
    ax.set_axis_off()
    if c >= k:
      continue
    up = np.asarray(jax.image.resize(jnp.asarray(psi[..., c]), size, "bilinear"))
    ax.imshow(_gray(anchor), cmap="gray")
    ax.imshow(up, cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
    ax.set_title(class_names[c], fontsize=8)
  fig.colorbar(ScalarMappable(norm=Normalize(0.0, 1.0), cmap="jet"), ax=axes.tolist(),
               label=MASK_LABEL, shrink=0.8, aspect=25)
  return fig


def write_mask_panel(path: str, psi: np.ndarray, anchor: np.ndarray,
                     class_names: Sequence[str], title: str) -> None:
  """PNG like Kim's Fig. 3: each class's mask (upsampled) over the anchor image, with the
  masks' colour bar."""
  report.write_png(path, mask_panel_figure(psi, anchor, class_names, title))


def aligned_figure(images: np.ndarray, aligned: np.ndarray, anchor: np.ndarray,
                   title: str = "Alignment") -> Figure:
  """The figure of ``write_aligned_examples`` (not written)."""
  n = len(images)
  fig = Figure(figsize=(1.8 * (n + 1), 4.1), dpi=100, layout="constrained")
  fig.suptitle(title, fontsize=10)
  axes = fig.subplots(2, n + 1, squeeze=False)
  for i in range(n):
    axes[0, i].imshow(_gray(images[i]), cmap="gray")
    axes[1, i].imshow(_gray(aligned[i]), cmap="gray")
  axes[0, n].imshow(_gray(anchor), cmap="gray")
  axes[0, n].set_title("anchor", fontsize=8)
  axes[0, 0].set_title("original", fontsize=8, loc="left")
  axes[1, 0].set_title("aligned", fontsize=8, loc="left")
  for ax in axes.ravel():
    ax.set_axis_off()
  return fig


def write_aligned_examples(path: str, images: np.ndarray, aligned: np.ndarray,
                           anchor: np.ndarray, title: str = "Alignment") -> None:
  """PNG like Kim's Fig. 4: original images (top), aligned (bottom), the anchor on the right,
  under the figure title ``title``."""
  report.write_png(path, aligned_figure(images, aligned, anchor, title))


def pose_summary(residual: dict[str, np.ndarray]) -> dict[str, float]:
  """Per quantity of ``alignment.residual_pose``: mean |.| and the spread around the mean (std
  of rotation / log scale; mean distance of the shift vectors to their mean), which a
  constant offset of the anchor frame does not change."""
  shift = residual["shift_xy"]
  return {"rotation_deg_mean_abs": float(np.mean(np.abs(residual["rotation_deg"]))),
          "rotation_deg_std": float(np.std(residual["rotation_deg"])),
          "scale_log_std": float(np.std(np.log(residual["scale"]))),
          "shift_mean": float(np.mean(np.linalg.norm(shift, axis=-1))),
          "shift_spread": float(np.mean(np.linalg.norm(shift - shift.mean(0), axis=-1)))}


class AlignmentEval:
  """``dict(type='dm_alignment', splits=('val',), pose_images=500)`` (module docstring)."""
  needs = ()  # what its splits must hold (cxr_jax.train.preflight): images only

  def __init__(self, ctx, name: str, *, splits: Sequence[str] = ("val",), pose_images: int = 500):
    self.ctx, self.name, self.splits, self.pose_images = ctx, name, tuple(splits), int(pose_images)
    model = ctx.model
    self.aligned_fn = jax.jit(lambda v, x: model.apply(v, x)["aligned"])
    self.matrices_fn = jax.jit(lambda v, x: model.apply(v, x, method="matrices"))

  def run(self, variables, *, stage: str) -> dict[str, dict]:
    del stage
    c = self.ctx
    variables = c.replicated(variables)
    sections = {}
    for split in self.splits:
      with c.batches(split) as batches:
        images = next(iter(batches))["image"]
      aligned = self.aligned_fn(variables, images)
      if c.writes:
        count = min(NUM_EXAMPLES, images.shape[0])
        write_aligned_examples(c.path("report", f"alignment_{split}.png"),
                               np.asarray(images[:count]), np.asarray(aligned[:count]),
                               np.asarray(variables["params"]["anchor"]),
                               title=f"{c.method.name}: alignment module on {split} (original "
                                     f"above, aligned to the anchor below)")
      if self.pose_images:
        section = self.pose_report(variables, split)
        if section is not None:
          sections[split] = section
    return sections

  def pose_report(self, variables, split: str) -> dict | None:
    """The residual pose before / after alignment over up to ``pose_images`` images of
    ``split`` ('before': the identity against each image's true pose; 'after': the
    aligner's transform), or None where the data has no true poses."""
    c = self.ctx
    if anatomy.true_poses(c.config.data, split, np.zeros(0, np.int64)) is None:
      return None
    predicted, indices = [], []
    with c.batches(split) as batches:
      for batch in batches:
        m = np.asarray(self.matrices_fn(variables, batch["image"]))
        valid = np.asarray(batch["valid"]) > 0
        predicted.append(m[valid])
        indices.append(np.asarray(batch["index"])[valid])
        if sum(map(len, predicted)) >= self.pose_images:
          break
    predicted = np.concatenate(predicted)[:self.pose_images]
    poses = anatomy.true_poses(c.config.data, split,
                               np.concatenate(indices)[:self.pose_images])["matrix"]
    identity = np.broadcast_to(np.array([[1.0, 0, 0], [0, 1.0, 0]]), poses.shape)
    return {"num_images": len(poses),
            "before": pose_summary(alignment.residual_pose(poses, identity)),
            "after": pose_summary(alignment.residual_pose(poses, predicted))}


class MasksEval:
  """``dict(type='dm_masks', splits=())``: the npz and panel of psi (module docstring);
  nothing for ``config.dm.masks = 'none'`` (psi = 0)."""
  needs = ()  # reads no split

  def __init__(self, ctx, name: str, *, splits: Sequence[str] = ()):
    self.ctx, self.name, self.splits = ctx, name, tuple(splits)

  def run(self, variables, *, stage: str) -> dict[str, dict]:
    del stage
    c = self.ctx
    masks = c.config.dm.masks
    if masks == "none" or not c.writes:
      return {}
    params = jax.device_get(variables["params"])
    psi, anchor = np.asarray(params["psi"]), np.asarray(params["anchor"])
    class_names = schema.get_label_space(c.config.data.label_space).classes
    files.write_npz_atomic(c.path("eval", f"disease_masks_{masks}.npz"), psi=psi,
                           class_names=np.array(class_names))
    write_mask_panel(c.path("report", f"disease_masks_{masks}.png"), psi, anchor, class_names,
                     f"{c.method.name}: {MASK_TITLES[masks]} over the anchor image")
    return {}
