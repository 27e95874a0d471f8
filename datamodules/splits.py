"""Patient-level splits and the choice of supervision stream for each training image.

Everything here is a pure function of its inputs and a seed: the same call gives the same split on every
machine and every DDP rank, and no patient ever appears in two splits.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from datamodules.batch import STREAM_BOX, STREAM_LABEL, STREAM_NAMES, STREAM_UNLABELED
from datamodules.manifest import DataError, Manifest


def _patients_in_order(patient_ids: Sequence[str]) -> np.ndarray:
    return np.array(sorted(set(map(str, patient_ids))))


def split_by_patient(
    patient_ids: Sequence[str],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    forced_test: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Split image positions into train/val/test so that each patient lands in exactly one split.

    Fractions are of *patients* (a patient's images move together). ``forced_test`` is a boolean array over
    images: every patient with at least one such image goes to test (e.g. an official test list, or the NIH
    images with boxes held out for localisation). Returns sorted image positions per split.
    """
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise DataError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in [0, 1) and sum < 1")
    pids = np.asarray(list(map(str, patient_ids)))
    patients = _patients_in_order(pids)
    rng = np.random.default_rng(seed)
    rng.shuffle(patients)
    test_patients: set[str] = set()
    if forced_test is not None and np.any(forced_test):
        test_patients = set(pids[np.asarray(forced_test, bool)])
        patients = np.array([p for p in patients if p not in test_patients])
        n_test = 0
    else:
        n_test = int(round(test_fraction * len(patients)))
    n_val = int(round(val_fraction * (len(patients) + len(test_patients))))
    test_patients |= set(patients[:n_test])
    val_patients = set(patients[n_test:n_test + n_val])
    split = np.where(np.isin(pids, list(test_patients)), "test", np.where(np.isin(pids, list(val_patients)), "val", "train"))
    return {name: np.flatnonzero(split == name) for name in ("train", "val", "test")}


def kfold_by_patient(patient_ids: Sequence[str], num_folds: int, fold: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Patient-level k-fold: returns (train positions, held-out positions) for ``fold`` in [0, num_folds)."""
    if not 0 <= fold < num_folds:
        raise DataError(f"fold={fold} must be in [0, num_folds={num_folds})")
    pids = np.asarray(list(map(str, patient_ids)))
    patients = _patients_in_order(pids)
    np.random.default_rng(seed).shuffle(patients)
    held_out = set(np.array_split(patients, num_folds)[fold])
    mask = np.isin(pids, list(held_out))
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def assign_streams(
    image_ids: Sequence[str],
    has_boxes: np.ndarray,
    box_fraction: float | None,
    unlabeled_fraction: float,
    seed: int,
    box_images: Sequence[str] | None = None,
    unlabeled_images: Sequence[str] | None = None,
) -> np.ndarray:
    """Choose the supervision stream of every training image.

    Args:
        image_ids: training image ids.
        has_boxes: bool per image, whether box annotation exists for it.
        box_fraction: fraction of *training images* that form the box stream, drawn among images with boxes;
            ``None`` puts every image that has boxes in the box stream (the NIH protocol).
        unlabeled_fraction: fraction of training images whose labels are hidden (drawn among non-box images).
        box_images / unlabeled_images: explicit id lists; they override the fractions.
    Returns:
        long array of ``STREAM_*`` values.
    """
    ids = np.asarray(list(map(str, image_ids)))
    n = len(ids)
    has_boxes = np.asarray(has_boxes, bool)
    rng = np.random.default_rng(seed)
    streams = np.full(n, STREAM_LABEL, dtype=np.int64)
    if box_images is not None:
        chosen = np.isin(ids, list(map(str, box_images)))
        if np.any(chosen & ~has_boxes):
            raise DataError(f"box_images lists images without boxes, e.g. {ids[chosen & ~has_boxes][0]!r}")
        streams[chosen] = STREAM_BOX
    elif box_fraction is None:
        streams[has_boxes] = STREAM_BOX
    elif box_fraction > 0:
        want = int(round(box_fraction * n))
        candidates = np.flatnonzero(has_boxes)
        if want > len(candidates):
            raise DataError(f"box_fraction={box_fraction} asks for {want} box-annotated training images but only "
                            f"{len(candidates)} training images have boxes")
        streams[rng.choice(candidates, size=want, replace=False)] = STREAM_BOX
    if unlabeled_images is not None:
        chosen = np.isin(ids, list(map(str, unlabeled_images)))
        streams[chosen & (streams != STREAM_BOX)] = STREAM_UNLABELED
    elif unlabeled_fraction > 0:
        want = int(round(unlabeled_fraction * n))
        candidates = np.flatnonzero(streams == STREAM_LABEL)
        if want > len(candidates):
            raise DataError(f"unlabeled_fraction={unlabeled_fraction} asks for {want} images but only "
                            f"{len(candidates)} non-box training images exist")
        streams[rng.choice(candidates, size=want, replace=False)] = STREAM_UNLABELED
    return streams


def split_summary(manifest: Manifest, splits: dict[str, np.ndarray], train_streams: np.ndarray) -> pd.DataFrame:
    """One row per split/stream: images, patients, boxed images and positives per class."""
    rows = []
    groups: list[tuple[str, np.ndarray]] = []
    train = splits["train"]
    for value, name in STREAM_NAMES.items():
        groups.append((f"train/{name}", train[train_streams == value]))
    groups += [("val", splits["val"]), ("test", splits["test"])]
    boxed = set(manifest.boxes["image_id"].astype(str))
    for name, index in groups:
        records = manifest.records.iloc[index]
        row = {"split": name, "images": len(index), "patients": records["patient_id"].nunique(),
               "boxed_images": int(records["image_id"].astype(str).isin(boxed).sum())}
        labels = manifest.labels[index]
        for k, cls in enumerate(manifest.class_names):
            row[f"pos:{cls}"] = int(np.nansum(labels[:, k] == 1))
        rows.append(row)
    return pd.DataFrame(rows)
