"""Kim 2022 alignment module: affine warp (vs OpenCV), its gradients, B(G(.)), losses, pose residuals."""

import math

import cv2
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxr_jax.data.sources import synthetic
from cxr_jax.models import alignment


def smooth_image(seed, size=32, channels=2):
  """Sum of wide Gaussian blobs: gradients small enough for OpenCV's 1/32-pixel weights."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
  image = np.zeros((size, size, channels))
  for c in range(channels):
    for _ in range(4):
      cx, cy, s = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(4, 8)
      image[..., c] += rng.uniform(-1, 1) * np.exp(-((xx - cx)**2 + (yy - cy)**2) / (2 * s * s))
  return image


def pixel_matrix(matrix, size):
  """Eq. 6's normalized matrix as OpenCV's dst-pixel -> src-pixel map (WARP_INVERSE_MAP)."""
  to_norm = np.array([[2 / size, 0, 1 / size - 1], [0, 2 / size, 1 / size - 1], [0, 0, 1]])
  full = np.vstack([np.asarray(matrix, np.float64), [0, 0, 1]])
  return (np.linalg.inv(to_norm) @ full @ to_norm)[:2]


TRANSFORMS = np.array([[1.0, 1.0, 0.0, 0.0, 0.0], [1.1, 0.9, 0.12, -0.08, 0.15],
                       [0.85, 1.05, -0.2, 0.1, -0.3], [1.0, 1.0, 0.5, 0.4, 0.6]])


@pytest.mark.parametrize("mode,border", [("edge", cv2.BORDER_REPLICATE),
                                         ("constant", cv2.BORDER_CONSTANT)])
def test_warp_matches_opencv(mode, border):
  size, cval = 32, 0.3
  images = np.stack([smooth_image(i, size) for i in range(len(TRANSFORMS))])
  matrices = np.asarray(alignment.affine_matrix(jnp.asarray(TRANSFORMS, jnp.float32)))
  warped = np.asarray(jax.jit(lambda x, m: alignment.warp_affine(x, m, mode, cval))(
      jnp.asarray(images, jnp.float32), jnp.asarray(matrices)))
  for image, matrix, ours in zip(images, matrices, warped):
    ref = cv2.warpAffine(image, pixel_matrix(matrix, size), (size, size),
                         flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=border,
                         borderValue=(cval,) * 4)
    # OpenCV weighs in steps of 1/32 pixel: ~|jump| / 64 where the image meets cval.
    np.testing.assert_allclose(ours, ref.reshape(ours.shape), atol=4e-3 if mode == "edge" else 1.2e-2)
  # The identity samples every pixel centre exactly.
  np.testing.assert_allclose(warped[0], images[0], atol=1e-6)


def test_eq6_matrix_and_inverse():
  sx, sy, tx, ty, theta = TRANSFORMS[1]
  expected = [[sx * math.cos(theta), -sy * math.sin(theta), tx],
              [sx * math.sin(theta), sy * math.cos(theta), ty]]
  m = np.asarray(alignment.affine_matrix(jnp.asarray(TRANSFORMS[1], jnp.float32)))
  np.testing.assert_allclose(m, expected, rtol=1e-6)
  inv = np.asarray(alignment.invert_affine(jnp.asarray(m)))
  np.testing.assert_allclose(np.vstack([inv, [0, 0, 1]]) @ np.vstack([m, [0, 0, 1]]),
                             np.eye(3), atol=1e-6)


def test_warp_gradients_match_finite_differences():
  image = jnp.asarray(smooth_image(7, 32, 1)[None])
  weights = jnp.asarray(np.random.default_rng(1).normal(size=(1, 32, 32, 1)))

  @jax.jit
  def objective(params):
    warped = alignment.warp_affine(image, alignment.affine_matrix(params)[None])
    return jnp.sum(warped * weights)

  with jax.enable_x64(True):
    params = jnp.asarray(TRANSFORMS[2], jnp.float64)
    grad = np.asarray(jax.grad(objective)(params))
    h, fd = 1e-7, np.zeros(5)   # small: few samples cross a pixel boundary (a kink)
    for i in range(5):
      step = np.zeros(5)
      step[i] = h
      fd[i] = (objective(params + step) - objective(params - step)) / (2 * h)
  assert np.all(np.abs(grad) > 1e-3)
  np.testing.assert_allclose(grad, fd, rtol=1e-4, atol=1e-6)


def test_grid_blur_is_block_mean_then_bilinear():
  images = np.random.default_rng(0).normal(size=(2, 32, 32, 2)).astype(np.float32)
  ours = np.asarray(alignment.grid_blur(jnp.asarray(images), 8))
  for n in range(2):
    for c in range(2):
      blocks = images[n, :, :, c].reshape(4, 8, 4, 8).mean((1, 3))
      ref = cv2.resize(blocks, (32, 32), interpolation=cv2.INTER_LINEAR)
      np.testing.assert_allclose(ours[n, :, :, c], ref, atol=1e-5)
  with pytest.raises(ValueError, match="multiple"):
    alignment.grid_blur(jnp.zeros((1, 30, 30, 1)), 8)


def test_losses_match_eq7_and_eq8():
  rng = np.random.default_rng(3)
  anchor, warped = rng.normal(size=(8, 8, 3)), rng.normal(size=(4, 8, 8, 3))
  ref_e = np.mean([np.linalg.norm(anchor[i, j] - warped[n, i, j])
                   for n in range(4) for i in range(8) for j in range(8)])
  np.testing.assert_allclose(float(alignment.euclidean_loss(anchor, warped)), ref_e, rtol=1e-5)
  feats = {"a": rng.normal(size=(4, 4, 4, 5)), "b": rng.normal(size=(4, 2, 2, 7))}
  anchor_feats = {"a": rng.normal(size=(1, 4, 4, 5)), "b": rng.normal(size=(1, 2, 2, 7))}
  ref_p = sum(np.mean([np.linalg.norm(feats[s][n] - anchor_feats[s][0]) for n in range(4)])
              / feats[s][0].size for s in feats)
  np.testing.assert_allclose(float(alignment.perceptual_loss(anchor_feats, feats)), ref_p,
                             rtol=1e-5)


class TinyBackbone(nn.Module):
  """A conv feature map [N,h,w,8] with a backbone's call signature (the ResNet is slow to build)."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    return nn.relu(nn.Conv(8, (3, 3), strides=4)(x))


def test_aligner_starts_at_identity():
  aligner = alignment.Aligner(TinyBackbone())
  x = jax.random.normal(jax.random.key(0), (3, 32, 32, 1))
  out = np.asarray(jax.jit(lambda r, x: aligner.init_with_output(r, x)[0])(jax.random.key(1), x))
  np.testing.assert_array_equal(out, np.tile(alignment.IDENTITY, (3, 1)))


def test_residual_pose_recovers_a_known_residual():
  pose = synthetic.Pose(math.radians(7.0), 1.05, (0.1, -0.06))
  residual = synthetic.Pose(math.radians(-3.0), 0.97, (0.02, 0.05))
  full = lambda p: np.vstack([p.matrix(), [0, 0, 1]])
  predicted = (full(pose) @ full(residual))[:2]
  out = alignment.residual_pose(pose.matrix()[None], predicted[None])
  np.testing.assert_allclose(out["rotation_deg"], [-3.0], atol=1e-9)
  np.testing.assert_allclose(out["scale"], [0.97], atol=1e-9)
  np.testing.assert_allclose(out["shift_xy"], [[0.02, 0.05]], atol=1e-9)
  before = alignment.residual_pose(pose.matrix()[None], np.eye(2, 3)[None])
  np.testing.assert_allclose(before["rotation_deg"], [-7.0], atol=1e-9)


def test_fitting_eq6_to_a_canonical_phantom_undoes_its_pose():
  """Gradient descent on the 5 parameters (Eq. 8 through B(G(.))) recovers the phantom's pose:
  the warp, Eq. 6 and ``residual_pose`` share one convention with ``synthetic.Pose``."""
  size, index = 64, 11
  pose = synthetic.sample_pose(0, index)
  render = lambda apply_pose: synthetic.render_example(0, index, size, apply_pose=apply_pose)
  to_float = lambda e: jnp.asarray(e["image"], jnp.float32)[None, :, :, None] / 127.5 - 1
  posed, canonical = to_float(render(True)), to_float(render(False))
  anchor = alignment.grid_blur(canonical, 4)[0]

  @jax.jit
  def step(params):
    def loss(p):
      warped = alignment.warp_affine(posed, alignment.affine_matrix(p)[None])
      return alignment.euclidean_loss(anchor, alignment.grid_blur(warped, 4))
    return params - 0.05 * jax.grad(loss)(params)

  params = jnp.asarray(alignment.IDENTITY, jnp.float32)
  before = alignment.residual_pose(pose.matrix()[None], np.eye(2, 3)[None])
  for _ in range(300):
    params = step(params)
  after = alignment.residual_pose(pose.matrix()[None], np.asarray(
      alignment.affine_matrix(params))[None])
  assert abs(before["rotation_deg"][0]) > 5 and before["shift"][0] > 0.1   # index 11's pose
  assert abs(after["rotation_deg"][0]) < 1.5
  # 0.13 before; the 4 x 4 grid blur leaves 1-1.5 px (1 px = 2/64): 0.040 / 0.045 after 300
  # steps with XLA:CPU's default / our YNNPACK setting (float order); a wrong convention >= 0.13.
  assert after["shift"][0] < 0.05
  assert abs(after["scale"][0] - 1) < 0.03
