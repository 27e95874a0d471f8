"""Patient-level splits, stratified by label, and the choice of supervision stream for each training image.

Everything here is a pure function of its inputs and a seed: the same call gives the same split on every
machine and every DDP rank, and no patient ever appears in two splits.

Stratification (``labels`` given): every patient gets one *stratum*, its **rarest class**: the class, among
those its images are positive for, with the fewest positive images in the whole manifest (ties: lower class
index); a last stratum holds the patients none of whose images is positive (multilabel "No Finding", or unknown labels). This
one rule covers binary and multiclass tasks (one-hot rows: the stratum is the patient's rarest class) and
multilabel tasks (per-class positives, rarest label first, so a rare finding is spread over the splits instead
of being outvoted by a common one). Each stratum is then split in the requested proportions (largest-remainder
rounding, so the split sizes are exactly those of the unstratified split and each stratum gets the floor or
ceiling of its share). Stratification spreads classes; :func:`check_class_counts` then *verifies* that each
split that a stage needs holds enough examples of every class, and raises otherwise.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from datamodules.batch import STREAM_BOX, STREAM_LABEL, STREAM_NAMES, STREAM_UNLABELED
from datamodules.manifest import DataError, Manifest


def _patients_in_order(patient_ids: Sequence[str]) -> np.ndarray:
    return np.array(sorted(set(map(str, patient_ids))))


def patient_strata(patient_ids: Sequence[str], labels: np.ndarray) -> dict[str, int]:
    """Patient -> stratum: the rarity rank of the patient's rarest positive class (0 = the rarest class of
    the manifest), or ``K`` (the number of classes) when none of the patient's images is positive.

    ``labels`` is (N, K) with 1 positive, 0 negative, NaN unknown (unknown counts as not positive).
    """
    pids = np.asarray(list(map(str, patient_ids)))
    positive = np.asarray(labels, dtype=np.float64).reshape(len(pids), -1) == 1
    k = positive.shape[1]
    by_rarity = np.lexsort((np.arange(k), positive.sum(axis=0)))  # fewest positive images first, then index
    rank = np.empty(k, dtype=np.int64)
    rank[by_rarity] = np.arange(k)
    image_rank = np.where(positive, rank[None, :], k).min(axis=1, initial=k)
    per_patient = pd.Series(image_rank).groupby(pids).min()
    return {str(p): int(r) for p, r in per_patient.items()}


def _allocate(sizes: np.ndarray, total: int) -> np.ndarray:
    """Largest-remainder apportionment of ``total`` over strata of ``sizes``, in exact integer arithmetic.

    Each stratum gets the floor or the ceiling of its share ``total * size / sum(sizes)``; ties in the remainder go
    to the earlier (rarer) stratum.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    n = int(sizes.sum())
    total = min(int(total), n)
    if n == 0 or total <= 0:
        return np.zeros(len(sizes), dtype=np.int64)
    base, remainder = np.divmod(total * sizes, n)
    order = np.lexsort((np.arange(len(sizes)), -remainder))
    base[order[: total - int(base.sum())]] += 1
    return base


def split_by_patient(
    patient_ids: Sequence[str],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    forced_test: np.ndarray | None = None,
    labels: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Split image positions into train/val/test so that each patient lands in exactly one split.

    Fractions are of *patients* (a patient's images move together). ``forced_test`` is a boolean array over
    images: every patient with at least one such image goes to test (e.g. an official test list, or the NIH
    images with boxes held out for localisation); the test split is then exactly those patients and
    **``test_fraction`` is ignored**, while ``val_fraction`` stays a fraction of all patients. ``labels`` (N, K)
    stratifies val and test by each patient's rarest class (module docstring); without it the split is a plain
    seeded shuffle of patients. Returns sorted image positions per split.
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
    if labels is None:
        strata = np.zeros(len(patients), dtype=np.int64)
    else:
        stratum_of = patient_strata(pids, labels)
        strata = np.array([stratum_of[p] for p in patients], dtype=np.int64)
    # Strata in rarity order; within a stratum the seeded shuffle order (one stratum = the unstratified split).
    groups = [patients[strata == s] for s in np.unique(strata)]
    sizes = np.array([len(g) for g in groups], dtype=np.int64)
    n_test_of = _allocate(sizes, n_test)
    n_val_of = _allocate(sizes - n_test_of, n_val)
    val_patients: set[str] = set()
    for group, t, v in zip(groups, n_test_of, n_val_of):
        test_patients |= set(group[:t])
        val_patients |= set(group[t:t + v])
    split = np.where(np.isin(pids, list(test_patients)), "test", np.where(np.isin(pids, list(val_patients)), "val", "train"))
    return {name: np.flatnonzero(split == name) for name in ("train", "val", "test")}


def kfold_by_patient(
    patient_ids: Sequence[str], num_folds: int, fold: int, seed: int, labels: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Patient-level k-fold: returns (train positions, held-out positions) for ``fold`` in [0, num_folds).

    With ``labels`` the folds are stratified: patients sorted by stratum (rarest class first, seeded order
    inside) are dealt to the folds in turn, so every fold gets the floor or ceiling of each stratum's share.
    """
    if not 0 <= fold < num_folds:
        raise DataError(f"fold={fold} must be in [0, num_folds={num_folds})")
    pids = np.asarray(list(map(str, patient_ids)))
    patients = _patients_in_order(pids)
    np.random.default_rng(seed).shuffle(patients)
    if labels is None:
        held_out = set(np.array_split(patients, num_folds)[fold])
    else:
        stratum_of = patient_strata(pids, labels)
        dealt = patients[np.argsort([stratum_of[p] for p in patients], kind="stable")]
        held_out = set(dealt[fold::num_folds])
    mask = np.isin(pids, list(held_out))
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def class_counts(labels: np.ndarray, task: str, class_names: Sequence[str], index: np.ndarray) -> dict[str, int]:
    """Examples per class among the images ``index``: ``{class: positives}``, plus ``{"not " + class: negatives}``
    for multilabel tasks (a per-class AUROC needs both). Unknown (NaN) labels count as neither."""
    part = np.asarray(labels, dtype=np.float64)[index]
    counts = {str(c): int((part[:, k] == 1).sum()) for k, c in enumerate(class_names)}
    if task == "multilabel":
        counts.update({f"not {c}": int((part[:, k] == 0).sum()) for k, c in enumerate(class_names)})
    return counts


def check_class_counts(
    labels: np.ndarray, task: str, class_names: Sequence[str], splits: dict[str, np.ndarray], min_per_class: int,
    source: str = "", unit: str = "images",
) -> None:
    """Raise a :class:`DataError` when a non-empty split holds fewer than ``min_per_class`` examples of a class
    (for multilabel tasks: fewer positives, or fewer negatives, of a class). The message names the split, the
    class and every split's counts. ``min_per_class=0`` turns the check off. ``unit`` names what a row of
    ``labels`` is in the message (``"subjects"`` for the subject-level check of DC-MT)."""
    if min_per_class <= 0:
        return
    # Evaluation splits first: theirs is the count that decides whether a reported metric means anything.
    order = sorted(splits, key=lambda name: {"test": 0, "val": 1}.get(name, 2))
    counts = {name: class_counts(labels, task, class_names, splits[name]) for name in order if len(splits[name])}
    for name, per_class in counts.items():
        for cls, n in per_class.items():
            if n < min_per_class:
                negative = cls.startswith("not ") and cls not in class_names
                what = f"negatives of class {cls[4:]!r}" if negative else f"examples of class {cls!r}"
                across = ", ".join(f"{split} {pc[cls]} of {len(splits[split])} {unit}" for split, pc in counts.items())
                raise DataError(
                    f"{source + ': ' if source else ''}the {name} split has {n} {what}, fewer than "
                    f"min_per_class={min_per_class}, so its metrics for that class say little ({what} per split: "
                    f"{across}). Use more data, other fractions or another seed, or lower min_per_class (0 turns "
                    f"this check off)."
                )


def official_test_mask(manifest: Manifest, reader: object) -> np.ndarray:
    """Images in the reader's official test split (``records.official_split == "test"``); raises, naming the
    files the reader looked for (its ``official_split_sources``), when there are none: an official-split run
    must never fall back to a random or an empty test split."""
    name = type(reader).__name__
    sources = getattr(reader, "official_split_sources", None) or {}
    looked = "; ".join(f"{path} ({status})" for path, status in sources.items()) or "no official split files"
    if "official_split" not in manifest.records.columns:
        raise DataError(f"use_official_test_split=True but {name} records have no 'official_split' column "
                        f"(it looked for: {looked})")
    mask = manifest.records["official_split"].astype(str).eq("test").to_numpy()
    if not mask.any():
        raise DataError(
            f"use_official_test_split=True but no image of {name} is in its official test split. It looked for: "
            f"{looked}. Put the official split files there, or set use_official_test_split=false and test_fraction > 0."
        )
    return mask


def build_splits(
    manifest: Manifest,
    reader: object,
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    hold_out_boxed_for_test: bool = False,
    use_official_test_split: bool = False,
    num_folds: int = 1,
    fold: int = 0,
    min_per_class: int = 10,
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The train/val/test split of ``CXRDataModule`` (arguments as there), stratified by label, checked.

    Returns ``(splits, notes)``: image positions per split and a note per split for the summary table (how the
    test split was chosen, and that ``test_fraction`` is ignored when it is a k-fold, the official list or the
    boxed hold-out). Raises a :class:`DataError` when a split that a run needs is empty (train; val when
    ``val_fraction > 0``; test when ``test_fraction > 0``, k-fold, official or boxed hold-out), when the official
    split or the boxed images are missing, or when a split holds fewer than ``min_per_class`` examples of a class.
    """
    pids = manifest.records["patient_id"].astype(str).to_numpy()
    labels = manifest.labels
    has_boxes = manifest.records["image_id"].astype(str).isin(set(manifest.boxes["image_id"].astype(str))).to_numpy()
    notes: dict[str, str] = {}
    ignored = f" (test_fraction={test_fraction} ignored)" if test_fraction > 0 else ""
    if num_folds > 1:
        rest, test = kfold_by_patient(pids, num_folds, fold, seed, labels=labels)
        inner = split_by_patient(pids[rest], val_fraction / max(1e-9, 1 - 1 / num_folds), 0.0, seed,
                                 labels=labels[rest])
        splits = {"train": rest[inner["train"]], "val": rest[inner["val"]], "test": test}
        notes["test"] = f"fold {fold} of {num_folds}, stratified{ignored}"
    else:
        forced, how = None, []
        if hold_out_boxed_for_test:
            if not has_boxes.any():
                raise DataError(f"hold_out_boxed_for_test=True but {type(reader).__name__} ({manifest.source}) has "
                                f"no image with a box: check its box file")
            forced, how = has_boxes, ["every patient with a boxed image"]
        if use_official_test_split:
            official = official_test_mask(manifest, reader)
            forced = official if forced is None else forced | official
            how.insert(0, "official test split")
        splits = split_by_patient(pids, val_fraction, test_fraction, seed, forced_test=forced, labels=labels)
        notes["test"] = (" + ".join(how) + ignored) if how else f"stratified, test_fraction={test_fraction}"
    needed = {"train": True, "val": val_fraction > 0,
              "test": test_fraction > 0 or num_folds > 1 or hold_out_boxed_for_test or use_official_test_split}
    for name, index in splits.items():
        if len(index) == 0 and needed[name]:
            raise DataError(f"the {name} split is empty: {len(set(pids))} patients, val_fraction={val_fraction}, "
                            f"test_fraction={test_fraction}. Use more data or other fractions.")
    check_class_counts(labels, manifest.task, manifest.class_names, splits, min_per_class,
                       f"{type(reader).__name__} ({manifest.source})")
    return splits, notes


def all_images_split(
    manifest: Manifest, *, min_per_class: int, ignored: dict[str, object] | None = None
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``split="all"`` of the DataModules: every image is the test split (external testing of a trained model on
    another dataset); train and val are empty, so no patient is split and nothing is stratified.

    The class counts of a fixed external set cannot be changed with fractions or seeds, so a class with fewer than
    ``min_per_class`` examples is not an error here: it is named in the returned note (and warned about by the
    caller); the AUROC policy (``lightning_modules/metrics/auroc.py``) leaves a class without positives or
    negatives out of the macro mean and reports it as NaN. ``ignored`` are the splitting arguments that split="all"
    overrides (``{name: value}``); they are named in the note, so a summary never suggests a fraction was applied.
    Returns ``(splits, notes)`` as :func:`build_splits`.
    """
    n = len(manifest.records)
    if n == 0:
        raise DataError(f"split='all': {manifest.source} holds no images")
    empty = np.zeros(0, dtype=np.int64)
    splits = {"train": empty, "val": empty.copy(), "test": np.arange(n, dtype=np.int64)}
    note = "every image (split=all)"
    if ignored:
        note += "; " + ", ".join(f"{k}={v}" for k, v in ignored.items()) + " ignored"
    if min_per_class > 0:
        counts = class_counts(manifest.labels, manifest.task, manifest.class_names, splits["test"])
        few = {cls: c for cls, c in counts.items() if c < min_per_class}
        if few:
            note += (f"; fewer than min_per_class={min_per_class}: "
                     + ", ".join(f"{cls} {c}" for cls, c in few.items())
                     + " (a class without positives or negatives is left out of the AUROC, reported as NaN)")
    return splits, {"test": note}


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


def split_summary(
    manifest: Manifest, splits: dict[str, np.ndarray], train_streams: np.ndarray, notes: dict[str, str] | None = None
) -> pd.DataFrame:
    """One row per split/stream: images, patients, boxed images and positives per class, and a ``note`` column
    (``notes[split]``, e.g. how the test split was chosen and which fraction was ignored; "" elsewhere)."""
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
        row["note"] = (notes or {}).get(name, "")
        rows.append(row)
    return pd.DataFrame(rows)
