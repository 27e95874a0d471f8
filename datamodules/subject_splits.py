"""Subject-level splits of slice stacks (DC-MT) and the record of each subject's role that stage 2 reuses.

:func:`split_subjects` is a pure function of its inputs: the held-out fold is the **test** split, the
**validation** subjects are drawn from the remaining (training) subjects, and ``label_ratio`` of the training
subjects are **labeled**. Each subject therefore has exactly one *role*: ``labeled``, ``unlabeled``, ``val`` or
``test`` (:data:`ROLES`), plus its *fold* (0 … num_folds − 1).

Validation. By default ``val_fraction`` of the training subjects (0.15) are held out for validation, so that
checkpoint selection (``best.ckpt``) never sees the test subjects. The DC-MT reference protocol has no validation
split (it validated on the test fold); a config that wants it says so with ``val_fraction: 0`` **and**
``no_validation_split: true``: the run then validates on nothing, has no monitored checkpoint and tests its last
epoch. ``val_fraction: 0`` alone is an error, so no run ends up selecting its model on the test set by default.

Stratification. The k-fold and the validation draw are stratified by subject label when the subject labels are
known (:func:`datamodules.splits.kfold_by_patient`, :func:`datamodules.splits.split_by_patient`: every fold and
the validation split get the floor or ceiling of each class's share); a ``fold`` column in the subject table
overrides the k-fold.

Class counts. Stratification spreads the classes; :func:`check_subject_counts` then *verifies* that every split
holds at least ``min_per_class`` **subjects** of every class, with the check and wording of the CXR path
(:func:`datamodules.splits.check_class_counts`). The unit is the subject, not the slice: the split is drawn over
subjects, DC-MT's subject-level metrics (and the whole of stage 2) are per subject, and the slices of one subject
are correlated, so twenty slices of two subjects are two examples of their class, not twenty. The slice-level
metrics therefore rest on at least ``min_per_class`` subjects of each subject class too.

Stage 2 (:class:`datamodules.subject_features.SubjectFeatureDataModule`) does not split again: the stage-1 feature
export records every subject's role and fold (:func:`role_frame`), and stage 2 turns it back into the split
(:func:`split_from_roles`), so a subject never changes role between the stages.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from datamodules.manifest import DataError
from datamodules.splits import check_class_counts, kfold_by_patient, split_by_patient

__all__ = ["ROLES", "DEFAULT_VAL_FRACTION", "split_subjects", "subject_folds", "role_frame", "split_from_roles",
           "check_subject_counts"]

ROLES = ("labeled", "unlabeled", "val", "test")
DEFAULT_VAL_FRACTION = 0.15


def _one_hot(labels: np.ndarray) -> np.ndarray | None:
    """(N, K) one-hot of integer subject labels (NaN rows: unknown), or None when no label is known."""
    labels = np.asarray(labels, dtype=np.float64)
    known = ~np.isnan(labels)
    if not known.any():
        return None
    k = int(labels[known].max()) + 1
    out = np.full((len(labels), k), np.nan)
    out[known] = np.eye(k)[labels[known].astype(np.int64)]
    return out


def check_validation_arguments(val_fraction: float, no_validation_split: bool) -> None:
    """The two ways to ask for a split, and the error for neither (see the module doc)."""
    if no_validation_split:
        if val_fraction > 0:
            raise DataError(f"no_validation_split=true but val_fraction={val_fraction}: choose one (val_fraction 0 "
                            "for the reference protocol without validation, or no_validation_split false)")
        return
    if not 0 < val_fraction < 1:
        raise DataError(
            f"val_fraction={val_fraction} leaves no validation subjects, and validating on the held-out fold would "
            f"select the model on the test set. Use val_fraction > 0 (default {DEFAULT_VAL_FRACTION}), or set "
            "no_validation_split: true for the reference protocol (no validation, the last epoch is tested)")


def subject_folds(subjects: pd.DataFrame, num_folds: int, seed: int) -> pd.Series:
    """``subject_id -> fold``: the ``fold`` column when it is filled, else the seeded stratified k-fold."""
    ids = subjects["subject_id"].astype(str).to_numpy()
    if len(subjects) and subjects["fold"].notna().all():
        return pd.Series(subjects["fold"].to_numpy().astype(np.int64), index=ids)
    if num_folds < 2:
        raise DataError(f"num_folds must be >= 2 (the held-out fold is the test split), got {num_folds}")
    labels = _one_hot(subjects["subject_label"].to_numpy())
    folds = np.full(len(ids), -1, np.int64)
    for f in range(num_folds):
        folds[kfold_by_patient(ids, num_folds, f, seed, labels=labels)[1]] = f
    return pd.Series(folds, index=ids)


def split_subjects(subjects: pd.DataFrame, num_folds: int = 5, fold: int = 0,
                   val_fraction: float = DEFAULT_VAL_FRACTION, label_ratio: float = 0.25, seed: int = 0,
                   labeled_subjects: Sequence[str] | None = None,
                   no_validation_split: bool = False) -> dict[str, list[str]]:
    """Subject ids of ``train``, ``val``, ``test`` and ``labeled`` (⊂ train); see the module doc.

    Args:
        subjects: ``subject_id``, ``subject_label`` (float, NaN unknown), ``fold`` (float, NaN = no fixed folds).
        num_folds, fold: the k-fold and its held-out fold (the test split).
        val_fraction: share of the training subjects held out for validation (stratified by subject label).
        label_ratio: share of the remaining training subjects that are labeled, drawn per subject-label stratum
            (at least one per stratum when positive); ``labeled_subjects`` overrides it.
        no_validation_split: the reference protocol: ``val`` is empty (needs ``val_fraction = 0``).
    """
    check_validation_arguments(val_fraction, no_validation_split)
    ids = subjects["subject_id"].astype(str).to_numpy()
    folds = subject_folds(subjects, num_folds, seed)
    held = folds.reindex(ids).to_numpy() == fold
    if not held.any():
        raise DataError(f"fold={fold} matches no subject; folds present: {sorted(set(folds.tolist()))}")
    train, test = ids[~held], ids[held]
    label_of = subjects.assign(subject_id=ids).set_index("subject_id")["subject_label"]
    val = np.array([], dtype=ids.dtype)
    if val_fraction > 0:
        parts = split_by_patient(train, val_fraction, 0.0, seed, labels=_one_hot(label_of.loc[train].to_numpy()))
        val, train = train[parts["val"]], train[parts["train"]]
        if len(val) == 0:
            raise DataError(f"val_fraction={val_fraction} of {len(train)} training subjects rounds to 0 validation "
                            "subjects; raise val_fraction or use more subjects")
    rng = np.random.default_rng([seed, 1])
    if labeled_subjects is not None:
        labeled = sorted(set(map(str, labeled_subjects)) & set(train))
    else:
        if not 0.0 <= label_ratio <= 1.0:
            raise DataError(f"label_ratio must be in [0, 1], got {label_ratio}")
        labels = label_of.loc[train].fillna(-1).to_numpy()
        labeled = []
        for value in np.unique(labels):
            members = np.sort(train[labels == value])
            want = int(round(label_ratio * len(members)))
            if label_ratio > 0:
                want = max(1, want)
            labeled += list(rng.permutation(members)[:want])
    if len(train) == 0 or len(test) == 0:
        raise DataError(f"empty split: {len(train)} training and {len(test)} test subjects")
    return {"train": sorted(train), "val": sorted(val), "test": sorted(test), "labeled": sorted(labeled)}


def check_subject_counts(subjects: pd.DataFrame, split: dict[str, list[str]], class_names: Sequence[str],
                         min_per_class: int, source: str = "") -> None:
    """Raise a :class:`DataError` when the ``train``, ``val`` or ``test`` subjects of ``split`` hold fewer than
    ``min_per_class`` subjects of a class (by ``subject_label``; unknown labels count for no class), naming the
    split, the class and every split's counts; an empty split (no validation split) is not checked.
    ``min_per_class=0`` turns the check off."""
    ids = subjects["subject_id"].astype(str).to_numpy()
    labels = np.asarray(subjects["subject_label"], dtype=np.float64)
    one_hot = np.full((len(ids), len(class_names)), np.nan)
    known = ~np.isnan(labels)
    one_hot[known] = np.eye(len(class_names))[labels[known].astype(np.int64)]
    positions = {name: np.flatnonzero(np.isin(ids, list(split[name]))) for name in ("train", "val", "test")}
    check_class_counts(one_hot, "multiclass", class_names, positions, min_per_class, source, unit="subjects")


def role_frame(split: dict[str, list[str]], folds: pd.Series) -> pd.DataFrame:
    """One row per subject: ``subject_id``, ``role`` (:data:`ROLES`), ``fold``."""
    labeled = set(split["labeled"])
    rows = [(s, "labeled" if s in labeled else "unlabeled") for s in split["train"]]
    rows += [(s, "val") for s in split["val"]] + [(s, "test") for s in split["test"]]
    frame = pd.DataFrame(rows, columns=["subject_id", "role"]).sort_values("subject_id").reset_index(drop=True)
    frame["fold"] = folds.reindex(frame["subject_id"]).fillna(-1).astype(np.int64).to_numpy()
    return frame


def split_from_roles(roles: pd.DataFrame, source: str = "") -> dict[str, list[str]]:
    """The split that :func:`role_frame` recorded (``train`` = labeled + unlabeled)."""
    bad = roles.loc[~roles["role"].isin(ROLES)]
    if len(bad):
        raise DataError(f"{source}: subject {bad['subject_id'].iloc[0]} has role {bad['role'].iloc[0]!r}; "
                        f"expected one of {ROLES}")
    of = {role: sorted(roles.loc[roles["role"] == role, "subject_id"].astype(str)) for role in ROLES}
    return {"train": sorted(of["labeled"] + of["unlabeled"]), "val": of["val"], "test": of["test"],
            "labeled": of["labeled"]}
