"""Grain pipeline: splits, determinism, resumable state, sharding, padding, maps, bad input."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from configs.common import base_config
from cxr_jax.data import anatomy, annotations, augment, pipeline, schema, splits
from cxr_jax.data.sources import synthetic

BATCH = 8


@pytest.fixture(scope="module")
def sharding():
  return NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))


def data_config(**overrides):
  c = base_config("runlocal").data
  c.synthetic.num_train, c.synthetic.num_val, c.synthetic.num_test = 40, 15, 16
  c.synthetic.annotated_fraction = 0.25
  c.prefetch = 0
  c.update(overrides)
  return c


def take(iterator, n):
  return [jax.tree.map(np.asarray, next(iterator)) for _ in range(n)]


def assert_batches_equal(got, want):
  assert len(got) == len(want)
  for g, w in zip(got, want):
    assert g.keys() == w.keys()
    for key in g:
      np.testing.assert_array_equal(g[key], w[key], err_msg=key)


def test_synthetic_splits_are_patient_disjoint_and_annotation_is_limited():
  c = data_config()
  bounds = splits.synthetic_bounds(40, 15, 16, synthetic.IMAGES_PER_PATIENT)
  np.testing.assert_array_equal(bounds, [0, 40, 56, 72])  # 55 rounds up to a whole patient
  parts = {split: pipeline.make_source(c, split) for split in ("train", "val", "test")}
  assert [len(parts[s]) for s in ("train", "val", "test")] == [40, 16, 16]
  patients = {s: {src[i]["patient_id"] for i in range(len(src))} for s, src in parts.items()}
  images = {s: {src[i]["image_id"] for i in range(len(src))} for s, src in parts.items()}
  for a, b in [("train", "val"), ("train", "test"), ("val", "test")]:
    assert not patients[a] & patients[b], (a, b)
    assert not images[a] & images[b], (a, b)

  train = parts["train"]
  annotated = pipeline.make_source(c, "annotated_train")
  unannotated = pipeline.make_source(c, "unannotated_train")
  assert len(annotated) == 10 and len(unannotated) == 30  # 25% of 20 patients = 5 patients
  ids = lambda src: [src[i]["image_id"] for i in range(len(src))]
  assert sorted(ids(annotated) + ids(unannotated)) == sorted(ids(train))
  phantoms = synthetic.SyntheticPhantoms(num_examples=40, image_size=c.image_size, seed=0)
  by_patient = {}
  for i in range(len(train)):
    example = train[i]
    keep = example["has_boxes"] == 1
    by_patient.setdefault(example["patient_id"], set()).add(bool(keep))
    if keep:
      np.testing.assert_array_equal(example["box_labels"], phantoms[i]["box_labels"])
    else:
      assert np.all(example["box_labels"] == -1)
  assert all(len(v) == 1 for v in by_patient.values())  # annotation is per patient
  val = parts["val"]
  val_phantoms = synthetic.SyntheticPhantoms(num_examples=16, image_size=c.image_size, offset=40)
  for i in range(len(val)):
    assert val[i]["has_boxes"] == 1
    np.testing.assert_array_equal(val[i]["boxes"], val_phantoms[i]["boxes"])


def test_anatomy_regions_and_true_poses_of_phantoms_only():
  c = data_config()
  regions = anatomy.anatomy_regions(c, 32)
  for name, region in synthetic.anatomy_regions(32).items():
    np.testing.assert_array_equal(regions[name], region)
  source = pipeline.make_source(c, "unannotated_train")
  indices = np.array([5, 0, 17])
  poses = anatomy.true_poses(c, "unannotated_train", indices)
  for row, i in enumerate(indices):
    want = synthetic.sample_pose(c.synthetic.seed, source.source.offset + int(source.indices[i]))
    np.testing.assert_array_equal(poses["matrix"][row], want.matrix())
    assert (poses["angle"][row], poses["scale"][row]) == (want.angle, want.scale)
    np.testing.assert_array_equal(poses["shift"][row], want.shift)
  real = data_config(name="nih")
  assert anatomy.anatomy_regions(real, 32) is None
  assert anatomy.true_poses(real, "val", indices) is None


def test_unknown_dataset_and_split():
  with pytest.raises(ValueError, match="data.name='nih'"):
    pipeline.make_source(data_config(name="nih"), "train")
  with pytest.raises(KeyError, match="unknown split"):
    pipeline.make_source(data_config(), "trian")


def test_batch_layout_sharding_and_normalization(sharding):
  c = data_config()
  with pipeline.make_iterator(c, "val", batch_size=BATCH, sharding=sharding, seed=0,
                              shuffle=False, augment=False) as it:
    batch = next(it)
  n, size = BATCH, c.image_size
  want = {"image": ((n, size, size, 1), np.float32), "labels": ((n, 14), np.float32),
          "label_mask": ((n, 14), np.float32), "boxes": ((n, schema.MAX_BOXES, 4), np.float32),
          "box_labels": ((n, schema.MAX_BOXES), np.int32),
          "gaze": ((n, schema.MAX_FIXATIONS, 3), np.float32), "has_boxes": ((n,), np.float32),
          "index": ((n,), np.int32), "valid": ((n,), np.float32)}
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == want
  for key, value in batch.items():
    assert value.sharding.is_equivalent_to(sharding, value.ndim), key
    assert len(value.sharding.device_set) == 8
    assert {s.data.shape[0] for s in value.addressable_shards} == {n // 8}, key
  source = it.source
  np.testing.assert_array_equal(batch["index"], np.arange(n))
  for row in range(n):
    example = source[row]
    np.testing.assert_allclose(batch["image"][row, ..., 0],
                               example["image"].astype(np.float64) / 127.5 - 1, atol=1e-6)
    np.testing.assert_array_equal(batch["labels"][row], example["labels"])
    np.testing.assert_array_equal(batch["boxes"][row], example["boxes"])


def test_imagenet_normalization_three_channels(sharding):
  c = data_config(normalization="imagenet", channels=3)
  with pipeline.make_iterator(c, "val", batch_size=BATCH, sharding=sharding, seed=0,
                              shuffle=False, augment=False) as it:
    image = np.asarray(next(it)["image"])
  grey = np.stack([it.source[i]["image"] for i in range(BATCH)]).astype(np.float64) / 255
  for ch, (mean, std) in enumerate(zip(pipeline.IMAGENET_MEAN, pipeline.IMAGENET_STD)):
    np.testing.assert_allclose(image[..., ch], (grey - mean) / std, atol=1e-5)


def test_maps_match_annotations(sharding):
  c = data_config(grid_size=4)
  maps = ("gaze_map", "box_map", "box_grid")
  with pipeline.make_iterator(c, "val", batch_size=BATCH, sharding=sharding, seed=0,
                              maps=maps, augment=False) as it:
    batch = jax.tree.map(np.asarray, next(it))
  size = c.image_size
  assert batch["gaze_map"].shape == (BATCH, size, size, 1)
  assert batch["box_map"].shape == (BATCH, size, size, 1)
  assert batch["box_grid"].shape == (BATCH, 4, 4, 14)
  for row, index in enumerate(batch["index"]):
    example = it.source[int(index)]
    np.testing.assert_allclose(
        batch["gaze_map"][row, ..., 0],
        annotations.gaze_heatmap(example["gaze"], size, size, c.gaze_sigma_per_second))
    np.testing.assert_allclose(
        batch["box_map"][row, ..., 0],
        annotations.boxes_to_soft_mask(example["boxes"], example["box_labels"], size, size,
                                       c.box_sigma))
    np.testing.assert_array_equal(
        batch["box_grid"][row],
        annotations.boxes_to_patch_grid(example["boxes"], example["box_labels"], 4, 14))
  assert batch["box_map"].max() > 0.5 and batch["gaze_map"].max() == 1


def test_training_batches_follow_the_augmentation_and_annotation_mask(sharding):
  c = data_config()
  with pipeline.make_iterator(c, "train", batch_size=BATCH, sharding=sharding, seed=3) as it:
    batches = take(it, 5)
  source = it.source
  for batch in batches:
    for row, index in enumerate(batch["index"]):
      assert batch["has_boxes"][row] == source.keep_boxes[index]
      if not source.keep_boxes[index]:
        assert np.all(batch["box_labels"][row] == -1)
  # Augmented: some images differ from the plain resize of their example.
  plain = [augment.eval_transform(source[int(i)], c.image_size)["image"] / 127.5 - 1
           for i in batches[0]["index"]]
  assert not np.allclose(batches[0]["image"][..., 0], np.stack(plain), atol=1e-3)


def test_deterministic_given_seed_and_epochs_reshuffle(sharding):
  c = data_config()

  def run(seed):
    with pipeline.make_iterator(c, "val", batch_size=BATCH, sharding=sharding, seed=seed,
                                num_epochs=3) as it:
      return take(it, 6)

  first, again, other = run(0), run(0), run(1)
  assert_batches_equal(again, first)
  assert not np.array_equal(other[0]["index"], first[0]["index"])
  epochs = [np.concatenate([b["index"] for b in first[e * 2:e * 2 + 2]]) for e in range(3)]
  for order in epochs:
    np.testing.assert_array_equal(np.sort(order), np.arange(16))
  assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
  # An example gets a different augmentation in another epoch (each transform
  # runs with a probability, so a few examples are plain resizes in both).
  image = lambda e, row: first[e * 2 + row // BATCH]["image"][row % BATCH]
  rows = [[list(epochs[e]).index(example) for e in (0, 1)] for example in range(16)]
  changed = [not np.array_equal(image(0, r0), image(1, r1)) for r0, r1 in rows]
  assert sum(changed) >= 12, changed


@pytest.mark.parametrize("prefetch", [0, 2])
def test_restore_mid_epoch_yields_the_following_batches(sharding, prefetch):
  c = data_config(prefetch=prefetch)
  make = lambda: pipeline.make_iterator(c, "train", batch_size=BATCH, sharding=sharding,
                                        seed=7, maps=("box_map",))
  with make() as it:
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # JSON round trip, as in a checkpoint
    expected = take(it, 4)
    it.set_state(state)  # rewinds past the prefetched batches
    assert_batches_equal(take(it, 4), expected)
  with make() as resumed:
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 4), expected)


def test_restore_refuses_the_state_of_another_pipeline(sharding):
  make = lambda seed: pipeline.make_iterator(data_config(), "train", batch_size=BATCH,
                                             sharding=sharding, seed=seed)
  with make(7) as it, make(8) as other:
    take(it, 1)
    with pytest.raises(ValueError, match="seed 7"):
      other.set_state(it.get_state())


def test_eval_padding_covers_every_example_once(sharding):
  c = data_config(prefetch=2)
  with pipeline.make_iterator(c, "val", batch_size=BATCH, sharding=sharding, seed=0,
                              shuffle=False, num_epochs=1, drop_remainder=False,
                              augment=False) as it:
    assert it.num_examples == 16 and it.steps_per_epoch == 2
    batches = [jax.tree.map(np.asarray, b) for b in it]
  assert len(batches) == 2
  c.synthetic.num_val = 21
  c.synthetic.num_train = 40
  with pipeline.make_iterator(c, "val", batch_size=BATCH, sharding=sharding, seed=0,
                              shuffle=False, num_epochs=1, drop_remainder=False,
                              augment=False) as it:
    assert it.num_examples == 22 and it.steps_per_epoch == 3  # 21 rounds up to whole patients
    batches = [jax.tree.map(np.asarray, b) for b in it]
    with pytest.raises(StopIteration):
      next(it)
  assert len(batches) == 3
  valid = np.concatenate([b["valid"] for b in batches])
  index = np.concatenate([b["index"] for b in batches])
  np.testing.assert_array_equal(np.sort(index[valid == 1]), np.arange(22))
  assert valid.sum() == 22 and np.all(index[valid == 0] == -1)
  pad = valid == 0
  assert np.all(np.concatenate([b["box_labels"] for b in batches])[pad] == -1)
  assert np.all(np.concatenate([b["image"] for b in batches])[pad] == -1)  # 0 -> -1


def test_process_shards_cover_the_source():
  for n, count in [(10, 3), (16, 4), (7, 7), (100, 6)]:
    for drop in (False, True):
      shards = [pipeline.process_shard(n, p, count, drop) for p in range(count)]
      sizes = [stop - start for start, stop in shards]
      covered = np.concatenate([np.arange(*s) for s in shards])
      np.testing.assert_array_equal(covered, np.arange(len(covered)))  # contiguous, disjoint
      assert max(sizes) - min(sizes) <= (0 if drop else 1)
      assert len(covered) == (n // count * count if drop else n)


def test_batch_size_must_divide_over_devices(sharding):
  with pytest.raises(ValueError, match="batch_size=12"):
    pipeline.make_iterator(data_config(), "val", batch_size=12, sharding=sharding, seed=0)


class Corrupted:
  """Synthetic val phantoms with one broken example."""

  def __init__(self, bad_index, how):
    self.phantoms = synthetic.SyntheticPhantoms(num_examples=24, image_size=32)
    self.bad_index, self.how = bad_index, how

  def __len__(self):
    return len(self.phantoms)

  def __repr__(self):
    return "Corrupted(phantoms)"

  def __getitem__(self, index):
    example = self.phantoms[index]
    if index == self.bad_index:
      if self.how == "box":
        example["boxes"], example["box_labels"] = schema.pad_boxes([[0.2, 0.2, 1.5, 0.6]], [3])
      else:
        example["image"] = b"\x89PNG not really"
    return example


@pytest.mark.parametrize("how", ["box", "image"])
def test_bad_example_error_names_source_and_index(sharding, how):
  it = pipeline.make_iterator(data_config(), "val", batch_size=BATCH, sharding=sharding, seed=0,
                              shuffle=False, augment=False, source=Corrupted(13, how))
  with pytest.raises(schema.ExampleError, match=r"Corrupted\(phantoms\) index 13"):
    take(it, 3)
  it.close()


def test_bad_examples_can_be_skipped_and_counted(sharding):
  c = data_config()
  c.skip_bad_examples = True
  with pipeline.make_iterator(c, "val", batch_size=BATCH, sharding=sharding, seed=0,
                              shuffle=False, num_epochs=1, drop_remainder=False, augment=False,
                              source=Corrupted(13, "box")) as it:
    batches = [jax.tree.map(np.asarray, b) for b in it]
  index = np.concatenate([b["index"] for b in batches])
  valid = np.concatenate([b["valid"] for b in batches])
  np.testing.assert_array_equal(index[valid == 1], np.delete(np.arange(24), 13))
  assert it.num_skipped == 1


def test_worker_processes_give_identical_batches(sharding):
  def run(workers):
    c = data_config(worker_count=workers, prefetch=1)
    with pipeline.make_iterator(c, "train", batch_size=BATCH, sharding=sharding, seed=5,
                                maps=("gaze_map",)) as it:
      batches = take(it, 3)
      state = it.get_state()
      return batches, take(it, 2), state

  single, single_next, _ = run(0)
  multi, multi_next, state = run(2)
  assert_batches_equal(multi, single)
  assert_batches_equal(multi_next, single_next)
  # Resuming a multi-worker iterator mid-epoch.
  c = data_config(worker_count=2, prefetch=1)
  with pipeline.make_iterator(c, "train", batch_size=BATCH, sharding=sharding, seed=5,
                              maps=("gaze_map",)) as it:
    it.set_state(state)
    assert_batches_equal(take(it, 2), single_next)
