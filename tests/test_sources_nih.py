"""NIH ChestX-ray14 reader: on the real sample, and on small broken copies of its layout."""

import collections
import json
import os
import pathlib

import cv2
import numpy as np
import pytest

from cxr_jax.data import schema
from cxr_jax.data.sources import nih
from cxr_jax.data.sources import records as rec

HEADER_2017 = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
               "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")
BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"


@pytest.fixture(scope="module")
def sample(nih_sample_dir):
  return nih.read(str(nih_sample_dir), only_present=True)


@pytest.fixture(scope="module")
def data_entry(nih_sample_dir):
  """Independent parse: {image: (finding labels text, patient id)}."""
  lines = (nih_sample_dir / "Data_Entry_2017_v2020.csv").read_text().splitlines()[1:]
  out = {}
  for line in lines:
    parts = line.split(",")
    out[parts[0]] = (parts[1], parts[3])
  return out


def test_sample_counts(sample, nih_sample_dir):
  records, problems = sample
  assert len(records) == len(os.listdir(nih_sample_dir / "images")) == 880
  assert sum(len(r.boxes) for r in records) == 984
  assert sum(len(r.boxes) > 0 for r in records) == 880
  assert problems.bad_count == 0
  assert problems.counts() == {nih.SKIPPED_BY_ONLY_PRESENT: 112_120 - 880}
  assert len({r.id for r in records}) == 880


def test_problems_report_written_atomically(sample, tmp_path):
  _, problems = sample
  path = tmp_path / "report" / "problems.json"
  problems.write(str(path), max_filtered_listed=7)
  report = json.loads(path.read_text())
  assert report["counts"] == problems.counts() and report["count"] == 112_120 - 880
  assert len(report["entries"]) == 7 and os.listdir(path.parent) == ["problems.json"]
  assert all(e["row"] >= 2 and e["file"].endswith("Data_Entry_2017_v2020.csv")
             for e in report["entries"])


def test_sample_labels_and_patients(sample, data_entry):
  records, _ = sample
  classes = schema.NIH14.classes
  for r in records:
    text, patient = data_entry[r.id]
    names = set() if text == "No Finding" else set(text.split("|"))
    assert {classes[i] for i in np.flatnonzero(r.labels)} == names, r.id
    assert r.labels.dtype == np.float32 and np.all(r.label_mask == 1)
    assert r.patient_id == patient
    assert int(r.id.split("_")[0]) == int(patient)
    assert r.view in ("PA", "AP")
  # Every boxed class is among the image's findings ('Infiltrate' -> Infiltration).
  for r in records:
    assert set(r.box_labels.tolist()) <= set(np.flatnonzero(r.labels).tolist()), r.id
  assert any(classes[i] == "Infiltration" for r in records for i in r.box_labels)


def test_sample_boxes_in_release_pixels(sample, nih_sample_dir):
  records, _ = sample
  by_id = {r.id: r for r in records}
  expected = collections.defaultdict(list)
  for line in (nih_sample_dir / "BBox_List_2017.csv").read_text().splitlines()[1:]:
    name, label, x, y, w, h = line.split(",")[:6]
    x, y, w, h = map(float, (x, y, w, h))
    label = "Infiltration" if label == "Infiltrate" else label
    expected[name].append((schema.NIH14.index(label), x / 1024, y / 1024, (x + w) / 1024,
                           (y + h) / 1024))
  assert len(expected) == 880
  for name, boxes in expected.items():
    r = by_id[name]
    got = sorted(zip(r.box_labels.tolist(), *r.boxes.T.tolist()))
    np.testing.assert_allclose(np.array(got), np.array(sorted(boxes)), atol=1e-6)


def test_sample_boxes_cover_image_content(sample):
  """Boxed regions of the real 256 px images hold lung / heart, not the black border."""
  records, _ = sample
  for r in records[:20]:
    image = cv2.imread(r.path, cv2.IMREAD_GRAYSCALE)
    size = image.shape[0]
    for x0, y0, x1, y1 in (r.boxes * size).astype(int):
      patch = image[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)]
      assert patch.std() > 2 and patch.mean() > 10, (r.id, patch.mean(), patch.std())


def test_sample_official_splits(nih_sample_dir):
  records, problems = nih.read(str(nih_sample_dir), check_images=False)
  assert len(records) == 112_120 and problems.count == 0
  test = set((nih_sample_dir / "test_list.txt").read_text().split())
  splits = collections.Counter(r.official_split for r in records)
  assert splits == {"train": 86_524, "test": 25_596}
  assert all((r.official_split == "test") == (r.id in test) for r in records)
  patients = {s: {r.patient_id for r in records if r.official_split == s} for s in splits}
  assert not patients["train"] & patients["test"]
  assert all(r.official_split == "test" for r in records if len(r.boxes))


def test_to_example_decodes_and_resizes(sample):
  records, _ = sample
  source = rec.RecordSource("nih", records, image_size=32)
  assert len(source) == 880 and "880" in repr(source)
  example = source[np.int64(3)]
  r = records[3]
  raw = cv2.imread(r.path, cv2.IMREAD_UNCHANGED)
  np.testing.assert_array_equal(example["image"],
                                cv2.resize(raw, (32, 32), interpolation=cv2.INTER_AREA))
  n = len(r.boxes)
  np.testing.assert_array_equal(example["boxes"][:n], r.boxes)
  assert np.all(example["box_labels"][n:] == -1) and example["boxes"].shape == (schema.MAX_BOXES, 4)
  assert example["image_id"] == r.id and example["patient_id"] == r.patient_id
  assert source.patient_ids.shape == (880,) and set(source.official_splits.tolist()) == {"test"}


# --- small broken layouts ----------------------------------------------------------------


def _write_layout(root: pathlib.Path, rows, boxes=(), nested=False, missing=()):
  """A tiny NIH download: 2017 Data_Entry (trailing commas), BBox_List, images, split lists."""
  folder = root / "images_001" / "images" if nested else root / "images"
  folder.mkdir(parents=True)
  names = list(dict.fromkeys(name for name, _, _ in rows))
  for name in names:
    if name not in missing:
      cv2.imwrite(str(folder / name), np.full((16, 16), 128, np.uint8))
  (root / "Data_Entry_2017.csv").write_text("\n".join(
      [HEADER_2017] + [f"{n},{l},0,{p},50,M,PA,2500,2048,0.14,0.14," for n, l, p in rows]) + "\n")
  (root / "BBox_List_2017.csv").write_text("\n".join([BBOX_HEADER] + list(boxes)) + "\n")
  (root / "train_val_list.txt").write_text("\n".join(names[:-1]) + "\n")
  (root / "test_list.txt").write_text(names[-1] + "\n")
  return root


ROWS = [("00000001_000.png", "Cardiomegaly", "1"),
        ("00000001_001.png", "Cardiomegaly|Infiltration", "1"),
        ("00000002_000.png", "No Finding", "2")]


def test_nested_layout_and_2017_file(tmp_path):
  root = _write_layout(tmp_path, ROWS, ["00000001_001.png,Infiltrate,512,256,256,128,,,"],
                       nested=True)
  records, problems = nih.read(str(root))
  assert problems.count == 0 and [r.id for r in records] == [n for n, _, _ in ROWS]
  assert [r.official_split for r in records] == ["train", "train", "test"]
  assert all(os.path.isfile(r.path) and "images_001" in r.path for r in records)
  np.testing.assert_allclose(records[1].boxes, [[0.5, 0.25, 0.75, 0.375]])
  assert records[1].box_labels.tolist() == [schema.NIH14.index("Infiltration")]
  assert records[2].labels.sum() == 0


@pytest.mark.parametrize("case, file, line, words", [
    ("missing_image", "Data_Entry_2017.csv", 3, "not found"),
    ("unknown_label", "Data_Entry_2017.csv", 4, "unknown label"),
    ("duplicate", "Data_Entry_2017.csv", 5, "duplicated"),
    ("box_outside", "BBox_List_2017.csv", 3, "outside"),
    ("box_label", "BBox_List_2017.csv", 2, "unknown box label"),
])
def test_bad_input_names_file_and_line(tmp_path, case, file, line, words):
  rows, boxes, missing = list(ROWS), ["00000001_000.png,Cardiomegaly,10,10,100,100"], ()
  if case == "missing_image":
    missing = (ROWS[1][0],)
  elif case == "unknown_label":
    rows[2] = (rows[2][0], "Cardiomegaly|Pneumonitis", "2")
  elif case == "duplicate":
    rows.append(ROWS[0])
  elif case == "box_outside":
    boxes.append("00000001_001.png,Mass,900,10,200,100")
  elif case == "box_label":
    boxes[0] = "00000001_000.png,Lesion,10,10,100,100"
  root = _write_layout(tmp_path, rows, boxes, missing=missing)
  with pytest.raises(rec.BadInput, match=rf"{file}, line {line}: .*{words}"):
    nih.read(str(root))
  records, problems = nih.read(str(root), skip_bad=True)
  assert problems.bad_count == 1 and problems.entries[0]["row"] == line
  assert problems.entries[0]["file"].endswith(file)
  dropped = 1 if file.startswith("Data_Entry") else 0
  assert len(records) == len(rows) - dropped
  assert sum(len(r.boxes) for r in records) == len(boxes) - (1 - dropped)
  problems.write(str(tmp_path / "out" / "problems.json"))
  assert '"bad_count": 1' in (tmp_path / "out" / "problems.json").read_text()


def test_only_present_and_unchecked(tmp_path):
  root = _write_layout(tmp_path, ROWS, missing=(ROWS[0][0],))
  records, problems = nih.read(str(root), only_present=True)
  assert [r.id for r in records] == [ROWS[1][0], ROWS[2][0]]
  assert problems.counts() == {nih.SKIPPED_BY_ONLY_PRESENT: 1} and problems.bad_count == 0
  records, problems = nih.read(str(root), check_images=False)
  assert len(records) == 3 and problems.count == 0
  with pytest.raises(rec.BadInput, match="00000001_000.png"):
    rec.to_example(records[0], 16)
