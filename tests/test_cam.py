"""CAM toolkit: float64 numpy references, finite differences, pytorch-grad-cam parity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cxr_jax import cam


def _rng(seed=0):
  return np.random.default_rng(seed)


# ---- numpy float64 references ------------------------------------------------------------

def _conv_tanh_head(w1, w2):
  """logits = mean_{y,x} tanh(f(y,x) @ w1) @ w2: a head whose gradient varies in space."""
  def head(f):
    return jnp.mean(jnp.tanh(f @ w1), axis=(1, 2)) @ w2
  return head


def _reference_gradients(f, w1, w2):
  """d logit_c / d f[n,y,x,:] = w1 @ ((1 - tanh^2(f w1)) * w2[:, c]) / (h w), [C,N,h,w,D]."""
  n, h, w, _ = f.shape
  grads = np.zeros((w2.shape[1],) + f.shape)
  for c in range(w2.shape[1]):
    for i in range(n):
      for y in range(h):
        for x in range(w):
          t = np.tanh(f[i, y, x] @ w1)
          grads[c, i, y, x] = w1 @ ((1 - t**2) * w2[:, c]) / (h * w)
  return grads


def _reference_grad_cam(f, grads):
  out = np.zeros((f.shape[0], grads.shape[0]) + f.shape[1:3])
  for c in range(grads.shape[0]):
    for i in range(f.shape[0]):
      alpha = grads[c, i].mean(axis=(0, 1))
      out[i, c] = np.maximum((f[i] * alpha).sum(-1), 0)
  return out


def _reference_grad_cam_pp(f, grads, eps=1e-6):
  out = np.zeros((f.shape[0], grads.shape[0]) + f.shape[1:3])
  for c in range(grads.shape[0]):
    for i in range(f.shape[0]):
      g = grads[c, i]
      total = f[i].sum(axis=(0, 1))
      a = np.where(g != 0, g**2 / (2 * g**2 + total * g**3 + eps), 0)
      weights = (a * np.maximum(g, 0)).sum(axis=(0, 1))
      out[i, c] = np.maximum((f[i] * weights).sum(-1), 0)
  return out


def _reference_upsample_aligned(a, height, width):
  """Bilinear with aligned corners on the last two axes (torch UpsamplingBilinear2d)."""
  h, w = a.shape[-2:]
  ys = np.arange(height) * (h - 1) / max(height - 1, 1)
  xs = np.arange(width) * (w - 1) / max(width - 1, 1)
  y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
  y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
  fy, fx = (ys - y0)[:, None], xs - x0
  rows = a[..., y0, :] * (1 - fy) + a[..., y1, :] * fy
  return rows[..., x0] * (1 - fx) + rows[..., x1] * fx


def _head_setup(seed=0, n=2, h=3, w=4, d=5, hidden=6, k=4):
  r = _rng(seed)
  f = np.abs(r.normal(size=(n, h, w, d)))  # post-ReLU features are >= 0
  return f, r.normal(size=(d, hidden)), r.normal(size=(hidden, k))


def test_cam_spatial_mean_is_the_gap_linear_logit():
  r = _rng(1)
  f, kernel, bias = r.normal(size=(2, 3, 4, 5)), r.normal(size=(5, 3)), r.normal(size=3)
  with jax.enable_x64(True):
    maps = np.asarray(cam.cam(jnp.asarray(f), jnp.asarray(kernel), jnp.asarray(bias)))
  np.testing.assert_allclose(maps.mean(axis=(2, 3)), f.mean(axis=(1, 2)) @ kernel + bias,
                             rtol=1e-12)
  assert maps.shape == (2, 3, 3, 4)


def test_grad_cam_of_a_linear_head_is_rectified_cam_over_hw():
  """GAP + linear: d y_c / d f(y, x) = w_c / (h w) everywhere, so Grad-CAM = ReLU(CAM) / (h w)."""
  r = _rng(2)
  f, kernel, bias = r.normal(size=(3, 4, 5, 6)), r.normal(size=(6, 4)), r.normal(size=4)
  head = lambda x: jnp.mean(x, axis=(1, 2)) @ kernel + bias
  with jax.enable_x64(True):
    got = np.asarray(cam.grad_cam(head, jnp.asarray(f)))
    signed = np.asarray(cam.grad_cam(head, jnp.asarray(f), relu=False))
  expected = np.einsum("nhwd,dk->nkhw", f, kernel) / (4 * 5)
  np.testing.assert_allclose(got, np.maximum(expected, 0), rtol=1e-10, atol=1e-14)
  np.testing.assert_allclose(signed, expected, rtol=1e-10, atol=1e-14)


def test_grad_cam_and_plus_plus_match_float64_reference_for_all_and_some_classes():
  f, w1, w2 = _head_setup()
  grads = _reference_gradients(f, w1, w2)
  with jax.enable_x64(True):
    head = _conv_tanh_head(jnp.asarray(w1), jnp.asarray(w2))
    fj = jnp.asarray(f)
    np.testing.assert_allclose(np.asarray(cam.feature_gradients(head, fj)), grads, rtol=1e-10)
    np.testing.assert_allclose(np.asarray(cam.grad_cam(head, fj)),
                               _reference_grad_cam(f, grads), rtol=1e-9, atol=1e-13)
    np.testing.assert_allclose(np.asarray(cam.grad_cam_plus_plus(head, fj)),
                               _reference_grad_cam_pp(f, grads), rtol=1e-9, atol=1e-13)
    some = np.asarray(cam.grad_cam(head, fj, classes=jnp.array([3, 1])))
  np.testing.assert_allclose(some, _reference_grad_cam(f, grads[[3, 1]]), rtol=1e-9, atol=1e-13)


def test_grad_cam_gradients_match_finite_differences():
  """The BYOL + CAM loss differentiates through Grad-CAM (second order) w.r.t. head and features."""
  f, w1, w2 = _head_setup(seed=3)
  target = _rng(4).uniform(size=(2, 4, 3, 4))

  def loss(w1, f):
    maps = cam.grad_cam(_conv_tanh_head(w1, jnp.asarray(w2)), f)
    return jnp.sum(jax.nn.sigmoid(maps * 10.0) * target)

  with jax.enable_x64(True):
    w1j, fj = jnp.asarray(w1), jnp.asarray(f)
    g_w1, g_f = jax.grad(loss, argnums=(0, 1))(w1j, fj)
    r = _rng(5)
    for arg, grad in ((0, g_w1), (1, g_f)):
      for _ in range(4):
        direction = r.normal(size=grad.shape)
        step = 1e-6
        args_plus, args_minus = [w1j, fj], [w1j, fj]
        args_plus[arg] = args_plus[arg] + step * direction
        args_minus[arg] = args_minus[arg] - step * direction
        numeric = (loss(*args_plus) - loss(*args_minus)) / (2 * step)
        np.testing.assert_allclose(float(jnp.sum(grad * direction)), float(numeric), rtol=1e-5)
    assert float(jnp.abs(g_w1).max()) > 0


def test_score_cam_matches_float64_reference_with_partial_last_chunk():
  r = _rng(6)
  n, hh, ww, d, k = 2, 8, 12, 5, 3
  images = r.normal(size=(n, hh, ww, 2))
  features = np.abs(r.normal(size=(n, 2, 3, d)))
  proj = r.normal(size=(2, k))
  logits_np = lambda x: np.tanh(x @ proj).mean(axis=(1, 2))
  logits_fn = lambda x: jnp.mean(jnp.tanh(x @ jnp.asarray(proj)), axis=(1, 2))
  masks = _reference_upsample_aligned(np.moveaxis(features, -1, 1), hh, ww)  # [N,D,H,W]
  low = masks.min(axis=(2, 3), keepdims=True)
  masks = (masks - low) / (masks.max(axis=(2, 3), keepdims=True) - low + 1e-8)
  expected = np.zeros((n, k, 2, 3))
  for i in range(n):
    scores = np.stack([logits_np(images[i][None] * masks[i, j][None, :, :, None])[0]
                       for j in range(d)])  # [D,K]
    weights = np.exp(scores - scores.max(0)) / np.exp(scores - scores.max(0)).sum(0)
    expected[i] = np.maximum(np.einsum("dk,hwd->khw", weights, features[i]), 0)
  with jax.enable_x64(True):
    got = cam.score_cam(logits_fn, jnp.asarray(images), jnp.asarray(features), batch_size=4)
    some = cam.score_cam(logits_fn, jnp.asarray(images), jnp.asarray(features),
                         classes=jnp.array([2]), batch_size=3)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(np.asarray(some), expected[:, [2]], rtol=1e-9, atol=1e-12)


def test_upsample_and_normalize():
  r = _rng(7)
  maps = r.normal(size=(2, 3, 4, 5))
  with jax.enable_x64(True):
    aligned = np.asarray(cam.upsample(jnp.asarray(maps), (7, 9), align_corners=True))
    half = np.asarray(cam.upsample(jnp.asarray(maps), (8, 10)))
    single = np.asarray(cam.upsample(jnp.full((1, 1, 1, 1), 3.0), (4, 4), align_corners=True))
    normed = np.asarray(cam.normalize(jnp.asarray(maps)))
  np.testing.assert_allclose(aligned, _reference_upsample_aligned(maps, 7, 9), rtol=1e-10)
  # Half-pixel 2x upsampling: output pixel 1 sits at input coordinate 0.25.
  np.testing.assert_allclose(half[..., 1, 1], maps[..., 0, 0] * 0.75**2 + maps[..., 0, 1] * 0.75
                             * 0.25 + maps[..., 1, 0] * 0.25 * 0.75 + maps[..., 1, 1] * 0.25**2,
                             rtol=1e-10)
  np.testing.assert_allclose(single, 3.0)
  np.testing.assert_allclose(normed.min(axis=(2, 3)), 0, atol=1e-12)
  np.testing.assert_allclose(normed.max(axis=(2, 3)), 1, atol=1e-6)
  low = maps.min(axis=(2, 3), keepdims=True)
  np.testing.assert_allclose(normed, (maps - low) / (maps.max(axis=(2, 3), keepdims=True) - low),
                             rtol=1e-6)


def test_class_heatmaps_jit_compiles_once_for_a_model():
  from cxr_jax.models.classifier import Classifier
  from cxr_jax.models.backbones import get_backbone
  model = Classifier(get_backbone("resnet18", width=0.125), num_classes=3)
  images = jnp.asarray(_rng(8).normal(size=(2, 32, 32, 1)), jnp.float32)
  # Random variables of the right shapes without compiling the initializers (slow on CPU).
  shapes = jax.eval_shape(model.init, jax.random.key(0), images)
  r = _rng(11)
  variables = jax.tree.map(
      lambda s: jnp.asarray(r.normal(size=s.shape) * np.sqrt(2 / np.prod(s.shape[:-1]))
                            if len(s.shape) > 1 else r.uniform(0.5, 1.5, size=s.shape),
                            jnp.float32), shapes)
  head = variables["params"]["head"]
  features_fn = lambda x: model.apply(variables, x)["features"]
  head_fn = lambda f: jnp.mean(f, axis=(1, 2)) @ head["kernel"] + head["bias"]
  traces = []

  @jax.jit
  def heatmaps(images):
    traces.append(1)
    return {kind: cam.class_heatmaps(kind, features_fn, head_fn, images, image_size=True)
            for kind in ("gradcam", "gradcam++")}

  out = heatmaps(images)
  heatmaps(images + 1.0)
  assert len(traces) == 1
  for kind, maps in out.items():
    maps = np.asarray(maps)
    assert maps.shape == (2, 3, 32, 32), kind
    assert np.all(np.isfinite(maps)) and maps.min() >= 0 and maps.max() <= 1 + 1e-6, kind
  # Grad-CAM of this GAP + linear head is the rectified CAM (up to a positive scale).
  expected = jax.jit(lambda x: cam.normalize(cam.upsample(
      jax.nn.relu(cam.cam(features_fn(x), head["kernel"])), (32, 32))))(images)
  np.testing.assert_allclose(np.asarray(out["gradcam"]), np.asarray(expected), atol=1e-4)
  with pytest.raises(ValueError, match="unknown CAM kind"):
    cam.class_heatmaps("eigencam", features_fn, head_fn, images)


# ---- parity with pytorch-grad-cam on a torchvision ResNet-18 -----------------------------

def _torch_resnet18(num_classes):
  torch = pytest.importorskip("torch")
  torchvision = pytest.importorskip("torchvision")
  torch.manual_seed(0)
  net = torchvision.models.resnet18(num_classes=num_classes)
  with torch.no_grad():  # non-trivial BatchNorm statistics, so their conversion matters
    for module in net.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0, 0.1)
        module.running_mean.normal_(0, 0.1)
        module.running_var.uniform_(0.5, 1.5)
  return net.eval()


def _flax_resnet18(net, stage=None):
  """(features_fn, head_fn, logits_fn) of our resnet18 with ``net``'s weights."""
  from cxr_jax.models import pretrained
  from cxr_jax.models.backbones import get_backbone
  converted = pretrained.convert_torchvision("resnet18", net.state_dict(), head=True)
  variables = {"params": converted["params"], "batch_stats": converted["batch_stats"]}
  head = converted["head"]
  backbone = get_backbone("resnet18")
  final_fn = lambda x: backbone.apply(variables, x, train=False)
  head_fn = lambda f: jnp.mean(f, axis=(1, 2)) @ head["kernel"] + head["bias"]
  logits_fn = lambda x: head_fn(final_fn(x))
  if stage is None:
    return final_fn, head_fn, logits_fn
  stage_fn = lambda x: backbone.apply(variables, x, train=False, return_stages=True)[stage]
  return stage_fn, head_fn, logits_fn


def _torch_maps(method_cls, net, layer, images_nchw, classes, **kw):
  pytest.importorskip("pytorch_grad_cam")
  from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
  import torch
  extractor = method_cls(model=net, target_layers=[layer], **kw)
  maps = [extractor(input_tensor=torch.from_numpy(images_nchw),
                    targets=[ClassifierOutputTarget(c)] * len(images_nchw)) for c in classes]
  return np.stack(maps, axis=1)  # [N,C,H,W]


def _compare(ours, theirs, min_corr=0.99):
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape
  for i in range(ours.shape[0]):
    for c in range(ours.shape[1]):
      corr = np.corrcoef(ours[i, c].ravel(), theirs[i, c].ravel())[0, 1]
      assert corr > min_corr, (i, c, corr)
  return float(np.abs(ours - theirs).max())


@pytest.fixture(scope="module")
def resnet18_pair():
  """A random-init torchvision ResNet-18 (4 classes) and our resnet18 with its weights."""
  net = _torch_resnet18(num_classes=4)
  pytest.importorskip("pytorch_grad_cam")
  import torch
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # the 2-core machine runs several test workers
  yield net, _flax_resnet18(net), _flax_resnet18(net, stage="conv2_x")
  torch.set_num_threads(threads)


def test_gradient_cams_match_pytorch_grad_cam_on_resnet18_layer4(resnet18_pair):
  """At 160 px (5 x 5 maps, all 4 classes) the maps agree to 3e-6, correlation > 0.999999."""
  import pytorch_grad_cam
  net, (features_fn, head_fn, _), _ = resnet18_pair
  images = _rng(9).normal(size=(2, 3, 128, 128)).astype(np.float32)  # layer4: 4 x 4
  classes = [0, 3]
  ours = jax.jit(lambda x: {kind: cam.class_heatmaps(kind, features_fn, head_fn, x,
                                                     classes=jnp.array(classes), image_size=True)
                            for kind in ("gradcam", "gradcam++")})(
      jnp.asarray(images.transpose(0, 2, 3, 1)))
  for kind, method_cls in (("gradcam", pytorch_grad_cam.GradCAM),
                           ("gradcam++", pytorch_grad_cam.GradCAMPlusPlus)):
    theirs = _torch_maps(method_cls, net, net.layer4[-1], images, classes)
    max_err = _compare(ours[kind], theirs)
    assert max_err < 1e-3, (kind, max_err)


def test_score_cam_matches_pytorch_grad_cam_on_resnet18_layer1(resnet18_pair):
  """Score-CAM costs a forward pass per channel: layer1 (64 channels, 8 x 8 at 32 px) keeps it
  cheap; at layer4 (512 channels, 160 px) the maps agree to 2e-6 as well."""
  import pytorch_grad_cam
  net, _, (features_fn, _, logits_fn) = resnet18_pair
  images = _rng(10).normal(size=(1, 3, 32, 32)).astype(np.float32)
  classes = [2]
  theirs = _torch_maps(pytorch_grad_cam.ScoreCAM, net, net.layer1[-1], images, classes)

  @jax.jit
  def ours(x):
    maps = cam.score_cam(logits_fn, x, features_fn(x), classes=jnp.array(classes), batch_size=64)
    return cam.normalize(cam.upsample(maps, x.shape[1:3]))

  max_err = _compare(ours(jnp.asarray(images.transpose(0, 2, 3, 1))), theirs)
  assert max_err < 1e-3, max_err
