"""How the labelled images are split for selection: a val split carved from train, and CV folds.

Kermany's pneumonia set holds up to a dozen X-rays of one patient. Split image by image, a val patient's other
X-rays sit in train, and val grades the models on patients they have seen, which the test set (other patients)
never does. So both splits keep each patient's images on one side wherever file names say who the patient is.
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING

import numpy as np

from pneumo_ray.config import ConfigError

if TYPE_CHECKING:
    from pneumo_ray.data import Splits


def with_folds(splits: Splits, k: int, seed: int) -> Splits:
    """``splits`` with the pool (train + val) assigned to ``k`` stratified folds, shuffled by ``seed``, each
    patient's images in one fold where ``splits.patients`` names them. Made once, in the driver, and carried with
    the images, so every worker and the leaderboard agree on them."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    _, y = splits.pool()
    smallest = int(np.bincount(y, minlength=len(splits.class_names)).min())
    if k > smallest:
        raise ConfigError(f"data.cv_folds: {k} folds need at least {k} images of each class in train+val, "
                          f"{splits.source} has {smallest} of its rarest; use data.cv_folds <= {smallest}")
    folds = np.empty(len(y), dtype=np.int64)
    splitter = (StratifiedKFold(k, shuffle=True, random_state=seed) if splits.patients is None
                else StratifiedGroupKFold(k, shuffle=True, random_state=seed))
    for fold, (_, held_out) in enumerate(splitter.split(y, y, splits.patients)):
        folds[held_out] = fold
    return dataclasses.replace(splits, folds=folds)


# Kermany's names: personN_bacteria_M / personN_virus_M (pneumonia), IM-NNNN-MMMM and NORMAL2-IM-NNNN-MMMM (normal)
KERMANY_PATIENT = re.compile(r"^(person\d+)_|^((?:NORMAL2-)?IM-\d+)-")


def patient_ids(names: list[str]) -> np.ndarray:
    """The patient of each image file name; a name that follows no known pattern is a patient of its own, as
    under data.split_by: image."""
    return np.array([next((g for g in m.groups() if g), name) if (m := KERMANY_PATIENT.match(name)) else name
                     for name in names], dtype=str)


def carve_val(y: np.ndarray, patients: np.ndarray | None, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of train and of val carved from it: stratified by class, seeded, and when ``patients`` is given,
    every patient's images on one side (one of round(1 / fraction) stratified group folds)."""
    from sklearn.model_selection import StratifiedGroupKFold, train_test_split

    everything = np.arange(len(y))
    if patients is None:
        return tuple(train_test_split(everything, test_size=fraction, stratify=y, random_state=seed))
    splitter = StratifiedGroupKFold(max(2, round(1 / fraction)), shuffle=True, random_state=seed)
    return next(splitter.split(everything, y, patients))
