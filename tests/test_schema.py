"""Example validation, label-space mapping and padding of cxr_jax.data.schema."""

import numpy as np
import pytest

from cxr_jax.data import schema
from cxr_jax.data.schema import CHEXPERT14, MAX_BOXES, MAX_FIXATIONS, NIH14, ExampleError

K = len(NIH14)
ORIGIN = "nih/Data_Entry_2017_v2020.csv row 17"


def good_example():
  rng = np.random.default_rng(0)
  boxes, box_labels = schema.pad_boxes([[0.1, 0.2, 0.4, 0.5], [0.5, 0.5, 1.0, 1.0]], [2, 7])
  gaze = schema.pad_gaze(np.array([[0.3, 0.4, 0.5], [0.0, 1.0, 0.2]]))
  return {
      "image": rng.integers(0, 256, size=(48, 40), dtype=np.uint8),
      "labels": np.eye(K, dtype=np.float32)[2] + np.eye(K, dtype=np.float32)[7],
      "label_mask": np.ones(K, np.float32),
      "boxes": boxes,
      "box_labels": box_labels,
      "gaze": gaze,
      "patient_id": "00000013",
      "image_id": "00000013_005.png",
      "finding_mask": np.zeros((48, 40), bool),  # extra keys are allowed
  }


def test_accepts_well_formed_example():
  schema.validate_example(good_example(), K, origin=ORIGIN)
  empty = good_example()
  empty["boxes"], empty["box_labels"] = schema.empty_boxes()
  empty["gaze"] = schema.empty_gaze()
  schema.validate_example(empty, K, origin=ORIGIN)


def _set(key, value):
  def mutate(example):
    example[key] = value(example[key]) if callable(value) else value
  return mutate


def _set_row(key, row, values):
  def mutate(example):
    example[key][row] = values
  return mutate


BAD = {
    "missing key": (lambda e: e.pop("gaze"), "missing keys"),
    "image dtype": (_set("image", lambda v: v.astype(np.float32)), "image has dtype"),
    "labels dtype": (_set("labels", lambda v: v.astype(np.float64)), "labels has dtype"),
    "image rank": (_set("image", lambda v: v[..., None]), "image has shape"),
    "labels shape": (_set("labels", np.zeros(K + 1, np.float32)), "labels has shape"),
    "boxes shape": (_set("boxes", lambda v: v[:-1]), "boxes has shape"),
    "not an array": (_set("label_mask", [1.0] * K), "must be a numpy array"),
    "soft label": (_set_row("labels", 0, 0.5), "labels must be 0/1"),
    "mask not 0/1": (_set_row("label_mask", 3, -1.0), "label_mask must be 0/1"),
    "box outside": (_set_row("boxes", 1, [0.5, 0.5, 1.2, 1.0]), "box outside the image"),
    "negative box": (_set_row("boxes", 0, [-0.1, 0.2, 0.4, 0.5]), "box outside the image"),
    "nan box": (_set_row("boxes", 0, [np.nan, 0.2, 0.4, 0.5]), "box outside the image"),
    "x1 < x0": (_set_row("boxes", 0, [0.4, 0.2, 0.1, 0.5]), "x1 < x0"),
    "y1 < y0": (_set_row("boxes", 0, [0.1, 0.5, 0.4, 0.2]), "y1 < y0"),
    "padding first": (_set("box_labels", lambda v: np.roll(v, 1)), "padding rows"),
    "label too big": (_set_row("box_labels", 0, K), "box_labels outside"),
    "label below -1": (_set_row("box_labels", 0, -2), "box_labels outside"),
    "gaze outside": (_set_row("gaze", 0, [1.5, 0.4, 0.5]), "gaze fixation outside"),
    "negative seconds": (_set_row("gaze", 1, [0.2, 0.4, -0.1]), "durations"),
    "nan gaze": (_set_row("gaze", 0, [np.nan, 0.4, 0.5]), "non-finite"),
    "empty id": (_set("patient_id", ""), "patient_id"),
    "id not str": (_set("image_id", 13), "image_id"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_rejects_bad_example_naming_origin(case):
  mutate, message = BAD[case]
  example = good_example()
  mutate(example)
  with pytest.raises(ExampleError, match=message) as error:
    schema.validate_example(example, K, origin=ORIGIN)
  assert str(error.value).startswith(ORIGIN + ":")


def test_padding_rows_are_not_checked_as_boxes_or_fixations():
  example = good_example()
  example["boxes"][5] = [2.0, 2.0, -1.0, -1.0]   # box_labels[5] == -1
  example["gaze"][7] = [5.0, -3.0, 0.0]            # seconds == 0
  schema.validate_example(example, K, origin=ORIGIN)


def test_label_mapping_by_name():
  mapping = schema.label_mapping(NIH14, CHEXPERT14)
  assert mapping.dtype == np.int32 and mapping.shape == (len(CHEXPERT14),)
  # Independent expectation: same name, or the one synonym pair between these spaces.
  synonyms = {"Pleural Effusion": "Effusion"}
  for j, name in enumerate(CHEXPERT14.classes):
    source = synonyms.get(name, name)
    expected = NIH14.classes.index(source) if source in NIH14.classes else -1
    assert mapping[j] == expected, name
  named = {CHEXPERT14.classes[j]: NIH14.classes[i] for j, i in enumerate(mapping) if i >= 0}
  assert named == {"Cardiomegaly": "Cardiomegaly", "Edema": "Edema",
                   "Consolidation": "Consolidation", "Pneumonia": "Pneumonia",
                   "Atelectasis": "Atelectasis", "Pneumothorax": "Pneumothorax",
                   "Pleural Effusion": "Effusion"}
  back = schema.label_mapping(CHEXPERT14, NIH14)
  assert back[NIH14.index("Effusion")] == CHEXPERT14.index("Pleural Effusion")
  assert back[NIH14.index("Mass")] == -1 and back[NIH14.index("Hernia")] == -1


def test_map_labels_masks_unmatched_and_round_trips():
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 2, size=(6, K)).astype(np.float32)
  mask = rng.integers(0, 2, size=(6, K)).astype(np.float32)
  cx_labels, cx_mask = schema.map_labels(labels, mask, NIH14, CHEXPERT14)
  assert cx_labels.shape == (6, len(CHEXPERT14)) and cx_labels.dtype == np.float32
  for name in ("No Finding", "Lung Lesion", "Support Devices", "Fracture"):
    j = CHEXPERT14.index(name)
    assert not cx_mask[:, j].any() and not cx_labels[:, j].any()
  j, i = CHEXPERT14.index("Pleural Effusion"), NIH14.index("Effusion")
  np.testing.assert_array_equal(cx_labels[:, j], labels[:, i])
  np.testing.assert_array_equal(cx_mask[:, j], mask[:, i])
  round_labels, round_mask = schema.map_labels(cx_labels, cx_mask, CHEXPERT14, NIH14)
  shared = schema.label_mapping(CHEXPERT14, NIH14) >= 0
  assert shared.sum() == 7
  np.testing.assert_array_equal(round_labels[:, shared], labels[:, shared])
  np.testing.assert_array_equal(round_mask[:, shared], mask[:, shared])
  assert not round_mask[:, ~shared].any()


def test_label_space_errors():
  with pytest.raises(KeyError, match="Effusion"):
    CHEXPERT14.index("Effusion")
  with pytest.raises(KeyError, match="unknown label space"):
    schema.get_label_space("mimic")
  with pytest.raises(ValueError, match="repeats"):
    schema.LabelSpace("x", ("a", "a"))
  assert NIH14.boxed_indices == tuple(range(8))


def test_pad_boxes():
  boxes, labels = schema.pad_boxes([[0.1, 0.2, 0.3, 0.4]], [5], origin=ORIGIN)
  assert boxes.shape == (MAX_BOXES, 4) and boxes.dtype == np.float32
  assert labels.shape == (MAX_BOXES,) and labels.dtype == np.int32
  np.testing.assert_allclose(boxes[0], [0.1, 0.2, 0.3, 0.4])
  assert labels[0] == 5 and np.all(labels[1:] == -1) and np.all(boxes[1:] == 0)
  empty_boxes, empty_labels = schema.pad_boxes([], [])
  assert np.all(empty_labels == -1) and empty_boxes.shape == (MAX_BOXES, 4)
  with pytest.raises(ExampleError, match=f"{ORIGIN}: 1 boxes but 2 box labels"):
    schema.pad_boxes([[0.1, 0.2, 0.3, 0.4]], [1, 2], origin=ORIGIN)
  too_many = [[0.0, 0.0, 1.0, 1.0]] * (MAX_BOXES + 1)
  with pytest.raises(ExampleError, match="MAX_BOXES"):
    schema.pad_boxes(too_many, [0] * len(too_many), origin=ORIGIN)


def test_pad_gaze():
  rng = np.random.default_rng(2)
  fixations = np.stack([rng.uniform(0, 1, 10), rng.uniform(0, 1, 10),
                        rng.uniform(0.1, 1, 10)], axis=1)
  gaze = schema.pad_gaze(fixations)
  assert gaze.shape == (MAX_FIXATIONS, 3) and gaze.dtype == np.float32
  np.testing.assert_allclose(gaze[:10], fixations, rtol=1e-6)
  assert np.all(gaze[10:] == 0)
  # More than MAX_FIXATIONS: the longest are kept, in their original order.
  n = MAX_FIXATIONS + 40
  seconds = rng.permutation(n) + 1.0
  many = np.stack([np.linspace(0, 1, n), np.full(n, 0.5), seconds], axis=1)
  kept = schema.pad_gaze(many)
  longest = np.sort(np.argsort(-seconds)[:MAX_FIXATIONS])
  np.testing.assert_allclose(kept, many[longest].astype(np.float32))
  assert kept[:, 2].min() == 41.0
