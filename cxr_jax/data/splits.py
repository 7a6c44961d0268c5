"""Patient-level splits, the split names, and how each dataset is cut into its splits.

Every split assigns whole patients, never single images, so no patient's
images are seen in training and evaluation at once. Functions take the
per-image patient ids and return sorted int64 index arrays into them. Patients
are shuffled from their sorted unique ids with ``np.random.default_rng(seed)``,
so a result depends only on the set of (index, patient) pairs and the seed.

Split names (``parse_split``): a part 'train', 'val' or 'test', or
'annotated_<part>' / 'unannotated_<part>': the images of the part with /
without boxes (``split_subset``). Each dataset family cuts its parts here:

Prepared real datasets (``split_indices``): with ``data.split_policy =
'random'`` (Ge 2018's random patient split), or when no image of the official
train split is present (the NIH sample), all images are split by patient
(data.val_fraction / data.test_fraction) and the official lists are not read;
otherwise ('official') 'test' = the official test
split (else the official validation split, else a patient-level
``data.test_fraction``); 'val' = the official validation split when an official
test split exists too, else a patient-level ``data.val_fraction`` of the
official train patients; 'train' = the rest of official train. With
``data.cv.num_folds > 0``, 'train' / 'test' become one fold of ``cv_split``
over the boxed images (of any official split) plus the unboxed official-train
images, 'val' unchanged and excluded from the folds (when it is empty, as on
the NIH sample whose images are all in the official test split, 'val' is a
patient-level ``data.val_fraction`` of the fold's train). Boxes are kept
wherever an image has them.

Joined datasets ('A+B', ``prepared.JoinedSource``; ``split_indices(..., parts=)``):
the official splits are first made consistent per patient (``follow_official_splits``):
a patient's official split, where any part has one, decides for all their images across
the parts, and an image of a part without official splits (official split '', e.g.
EGD-CXR) follows it; images of patients in no official split are official 'train' (as
a dataset without official splits is stored), split by the fractions above. Two parts
putting one patient in different official splits is an error.

Synthetic phantoms (``phantom_range``, ``phantom_split``): train/val/test are
disjoint, patient-aligned index ranges (``synthetic_bounds``). A
patient-level fraction ``data.synthetic.annotated_fraction`` of train keeps
its boxes; the rest of train has them stripped (box_labels -1, has_boxes 0):
limited annotation. Val and test keep every box (evaluation needs them;
'annotated_val' is then all of val). With ``data.cv.num_folds > 0``, 'train'
/ 'test' are a fold of cross-validation over the annotated train images
(``cv_split``).

``SplitSource`` is the random-access source of a split: the chosen images of
a dataset, with boxes stripped where they are not kept.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from cxr_jax.data import schema

SPLITS = ("train", "val", "test")
SUBSETS = ("annotated", "unannotated")


class EmptySplit(ValueError):
  """A split that holds no image (the message names the split and the fields that cut it)."""
SPLIT_POLICIES = ("official", "random")


def _patients(patient_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """(unique sorted patient ids [P], patient number of each image [N])."""
  ids = np.asarray(patient_ids, dtype=str)
  if ids.ndim != 1:
    raise ValueError(f"patient_ids must be a flat sequence, got shape {ids.shape}")
  unique, inverse = np.unique(ids, return_inverse=True)
  return unique, inverse


def _images_of(patient_mask: np.ndarray, inverse: np.ndarray) -> np.ndarray:
  return np.flatnonzero(patient_mask[inverse]).astype(np.int64)


def _check_fractions(fractions: Mapping[str, float]) -> None:
  if not fractions:
    raise ValueError("fractions is empty; give e.g. {'train': 0.7, 'val': 0.1, 'test': 0.2}")
  negative = {k: v for k, v in fractions.items() if not v >= 0}
  if negative:
    raise ValueError(f"fractions must be >= 0, got {negative}")
  total = sum(fractions.values())
  if abs(total - 1.0) > 1e-6:
    raise ValueError(f"fractions must sum to 1, got {dict(fractions)} (sum {total:.6g})")


def patient_split(patient_ids: Sequence[str], fractions: Mapping[str, float],
                  seed: int) -> dict[str, np.ndarray]:
  """Splits images into parts holding the given fractions of the *patients*.

  Patients are shuffled and cut in the order of ``fractions`` at
  round(cumulative fraction * num_patients); the fractions of images follow
  only approximately (patients have different numbers of images).

  Args:
    patient_ids: [N] patient id of each image.
    fractions: part name -> fraction of patients, >= 0, summing to 1.
    seed: shuffling seed.
  Returns:
    part name -> sorted int64 indices into ``patient_ids``; every index is in
    exactly one part.
  """
  _check_fractions(fractions)
  unique, inverse = _patients(patient_ids)
  order = np.random.default_rng(seed).permutation(len(unique))
  cuts = np.round(np.cumsum(list(fractions.values())) * len(unique)).astype(np.int64)
  cuts[-1] = len(unique)
  parts = {}
  for name, lo, hi in zip(fractions, np.concatenate([[0], cuts[:-1]]), cuts):
    chosen = np.zeros(len(unique), bool)
    chosen[order[lo:hi]] = True
    parts[name] = _images_of(chosen, inverse)
  return parts


def kfold(patient_ids: Sequence[str], k: int, seed: int
          ) -> list[tuple[np.ndarray, np.ndarray]]:
  """Patient-level k-fold cross-validation.

  Shuffled patients are dealt into k groups of near-equal patient counts;
  fold f tests on the images of group f and trains on all others. To run CV
  over a subset (e.g. the boxed images), call it on ``patient_ids[subset]``
  and map the results back with ``subset[indices]``.

  Returns:
    k pairs (train_indices, test_indices), sorted int64 indices into
    ``patient_ids``; every index is in exactly one test part.
  """
  unique, inverse = _patients(patient_ids)
  if not 2 <= k <= len(unique):
    raise ValueError(f"k must lie in [2, number of patients = {len(unique)}], got {k}")
  order = np.random.default_rng(seed).permutation(len(unique))
  folds = []
  for group in np.array_split(order, k):
    in_test = np.zeros(len(unique), bool)
    in_test[group] = True
    folds.append((_images_of(~in_test, inverse), _images_of(in_test, inverse)))
  return folds


def select_fraction(indices: np.ndarray, fraction: float, seed: int,
                    patient_ids: Sequence[str] | None = None) -> np.ndarray:
  """A random ``fraction`` of ``indices`` (Rozenberg's 0% / 20% unannotated).

  Without ``patient_ids``: round(fraction * len(indices)) indices. With
  ``patient_ids`` (the full per-image sequence that ``indices`` index into):
  round(fraction * number of patients among ``indices``) whole patients, and
  all of their images in ``indices``.

  Returns:
    sorted int64 subset of ``indices``.
  """
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
  indices = np.unique(np.asarray(indices, np.int64))
  rng = np.random.default_rng(seed)
  if patient_ids is None:
    count = int(round(fraction * len(indices)))
    return np.sort(rng.choice(indices, size=count, replace=False))
  if len(indices) and (indices.min() < 0 or indices.max() >= len(patient_ids)):
    raise ValueError(f"indices must lie in [0, {len(patient_ids)}) to index patient_ids, "
                     f"got range [{indices.min()}, {indices.max()}]")
  unique, inverse = _patients(np.asarray(patient_ids, dtype=str)[indices])
  count = int(round(fraction * len(unique)))
  chosen = np.zeros(len(unique), bool)
  chosen[rng.permutation(len(unique))[:count]] = True
  return indices[chosen[inverse]]


def annotated_split(patient_ids: Sequence[str], has_boxes: np.ndarray,
                    fractions: Mapping[str, float], seed: int,
                    pool_joins: str | None = None) -> dict[str, np.ndarray]:
  """Splits the annotated images by patient, and sets aside the unannotated pool.

  Patients with at least one annotated image are split by ``fractions``
  (``patient_split``); each part holds their annotated images. The extra part
  ``'unannotated'`` holds the images without boxes of patients with *no*
  annotated image, so it is patient-disjoint from every annotated part and can
  be added (whole or via ``select_fraction``) to any training set. With
  ``pool_joins='train'`` it also holds the unannotated images of the patients
  of part 'train' (then it is disjoint from all parts but that one). Other
  unannotated images of annotated patients are in no part.

  Args:
    patient_ids: [N] patient id of each image.
    has_boxes: bool [N], whether each image has box annotations.
    fractions: part name -> fraction of annotated patients, summing to 1.
    seed: shuffling seed.
    pool_joins: optional name of a part whose patients may be in the pool.
  Returns:
    part name -> sorted int64 indices, for each part of ``fractions`` and
    ``'unannotated'``.
  """
  if "unannotated" in fractions:
    raise ValueError("'unannotated' is reserved for the pool of unannotated images")
  if pool_joins is not None and pool_joins not in fractions:
    raise ValueError(f"pool_joins={pool_joins!r} is not a part of {list(fractions)}")
  has_boxes = np.asarray(has_boxes, bool)
  ids = np.asarray(patient_ids, dtype=str)
  if has_boxes.shape != ids.shape:
    raise ValueError(f"has_boxes has shape {has_boxes.shape}, patient_ids {ids.shape}")
  annotated = np.flatnonzero(has_boxes).astype(np.int64)
  if not len(annotated):
    raise ValueError("no image has boxes (has_boxes is all False)")
  parts = {name: annotated[local]
           for name, local in patient_split(ids[annotated], fractions, seed).items()}
  held_out = [parts[name] for name in fractions if name != pool_joins]
  held_out_patients = np.isin(ids, ids[np.concatenate(held_out)] if held_out else [])
  parts["unannotated"] = np.flatnonzero(~has_boxes & ~held_out_patients).astype(np.int64)
  return parts


def assert_patient_disjoint(parts: Mapping[str, np.ndarray],
                            patient_ids: Sequence[str]) -> None:
  """Raises ValueError naming a patient found in two parts (and the two parts).

  Args:
    parts: part name -> int indices into ``patient_ids``.
    patient_ids: [N] patient id of each image.
  """
  ids = np.asarray(patient_ids, dtype=str)
  names = list(parts)
  patients = [np.unique(ids[np.asarray(parts[n], np.int64)]) for n in names]
  for a in range(len(names)):
    for b in range(a + 1, len(names)):
      shared = np.intersect1d(patients[a], patients[b], assume_unique=True)
      if len(shared):
        raise ValueError(f"patient {shared[0]!r} is in both part {names[a]!r} and part "
                         f"{names[b]!r} ({len(shared)} shared patients)")


def cv_split(patient_ids: Sequence[str], has_boxes: np.ndarray, num_folds: int, fold: int,
             unannotated_fraction: float, seed: int) -> dict[str, np.ndarray]:
  """One fold of cross-validation over the annotated images (Rozenberg 2020 Sec. 4, Table 1).

  The images with boxes (``has_boxes``) are dealt by patient into ``num_folds``
  folds (``kfold``); fold ``fold`` is the test part, the others are
  'annotated_train'. 'unannotated_train' is a patient-level
  ``unannotated_fraction`` of the images without boxes whose patients have no
  boxed image (so it never shares a patient with the test fold).

  Returns:
    {'annotated_train', 'unannotated_train', 'test'}: sorted int64 indices into
    ``patient_ids``, patient-disjoint from one another.
  """
  ids = np.asarray(patient_ids, dtype=str)
  has_boxes = np.asarray(has_boxes, bool)
  if has_boxes.shape != ids.shape:
    raise ValueError(f"has_boxes has shape {has_boxes.shape}; patient_ids has {ids.shape}")
  if not 0 <= fold < num_folds:
    raise ValueError(f"fold={fold} must lie in [0, num_folds={num_folds})")
  pool = np.flatnonzero(has_boxes)
  if not len(pool):
    raise ValueError("cross-validation over annotated images: no image has boxes")
  train, test = kfold(ids[pool], num_folds, seed)[fold]
  annotated_patients = np.unique(ids[pool])
  candidates = np.flatnonzero(~has_boxes & ~np.isin(ids, annotated_patients))
  unannotated = select_fraction(candidates, unannotated_fraction, seed, patient_ids=ids)
  parts = {"annotated_train": pool[train], "unannotated_train": unannotated, "test": pool[test]}
  assert_patient_disjoint(parts, ids)
  return parts


# ----------------------------------------------------------------------------
# Split names and the sources of splits.

def parse_split(split: str, name: str) -> tuple[str, str]:
  """A split name -> (subset, part): 'val' -> ('', 'val'), 'annotated_train' ->
  ('annotated', 'train'). KeyError naming data.name ``name`` for any other name."""
  subset, _, part = split.rpartition("_")
  if part not in SPLITS or subset not in ("",) + SUBSETS:
    raise KeyError(f"unknown split {split!r} of data.name={name!r}; known: "
                   f"{list(SPLITS)}, 'annotated_<part>', 'unannotated_<part>'")
  return subset, part


def split_subset(indices: np.ndarray, has_boxes: np.ndarray, subset: str) -> np.ndarray:
  """The ``indices`` [M] whose image has boxes (subset 'annotated'), has none
  ('unannotated'), or all of them (''); ``has_boxes`` bool [N] is indexed by them."""
  if not subset:
    return indices
  return indices[has_boxes[indices] == (subset == "annotated")]


class SplitSource:
  """Images ``indices`` of ``source``; boxes kept where ``keep_boxes``, else stripped.

  Adds ``has_boxes`` (float32 0/1) to every Example. ``name`` is the repr, which
  grain stores in the iterator state and checks on restore.
  """

  def __init__(self, source: Any, indices: np.ndarray, keep_boxes: np.ndarray, name: str):
    self.source = source
    self.indices = np.asarray(indices, np.int64)
    self.keep_boxes = np.asarray(keep_boxes, bool)
    self.name = name

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> schema.Example:
    example = dict(self.source[int(self.indices[index])])
    keep = bool(self.keep_boxes[index])
    if not keep:
      example["boxes"], example["box_labels"] = schema.empty_boxes()
    example["has_boxes"] = np.float32(keep)
    return example

  def __repr__(self) -> str:
    return f"SplitSource({self.name}, {len(self)} images)"


# ----------------------------------------------------------------------------
# Prepared real datasets.

def split_policy(data_config: Any) -> str:
  """``data.split_policy`` ('official' where a data config has none); ValueError naming the key
  for a value not in ``SPLIT_POLICIES``."""
  policy = getattr(data_config, "split_policy", "official")
  if policy not in SPLIT_POLICIES:
    raise ValueError(f"unknown data.split_policy {policy!r}; known: {list(SPLIT_POLICIES)}")
  return policy


_warned: set[str] = set()  # the warnings this process has logged (each is logged once)


def _warn_once(message: str) -> None:
  if message not in _warned:
    _warned.add(message)
    from absl import logging  # pylint: disable=import-outside-toplevel
    logging.warning("%s", message)


def _no_official_train(num_images: int, data_config: Any) -> str:
  """What ``split_indices`` does with images none of which is in the official train split."""
  head = f"no image of the official train split is present ({num_images} images): "
  cv = data_config.cv
  if cv is not None and cv.num_folds > 0:
    return (head + f"'val' is a patient-level data.val_fraction={data_config.val_fraction:g} of "
            f"them; 'train' / 'test' are fold {cv.fold} of data.cv's {cv.num_folds} over the "
            f"other patients' boxed images" + (", with a data.cv.unannotated_fraction of their "
            "unboxed ones in 'train'" if cv.unannotated_fraction else ""))
  return (head + f"all are split by patient (data.val_fraction={data_config.val_fraction:g}, "
          f"data.test_fraction={data_config.test_fraction:g}, the rest 'train')")


def follow_official_splits(patient_ids: Sequence[str], official_splits: Sequence[str],
                           parts: Sequence[str]) -> np.ndarray:
  """The official split of each image of a joined dataset, made consistent per patient.

  A patient's official split ('train' / 'val' / 'test'), where an image of theirs has one,
  becomes that of all their images, in every part; an image without one ('': a part
  without official splits) of a patient with none anywhere becomes 'train'.

  Args:
    patient_ids: [N] patient id of each image.
    official_splits: [N] official split of each image, '' where its part has none.
    parts: [N] name of the part (dataset) each image comes from.
  Returns:
    str [N]: the official split of each image.
  Raises:
    ValueError naming the patient and the parts where two official splits of one patient
    differ.
  """
  unique, inverse = _patients(patient_ids)
  official = np.asarray(official_splits, dtype=str)
  parts = np.asarray(parts, dtype=str)
  given = official != ""
  names, code = np.unique(official, return_inverse=True)
  # Per patient, the lowest and highest code of the official splits of their images (-1: none).
  low = np.full(len(unique), len(names))
  high = np.full(len(unique), -1)
  np.minimum.at(low, inverse[given], code[given])
  np.maximum.at(high, inverse[given], code[given])
  clash = np.flatnonzero((high >= 0) & (low != high))
  if len(clash):
    p = clash[0]
    a, b = (np.flatnonzero(given & (inverse == p) & (code == c))[0] for c in (low[p], high[p]))
    raise ValueError(f"patient {str(unique[p])!r} is in official split {str(official[a])!r} "
                     f"of part {str(parts[a])!r} and {str(official[b])!r} of part "
                     f"{str(parts[b])!r}: the parts of a joined dataset must agree")
  return np.where(high >= 0, names[np.maximum(high, 0)], "train")[inverse]


def split_indices(patient_ids: np.ndarray, official_splits: np.ndarray, has_boxes: np.ndarray,
                  data_config: Any, parts: Sequence[str] | None = None
                  ) -> dict[str, np.ndarray]:
  """Patient-level 'train', 'val', 'test' (int64 indices) on top of the official splits.

  See the module docstring. Uses data.split_policy, data.val_fraction,
  data.test_fraction, data.split_seed and data.cv (num_folds, fold,
  unannotated_fraction). ``parts`` ([N] part name of each image): a joined dataset,
  whose official splits ('' for a part without any) ``follow_official_splits`` first
  (policy 'official'; 'random' reads none).
  Raises ValueError if two parts share a patient.
  """
  ids = np.asarray(patient_ids, dtype=str)
  official = np.asarray(official_splits, dtype=str)
  has_boxes = np.asarray(has_boxes, bool)
  seed = data_config.split_seed
  policy = split_policy(data_config)
  if parts is not None and policy == "official":
    official = follow_official_splits(ids, official, parts)
  present = set(official.tolist())
  everything = np.arange(len(ids))
  train_pool = np.flatnonzero(official == "train")
  val_frac, test_frac = data_config.val_fraction, data_config.test_fraction
  if policy == "random":
    train_pool, present = everything, set()
  elif not len(train_pool):
    # No image of the official train split is here (e.g. the NIH sample: every image is in
    # the official test list): patient-level train / val / test over all of them.
    _warn_once(_no_official_train(len(ids), data_config))
    train_pool, present = everything, set()
  if "test" in present and "val" in present:
    test, val, train = (np.flatnonzero(official == s) for s in ("test", "val", "train"))
  elif present & {"test", "val"}:
    test = np.flatnonzero(official == ("test" if "test" in present else "val"))
    cut = patient_split(ids[train_pool], {"train": 1 - val_frac, "val": val_frac}, seed)
    val, train = train_pool[cut["val"]], train_pool[cut["train"]]
  else:
    cut = patient_split(ids[train_pool], {"train": 1 - val_frac - test_frac,
                                          "val": val_frac, "test": test_frac}, seed)
    train, val, test = (train_pool[cut[s]] for s in ("train", "val", "test"))
  parts = {"train": train, "val": val, "test": test}
  cv = data_config.cv
  if cv is not None and cv.num_folds > 0:
    val_patients = np.isin(ids, ids[val])
    subset = everything[~val_patients & (has_boxes | np.isin(everything, train))]
    fold = cv_split(ids[subset], has_boxes[subset], cv.num_folds, cv.fold,
                    cv.unannotated_fraction, seed)
    train = np.sort(subset[np.concatenate([fold["annotated_train"], fold["unannotated_train"]])])
    if not len(val):  # e.g. the NIH sample: every image is boxed and in the official test
      cut = patient_split(ids[train], {"train": 1 - val_frac, "val": val_frac}, seed)
      val, train = train[cut["val"]], train[cut["train"]]
    parts = {"train": train, "val": val, "test": subset[fold["test"]]}
  assert_patient_disjoint(parts, ids)
  return parts


# ----------------------------------------------------------------------------
# Synthetic phantoms.

def synthetic_bounds(num_train: int, num_val: int, num_test: int, images_per_patient: int
                     ) -> np.ndarray:
  """int [4]: train/val/test are [b0, b1), [b1, b2), [b2, b3) of the phantom indices.

  Cumulative sizes rounded up to whole patients, so no patient spans two parts.
  """
  cumulative = np.cumsum([0, num_train, num_val, num_test])
  return -(-cumulative // images_per_patient) * images_per_patient


def _phantom_cv(data_config: Any, part: str) -> Any:
  """data.cv when ``part`` is a cross-validation fold ('train' / 'test'), else None."""
  cv = data_config.cv
  in_cv = cv is not None and cv.num_folds > 0 and part in ("train", "test")
  return cv if in_cv else None


def phantom_range(data_config: Any, part: str, images_per_patient: int) -> tuple[int, int]:
  """[start, stop) of the phantom indices ``part`` is cut from: its range of
  ``synthetic_bounds``, or train's for a fold of cross-validation."""
  cfg = data_config.synthetic
  bounds = synthetic_bounds(cfg.num_train, cfg.num_val, cfg.num_test, images_per_patient)
  first = 0 if _phantom_cv(data_config, part) is not None else SPLITS.index(part)
  start, stop = (int(b) for b in bounds[first:first + 2])
  return start, stop


def phantom_split(data_config: Any, subset: str, part: str, size: int,
                  images_per_patient: int) -> tuple[np.ndarray, np.ndarray, str]:
  """The images of a split among the ``size`` phantoms of ``phantom_range`` (see the module
  docstring).

  Returns:
    (int64 indices [M] into the range, bool keep_boxes [M], the split's cross-validation
    note for its name: '' or ' (cv fold F of K, unannotated fraction U)').
  """
  cfg = data_config.synthetic
  cv = _phantom_cv(data_config, part)
  everything = np.arange(size)
  keep = np.ones(size, bool)
  if cv is not None or part == "train":  # limited annotation: a fraction of train keeps boxes
    patients = (everything // images_per_patient).astype(str)
    annotated = select_fraction(everything, cfg.annotated_fraction, cfg.seed,
                                patient_ids=patients)
    keep = np.isin(everything, annotated)
  if cv is None:
    chosen = split_subset(everything, keep, subset)
    return chosen, keep[chosen], ""
  parts = cv_split(patients, keep, cv.num_folds, cv.fold, cv.unannotated_fraction, cfg.seed)
  if part == "test":
    chosen = np.isin(everything, parts["test"])
  else:
    chosen = np.isin(everything, np.concatenate(
        [parts[f"{s}_train"] for s in (SUBSETS if not subset else (subset,))]))
  note = (f" (cv fold {cv.fold} of {cv.num_folds}, unannotated fraction "
          f"{cv.unannotated_fraction})")
  return np.flatnonzero(chosen), keep[chosen], note
