"""Patient-level splits: train/val/test fractions, k-fold CV, annotated subsets.

Every split assigns whole patients, never single images, so no patient's
images are seen in training and evaluation at once. Functions take the
per-image patient ids and return sorted int64 index arrays into them. Patients
are shuffled from their sorted unique ids with ``np.random.default_rng(seed)``,
so a result depends only on the set of (index, patient) pairs and the seed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


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
