"""Patient-level splits on the real NIH Data_Entry_2017_v2020.csv (112,120 images)."""

import collections
import csv

import numpy as np
import pytest

from cxr_jax.data import splits

FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}


@pytest.fixture(scope="module")
def entries(nih_sample_dir):
  """(image names [N], patient ids [N]) read with the csv module.

  The header's unquoted brackets ("OriginalImage[Width,Height]") split into
  extra columns, so columns are found by name in the header row.
  """
  with open(nih_sample_dir / "Data_Entry_2017_v2020.csv", newline="") as f:
    rows = list(csv.reader(f))
  header = rows[0]
  image_col, patient_col = header.index("Image Index"), header.index("Patient ID")
  images = [r[image_col] for r in rows[1:]]
  patients = [r[patient_col] for r in rows[1:]]
  assert len(images) == 112_120 and len(set(patients)) == 30_805
  return images, patients


def patient_sets(parts, patients):
  return {name: {patients[i] for i in idx} for name, idx in parts.items()}


def assert_partition(index_arrays, n):
  """Every index in [0, n) appears in exactly one of the arrays; each is sorted int64."""
  for idx in index_arrays:
    assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0)
  np.testing.assert_array_equal(np.sort(np.concatenate(index_arrays)), np.arange(n))


def test_patient_split_real_data(entries):
  _, patients = entries
  parts = splits.patient_split(patients, FRACTIONS, seed=0)
  assert list(parts) == list(FRACTIONS)
  assert_partition(list(parts.values()), len(patients))
  sets = patient_sets(parts, patients)
  names = list(sets)
  for a in range(len(names)):
    for b in range(a + 1, len(names)):
      assert not sets[names[a]] & sets[names[b]], (names[a], names[b])
  splits.assert_patient_disjoint(parts, patients)
  num_patients = len(set(patients))
  for name, fraction in FRACTIONS.items():
    assert abs(len(sets[name]) - fraction * num_patients) <= 1
    assert abs(len(parts[name]) / len(patients) - fraction) < 0.02  # images follow loosely


def test_patient_split_determinism(entries):
  _, patients = entries
  first = splits.patient_split(patients, FRACTIONS, seed=3)
  again = splits.patient_split(patients, FRACTIONS, seed=3)
  other = splits.patient_split(patients, FRACTIONS, seed=4)
  for name in FRACTIONS:
    np.testing.assert_array_equal(first[name], again[name])
  assert not np.array_equal(first["test"], other["test"])
  # Depends on the patients, not on the order of the rows.
  order = np.random.default_rng(0).permutation(len(patients))
  shuffled = splits.patient_split([patients[i] for i in order], FRACTIONS, seed=3)
  np.testing.assert_array_equal(np.sort(order[shuffled["test"]]), first["test"])


def test_patient_split_bad_fractions():
  with pytest.raises(ValueError, match="sum to 1"):
    splits.patient_split(["a", "b"], {"train": 0.7, "test": 0.2}, seed=0)
  with pytest.raises(ValueError, match=">= 0"):
    splits.patient_split(["a", "b"], {"train": 1.2, "test": -0.2}, seed=0)


def test_kfold_real_data(entries):
  _, patients = entries
  k = 5
  folds = splits.kfold(patients, k, seed=0)
  assert len(folds) == k
  assert_partition([test for _, test in folds], len(patients))
  test_patient_counts = []
  for train, test in folds:
    assert_partition([train, test], len(patients))
    train_patients = {patients[i] for i in train}
    test_patients = {patients[i] for i in test}
    assert not train_patients & test_patients
    splits.assert_patient_disjoint({"train": train, "test": test}, patients)
    test_patient_counts.append(len(test_patients))
  assert max(test_patient_counts) - min(test_patient_counts) <= 1
  again = splits.kfold(patients, k, seed=0)
  other = splits.kfold(patients, k, seed=1)
  assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again))
  assert not np.array_equal(folds[0][1], other[0][1])
  with pytest.raises(ValueError, match="k must lie"):
    splits.kfold(["a", "b"], 3, seed=0)


def test_select_fraction(entries):
  _, patients = entries
  indices = splits.patient_split(patients, {"a": 0.5, "b": 0.5}, seed=0)["a"]
  picked = splits.select_fraction(indices, 0.2, seed=1)
  assert len(picked) == round(0.2 * len(indices)) and set(picked) <= set(indices)
  assert np.all(np.diff(picked) > 0)
  np.testing.assert_array_equal(picked, splits.select_fraction(indices, 0.2, seed=1))
  assert not np.array_equal(picked, splits.select_fraction(indices, 0.2, seed=2))
  assert len(splits.select_fraction(indices, 0.0, seed=1)) == 0
  np.testing.assert_array_equal(splits.select_fraction(indices, 1.0, seed=1), indices)
  # By patient: whole patients, the requested fraction of them.
  by_patient = splits.select_fraction(indices, 0.2, seed=1, patient_ids=patients)
  images_of = collections.defaultdict(set)
  for i in indices:
    images_of[patients[i]].add(i)
  chosen = {patients[i] for i in by_patient}
  assert len(chosen) == round(0.2 * len(images_of))
  assert set(by_patient) == set().union(*(images_of[p] for p in chosen))
  with pytest.raises(ValueError, match="fraction"):
    splits.select_fraction(indices, 1.5, seed=0)


def test_annotated_split_real_boxes(entries, nih_sample_dir):
  images, patients = entries
  with open(nih_sample_dir / "BBox_List_2017.csv", newline="") as f:
    boxed = {row[0] for row in list(csv.reader(f))[1:]}
  has_boxes = np.array([name in boxed for name in images])
  assert has_boxes.sum() == 880
  parts = splits.annotated_split(patients, has_boxes, {"train": 0.8, "test": 0.2}, seed=0)
  splits.assert_patient_disjoint(parts, patients)
  np.testing.assert_array_equal(np.sort(np.concatenate([parts["train"], parts["test"]])),
                                np.flatnonzero(has_boxes))
  annotated_patients = {patients[i] for i in np.flatnonzero(has_boxes)}
  expected_pool = [i for i, p in enumerate(patients) if p not in annotated_patients]
  np.testing.assert_array_equal(parts["unannotated"], expected_pool)
  # Rozenberg's settings: 0% or 20% of the unannotated images for training.
  extra = splits.select_fraction(parts["unannotated"], 0.2, seed=0)
  splits.assert_patient_disjoint({"train": np.union1d(parts["train"], extra),
                                  "test": parts["test"]}, patients)
  # The pool may also take the unannotated images of the training patients.
  joined = splits.annotated_split(patients, has_boxes, {"train": 0.8, "test": 0.2}, seed=0,
                                  pool_joins="train")
  np.testing.assert_array_equal(joined["test"], parts["test"])
  test_patients = {patients[i] for i in parts["test"]}
  expected_pool = [i for i, p in enumerate(patients)
                   if not has_boxes[i] and p not in test_patients]
  np.testing.assert_array_equal(joined["unannotated"], expected_pool)
  assert len(joined["unannotated"]) > len(parts["unannotated"])
  splits.assert_patient_disjoint({"pool": joined["unannotated"], "test": joined["test"]},
                                 patients)
  with pytest.raises(ValueError, match="pool_joins"):
    splits.annotated_split(patients, has_boxes, {"train": 0.8, "test": 0.2}, 0, pool_joins="val")


def test_assert_patient_disjoint_catches_overlap(entries):
  _, patients = entries
  parts = splits.patient_split(patients, FRACTIONS, seed=0)
  leaked = parts["test"][5]
  parts["train"] = np.append(parts["train"], leaked)
  with pytest.raises(ValueError) as error:
    splits.assert_patient_disjoint(parts, patients)
  message = str(error.value)
  assert repr(patients[leaked]) in message and "'train'" in message and "'test'" in message


def test_official_lists_are_patient_disjoint(entries, nih_sample_dir):
  images, patients = entries
  patient_of = dict(zip(images, patients))
  lists = {name: (nih_sample_dir / f"{name}.txt").read_text().split()
           for name in ("train_val_list", "test_list")}
  assert len(lists["train_val_list"]) == 86_524 and len(lists["test_list"]) == 25_596
  assert set(lists["train_val_list"]) | set(lists["test_list"]) == set(images)
  index_of = {name: i for i, name in enumerate(images)}
  parts = {name: np.array([index_of[n] for n in names]) for name, names in lists.items()}
  assert not ({patient_of[n] for n in lists["train_val_list"]}
              & {patient_of[n] for n in lists["test_list"]})
  splits.assert_patient_disjoint(parts, patients)


@pytest.mark.parametrize("policy", ["random", "official"])
def test_split_policy_on_the_full_nih_layout(entries, nih_sample_dir, policy):
  """data.split_policy on the full NIH metadata with its official test list: 'random' (Ge 2018)
  splits every image by patient 70/10/20 and ignores the list; 'official' tests on the list."""
  from configs import common  # pylint: disable=import-outside-toplevel
  images, patients = entries
  test_list = set((nih_sample_dir / "test_list.txt").read_text().split())
  official = np.array(["test" if name in test_list else "train" for name in images])
  data = common.base_config("dataset=nih").data
  assert data.split_policy == "official"
  data.split_policy = policy
  parts = splits.split_indices(patients, official, np.zeros(len(images), bool), data)
  assert_partition(list(parts.values()), len(images))
  splits.assert_patient_disjoint(parts, patients)
  in_list = official[parts["test"]] == "test"
  if policy == "official":
    np.testing.assert_array_equal(parts["test"], np.flatnonzero(official == "test"))
    return
  num_patients = len(set(patients))
  for name, fraction in FRACTIONS.items():
    share = len(patient_sets(parts, patients)[name]) / num_patients
    assert abs(share - fraction) < 1e-3, (name, share)
    assert abs(len(parts[name]) / len(images) - fraction) < 0.02, name
  # The official list plays no part: test holds about 20 % of the listed and unlisted images.
  assert 0.1 < in_list.mean() < 0.4 and 0.1 < (official[parts["train"]] == "test").mean() < 0.4
  data.split_policy = "by_hospital"
  with pytest.raises(ValueError, match="data.split_policy 'by_hospital'"):
    splits.split_indices(patients, official, np.zeros(len(images), bool), data)


def test_no_official_train_warning_is_logged_once_and_says_what_cv_does(caplog, monkeypatch):
  """The NIH sample (every image in the official test list) is split at every make_source: its
  warning is logged once per process, and under cross-validation it describes the folds."""
  from configs import common  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(splits, "_warned", set())
  ids = np.repeat(np.arange(50).astype(str), 2)
  data = common.base_config("dataset=nih").data
  caplog.set_level("WARNING")
  for _ in range(3):
    splits.split_indices(ids, np.full(len(ids), "test"), np.ones(len(ids), bool), data)
  with data.unlocked():
    data.cv.num_folds, data.cv.fold = 5, 2
  for _ in range(3):
    splits.split_indices(ids, np.full(len(ids), "test"), np.ones(len(ids), bool), data)
  messages = [r.getMessage() for r in caplog.records if "official train split" in r.getMessage()]
  assert messages == [
      "no image of the official train split is present (100 images): all are split by patient "
      "(data.val_fraction=0.1, data.test_fraction=0.2, the rest 'train')",
      "no image of the official train split is present (100 images): 'val' is a patient-level "
      "data.val_fraction=0.1 of them; 'train' / 'test' are fold 2 of data.cv's 5 over the other "
      "patients' boxed images"]
