"""Synthetic phantoms written to disk in the official NIH ChestX-ray14 layout.

``export(export_dir, num, image_size)`` (``cxr-phantoms --export_dir``) renders
phantoms ``0 .. num-1`` of set ``seed`` (``synthetic.render_example``) and
writes them exactly as the NIH download is laid out (``DATASETS.md``), so they
go through the real-data path (``nih.read``, ``cxr-prepare --dataset=nih``)::

  images/<patient:08d>_<follow-up:03d>.png   uint8 gray, image_size px
  Data_Entry_2017_v2020.csv   the v2020 header verbatim; 'Finding Labels' 'A|B'
                              or 'No Finding'; Patient ID = index //
                              synthetic.IMAGES_PER_PATIENT; view PA;
                              OriginalImage[Width,Height] = 1024,1024
  BBox_List_2017.csv          header 'Image Index,Finding Label,Bbox [x,y,w,h],,,';
                              one row per phantom box, x, y, w, h in pixels of the
                              1024 x 1024 release; Infiltration spelled 'Infiltrate'
  train_val_list.txt, test_list.txt
                              by patient: a patient is in test with probability
                              ``test_fraction`` (``is_test_patient``)

Every phantom box is listed, in both splits (NIH has boxes for 880 of its
test images only).
Streaming: worker processes render and write ``chunk_size`` images at a time
and return only their CSV / list lines, which the parent appends in index
order to temporary files renamed into place at the end; memory does not grow
with ``num``. Each PNG is written to a temporary name and renamed.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import time

import cv2
import numpy as np

from cxr_jax import files
from cxr_jax.data.sources import synthetic

DATA_ENTRY_FILE = "Data_Entry_2017_v2020.csv"
BBOX_FILE = "BBox_List_2017.csv"
TRAIN_VAL_FILE, TEST_FILE = "train_val_list.txt", "test_list.txt"
DATA_ENTRY_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,"
                     "Patient Gender,View Position,OriginalImage[Width,Height],"
                     "OriginalImagePixelSpacing[x,y]")
BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
RELEASE_SIZE = 1024        # NIH images and box coordinates are 1024 x 1024 px
PIXEL_SPACING = 0.143      # mm, the usual NIH value
DEFAULT_TEST_FRACTION = 0.2
DEFAULT_CHUNK_SIZE = 32
# BBox_List's spelling of class names that differ from Data_Entry's.
_BBOX_NAMES = {"Infiltration": "Infiltrate"}
# Random stream of the per-patient metadata (synthetic.py uses streams 0-3).
_PATIENT_STREAM = 101


def image_name(index: int) -> str:
  """NIH file name '<patient:08d>_<follow-up:03d>.png' of phantom ``index``."""
  patient, follow_up = divmod(index, synthetic.IMAGES_PER_PATIENT)
  return f"{patient:08d}_{follow_up:03d}.png"


def _patient_draws(seed: int, patient: int) -> np.ndarray:
  """float64 [3] uniforms of one patient: test split, age, sex."""
  return np.random.default_rng([seed, _PATIENT_STREAM, patient]).random(3)


def is_test_patient(seed: int, patient: int, test_fraction: float) -> bool:
  """Whether all images of ``patient`` are in test_list.txt (else train_val_list.txt)."""
  return bool(_patient_draws(seed, patient)[0] < test_fraction)


def release_box(box: np.ndarray) -> tuple[float, float, float, float]:
  """Normalized (x0, y0, x1, y1) -> (x, y, w, h) in pixels of the 1024 px release."""
  x0, y0, x1, y1 = (float(v) * RELEASE_SIZE for v in box)
  return x0, y0, x1 - x0, y1 - y0


def rows_of(example: dict, index: int, seed: int, test_fraction: float
            ) -> tuple[str, list[str], bool]:
  """One rendered phantom -> (Data_Entry line, BBox_List lines, in test)."""
  name = image_name(index)
  patient, follow_up = divmod(index, synthetic.IMAGES_PER_PATIENT)
  draws = _patient_draws(seed, patient)
  findings = "|".join(synthetic.CLASSES[c] for c in np.flatnonzero(example["labels"]))
  entry = (f"{name},{findings or 'No Finding'},{follow_up},{patient},"
           f"{20 + int(draws[1] * 60) + follow_up},{'MF'[int(draws[2] < 0.5)]},PA,"
           f"{RELEASE_SIZE},{RELEASE_SIZE},{PIXEL_SPACING},{PIXEL_SPACING}")
  boxes = []
  for box, c in zip(example["boxes"], example["box_labels"]):
    if c >= 0:
      label = synthetic.CLASSES[c]
      coords = ",".join(format(v, ".10g") for v in release_box(box))
      boxes.append(f"{name},{_BBOX_NAMES.get(label, label)},{coords}")
  return entry, boxes, is_test_patient(seed, patient, test_fraction)


def _write_png(path: str, image: np.ndarray) -> None:
  ok, png = cv2.imencode(".png", image)
  if not ok:
    raise ValueError(f"{path}: PNG encoding failed")
  # No fsync: one per image would slow the export ~2.5x, and a phantom is rendered again.
  files.write_bytes_atomic(path, png.tobytes(), fsync=False)


def export_chunk(task: tuple) -> tuple[list[str], list[str], list[str], list[str]]:
  """Renders and writes phantoms [start, stop) (runs in a worker process).

  Args:
    task: (export_dir, seed, image_size, start, stop, test_fraction).
  Returns:
    (Data_Entry lines, BBox_List lines, train_val names, test names), in index order.
  """
  export_dir, seed, image_size, start, stop, test_fraction = task
  images = os.path.join(export_dir, "images")
  entries, boxes, train_val, test = [], [], [], []
  for index in range(start, stop):
    example = synthetic.render_example(seed, index, image_size)
    _write_png(os.path.join(images, image_name(index)), example["image"])
    entry, box_lines, in_test = rows_of(example, index, seed, test_fraction)
    entries.append(entry)
    boxes.extend(box_lines)
    (test if in_test else train_val).append(image_name(index))
  return entries, boxes, train_val, test


def _run(tasks: list[tuple], workers: int):
  """Yields export_chunk(task) for each task, in order, over ``workers`` processes."""
  if workers == 1 or len(tasks) == 1:
    yield from map(export_chunk, tasks)
    return
  # spawn: the caller may hold JAX / threads that must not be forked.
  with multiprocessing.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
    yield from pool.imap(export_chunk, tasks)


def export(export_dir: str, num: int, image_size: int, *, seed: int = 0, workers: int = 1,
           test_fraction: float = DEFAULT_TEST_FRACTION,
           chunk_size: int = DEFAULT_CHUNK_SIZE) -> dict:
  """Writes phantoms 0 .. num-1 of set ``seed`` as an NIH download in ``export_dir``.

  Args:
    export_dir: output folder (created; files already there are replaced).
    num: number of images (num / IMAGES_PER_PATIENT patients, rounded up).
    image_size: stored PNG size in px (16 .. 1024); boxes are written in
      1024 px release coordinates whatever the size.
    seed: phantom set (``synthetic.render_example``).
    workers: rendering processes (1 = in this process).
    test_fraction: probability of a patient being in test_list.txt.
    chunk_size: images rendered per task (bounds the lines held in memory).
  Returns:
    {'images', 'boxes', 'train_val', 'test', 'seconds'}.
  """
  if num < 1 or workers < 1 or chunk_size < 1:
    raise ValueError(f"export: num={num}, workers={workers}, chunk_size={chunk_size} "
                     f"must be >= 1")
  if not 16 <= image_size <= 1024:
    raise ValueError(f"export: image_size={image_size} outside [16, 1024]")
  if not 0.0 <= test_fraction <= 1.0:
    raise ValueError(f"export: test_fraction={test_fraction} outside [0, 1]")
  start_time = time.perf_counter()
  os.makedirs(os.path.join(export_dir, "images"), exist_ok=True)
  tasks = [(export_dir, seed, image_size, start, min(start + chunk_size, num), test_fraction)
           for start in range(0, num, chunk_size)]
  names = (DATA_ENTRY_FILE, BBOX_FILE, TRAIN_VAL_FILE, TEST_FILE)
  # All four files appear on a clean exit, none (their temps removed) on an exception.
  with contextlib.ExitStack() as stack:
    outs = [stack.enter_context(files.atomic_open(os.path.join(export_dir, name), "w",
                                                  newline=""))
            for name in names]
    outs[0].write(DATA_ENTRY_HEADER + "\n")
    outs[1].write(BBOX_HEADER + "\n")
    counts = np.zeros(4, np.int64)
    for lines in _run(tasks, workers):
      for i, (f, part) in enumerate(zip(outs, lines)):
        f.writelines(line + "\n" for line in part)
        counts[i] += len(part)
  images, boxes, train_val, test = (int(c) for c in counts)
  return dict(images=images, boxes=boxes, train_val=train_val, test=test,
              seconds=time.perf_counter() - start_time)
