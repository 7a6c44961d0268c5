"""CheXpert, MIMIC-CXR-JPG, REFLACX and EGD-CXR readers on tiny trees in the documented layouts."""

import os

import cv2
import numpy as np
import pytest

from cxr_jax.data import schema
from cxr_jax.data.sources import chexpert, egd, mimic, reflacx
from cxr_jax.data.sources import records as rec
from fixtures_real import write_csv

CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding",
                   "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
                   "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax",
                   "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices"]
MIMIC_LABEL_HEADER = ["subject_id", "study_id", "Atelectasis", "Cardiomegaly", "Consolidation",
                      "Edema", "Enlarged Cardiomediastinum", "Fracture", "Lung Lesion",
                      "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other",
                      "Pneumonia", "Pneumothorax", "Support Devices"]
EGD_FIXATION_HEADER = (
    "SESSION_ID,MEDIA_ID,DICOM_ID,CNT,Time (in secs),TIMETICK(f=10000000),FPOGX,FPOGY,FPOGS,"
    "FPOGD,FPOGID,FPOGV,BPOGX,BPOGY,BPOGV,LPCX,LPCY,LPD,LPS,LPV,RPCX,RPCY,RPD,RPS,RPV,BKID,BKDUR,"
    "BKPMIN,LPMM,LPMMV,RPMM,RPMMV,SACCADE_MAG,SACCADE_DIR,VID_FRAME,X_ORIGINAL,Y_ORIGINAL"
).split(",")
REFLACX_FIXATION_HEADER = (
    "timestamp_start_fixation, timestamp_end_fixation, x_position, y_position, "
    "pupil_area_normalized, angular_resolution_x_pixels_per_degree, "
    "angular_resolution_y_pixels_per_degree, window_width, window_level, xmin_shown_from_image, "
    "ymin_shown_from_image, xmax_shown_from_image, ymax_shown_from_image, "
    "xmin_in_screen_coordinates, ymin_in_screen_coordinates, xmax_in_screen_coordinates, "
    "ymax_in_screen_coordinates")


def _image(path, width=40, height=30, value=100):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image = np.full((height, width), value, np.uint8)
  image[height // 3:, width // 4:] = 200
  assert cv2.imwrite(str(path), image)


def _expected_chexpert(text, policy, mask_blank=False):
  """Independent reading of one CheXpert label cell -> (label, mask)."""
  if text == "":
    return 0.0, 0.0 if mask_blank else 1.0
  value = float(text)
  if value == -1:
    return {"zeros": (0.0, 1.0), "ones": (1.0, 1.0), "ignore": (0.0, 0.0)}[policy]
  return value, 1.0


# --- images ------------------------------------------------------------------------------


def test_load_gray_rgba_16bit_jpeg_and_errors(tmp_path):
  rng = np.random.default_rng(0)
  bgra = rng.integers(0, 256, (20, 24, 4), dtype=np.uint8)
  cv2.imwrite(str(tmp_path / "rgba.png"), bgra)
  luma = 0.114 * bgra[..., 0] + 0.587 * bgra[..., 1] + 0.299 * bgra[..., 2]
  got = rec.load_gray(str(tmp_path / "rgba.png"))
  assert got.dtype == np.uint8 and got.shape == (20, 24)
  assert np.abs(got.astype(float) - luma).max() <= 1

  deep = rng.integers(0, 65536, (20, 24), dtype=np.uint16)
  cv2.imwrite(str(tmp_path / "deep.png"), deep)
  got = rec.load_gray(str(tmp_path / "deep.png"))
  assert got.dtype == np.uint8
  assert np.abs(got.astype(float) - deep / 257.0).max() <= 0.5 + 1e-9

  _image(tmp_path / "a.jpg", 48, 36)
  got = rec.load_gray(str(tmp_path / "a.jpg"), image_size=16)
  full = cv2.imread(str(tmp_path / "a.jpg"), cv2.IMREAD_GRAYSCALE)
  np.testing.assert_array_equal(got, cv2.resize(full, (16, 16), interpolation=cv2.INTER_AREA))

  (tmp_path / "broken.png").write_bytes(b"not a png")
  with pytest.raises(rec.BadInput, match="broken.png"):
    rec.load_gray(str(tmp_path / "broken.png"))
  with pytest.raises(rec.BadInput, match="nothere.png"):
    rec.load_gray(str(tmp_path / "nothere.png"))


# --- CheXpert ----------------------------------------------------------------------------

# (Path under the dataset folder, Frontal/Lateral, AP/PA, {column: cell})
CHEXPERT_TRAIN = [
    ("train/patient00001/study1/view1_frontal.jpg", "Frontal", "AP",
     {"Cardiomegaly": "1.0", "Edema": "-1.0", "Support Devices": "0.0"}),
    ("train/patient00001/study1/view2_lateral.jpg", "Lateral", "",
     {"Cardiomegaly": "1.0"}),
    ("train/patient00002/study3/view1_frontal.jpg", "Frontal", "PA",
     {"No Finding": "1.0", "Pneumonia": "-1.0", "Fracture": "", "Lung Opacity": "0.0"}),
]
CHEXPERT_VALID = [
    ("valid/patient64541/study1/view1_frontal.jpg", "Frontal", "AP",
     {c: "0.0" for c in schema.CHEXPERT14.classes} | {"Edema": "1.0"}),
]


def _chexpert_tree(root, folder="CheXpert-v1.0-small", train=CHEXPERT_TRAIN, missing=()):
  base = root / folder
  for name, rows in (("train.csv", train), ("valid.csv", CHEXPERT_VALID)):
    out = []
    for path, fl, appa, cells in rows:
      out.append([f"{folder}/{path}", "Female", "60", fl, appa] +
                 [cells.get(c, "") for c in CHEXPERT_HEADER[5:]])
      if path not in missing:
        _image(base / path)
    write_csv(base / name, CHEXPERT_HEADER, out)
  return base


@pytest.mark.parametrize("policy", ["zeros", "ones", "ignore"])
def test_chexpert_labels_under_each_policy(tmp_path, policy):
  _chexpert_tree(tmp_path)
  records, problems = chexpert.read(str(tmp_path), uncertainty=policy)
  frontal = [r for r in CHEXPERT_TRAIN + CHEXPERT_VALID if r[1] == "Frontal"]
  assert [r.id for r in records] == [f"CheXpert-v1.0-small/{p}" for p, *_ in frontal]
  for record, (path, _, appa, cells) in zip(records, frontal):
    expected = np.array([_expected_chexpert(cells.get(c, ""), policy)
                         for c in schema.CHEXPERT14.classes])
    np.testing.assert_array_equal(record.labels, expected[:, 0])
    np.testing.assert_array_equal(record.label_mask, expected[:, 1])
    assert record.patient_id == path.split("/")[1] and record.view == appa
    assert record.official_split == ("val" if path.startswith("valid") else "train")
    assert os.path.isfile(record.path) and record.path.endswith(path)
  assert problems.bad_count == 0 and problems.counts() == {"lateral view (frontal_only)": 1}


def test_chexpert_options_and_layouts(tmp_path):
  base = _chexpert_tree(tmp_path, folder="CheXpert-v1.0")
  # Pointing at the dataset folder itself works too; laterals kept on request.
  records, problems = chexpert.read(str(base), frontal_only=False, mask_unmentioned=True)
  assert len(records) == 4 and problems.count == 0
  lateral = records[1]
  assert lateral.view == "LATERAL" and lateral.study_id == "patient00001/study1"
  cells = CHEXPERT_TRAIN[0][3]
  expected = [_expected_chexpert(cells.get(c, ""), "zeros", mask_blank=True)
              for c in schema.CHEXPERT14.classes]
  np.testing.assert_array_equal(records[0].label_mask, [m for _, m in expected])
  assert records[0].label_mask.sum() == 3


def test_chexpert_bad_input(tmp_path):
  _chexpert_tree(tmp_path / "a", missing=(CHEXPERT_TRAIN[2][0],))
  with pytest.raises(rec.BadInput, match=r"train.csv, line 4: .*not found"):
    chexpert.read(str(tmp_path / "a"))
  records, problems = chexpert.read(str(tmp_path / "a"), skip_bad=True)
  assert len(records) == 2 and problems.bad_count == 1
  train = list(CHEXPERT_TRAIN)
  train[0] = train[0][:3] + ({"Edema": "2.0"},)
  _chexpert_tree(tmp_path / "b", train=train)
  with pytest.raises(rec.BadInput, match=r"train.csv, line 2: .*'2.0'"):
    chexpert.read(str(tmp_path / "b"))
  train[0] = CHEXPERT_TRAIN[2]
  _chexpert_tree(tmp_path / "c", train=train)
  with pytest.raises(rec.BadInput, match=r"train.csv, line 4: duplicated Path"):
    chexpert.read(str(tmp_path / "c"))



def test_unique_rows_reports_repeats_with_the_first_place_across_files(tmp_path):
  for name, ids in (("a.csv", ["x", "y", " x"]), ("b.csv", ["z", "y"])):
    write_csv(str(tmp_path / name), ["id", "v"], [[i, "1"] for i in ids])
  problems, seen, kept = rec.Problems(skip_bad=True), {}, []
  for name in ("a.csv", "b.csv"):
    path = str(tmp_path / name)
    columns, rows = rec.read_table(path, ("id",), problems)
    kept += [(name, line, key) for line, _, key in
             rec.unique_rows(path, rows, columns["id"], "id", problems, seen)]
  assert kept == [("a.csv", 2, "x"), ("a.csv", 3, "y"), ("b.csv", 2, "z")]
  assert [(os.path.basename(e["file"]), e["row"]) for e in problems.entries] == [("a.csv", 4),
                                                                                ("b.csv", 3)]
  first_y = f"{tmp_path / 'a.csv'}, line 3"
  assert problems.entries[1]["reason"] == f"duplicated id 'y' (first at {first_y})"
  columns, rows = rec.read_table(str(tmp_path / "a.csv"), ("id",))
  first_x = r"\(first at .*a.csv, line 2\)"
  with pytest.raises(rec.BadInput, match=r"a.csv, line 4: duplicated id 'x' " + first_x):
    list(rec.unique_rows(str(tmp_path / "a.csv"), rows, columns["id"], "id", rec.Problems()))

# --- MIMIC-CXR-JPG -----------------------------------------------------------------------

# dicom_id, subject, study, view, (width, height)
MIMIC_IMAGES = [
    ("d-a1", "10000032", "50414267", "PA", (40, 30)),
    ("d-a2", "10000032", "50414267", "LATERAL", (30, 40)),
    ("d-b1", "11000011", "51111111", "AP", (50, 40)),
    ("d-c1", "12000012", "52222222", "PA", (40, 40)),
]
MIMIC_STUDY_LABELS = {
    "50414267": {"Cardiomegaly": "1.0", "Edema": "-1.0", "Pleural Effusion": "0.0"},
    "51111111": {"No Finding": "1.0"},
    "52222222": {"Pneumonia": "-1.0", "Atelectasis": "1.0"},
}


def _mimic_tree(root, labels=MIMIC_STUDY_LABELS, gz=True):
  meta_header = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription",
                 "ViewPosition", "Rows", "Columns", "StudyDate", "StudyTime",
                 "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
                 "AcquisitionDeviceProcessingDescription",
                 "PatientOrientationCodeSequence_CodeMeaning"]
  meta = []
  for dicom, subject, study, view, (w, h) in MIMIC_IMAGES:
    meta.append([dicom, subject, study, "CHEST", view, h, w, "21800506", "213014.531", "CHEST",
                 "postero-anterior", "", "Erect"])
    _image(root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg", w, h)
  sfx = ".csv.gz" if gz else ".csv"
  write_csv(str(root / f"mimic-cxr-2.0.0-metadata{sfx}"), meta_header, meta, gz)
  subjects = {study: subject for _, subject, study, _, _ in MIMIC_IMAGES}
  write_csv(str(root / f"mimic-cxr-2.0.0-chexpert{sfx}"), MIMIC_LABEL_HEADER,
             [[subjects[s], s] + [cells.get(c, "") for c in MIMIC_LABEL_HEADER[2:]]
              for s, cells in labels.items()], gz)
  # Split table with its columns in another order: read by name.
  splits = {"d-a1": "train", "d-a2": "train", "d-b1": "validate", "d-c1": "test"}
  write_csv(str(root / f"mimic-cxr-2.0.0-split{sfx}"),
             ["split", "subject_id", "dicom_id", "study_id"],
             [[splits[d], s, d, st] for d, s, st, _, _ in MIMIC_IMAGES], gz)
  return root


@pytest.mark.parametrize("policy", ["zeros", "ignore"])
def test_mimic_joins_study_labels_and_splits(tmp_path, policy):
  _mimic_tree(tmp_path)
  records, problems = mimic.read(str(tmp_path), uncertainty=policy)
  assert [r.id for r in records] == ["d-a1", "d-b1", "d-c1"]
  assert problems.counts() == {"view 'LATERAL' is not frontal (frontal_only)": 1}
  assert [r.official_split for r in records] == ["train", "val", "test"]
  for r in records:
    _, subject, study, view, _ = next(m for m in MIMIC_IMAGES if m[0] == r.id)
    assert (r.patient_id, r.study_id, r.view) == (subject, study, view)
    assert os.path.isfile(r.path)
    assert r.path.endswith(f"p{subject[:2]}/p{subject}/s{study}/{r.id}.jpg")
    expected = np.array([_expected_chexpert(MIMIC_STUDY_LABELS[study].get(c, ""), policy)
                         for c in schema.CHEXPERT14.classes])
    np.testing.assert_array_equal(r.labels, expected[:, 0])
    np.testing.assert_array_equal(r.label_mask, expected[:, 1])


def test_mimic_bad_input(tmp_path):
  labels = dict(MIMIC_STUDY_LABELS)
  del labels["51111111"]
  _mimic_tree(tmp_path, labels=labels, gz=False)
  with pytest.raises(rec.BadInput, match=r"metadata.csv, line 4: study 51111111 has no row"):
    mimic.read(str(tmp_path))
  os.remove(tmp_path / "files" / "p10" / "p10000032" / "s50414267" / "d-a1.jpg")
  records, problems = mimic.read(str(tmp_path), skip_bad=True)
  assert [r.id for r in records] == ["d-c1"] and problems.bad_count == 2
  assert any(e["row"] == 2 and "not found" in e["reason"] for e in problems.entries)


# --- REFLACX -----------------------------------------------------------------------------

REFLACX_META = ["id", "split", "eye_tracking_data_discarded", "image", "dicom_id", "subject_id",
                "image_size_x", "image_size_y"]
PHASE1_LABELS = ["Airway wall thickening", "Atelectasis", "Emphysema", "Mass", "Pleural effusion",
                 "Quality issue", "Support devices"]
PHASE3_LABELS = ["Abnormal mediastinal contour", "Atelectasis", "Lung nodule or mass", "Other",
                 "Pleural abnormality", "Support devices"]


def _reflacx_tree(root, mimic_root, phase1_labels=PHASE1_LABELS):
  main = root / "main_data"
  # Phase 1: two radiologists read d-a1 (40 x 30); r2's eye tracking was discarded.
  phase1 = [
      ["P1R1", "train", "False", "files/p10/p10000032/s50414267/d-a1.dcm", "d-a1", "10000032",
       40, 30, "0", "0", "2", "0", "4", "False", "False"],
      ["P1R2", "train", "True", "files/p10/p10000032/s50414267/d-a1.dcm", "d-a1", "10000032",
       40, 30, "0", "5", "0", "3", "0", "False", "True"],
  ]
  write_csv(str(main / "metadata_phase_1.csv"), REFLACX_META + phase1_labels, phase1)
  phase3 = [["P3R1", "validate", "False", "files/p11/p11000011/s51111111/d-b1.dcm", "d-b1",
             "11000011", 50, 40, "4", "1", "0", "", "0", "True"]]
  write_csv(str(main / "metadata_phase_3.csv"), REFLACX_META + PHASE3_LABELS, phase3)
  ellipse_header = ["xmin", "ymin", "xmax", "ymax", "certainty"]
  write_csv(str(main / "P1R1" / "anomaly_location_ellipses.csv"), ellipse_header + phase1_labels, [
      [4, 3, 20, 15, 4, "False", "False", "False", "True", "True", "False", "False"],
      [30, 20, 45, 35, 5, "False", "False", "True", "False", "False", "False", "False"],
      [1, 1, 5, 5, 2, "False", "True", "False", "False", "False", "False", "False"],
  ])
  write_csv(str(main / "P1R2" / "anomaly_location_ellipses.csv"), ellipse_header + phase1_labels, [
      [0, 0, 10, 10, 5, "False", "True", "False", "False", "False", "False", "False"]])
  write_csv(str(main / "P3R1" / "anomaly_location_ellipses.csv"), ellipse_header + PHASE3_LABELS, [
      [10, 10, 30, 20, 3, "True", "False", "False", "False", "False", "False"]])
  pad = [0.5] * 13
  with open(main / "P1R1" / "fixations.csv", "w") as f:
    f.write(REFLACX_FIXATION_HEADER + "\n")
    for row in ([0.0, 0.4, 10, 15], [0.5, 1.5, -3, 10], [1.6, 2.0, 39.5, 29], [2.1, 2.1, 5, 5]):
      f.write(", ".join(map(str, row + pad)) + "\n")
  with open(main / "P3R1" / "fixations.csv", "w") as f:
    f.write(REFLACX_FIXATION_HEADER + "\n" + ", ".join(map(str, [1.0, 1.25, 25, 20] + pad)) + "\n")
  return root


@pytest.mark.parametrize("policy", ["zeros", "ones", "ignore"])
def test_reflacx_merge_ellipses_and_gaze(tmp_path, policy):
  mimic_root = _mimic_tree(tmp_path / "mimic")
  _reflacx_tree(tmp_path / "reflacx", mimic_root)
  records, problems = reflacx.read(str(tmp_path / "reflacx"), mimic_dir=str(mimic_root),
                                   uncertainty=policy)
  assert [r.id for r in records] == ["d-a1", "d-b1"] and problems.count == 0
  a, b = records
  c = reflacx.REFLACX.index
  # d-a1: P1R1 Pleural effusion 4 (positive), Emphysema 2 (uncertain); P1R2 Atelectasis 5,
  # Mass 3, Support devices True; Airway wall thickening / Quality issue unused.
  positives = {c("Pleural abnormality"), c("Atelectasis"), c("Lung nodule or mass"),
               c("Support devices")}
  uncertain = c("High lung volume / emphysema")
  expected = np.zeros(len(reflacx.REFLACX))
  expected[list(positives)] = 1
  expected_mask = np.ones(len(reflacx.REFLACX))
  if policy == "ones":
    expected[uncertain] = 1
  elif policy == "ignore":
    expected_mask[uncertain] = 0
  np.testing.assert_array_equal(a.labels, expected)
  np.testing.assert_array_equal(a.label_mask, expected_mask)
  # Ellipse bounding boxes / image size, clipped; certainty 2 dropped; one box per label.
  got = sorted(zip(a.box_labels.tolist(), map(tuple, a.boxes.tolist())))
  want = sorted([(c("Lung nodule or mass"), (4 / 40, 3 / 30, 20 / 40, 15 / 30)),
                 (c("Pleural abnormality"), (4 / 40, 3 / 30, 20 / 40, 15 / 30)),
                 (c("High lung volume / emphysema"), (30 / 40, 20 / 30, 1.0, 1.0)),
                 (c("Atelectasis"), (0.0, 0.0, 10 / 40, 10 / 30))])
  assert [g[0] for g in got] == [w[0] for w in want]
  np.testing.assert_allclose([g[1] for g in got], [w[1] for w in want], atol=1e-6)
  # Gaze of P1R1 only (P1R2 discarded): negative x and zero duration skipped.
  np.testing.assert_allclose(a.gaze, [[10 / 40, 15 / 30, 0.4], [39.5 / 40, 29 / 30, 0.4]],
                             atol=1e-6)
  assert (a.official_split, a.patient_id, a.view) == ("train", "10000032", "PA")
  # d-b1 (phase 3, 50 x 40): 'Other' ignored, Atelectasis certainty 1 is uncertain.
  assert b.official_split == "val" and b.labels[c("Abnormal mediastinal contour")] == 1
  assert b.labels[c("Atelectasis")] == (1 if policy == "ones" else 0)
  np.testing.assert_allclose(b.gaze, [[0.5, 0.5, 0.25]])
  np.testing.assert_allclose(b.boxes, [[0.2, 0.25, 0.6, 0.5]])
  example = rec.to_example(a, 16)
  assert example["image"].shape == (16, 16) and (example["box_labels"] >= 0).sum() == 4
  assert (example["gaze"][:, 2] > 0).sum() == 2


def test_reflacx_bad_input(tmp_path):
  mimic_root = _mimic_tree(tmp_path / "mimic")
  labels = list(PHASE1_LABELS)
  labels[0] = "Bronchiectasis"
  _reflacx_tree(tmp_path / "reflacx", mimic_root, phase1_labels=labels)
  with pytest.raises(rec.BadInput,
                     match=r"metadata_phase_1.csv, line 1: unknown label column 'Bronchiectasis'"):
    reflacx.read(str(tmp_path / "reflacx"), mimic_dir=str(mimic_root))
  _reflacx_tree(tmp_path / "r2", mimic_root)
  os.remove(tmp_path / "r2" / "main_data" / "P3R1" / "fixations.csv")
  with pytest.raises(rec.BadInput, match=r"metadata_phase_3.csv, line 2: .*fixations.csv"):
    reflacx.read(str(tmp_path / "r2"), mimic_dir=str(mimic_root))


# --- EGD-CXR -----------------------------------------------------------------------------

def _egd_tree(root, mimic_root, normal_cell="0"):
  chx = [f"{c}__chx" for c in schema.CHEXPERT14.classes]
  header = (["dicom_id", "path", "study_id", "patient_id", "stay_id", "gender", "anchor_age",
             "image_top_pad", "image_bottom_pad", "image_left_pad", "image_right_pad",
             "dx1", "dx1_icd", "normal_reports", "Normal", "CHF", "pneumonia"] + chx +
            ["cxr_exam_indication"])
  cells_a = {"Cardiomegaly__chx": "1", "Edema__chx": "-1"}
  cells_c = {"Pneumonia__chx": "1", "Atelectasis__chx": "-1", "No Finding__chx": "0"}
  rows = [
      ["d-a1", "files/p10/p10000032/s50414267/d-a1.dcm", "50414267", "10000032", "1", "F", "60",
       0, 0, 0, 0, "chf", "I50", "0", normal_cell, "1", "0"]
      + [cells_a.get(c, "") for c in chx] + ["sob"],
      ["d-c1", "files/p12/p12000012/s52222222/d-c1.dcm", "52222222", "12000012", "2", "M", "70",
       0, 0, 0, 0, "pna", "J18", "0", "0", "0", "1"]
      + [cells_c.get(c, "") for c in chx] + ["fever"],
  ]
  write_csv(str(root / "master_sheet.csv"), header, rows)

  def fixation(dicom, fid, duration, x, y):
    row = dict.fromkeys(EGD_FIXATION_HEADER, "0")
    row.update(SESSION_ID="1", DICOM_ID=dicom, FPOGD=duration, FPOGID=fid, X_ORIGINAL=x,
               Y_ORIGINAL=y)
    return [row[k] for k in EGD_FIXATION_HEADER]
  write_csv(str(root / "fixations.csv"), EGD_FIXATION_HEADER, [
      fixation("d-a1", 1, 0.3, 20, 15), fixation("d-a1", 1, 0.1, 20, 15),   # one fixation, twice
      fixation("d-a1", 2, 0.2, -1, -1), fixation("d-a1", 3, 0.5, 10, 6),
      fixation("d-c1", 1, 0.7, 30, 10), fixation("d-other", 1, 0.7, 30, 10)])
  write_csv(str(root / "bounding_boxes.csv"), ["dicom_id", "bbox_name", "x1", "x2", "y1", "y2"], [
      ["d-a1", "right lung", 4, 18, 3, 27], ["d-a1", "heart", 16, 30, 12, 24],
      ["d-c1", "left lung", 20, 44, 4, 36]])
  return root


def test_egd_labels_gaze_and_anatomy(tmp_path):
  mimic_root = _mimic_tree(tmp_path / "mimic")
  _egd_tree(tmp_path / "egd", mimic_root)
  records, problems = egd.read(str(tmp_path / "egd"), mimic_dir=str(mimic_root))
  assert problems.count == 0 and [r.id for r in records] == ["d-a1", "d-c1"]
  a, c = records
  np.testing.assert_array_equal(a.labels, [0, 1, 0])
  np.testing.assert_array_equal(c.labels, [0, 0, 1])
  assert a.official_split == c.official_split == "" and c.patient_id == "12000012"
  np.testing.assert_allclose(a.gaze, [[0.5, 0.5, 0.3], [10 / 40, 6 / 30, 0.5]], atol=1e-6)
  np.testing.assert_allclose(c.gaze, [[30 / 40, 10 / 40, 0.7]], atol=1e-6)
  assert a.anatomy_names == ("right lung", "heart")
  np.testing.assert_allclose(a.anatomy_boxes, [[4 / 40, 3 / 30, 18 / 40, 27 / 30],
                                               [16 / 40, 12 / 30, 30 / 40, 24 / 30]], atol=1e-6)
  np.testing.assert_allclose(c.anatomy_boxes, [[0.5, 0.1, 1.0, 0.9]], atol=1e-6)  # x2 clipped to 40
  assert len(a.boxes) == 0 and rec.to_example(a, 16)["image"].shape == (16, 16)

  records, _ = egd.read(str(tmp_path / "egd"), mimic_dir=str(mimic_root), chexpert_labels=True,
                        uncertainty="ignore")
  c14 = schema.CHEXPERT14.index
  assert records[0].labels[c14("Cardiomegaly")] == 1 and records[0].label_mask[c14("Edema")] == 0
  assert records[1].labels.sum() == 1 and records[1].label_mask.sum() == 13


def test_egd_bad_input(tmp_path):
  mimic_root = _mimic_tree(tmp_path / "mimic")
  _egd_tree(tmp_path / "egd", mimic_root, normal_cell="yes")
  with pytest.raises(rec.BadInput, match=r"master_sheet.csv, line 2: .*'yes'"):
    egd.read(str(tmp_path / "egd"), mimic_dir=str(mimic_root))
  records, problems = egd.read(str(tmp_path / "egd"), mimic_dir=str(mimic_root), skip_bad=True)
  assert [r.id for r in records] == ["d-c1"] and problems.bad_count == 1
