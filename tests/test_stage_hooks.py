"""Stage.hooks.prepare, DataSpec.views / overrides, and data.cv cross-validation folds."""

import functools

import jax
import numpy as np
import pytest

import _trainer_worker as w
from configs import common
from cxr_jax.data import pipeline, splits
from cxr_jax.data.sources import synthetic
from cxr_jax.train.stage import DataSpec, Hooks, Stage
from cxr_jax.methods.baseline import classification_loss
from cxr_jax.train import parallel, trainer
from cxr_jax.train import step as train_step


def _phantom_config(**cv):
  c = common.base_config("runlocal")
  c.data.image_size = 32
  c.data.synthetic.num_train, c.data.synthetic.annotated_fraction = 200, 0.4
  c.data.cv.update(cv)
  return c


def _patients(source):
  return (source.indices + source.source.offset) // synthetic.IMAGES_PER_PATIENT


def test_cv_folds_partition_the_annotated_pool_by_patient():
  tests, pool = [], None
  for fold in range(4):
    c = _phantom_config(num_folds=4, fold=fold, unannotated_fraction=0.5)
    train, test = pipeline.make_source(c.data, "train"), pipeline.make_source(c.data, "test")
    annotated = pipeline.make_source(c.data, "annotated_train")
    unannotated = pipeline.make_source(c.data, "unannotated_train")
    assert not np.intersect1d(_patients(train), _patients(test)).size
    assert test.keep_boxes.all() and annotated.keep_boxes.all() and not unannotated.keep_boxes.any()
    np.testing.assert_array_equal(np.sort(train.indices),
                                  np.union1d(annotated.indices, unannotated.indices))
    # Half of the unannotated train patients (whole patients) join the training set.
    plain = _phantom_config()
    everyone = pipeline.make_source(plain.data, "unannotated_train")
    assert len(np.unique(_patients(unannotated))) == round(0.5 * len(np.unique(_patients(everyone))))
    folds_pool = np.union1d(annotated.indices, test.indices)
    pool = folds_pool if pool is None else pool
    np.testing.assert_array_equal(folds_pool, pool)  # the same pool in every fold
    np.testing.assert_array_equal(pool, pipeline.make_source(plain.data, "annotated_train").indices)
    tests.append(test.indices)
  np.testing.assert_array_equal(np.sort(np.concatenate(tests)), pool)  # folds partition it
  c = _phantom_config(num_folds=4, fold=0, unannotated_fraction=0.0)
  assert len(pipeline.make_source(c.data, "train")) == len(
      pipeline.make_source(c.data, "annotated_train"))
  with pytest.raises(ValueError, match="fold=4"):
    pipeline.make_source(_phantom_config(num_folds=4, fold=4).data, "test")


def test_cv_split_never_adds_unannotated_images_of_annotated_patients():
  ids = np.array(["a", "a", "b", "c", "c", "d", "e", "f"])
  has_boxes = np.array([1, 0, 1, 1, 0, 0, 0, 0], bool)
  parts = splits.cv_split(ids, has_boxes, num_folds=3, fold=1, unannotated_fraction=1.0, seed=0)
  np.testing.assert_array_equal(parts["unannotated_train"], [5, 6, 7])
  np.testing.assert_array_equal(np.union1d(parts["annotated_train"], parts["test"]), [0, 2, 3])


def test_views_are_independent_augmentations_of_the_same_image():
  c = common.base_config("runlocal")
  c.data.image_size = 32
  for key in ("random_resized_crop", "affine", "blur", "intensity", "hflip"):
    c.data.augment[key] = 0.0  # the default augmentation is then a plain resize
  mesh = parallel.make_mesh()
  it = pipeline.make_iterator(c.data, "val", batch_size=8, sharding=parallel.data_sharding(mesh),
                              seed=0, shuffle=False, num_epochs=1, augment=True,
                              views=({}, {"affine": 1.0, "rotation": 30.0}))
  batch = next(it)
  it.close()
  image, same, moved = (np.asarray(batch[k]) for k in ("image", "view0", "view1"))
  assert image.shape == same.shape == moved.shape == (8, 32, 32, 1)
  np.testing.assert_array_equal(same, image)
  assert np.abs(moved - image).mean() > 0.05
  with pytest.raises(KeyError, match="roation"):
    pipeline.make_iterator(c.data, "val", batch_size=8, sharding=parallel.data_sharding(mesh),
                           seed=0, views=({"roation": 3.0},))


def test_stage_data_overrides_replace_only_that_stages_data():
  c = common.base_config("runlocal")
  before = (c.data.synthetic.seed, c.data.image_size)
  stage = Stage(name="s", loss=None, steps=1, optimizer=c.optimizer,
                data=DataSpec(overrides={"synthetic.seed": 7, "image_size": 48}))
  data = train_step.stage_data_config(c.data, stage)
  assert (data.synthetic.seed, data.image_size) == (7, 48) != before
  assert (c.data.synthetic.seed, c.data.image_size) == before
  bad = Stage(name="s", loss=None, steps=1, optimizer=c.optimizer,
              data=DataSpec(overrides={"synthetic.sed": 7}))
  with pytest.raises(KeyError, match="synthetic.sed"):
    train_step.stage_data_config(c.data, bad)


class PreparedTwoStages(w.TinyBaseline):
  """Stage 2's prepare writes the mean training image into extras and zeroes the head bias."""

  def __init__(self, calls):
    self.calls = calls

  def _prepare(self, ctx):
    it = ctx.make_iterator(ctx.config.data, "train", batch_size=16, sharding=ctx.batch_sharding,
                           seed=0, shuffle=False, num_epochs=1)
    mean = np.mean(np.asarray(next(it)["image"]))
    self.calls.append(mean)
    params = dict(ctx.params, head=dict(ctx.params["head"], bias=ctx.params["head"]["bias"] * 0))
    return params, dict(ctx.extras, mean_image=jax.numpy.float32(mean))

  def stages(self, config):
    loss = functools.partial(classification_loss, "weighted_bce")
    return [Stage(name="base", loss=loss, steps=4, optimizer=config.optimizer),
            Stage(name="second", loss=loss, steps=4, optimizer=config.optimizer,
                  trainable=(r"backbone/.*",), hooks=Hooks(prepare=self._prepare),
                  data=DataSpec(views=({"affine": 1.0},), overrides={"synthetic.seed": 3}))]


def test_prepare_runs_once_when_its_stage_starts_and_survives_resume(tmp_path):
  calls, iterator_calls = [], []
  config = w.tiny_config()
  state = trainer.train_and_evaluate(
      config, str(tmp_path), method=PreparedTwoStages(calls),
      make_iterator=w.make_iterator_factory(calls=iterator_calls), evaluate=w.fake_evaluate,
      mesh=parallel.make_mesh())
  first_batch = np.random.default_rng((0, 0)).permutation(128)[:16]  # ArrayIterator's order
  expected = np.mean(w.SPLITS["train"]["image"][first_batch])
  assert len(calls) == 1 and np.isclose(calls[0], expected)
  assert np.isclose(float(state.extras["mean_image"]), expected)
  np.testing.assert_array_equal(np.asarray(state.params["head"]["bias"]), 0.0)  # frozen after prepare
  second = iterator_calls[-1]
  assert second["views"] == ({"affine": 1.0},) and second["data_config"].synthetic.seed == 3
  assert iterator_calls[0]["data_config"].synthetic.seed == 0
  # Everything is done: a rerun resumes from the checkpoint and does not prepare again.
  state2 = trainer.train_and_evaluate(
      config, str(tmp_path), method=PreparedTwoStages(calls),
      make_iterator=w.make_iterator_factory(), evaluate=w.fake_evaluate, mesh=parallel.make_mesh())
  assert len(calls) == 1
  assert np.isclose(float(state2.extras["mean_image"]), expected)
