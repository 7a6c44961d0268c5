"""Where prepared datasets live: dataset names, folder layout, the readers' registry.

Layout (TFDS's, so ``tfds.builder_from_directory`` and the builders of
``cxr_jax.data.tfds`` agree)::

  DATA_DIR/cxr_<dataset>/<config>/<VERSION>/
    cxr_<dataset>-<split>.array_record-00000-of-000NN   shards per official split
    dataset_info.json, features.json                    TFDS metadata
    cxr_index.json      per split: image_id, patient_id, num_boxes (no image reading
                        is needed to cut splits), and the annotation columns that
                        ``counts`` reads: positives, masked, box_labels, fixations
    prepare_report.json rows the reader left out and images skipped (--skip_bad),
                        with counts per reason (``records.Problems`` format)

``<config>`` is ``config_name(image_size, uncertainty, frontal_only)``: the
size, e.g. ``256``, with ``_u<policy>`` / ``_allviews`` appended when the
uncertainty policy is not 'zeros' or lateral views are kept. Official splits
are stored as 'train', 'val', 'test' where the dataset has them (NIH:
train_val -> 'train', test; CheXpert: train, valid -> 'val'; MIMIC: train,
validate -> 'val', test); a dataset without any (EGD) is stored whole as 'train'.

``data.name`` names one dataset of ``DATASETS`` or joins several, 'A+B', each
part 'DATASET' or 'DATASET:KIND' keeping only annotation KIND
(``dataset_and_kept``).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable
from typing import Any

import numpy as np

from cxr_jax.data.sources import records as records_lib

VERSION = "1.0.0"
DATASETS = ("nih", "chexpert", "mimic", "reflacx", "egd")
# The annotation fields a part of a joined data.name can keep ("egd:gaze+reflacx:boxes").
ANNOTATION_FIELDS = ("gaze", "boxes")
INDEX_FILE = "cxr_index.json"
REPORT_FILE = "prepare_report.json"
# Official split names of the readers -> stored split names.
_OFFICIAL = {"train": "train", "val": "val", "test": "test", "": "train"}
# The datasets without official splits (stored whole as 'train'; joined, '': splits.py).
WITHOUT_OFFICIAL_SPLITS = ("egd",)


def tfds_name(dataset: str) -> str:
  return f"cxr_{dataset}"


def config_name(image_size: int, uncertainty: str = "zeros", frontal_only: bool = True) -> str:
  """'256', '256_uones', '512_uignore_allviews', ...: one folder per reader option set."""
  name = str(int(image_size))
  if uncertainty != "zeros":
    name += f"_u{uncertainty}"
  if not frontal_only:
    name += "_allviews"
  return name


def dataset_dir(data_dir: str, dataset: str, image_size: int, uncertainty: str = "zeros",
                frontal_only: bool = True) -> str:
  """The finished dataset's folder DATA_DIR/cxr_<dataset>/<config>/<VERSION>."""
  return os.path.join(data_dir, tfds_name(dataset),
                      config_name(image_size, uncertainty, frontal_only), VERSION)


def prepare_command(dataset: str, image_size: int, data_dir: str = "DATA_DIR",
                    uncertainty: str = "zeros", frontal_only: bool = True) -> str:
  """The cxr-prepare command line that builds ``dataset_dir(...)``."""
  command = (f"cxr-prepare --dataset={dataset} --manual_dir=<official download> "
             f"--data_dir={data_dir} --image_size={image_size}")
  if uncertainty != "zeros":
    command += f" --uncertainty={uncertainty}"
  if not frontal_only:
    command += " --all_views"
  if dataset in ("reflacx", "egd"):
    command += " --mimic_dir=<MIMIC-CXR-JPG download>"
  return command


def reader_module(dataset: str):
  if dataset not in DATASETS:
    raise KeyError(f"unknown dataset {dataset!r}; known: {list(DATASETS)}")
  return importlib.import_module(f"cxr_jax.data.sources.{dataset}")


def stored_split(record: records_lib.Record) -> str:
  try:
    return _OFFICIAL[record.official_split]
  except KeyError:
    raise records_lib.BadInput(f"record {record.id!r} ({record.path}): unknown official split "
                               f"{record.official_split!r}") from None


def prepared_sizes(data_dir: str, dataset: str, uncertainty: str = "zeros",
                   frontal_only: bool = True) -> list[int]:
  """Sorted image sizes of the finished prepared datasets with these reader options."""
  root = os.path.join(data_dir, tfds_name(dataset))
  sizes = []
  for name in os.listdir(root) if os.path.isdir(root) else ():
    size = name.split("_")[0]
    if (size.isdigit() and name == config_name(int(size), uncertainty, frontal_only)
        and os.path.isfile(os.path.join(root, name, VERSION, "dataset_info.json"))):
      sizes.append(int(size))
  return sorted(sizes)


def check_data_name(name: str) -> None:
  """KeyError naming data.name ``name`` unless it is 'synthetic' or joins ``DATASETS``."""
  if name != "synthetic" and not {dataset_and_kept(p, name)[0] for p in name.split("+")} <= set(
      DATASETS):
    raise KeyError(f"data.name={name!r}; known: 'synthetic', {list(DATASETS)}")


def dataset_and_kept(part: str, name: str = "") -> tuple[str, frozenset[str] | None]:
  """One '+'-separated part of data.name ``name``: 'DATASET' (every annotation it has) or
  'DATASET:KIND', KIND 'gaze' | 'boxes' (the annotation its examples keep). KeyError naming
  data.name for an empty part or an unknown KIND."""
  dataset, colon, kind = part.partition(":")
  if not dataset or (colon and kind not in ANNOTATION_FIELDS):
    raise KeyError(f"data.name={name or part!r}: join distinct prepared datasets with '+', each "
                   f"'DATASET' or 'DATASET:KIND', KIND one of {list(ANNOTATION_FIELDS)}")
  return dataset, frozenset({kind}) if kind else None


# Per-image annotation columns of cxr_index.json (``index_columns``).
INDEX_COLUMNS = ("positives", "masked", "box_labels", "fixations")


def index_columns(rows: Iterable[tuple[Any, Any, Any, Any]]) -> dict[str, list]:
  """The per-image annotation columns of cxr_index.json from (labels [K], label_mask [K],
  box_labels [B], gaze [F,3]) of each image, in the stored label space: 'positives' and
  'masked' (class indices with label 1 unmasked / with mask 0), 'box_labels', 'fixations'
  (fixations with a duration)."""
  out = {k: [] for k in INDEX_COLUMNS}
  for labels, mask, box_labels, gaze in rows:
    labels, mask = np.asarray(labels), np.asarray(mask)
    box_labels = np.asarray(box_labels, np.int64).reshape(-1)
    out["positives"].append(np.flatnonzero((labels > 0.5) & (mask > 0)).tolist())
    out["masked"].append(np.flatnonzero(mask <= 0).tolist())
    out["box_labels"].append(box_labels[box_labels >= 0].tolist())
    out["fixations"].append(int(np.sum(np.asarray(gaze, np.float32).reshape(-1, 3)[:, 2] > 0)))
  return out
