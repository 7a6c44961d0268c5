"""cxr-phantoms --export_dir: phantoms in the NIH layout, read back by the NIH reader and cxr-prepare."""

import collections
import csv
import os

import numpy as np
import pytest

from configs import common
from cxr_jax.cli import phantoms as phantoms_cli
from cxr_jax.data import prepared, schema, shards
from cxr_jax.data.sources import nih, phantom_export, synthetic

NUM, SIZE, SEED, TEST_FRACTION = 16, 64, 5, 0.4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """(folder, {image name: the phantom rendered directly})."""
  folder = str(tmp_path_factory.mktemp("phantoms_nih"))
  summary = phantom_export.export(folder, NUM, SIZE, seed=SEED, workers=2,
                                  test_fraction=TEST_FRACTION, chunk_size=5)
  source = synthetic.SyntheticPhantoms(num_examples=NUM, image_size=SIZE, seed=SEED)
  truth = {phantom_export.image_name(i): source[i] for i in range(NUM)}
  assert summary["images"] == NUM
  assert summary["boxes"] == sum(int((ex["box_labels"] >= 0).sum()) for ex in truth.values())
  return folder, truth


def _patient(example: dict) -> str:
  """The phantom's own patient number ('phantom<seed>-<patient>')."""
  return example["patient_id"].rsplit("-", 1)[1]


def test_headers_match_the_real_release(exported, nih_sample_dir):
  folder, _ = exported
  for name in (phantom_export.DATA_ENTRY_FILE, phantom_export.BBOX_FILE):
    with open(os.path.join(folder, name)) as ours, open(nih_sample_dir / name) as real:
      assert ours.readline() == real.readline()
  assert not [n for n in os.listdir(folder) if n.startswith(".tmp")]


def test_nih_reader_returns_the_phantoms_ground_truth(exported):
  folder, truth = exported
  recs, problems = nih.read(folder)
  assert problems.count == 0, problems
  assert [r.id for r in recs] == sorted(truth)
  boxes_per_image = collections.Counter()
  with open(os.path.join(folder, phantom_export.BBOX_FILE), newline="") as f:
    for row in list(csv.reader(f))[1:]:
      assert len(row) == 6, row
      boxes_per_image[row[0]] += 1
  for r in recs:
    ex = truth[r.id]
    np.testing.assert_array_equal(r.labels, ex["labels"])
    real = ex["box_labels"] >= 0
    assert boxes_per_image[r.id] == real.sum()
    np.testing.assert_array_equal(r.box_labels, ex["box_labels"][real])
    # Release coordinates are 1024 px: within a rounding of 1 px of the phantom's box.
    np.testing.assert_allclose(r.boxes, ex["boxes"][real], atol=1 / 1024)
    assert r.patient_id == _patient(ex)
    assert r.view == "PA"
    assert r.path == os.path.join(folder, "images", r.id)


def test_official_split_is_by_patient(exported):
  folder, truth = exported
  recs, _ = nih.read(folder)
  split_of_patient = collections.defaultdict(set)
  for r in recs:
    split_of_patient[r.patient_id].add(r.official_split)
  assert all(len(s) == 1 for s in split_of_patient.values())
  test_patients = {p for p, s in split_of_patient.items() if s == {"test"}}
  assert 0 < len(test_patients) < len(split_of_patient)
  assert test_patients == {p for p in map(_patient, truth.values())
                           if phantom_export.is_test_patient(SEED, int(p), TEST_FRACTION)}
  for name in (phantom_export.TRAIN_VAL_FILE, phantom_export.TEST_FILE):
    with open(os.path.join(folder, name)) as f:
      lines = f.read().splitlines()
    assert lines == sorted(lines)


def test_prepared_dataset_holds_the_phantom_images(exported, tmp_path):
  folder, truth = exported
  data_dir = str(tmp_path / "prepared")
  built = shards.prepare("nih", folder, data_dir, SIZE, workers=1, progress=False)
  source = prepared.PreparedSource(built)
  assert sorted(source.image_ids) == sorted(truth)
  for i in range(len(source)):
    ex = source[i]
    want = truth[ex["image_id"]]
    np.testing.assert_array_equal(ex["image"], want["image"])   # PNG is lossless
    np.testing.assert_array_equal(ex["labels"], want["labels"])
    np.testing.assert_array_equal(ex["box_labels"], want["box_labels"])
    np.testing.assert_allclose(ex["boxes"], want["boxes"], atol=1 / 1024)
  config = common.base_config("dataset=nih").data
  config.data_dir, config.image_size = data_dir, SIZE
  test = prepared.make_source(config, "test")
  names = [test.source.image_ids[i] for i in test.indices]
  assert names == sorted(n for n in truth if phantom_export.is_test_patient(
      SEED, int(_patient(truth[n])), TEST_FRACTION))
  for i in range(len(test)):
    np.testing.assert_array_equal(test[i]["image"], truth[names[i]]["image"])
    schema.validate_example(test[i], len(schema.NIH14), origin=names[i])


def test_cli_exports_and_grid_still_works(tmp_path, capsys):
  phantoms_cli.run([f"--export_dir={tmp_path / 'nih'}", "--num=3", "--size=32", "--workers=1",
                    "--seed=1"])
  recs, problems = nih.read(str(tmp_path / "nih"))
  assert [r.id for r in recs] == [phantom_export.image_name(i) for i in range(3)]
  assert problems.count == 0
  assert "cxr-prepare --dataset=nih" in capsys.readouterr().out
  phantoms_cli.run([f"--out={tmp_path / 'grid.png'}", "--size=32", "--num=2", "--dpi=30"])
  assert (tmp_path / "grid.png").stat().st_size > 0
