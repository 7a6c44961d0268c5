"""cxr-prepare: ArrayRecord shards round-trip, resume, bad input, splits on prepared data."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import cv2
import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from configs import common
from cxr_jax.cli import prepare as prepare_cli
from cxr_jax.data import layout, pipeline, prepared, schema, shards, splits
from cxr_jax.data.sources import nih
from cxr_jax.data.sources import records as records_lib
from cxr_jax.data.sources import synthetic

SOURCE_SIZE, SIZE = 48, 32
NUM_PATIENTS, PER_PATIENT = 12, 2
TEST_PATIENTS = 4        # the last ones: official test split


def fake_records(folder) -> list[records_lib.Record]:
  """24 phantom images (12 patients) as PNG files; boxes kept on every third patient."""
  phantoms = synthetic.SyntheticPhantoms(num_examples=NUM_PATIENTS * PER_PATIENT,
                                         image_size=SOURCE_SIZE, seed=3)
  out = []
  for i in range(len(phantoms)):
    ex = phantoms[i]
    patient = i // PER_PATIENT
    path = os.path.join(folder, f"img{i:03d}.png")
    cv2.imwrite(path, ex["image"])
    real = ex["box_labels"] >= 0
    boxed = patient % 3 == 0
    fixations = ex["gaze"][ex["gaze"][:, 2] > 0]
    out.append(records_lib.Record(
        id=f"img{i:03d}.png", path=path, patient_id=f"p{patient}",
        official_split="test" if patient >= NUM_PATIENTS - TEST_PATIENTS else "train",
        labels=ex["labels"], label_mask=np.ones_like(ex["labels"]),
        boxes=ex["boxes"][real] if boxed else np.zeros((0, 4), np.float32),
        box_labels=ex["box_labels"][real] if boxed else np.zeros((0,), np.int32),
        gaze=fixations, view="PA"))
  return out


def build(records, data_dir, **kwargs):
  return shards.prepare_records("nih", records, records_lib.Problems(), schema.NIH14,
                                str(data_dir), SIZE, progress=False, min_shards=1, **kwargs)


def data_config(data_dir, **overrides):
  c = common.base_config("dataset=nih")
  c.data.data_dir = str(data_dir)
  c.data.image_size = SIZE
  c.data.val_fraction = 0.25
  for key, value in overrides.items():
    c.data[key] = value
  return c.data


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
  images = tmp_path_factory.mktemp("images")
  recs = fake_records(str(images))
  data_dir = tmp_path_factory.mktemp("prepared")
  return recs, data_dir, build(recs, data_dir, shard_size=5)


def encoder_killed_after(count: int | None, encoded: list):
  """``shards.encode_record`` that records each id in ``encoded`` and raises
  KeyboardInterrupt (a killed build) when asked for record ``count + 1`` (None: never)."""
  encode = shards.encode_record

  def encode_or_die(record, *args):
    if count is not None and len(encoded) == count:
      raise KeyboardInterrupt("killed")
    encoded.append(record.id)
    return encode(record, *args)

  return encode_or_die


def independent_image(path: str) -> np.ndarray:
  return cv2.resize(cv2.imread(path, cv2.IMREAD_GRAYSCALE), (SIZE, SIZE),
                    interpolation=cv2.INTER_AREA)


def test_every_field_round_trips(fake):
  recs, _, folder = fake
  source = prepared.PreparedSource(folder)
  train = [r for r in recs if r.official_split == "train"]
  test = [r for r in recs if r.official_split == "test"]
  assert source.splits == ["train", "test"]
  assert len(source) == len(recs)
  for i, r in enumerate(train + test):   # stored order: official train, then test
    ex = source[i]
    schema.validate_example(ex, len(schema.NIH14), origin=f"example {i}")
    np.testing.assert_array_equal(ex["image"], independent_image(r.path))
    np.testing.assert_array_equal(ex["labels"], r.labels)
    np.testing.assert_array_equal(ex["label_mask"], r.label_mask)
    n = len(r.box_labels)
    np.testing.assert_array_equal(ex["boxes"][:n], r.boxes)
    np.testing.assert_array_equal(ex["box_labels"][:n], r.box_labels)
    assert np.all(ex["box_labels"][n:] == -1)
    np.testing.assert_array_equal(ex["gaze"][:len(r.gaze)], r.gaze)
    assert np.all(ex["gaze"][len(r.gaze):] == 0)
    assert (ex["patient_id"], ex["image_id"]) == (r.patient_id, r.id)
    assert source.official_splits[i] == r.official_split
    assert source.num_boxes[i] == n
  with open(os.path.join(folder, layout.REPORT_FILE)) as f:
    assert json.load(f)["count"] == 0


def test_readable_by_tfds_without_tensorflow(fake):
  """A fresh process reads the shards with tfds.data_source and never imports TensorFlow."""
  recs, _, folder = fake
  code = (
      "import sys, tensorflow_datasets as tfds\n"
      f"b = tfds.builder_from_directory({folder!r})\n"
      "n = {s: len(b.as_data_source(s)) for s in b.info.splits}\n"
      "x = b.as_data_source('test')[0]\n"
      "assert x['image'].shape == (%d, %d, 1), x['image'].shape\n"
      "assert 'tensorflow' not in sys.modules\n"
      "print(n['train'], n['test'])\n") % (SIZE, SIZE)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  train = sum(r.official_split == "train" for r in recs)
  assert out.stdout.split() == [str(train), str(len(recs) - train)]


def test_png_compression_level_changes_bytes_not_pixels(fake, tmp_path, monkeypatch):
  """The default (level 0) stores each row's filter byte and pixels uncompressed; level 9
  decodes to the same pixels in fewer PNG bytes; an unfinished build is not resumed at
  another level."""
  recs, _, folder = fake
  assert shards.PNG_COMPRESSION == 0
  level9 = build(recs, tmp_path / "level9", shard_size=5, png_compression=9)
  raw, packed = prepared.PreparedSource(folder), prepared.PreparedSource(level9)
  for i in range(len(raw)):
    np.testing.assert_array_equal(packed[i]["image"], raw[i]["image"])
  png_bytes = lambda source: [len(source.stored[i]["image"]) for i in range(len(source))]
  assert min(png_bytes(raw)) >= SIZE * (SIZE + 1)
  assert sum(png_bytes(packed)) < sum(png_bytes(raw))
  with pytest.raises(ValueError, match="png_compression=10"):
    build(recs, tmp_path / "bad", png_compression=10)
  encode = shards.encode_record
  monkeypatch.setattr(shards, "encode_record", encoder_killed_after(7, []))
  with pytest.raises(KeyboardInterrupt):
    build(recs, tmp_path / "resume", shard_size=3, png_compression=9)
  monkeypatch.setattr(shards, "encode_record", encode)
  with pytest.raises(ValueError, match="unfinished build of different records or options"):
    build(recs, tmp_path / "resume", shard_size=3)
  assert build(recs, tmp_path / "resume", shard_size=3, png_compression=9)


def test_splits_are_patient_level_and_follow_official_test(fake):
  recs, data_dir, _ = fake
  config = data_config(data_dir)
  by_id = {r.id: r for r in recs}
  parts = {}
  for split in ("train", "val", "test"):
    source = pipeline.make_source(config, split)
    parts[split] = source.indices
    split_ids = [source.source.image_ids[i] for i in source.indices]
    if split == "test":
      assert sorted(split_ids) == sorted(r.id for r in recs if r.official_split == "test")
    else:
      assert all(by_id[i].official_split == "train" for i in split_ids)
    np.testing.assert_array_equal(source.keep_boxes, source.source.num_boxes[source.indices] > 0)
  pids = pipeline.make_source(config, "train").source.patient_ids
  splits.assert_patient_disjoint(parts, pids)
  assert sum(len(v) for v in parts.values()) == len(recs)
  annotated = pipeline.make_source(config, "annotated_train")
  assert np.all(annotated.source.num_boxes[annotated.indices] > 0)
  assert set(annotated.indices) < set(parts["train"])


def test_cross_validation_folds(fake):
  recs, data_dir, _ = fake
  boxed_patients = {r.patient_id for r in recs if len(r.box_labels)}
  tests = []
  for fold in range(2):
    config = data_config(data_dir, cv=dict(num_folds=2, fold=fold, unannotated_fraction=1.0))
    parts = {s: pipeline.make_source(config, s) for s in ("train", "val", "test")}
    pids = parts["test"].source.patient_ids
    splits.assert_patient_disjoint({s: p.indices for s, p in parts.items()}, pids)
    assert np.all(parts["test"].keep_boxes)
    tests.append(set(parts["test"].indices.tolist()))
    val_patients = set(pids[parts["val"].indices])
    train_ids = set(pids[parts["train"].indices])
    # unannotated_fraction=1: every official-train patient without boxes outside val trains.
    unboxed_train = {r.patient_id for r in recs if r.official_split == "train"} - boxed_patients
    assert unboxed_train - val_patients <= train_ids
  assert not tests[0] & tests[1]
  num_boxes = parts["test"].source.num_boxes
  pool = {i for i, p in enumerate(pids) if num_boxes[i] and p not in val_patients}
  assert tests[0] | tests[1] == pool


def test_make_iterator_reads_prepared_batches(fake):
  recs, data_dir, _ = fake
  config = data_config(data_dir)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  by_id = {r.id: r for r in recs}
  with pipeline.make_iterator(config, "test", batch_size=8, sharding=NamedSharding(mesh, P("data")),
                              seed=0, shuffle=False, num_epochs=1, drop_remainder=False,
                              augment=False) as it:
    seen = 0
    for batch in it:
      valid = np.asarray(batch["valid"]) > 0
      for row in np.flatnonzero(valid):
        index = int(np.asarray(batch["index"])[row])
        r = by_id[it.source.source.image_ids[it.source.indices[index]]]
        np.testing.assert_array_equal(np.asarray(batch["labels"])[row], r.labels)
        n = len(r.box_labels)
        np.testing.assert_allclose(np.asarray(batch["boxes"])[row, :n], r.boxes, atol=1e-6)
        assert float(np.asarray(batch["has_boxes"])[row]) == float(n > 0)
        seen += 1
  assert seen == sum(r.official_split == "test" for r in recs)


def test_label_space_mapping_by_name(fake):
  recs, data_dir, _ = fake
  source = pipeline.make_source(data_config(data_dir, label_space="chexpert14"), "test")
  mapping = schema.label_mapping(schema.NIH14, schema.CHEXPERT14)
  for k in range(len(source)):
    ex = source[k]
    r = next(r for r in recs if r.id == ex["image_id"])
    np.testing.assert_array_equal(ex["labels"], np.where(mapping >= 0, r.labels[mapping], 0))
    np.testing.assert_array_equal(ex["label_mask"], (mapping >= 0).astype(np.float32))
    expected = sorted(int(np.flatnonzero(mapping == c)[0]) for c in r.box_labels
                      if c in mapping)
    assert sorted(ex["box_labels"][ex["box_labels"] >= 0].tolist()) == expected


def test_killed_build_resumes_without_rewriting_finished_shards(tmp_path, monkeypatch):
  recs = fake_records(str(tmp_path))[:12]
  encode = shards.encode_record
  monkeypatch.setattr(shards, "encode_record", encoder_killed_after(7, []))
  with pytest.raises(KeyboardInterrupt):
    build(recs, tmp_path / "resumed", shard_size=3)
  monkeypatch.setattr(shards, "encode_record", encode)
  final = layout.dataset_dir(str(tmp_path / "resumed"), "nih", SIZE)
  work = os.path.join(os.path.dirname(final), f".incomplete-{layout.VERSION}")
  assert not os.path.exists(final)
  done = sorted(n for n in os.listdir(work) if n.startswith("cxr_nih-"))
  assert len(done) == 2            # 7 records encoded = 2 whole shards of 3
  assert not any(n.startswith(".tmp-") for n in os.listdir(work))
  stat = {n: os.stat(os.path.join(work, n)) for n in done}
  open(os.path.join(work, ".tmp-cxr_nih-train.array_record-00002-of-00004-999"), "wb").close()
  with pytest.raises(FileNotFoundError, match="unfinished build"):
    prepared.open_prepared(data_config(tmp_path / "resumed"))

  encoded = []
  monkeypatch.setattr(shards, "encode_record", encoder_killed_after(None, encoded))
  assert build(recs, tmp_path / "resumed", shard_size=3) == final
  assert encoded == [r.id for r in recs[6:]]     # only the unfinished shards were encoded
  for name, before in stat.items():
    after = os.stat(os.path.join(final, name))
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
  clean = build(recs, tmp_path / "clean", shard_size=3)
  names = sorted(os.listdir(clean))
  assert sorted(os.listdir(final)) == names
  for name in names:
    if name != "dataset_info.json":   # holds the folder path
      with open(os.path.join(final, name), "rb") as a, open(os.path.join(clean, name), "rb") as b:
        assert a.read() == b.read(), name


def test_bad_image_raises_naming_it_and_leaves_nothing_complete(tmp_path):
  recs = fake_records(str(tmp_path))[:6]
  with open(recs[4].path, "wb") as f:
    f.write(b"not a png")
  with pytest.raises(records_lib.BadInput, match=recs[4].id) as info:
    build(recs, tmp_path / "out", shard_size=2)
  assert recs[4].path in str(info.value)
  assert not os.path.exists(layout.dataset_dir(str(tmp_path / "out"), "nih", SIZE))
  with pytest.raises(FileNotFoundError, match="data.data_dir"):
    prepared.open_prepared(data_config(tmp_path / "out"))

  folder = build(recs, tmp_path / "out", shard_size=2, skip_bad=True)   # resumes the failed build
  source = prepared.PreparedSource(folder)
  assert recs[4].id not in source.image_ids and len(source) == 5
  with open(os.path.join(folder, layout.REPORT_FILE)) as f:
    report = json.load(f)
  assert report["bad_count"] == 1 and report["entries"][0]["file"] == recs[4].path


def test_missing_data_dir_names_the_key_and_command(tmp_path):
  with pytest.raises(ValueError, match=r"data\.data_dir.*\n.*cxr-prepare --dataset=nih"):
    pipeline.make_source(data_config(""), "train")
  with pytest.raises(FileNotFoundError, match=r"cxr-prepare --dataset=nih .*--image_size=32"):
    pipeline.make_source(data_config(tmp_path), "train")


def small_nih_tree(sample, folder, num_images=6, extra_rows=()):
  """An NIH-layout folder with the first ``num_images`` boxed sample images (symlinked)."""
  os.makedirs(folder / "images")
  names = sorted(os.listdir(sample / "images"))[:num_images]
  for name in names:
    os.symlink(sample / "images" / name, folder / "images" / name)
  with open(sample / "Data_Entry_2017_v2020.csv") as f:
    lines = f.read().splitlines()
  rows = [line for line in lines[1:] if line.split(",")[0] in set(names)]
  entries = [lines[0], *rows, *extra_rows]
  (folder / "Data_Entry_2017_v2020.csv").write_text("\n".join(entries) + "\n")
  with open(sample / "BBox_List_2017.csv") as f:
    box_lines = f.read().splitlines()
  boxes = [line for line in box_lines[1:] if line.split(",")[0] in set(names)]
  (folder / "BBox_List_2017.csv").write_text("\n".join([box_lines[0], *boxes]) + "\n")
  (folder / "test_list.txt").write_text("\n".join(names) + "\n")
  (folder / "train_val_list.txt").write_text("\n")
  return names, len(boxes), len(rows) + 2


def test_cli_bad_row_raises_naming_file_and_line_or_is_reported(nih_sample_dir, tmp_path):
  row = "99999999_000.png,Atelectasis|Sunburn,0,99999999,50,M,PA,1024,1024,0.14,0.14"
  names, _, bad_line = small_nih_tree(nih_sample_dir, tmp_path / "nih", extra_rows=[row])
  argv = ["--dataset=nih", f"--manual_dir={tmp_path / 'nih'}", f"--data_dir={tmp_path / 'out'}",
          f"--image_size={SIZE}", "--workers=1", "--no_progress"]
  with pytest.raises(records_lib.BadInput, match=rf"Data_Entry_2017_v2020\.csv, line {bad_line}"):
    prepare_cli.main(argv)
  assert not os.path.exists(layout.dataset_dir(str(tmp_path / "out"), "nih", SIZE))
  folder = prepare_cli.main(argv + ["--skip_bad"])
  with open(os.path.join(folder, layout.REPORT_FILE)) as f:
    report = json.load(f)
  assert report["bad_count"] == 1 and report["entries"][0]["row"] == bad_line
  assert sorted(prepared.PreparedSource(folder).image_ids) == names


def test_nih_sample_two_workers(nih_sample_dir, tmp_path):
  """The real sample through the CLI with 2 processes: 880 images, 984 boxes, official test."""
  folder = prepare_cli.main(["--dataset=nih", f"--manual_dir={nih_sample_dir}",
                             f"--data_dir={tmp_path}", f"--image_size={SIZE}", "--workers=2",
                             "--only_present", "--no_progress"])
  source = prepared.PreparedSource(folder)
  assert len(source) == 880 and source.num_boxes.sum() == 984
  assert set(source.official_splits) == {"test"}
  for i in range(0, 880, 97):
    ex = source[i]
    path = os.path.join(nih_sample_dir, "images", ex["image_id"])
    np.testing.assert_array_equal(ex["image"], independent_image(path))
  config = data_config(tmp_path, cv=dict(num_folds=5, fold=1, unannotated_fraction=0.0))
  parts = {s: pipeline.make_source(config, s).indices for s in ("train", "val", "test")}
  splits.assert_patient_disjoint(parts, source.patient_ids)
  assert sum(len(p) for p in parts.values()) == 880


def test_tfds_builder_matches_cxr_prepare(nih_sample_dir, tmp_path):
  """`tfds build`'s route (CxrNih builder) stores the same examples as cxr-prepare."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from cxr_jax.data.tfds import builders  # pylint: disable=import-outside-toplevel
  names, num_boxes, _ = small_nih_tree(nih_sample_dir, tmp_path / "nih")
  builder = builders.CxrNih(config=builders.CxrConfig.make(SIZE), data_dir=str(tmp_path / "tfds"))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "nih")))
  ours = prepared.PreparedSource(prepare_cli.main([
      "--dataset=nih", f"--manual_dir={tmp_path / 'nih'}", f"--data_dir={tmp_path / 'ours'}",
      f"--image_size={SIZE}", "--workers=1", "--no_progress"]))
  theirs = prepared.make_source(data_config(tmp_path / "tfds"), "test").source  # no index file
  assert sorted(theirs.image_ids) == sorted(ours.image_ids) == names
  assert theirs.num_boxes.sum() == num_boxes
  for i in range(len(theirs)):
    a, b = theirs[i], ours[int(np.flatnonzero(ours.image_ids == theirs.image_ids[i])[0])]
    for key in schema.EXAMPLE_SPEC:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_manual_dir_without_data_dir_reads_directly(nih_sample_dir, tmp_path):
  """No data.data_dir: the official files are read directly, same examples as prepared."""
  names, _, _ = small_nih_tree(nih_sample_dir, tmp_path / "nih")
  folder = prepare_cli.main(["--dataset=nih", f"--manual_dir={tmp_path / 'nih'}",
                             f"--data_dir={tmp_path / 'out'}", f"--image_size={SIZE}",
                             "--workers=1", "--no_progress"])
  stored = prepared.PreparedSource(folder)
  config = data_config("", manual_dir=str(tmp_path / "nih"))
  # Every image is in the official test list (no official train image): split by patient.
  parts = [pipeline.make_source(config, split) for split in ("train", "val", "test")]
  assert all(isinstance(part.source, prepared.ReaderSource) for part in parts)
  assert sorted(np.concatenate([p.source.image_ids[p.indices] for p in parts])) == names
  for direct in parts:
    for k in range(len(direct)):
      a = direct[k]
      b = stored[int(np.flatnonzero(stored.image_ids == a["image_id"])[0])]
      for key in schema.EXAMPLE_SPEC:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_reads_the_smallest_prepared_size_not_below_image_size(fake):
  _, data_dir, _ = fake
  assert prepared.open_prepared(data_config(data_dir, image_size=SIZE // 2)).image_size == SIZE
  with pytest.raises(FileNotFoundError, match=f"--image_size={2 * SIZE}"):
    prepared.open_prepared(data_config(data_dir, image_size=2 * SIZE))


def test_without_official_train_images_all_images_are_split_by_patient():
  """The NIH sample: every image is in the official test list, yet train / val / test exist."""
  ids = np.repeat(np.arange(50).astype(str), 2)
  data = common.base_config("dataset=nih").data
  parts = splits.split_indices(ids, np.full(len(ids), "test"), np.ones(len(ids), bool), data)
  assert all(len(parts[k]) for k in ("train", "val", "test"))
  np.testing.assert_array_equal(np.sort(np.concatenate(list(parts.values()))), np.arange(100))
  splits.assert_patient_disjoint(parts, ids)
  assert abs(len(parts["test"]) - data.test_fraction * 100) <= 2


def test_stored_examples_equal_tfds_data_source(fake):
  """The TF-free reader returns what tfds' own data source returns: every split, field,
  dtype and shape; the fully decoded image too."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  _, _, folder = fake
  stored = prepared.StoredExamples(folder)
  builder = tfds.builder_from_directory(folder)
  assert stored.splits == [s for s in splits.SPLITS if s in builder.info.splits]
  index = 0
  for split in stored.splits:
    raw = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
    decoded = builder.as_data_source(split)
    assert stored.split_lengths[split] == len(raw)
    for local in range(len(raw)):
      ours, theirs = stored[index], raw[local]
      assert ours.keys() == theirs.keys()
      for key, expected in theirs.items():
        assert type(ours[key]) is type(expected), key
        if isinstance(expected, np.ndarray):
          assert (ours[key].dtype, ours[key].shape) == (expected.dtype, expected.shape), key
        np.testing.assert_array_equal(ours[key], expected, err_msg=key)
      image = cv2.imdecode(np.frombuffer(ours["image"], np.uint8), cv2.IMREAD_UNCHANGED)
      np.testing.assert_array_equal(image[..., None], decoded[local]["image"])
      index += 1
  assert index == len(stored)


def test_prepared_source_reads_without_tensorflow_or_tfds(fake):
  """A fresh process where TensorFlow and TFDS cannot be imported reads every split through
  make_source, also after pickling the source (as Grain workers do)."""
  recs, data_dir, _ = fake
  code = (
      "import pickle, sys\n"
      "sys.modules['tensorflow'] = None\n"
      "sys.modules['tensorflow_datasets'] = None\n"
      "sys.path.insert(0, sys.argv[1])\n"
      "from tests import test_prepare\n"
      "from cxr_jax.data import prepared\n"
      f"config = test_prepare.data_config({str(data_dir)!r})\n"
      "for split in ('train', 'val', 'test'):\n"
      "  source = prepared.make_source(config, split)\n"
      "  source[len(source) - 1]  # shards open: pickling must drop their readers\n"
      "  again = pickle.loads(pickle.dumps(source))\n"
      "  for k in range(len(source)):\n"
      "    a, b = source[k], again[k]\n"
      "    assert a['image'].shape == (%d, %d) and (a['image'] == b['image']).all()\n"
      "    print(a['image_id'], int(a['labels'].sum()), int((a['box_labels'] >= 0).sum()))\n"
      ) % (SIZE, SIZE)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", code, root], capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  by_id = {r.id: r for r in recs}
  rows = [line.split() for line in out.stdout.splitlines()]
  assert sorted(r[0] for r in rows) == sorted(by_id)
  for image_id, num_labels, num_boxes in rows:
    r = by_id[image_id]
    assert (int(num_labels), int(num_boxes)) == (int(r.labels.sum()), len(r.box_labels))


def test_corrupt_shard_or_record_raises_naming_the_shard(fake, tmp_path):
  from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
  _, _, folder = fake
  copy = str(tmp_path / "copy")
  shutil.copytree(folder, copy)
  stored = prepared.StoredExamples(copy)
  shard = lambda k: os.path.basename(stored.paths[k])
  first = lambda k: int(stored.starts[k])

  with open(stored.paths[0], "r+b") as f:   # bytes flipped inside the first record's chunk
    f.seek(80)
    chunk = f.read(16)
    f.seek(80)
    f.write(bytes(b ^ 0xFF for b in chunk))
  with pytest.raises(schema.ExampleError, match=rf"{shard(0)} record 0: .*[Cc]orrupt"):
    stored[first(0)]
  assert stored[first(0) + 1]["image_id"]     # the next record is intact

  reader = array_record_module.ArrayRecordReader(stored.paths[1])
  records = reader.read_all()
  reader.close()
  writer = array_record_module.ArrayRecordWriter(stored.paths[1], "group_size:1")
  for i, record in enumerate(records):      # record 2 cut short
    writer.write(record[:len(record) // 2] if i == 2 else record)
  writer.close()
  with pytest.raises(schema.ExampleError, match=rf"{shard(1)} record 2: .*truncated"):
    stored[first(1) + 2]

  with open(stored.paths[2], "r+b") as f:   # a shard cut short
    f.truncate(os.path.getsize(stored.paths[2]) // 2)
  with pytest.raises(schema.ExampleError, match=rf"{shard(2)}: .*dataset_info.json says"):
    stored[first(2)]
  os.remove(stored.paths[3])
  with pytest.raises(schema.ExampleError, match=rf"{shard(3)}: shard file missing"):
    prepared.PreparedSource(copy)[first(3)]


SHARED_TEST_PATIENT = f"p{NUM_PATIENTS - TEST_PATIENTS}"   # in EGD and REFLACX's official test


def prepare_egd_and_reflacx(recs, data_dir) -> dict[str, list[records_lib.Record]]:
  """The fake records as prepared 'egd' (patients 0-8, no official split: stored 'train', as
  EGD-CXR is) and 'reflacx' (4-11, official splits) datasets: patients 4-8 are in both, and
  patient 8 is in REFLACX's official test split."""
  third = NUM_PATIENTS // 3 * PER_PATIENT
  egd = [dataclasses.replace(r, official_split="") for r in recs[:2 * third + PER_PATIENT]]
  parts = {"egd": egd, "reflacx": recs[third:]}
  for name, part in parts.items():
    shards.prepare_records(name, part, records_lib.Problems(), schema.NIH14, str(data_dir), SIZE,
                           progress=False, min_shards=1)
  return parts


def test_two_prepared_datasets_join_with_plus(fake, tmp_path):
  """data.name 'egd+reflacx' (VKD's two gaze sources): both datasets' images, split together by
  patient, so a patient in both lands in one split."""
  recs, _, _ = fake
  parts = prepare_egd_and_reflacx(recs, tmp_path)
  joined = data_config(tmp_path, name="egd+reflacx")
  sources = {s: pipeline.make_source(joined, s) for s in ("train", "val", "test")}
  union = sources["test"].source
  assert len(union) == len(parts["egd"]) + len(parts["reflacx"])
  assert sum(len(s) for s in sources.values()) == len(union)
  by_id, patients, from_reflacx = {r.id: r for r in recs}, {}, 0
  for split, source in sources.items():
    for i in range(len(source)):
      example = source[i]
      np.testing.assert_array_equal(example["labels"], by_id[example["image_id"]].labels)
      patients.setdefault(example["patient_id"], set()).add(split)
      from_reflacx += int(source.indices[i]) >= len(parts["egd"])
  assert from_reflacx == len(parts["reflacx"])
  assert all(len(s) == 1 for s in patients.values()), patients
  assert {p for p, s in patients.items() if s == {"test"}} == {
      r.patient_id for r in recs if r.official_split == "test"}
  # The patient of EGD (no official split) and of REFLACX's official test: all in test.
  test_ids = set(sources["test"].source.image_ids[sources["test"].indices])
  shared = [r.id for r in parts["egd"] + parts["reflacx"] if r.patient_id == SHARED_TEST_PATIENT]
  assert len(shared) == 2 * PER_PATIENT and set(shared) <= test_ids
  with pytest.raises(IndexError, match="out of range"):
    union[len(union)]
  for bad in ("egd+egd", "egd+", "synthetic+egd"):
    with pytest.raises(KeyError, match="data.name"):
      pipeline.make_source(data_config(tmp_path, name=bad), "train")
  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharding = NamedSharding(mesh, P("data"))
  with pipeline.make_iterator(joined, "train", batch_size=8, sharding=sharding, seed=0,
                              shuffle=False, num_epochs=1, drop_remainder=False,
                              maps=("gaze_map",), augment=False) as it:
    seen = sum(int(np.asarray(batch["valid"]).sum()) for batch in it)
  assert seen == len(sources["train"])


def test_joined_parts_that_disagree_on_an_official_split_are_an_error():
  """Two parts with official splits putting one patient in different ones: one line naming the
  patient and both parts; under data.split_policy 'random' no official split is read."""
  ids = np.array(["a", "a", "b", "b", "c"])
  official = np.array(["train", "test", "val", "", ""])
  parts = np.array(["mimic", "reflacx", "reflacx", "egd", "egd"])
  data = common.base_config("dataset=mimic").data
  with pytest.raises(ValueError) as raised:
    splits.split_indices(ids, official, np.zeros(5, bool), data, parts=parts)
  assert str(raised.value) == ("patient 'a' is in official split 'test' of part 'reflacx' and "
                               "'train' of part 'mimic': the parts of a joined dataset must agree")
  np.testing.assert_array_equal(splits.follow_official_splits(ids[2:], official[2:], parts[2:]),
                                ["val", "val", "train"])
  data.split_policy = "random"
  parts_random = splits.split_indices(ids, official, np.zeros(5, bool), data, parts=parts)
  assert sum(len(v) for v in parts_random.values()) == 5


def test_a_joined_part_keeps_only_the_annotation_it_names(fake, tmp_path):
  """'egd:gaze+reflacx:boxes' (VKD Table 1: EGD-CXR gaze and REFLACX boxes): EGD examples lose
  their boxes and REFLACX examples their gaze; everything else is the plain join's."""
  recs, _, _ = fake
  parts = prepare_egd_and_reflacx(recs, tmp_path)
  plain = prepared.open_prepared(data_config(tmp_path, name="egd+reflacx"))
  kept = prepared.open_prepared(data_config(tmp_path, name="egd:gaze+reflacx:boxes"))
  num_egd = len(parts["egd"])
  assert len(kept) == len(plain) and num_egd < len(plain)
  np.testing.assert_array_equal(kept.num_boxes[:num_egd], 0)
  np.testing.assert_array_equal(kept.num_boxes[num_egd:], plain.num_boxes[num_egd:])
  assert plain.num_boxes[:num_egd].sum() > 0 and plain.num_boxes[num_egd:].sum() > 0
  gazes_dropped = 0
  for i in range(len(plain)):
    full, restricted = plain[i], kept[i]
    dropped = ("boxes", "box_labels") if i < num_egd else ("gaze",)
    for key, value in full.items():
      if key in dropped:
        assert not np.any(restricted[key] > 0) if key != "box_labels" else np.all(
            restricted[key] == -1), (i, key)
      else:
        np.testing.assert_array_equal(restricted[key], value, err_msg=f"{i} {key}")
    gazes_dropped += int(i >= num_egd and full["gaze"][:, 2].sum() > 0)
  assert gazes_dropped > 0
  annotated = pipeline.make_source(data_config(tmp_path, name="egd:gaze+reflacx:boxes"),
                                   "annotated_train")
  assert len(annotated) and np.all(annotated.indices >= num_egd)
  assert "keeping boxes" in repr(kept)
  sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
  drawn = {"gaze_map": [], "box_map": []}     # (from EGD, map drawn) per valid row
  train = pipeline.make_source(data_config(tmp_path, name="egd:gaze+reflacx:boxes"), "train")
  with pipeline.make_iterator(data_config(tmp_path, name="egd:gaze+reflacx:boxes"), "train",
                              batch_size=8, sharding=sharding, seed=0, shuffle=False,
                              num_epochs=1, drop_remainder=False, maps=tuple(drawn),
                              augment=False) as it:
    for batch in it:
      valid = np.asarray(batch["valid"]) > 0
      from_egd = train.indices[np.asarray(batch["index"])[valid]] < num_egd   # split -> joined
      for key, rows in drawn.items():
        rows += zip(from_egd, np.asarray(batch[key])[valid].max(axis=(1, 2, 3)) > 0)
  assert {egd for egd, drew in drawn["gaze_map"] if drew} == {True}    # only EGD draws gaze
  assert {egd for egd, drew in drawn["box_map"] if drew} == {False}    # only REFLACX boxes
  for bad in ("egd:masks+reflacx", "egd:+reflacx", ":gaze+egd", "egd:gaze+egd:boxes"):
    with pytest.raises(KeyError, match="data.name"):
      pipeline.make_source(data_config(tmp_path, name=bad), "train")


NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
              "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
BOXED = (0, 2, 5)     # the images of fake_nih_tree that BBox_List boxes


def fake_nih_tree(folder, num_images=8):
  """An NIH download of ``num_images`` phantom PNGs (2 per patient), boxes on ``BOXED``;
  returns the image names."""
  phantoms = synthetic.SyntheticPhantoms(num_examples=num_images, image_size=SOURCE_SIZE, seed=5)
  os.makedirs(folder / "images")
  names = [f"{i // 2 + 1:08d}_{i % 2:03d}.png" for i in range(num_images)]
  rows, boxes = [], []
  for i, name in enumerate(names):
    cv2.imwrite(str(folder / "images" / name), phantoms[i]["image"])
    rows.append(f"{name},{'Mass' if i in BOXED else 'No Finding'},{i % 2},{i // 2 + 1},50,M,PA,"
                f"1024,1024,0.14,0.14")
    if i in BOXED:
      boxes.append(f"{name},Mass,100,200,300,250")
  (folder / "Data_Entry_2017_v2020.csv").write_text("\n".join([NIH_HEADER, *rows]) + "\n")
  (folder / "BBox_List_2017.csv").write_text(
      "\n".join(["Image Index,Finding Label,Bbox [x,y,w,h],,,", *boxes]) + "\n")
  (folder / "test_list.txt").write_text("\n".join(names[:4]) + "\n")
  (folder / "train_val_list.txt").write_text("\n".join(names[4:]) + "\n")
  return names


def prepare_fake_nih(tmp_path, *flags):
  argv = ["--dataset=nih", f"--manual_dir={tmp_path / 'nih'}", f"--data_dir={tmp_path / 'out'}",
          f"--image_size={SIZE}", "--workers=1", "--no_progress", *flags]
  folder = prepare_cli.main(argv)
  with open(os.path.join(folder, layout.REPORT_FILE)) as f:
    return folder, json.load(f)


def test_only_present_names_every_missing_boxed_image(tmp_path, capsys):
  names = fake_nih_tree(tmp_path / "nih")
  for i in (2, 3, 5):                        # two boxed images and one without boxes deleted
    os.remove(tmp_path / "nih" / "images" / names[i])
  folder, report = prepare_fake_nih(tmp_path, "--only_present")
  out = capsys.readouterr().out
  assert (f"2 images with boxes or gaze are missing or unreadable and left out: {names[2]}, "
          f"{names[5]}") in out
  assert f"3  {nih.SKIPPED_BY_ONLY_PRESENT}: {names[2]}, {names[3]}, {names[5]}" in out
  assert [(e["image"], e["annotations"]) for e in report["annotated_missing"]] == [
      (names[2], ["boxes"]), (names[5], ["boxes"])]
  assert report["counts"] == {nih.SKIPPED_BY_ONLY_PRESENT: 3}
  assert sorted(prepared.PreparedSource(folder).image_ids) == sorted(
      n for i, n in enumerate(names) if i not in (2, 3, 5))
  # The list is not capped like the filtered entries.
  _, problems, _ = shards.read_records("nih", str(tmp_path / "nih"), only_present=True)
  problems.write(str(tmp_path / "capped.json"), max_filtered_listed=1)
  capped = json.loads((tmp_path / "capped.json").read_text())
  assert len(capped["entries"]) == 1 and len(capped["annotated_missing"]) == 2


def test_skip_bad_prints_what_it_skipped(tmp_path, capsys):
  names = fake_nih_tree(tmp_path / "nih")
  os.remove(tmp_path / "nih" / "images" / names[2])                 # missing, boxed
  (tmp_path / "nih" / "images" / names[5]).write_bytes(b"not a png")  # unreadable, boxed
  (tmp_path / "nih" / "images" / names[6]).write_bytes(b"not a png")  # unreadable, no box
  with pytest.raises(records_lib.BadInput, match=rf"line 4: {names[2]}: image not found"):
    prepare_fake_nih(tmp_path)
  _, report = prepare_fake_nih(tmp_path, "--skip_bad")
  out = capsys.readouterr().out
  assert f"1  {nih.NOT_FOUND}: {names[2]}" in out
  assert f"skipped 2 images while encoding (--skip_bad): {names[5]}, {names[6]}" in out
  assert f"1 of the skipped images had boxes or gaze: {names[5]}" in out
  assert report["bad_count"] == 3
  assert {e["image"] for e in report["entries"]} == {names[2], names[5], names[6]}
  assert [e["image"] for e in report["annotated_missing"]] == [names[2], names[5]]


def test_index_and_report_are_readable_by_others(tmp_path):
  fake_nih_tree(tmp_path / "nih")
  folder, _ = prepare_fake_nih(tmp_path)
  for name in (layout.INDEX_FILE, layout.REPORT_FILE):
    assert os.stat(os.path.join(folder, name)).st_mode & 0o777 == 0o644, name
