"""Slice-stack readers: subjects made of ordered 2D slices with slice-level and subject-level labels (DC-MT).

Two on-disk layouts are read into one :class:`SliceTable`:

* **HDF5, one file per slice** (the DC-MT layout, dossier a.1): ``<root>/<subject>_<slice>.h5`` holding
  ``image`` (H, W), ``masks`` (H, W integer labels; 2 = femoral cartilage) and ``label`` (the slice grade;
  absent or negative = unknown), plus ``<root>/subject_label.csv`` with ``subject_id,subject_label`` and
  optionally ``fold``. Read by :class:`H5SliceReader`.
* **NIfTI volumes + a per-slice CSV**: ``slices.csv`` with ``subject_id,image_path,slice_index,label`` and
  optionally ``mask_path`` (paths relative to the CSV; volumes (H, W, S) with slices on ``slice_axis``), and
  ``subjects.csv`` with ``subject_id,subject_label`` (optional ``fold``). Read by :class:`NiftiSliceReader`.

Intensities are clipped to the [0.1, 99.9] percentiles of the slice and min–max scaled to [0, 1]
(dossier a.1). A subject without a subject label gets the maximum of its known slice grades.
:class:`datamodules.slices.SliceStackDataModule` splits and batches what these readers load.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import pandas as pd

from datamodules.manifest import DataError, require_columns
from datamodules.readers._common import where

# ------------------------------------------------------------------------------------------ tables
@dataclass
class SliceTable:
    """All slices of all subjects.

    ``slices``: one row per slice, ordered by subject then slice, with ``image_id`` (``<subject>_<slice>``),
    ``subject_id``, ``slice_index``, ``label`` (float, NaN unknown), ``path``, ``mask_path`` ("" if none),
    ``kind`` (``"h5"`` | ``"nifti"``). ``subjects``: ``subject_id``, ``subject_label`` (float), ``fold``
    (float, NaN when the files define no folds).
    """

    slices: pd.DataFrame
    subjects: pd.DataFrame
    class_names: list[str]
    source: str = ""
    slice_axis: int = -1

    def __post_init__(self) -> None:
        k = len(self.class_names)
        bad = self.slices["label"].notna() & ~self.slices["label"].isin(range(k))
        if bad.any():
            row = self.slices[bad].iloc[0]
            raise DataError(f"{self.source}: slice {row['image_id']} has label {row['label']!r}; expected an "
                            f"integer in [0, {k}) ({self.class_names}) or empty for unknown")
        bad = self.subjects["subject_label"].notna() & ~self.subjects["subject_label"].isin(range(k))
        if bad.any():
            row = self.subjects[bad].iloc[0]
            raise DataError(f"{self.source}: subject {row['subject_id']} has subject label {row['subject_label']!r}; "
                            f"expected an integer in [0, {k}) ({self.class_names}) or empty for unknown")
        self.slices = self.slices.sort_values(["subject_id", "slice_index"]).reset_index(drop=True)
        missing = self.subjects["subject_label"].isna()
        if missing.any():  # subject grade = worst known slice grade
            worst = self.slices.groupby("subject_id")["label"].max()
            self.subjects.loc[missing, "subject_label"] = self.subjects.loc[missing, "subject_id"].map(worst)
        self.subjects = self.subjects.sort_values("subject_id").reset_index(drop=True)

    def load_slice(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(image float32 (H, W) in [0, 1] after percentile clipping, label map (H, W) or None)."""
        row = self.slices.iloc[index]
        if row["kind"] == "h5":
            image, seg = _read_h5(row["path"])
        else:
            image = _nifti_slice(row["path"], int(row["slice_index"]), self.slice_axis)
            seg = _nifti_slice(row["mask_path"], int(row["slice_index"]), self.slice_axis) if row["mask_path"] else None
        if seg is not None and seg.shape != image.shape:
            raise DataError(f"{row['path']}: mask of slice {row['image_id']} has shape {seg.shape}, image {image.shape}")
        if not np.isfinite(image).all():  # NaN/inf would turn the percentile scaling into NaN everywhere
            raise DataError(f"{row['path']}: slice {row['image_id']} holds {int((~np.isfinite(image)).sum())} NaN or "
                            "infinite pixel(s); fix the file (medattn does not guess a fill value)")
        return normalize_intensity(image), seg


def normalize_intensity(image: np.ndarray, low: float = 0.1, high: float = 99.9) -> np.ndarray:
    """Clip to the [low, high] percentiles and scale to [0, 1] (a constant slice becomes 0)."""
    image = np.asarray(image, np.float32)
    lo, hi = np.percentile(image, [low, high])
    if hi <= lo:
        return np.zeros_like(image)
    return ((np.clip(image, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def _read_h5(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "image" not in f:
                raise DataError(f"{path}: no 'image' dataset; expected keys 'image', 'masks', 'label', found {list(f)}")
            image = f["image"][()]
            seg = f["masks"][()] if "masks" in f else None
    except OSError as err:
        raise DataError(f"cannot read HDF5 slice {path}: {err}") from err
    if image.ndim != 2:
        raise DataError(f"{path}: 'image' has shape {image.shape}; expected one 2D slice (H, W)")
    return image, seg


@lru_cache(maxsize=8)
def _nifti_volume(path: str) -> np.ndarray:
    import nibabel as nib

    try:
        return np.asarray(nib.load(path).dataobj)
    except (OSError, ValueError, nib.filebasedimages.ImageFileError) as err:
        raise DataError(f"cannot read NIfTI volume {path}: {err}") from err


def _nifti_slice(path: str, index: int, axis: int) -> np.ndarray:
    volume = _nifti_volume(path)
    if volume.ndim != 3:
        raise DataError(f"{path}: volume has shape {volume.shape}; expected 3 dimensions (H, W, S)")
    if not 0 <= index < volume.shape[axis]:
        raise DataError(f"{path}: slice_index {index} out of range for {volume.shape[axis]} slices (axis {axis})")
    return np.take(volume, index, axis=axis)


def _class_values(cells: pd.Series, num_classes: int, what: str, path: Path, unknown_negative: bool) -> pd.Series:
    """Label cells -> float class indices (NaN = blank, or negative where ``unknown_negative``); a cell that is
    not an integer in [0, num_classes) (``yes``, ``grade1``, ``high``, ``7`` with 3 classes) raises naming its row."""
    values = pd.to_numeric(cells, errors="coerce")
    blank = cells.isna() | (cells.astype(str).str.strip() == "")
    if unknown_negative:
        values = values.mask(values < 0)
        blank = blank | (pd.to_numeric(cells, errors="coerce") < 0)
    bad = ~blank & ~values.isin(range(num_classes))
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        unknown = " or a negative value" if unknown_negative else ""
        raise DataError(f"{where(path, i)}, column {cells.name!r}: {what} {cells.iloc[i]!r} is not a class index; "
                        f"expected an integer in [0, {num_classes}), blank{unknown} for unknown")
    return values.astype(float)


def _subjects_frame(path: Path, subject_ids: Sequence[str], num_classes: int) -> pd.DataFrame:
    if path.is_file():
        frame = pd.read_csv(path, dtype={"subject_id": str, "subject_label": str})
        require_columns(frame, ["subject_id", "subject_label"], path)
        again = frame["subject_id"].duplicated().to_numpy()
        if again.any():
            i = int(np.flatnonzero(again)[0])
            first = int(np.flatnonzero((frame["subject_id"] == frame["subject_id"].iloc[i]).to_numpy())[0])
            raise DataError(f"{where(path, i)}: subject {frame['subject_id'].iloc[i]!r} is listed again (first at "
                            f"row {first + 1}); one row per subject")
        frame["subject_label"] = _class_values(frame["subject_label"], num_classes, "subject label", path, False)
    else:
        frame = pd.DataFrame({"subject_id": sorted(set(subject_ids)), "subject_label": np.nan})
    if "fold" not in frame.columns:
        frame["fold"] = np.nan
    unknown = sorted(set(subject_ids) - set(frame["subject_id"]))
    if unknown and path.is_file():
        raise DataError(f"{path}: subjects {unknown[:3]} have slices but no row here")
    return frame[frame["subject_id"].isin(set(subject_ids))][["subject_id", "subject_label", "fold"]].copy()


class H5SliceReader:
    """The DC-MT layout: ``<root>/<subject>_<slice>.h5`` files and ``subject_label.csv`` (see module doc).

    Args:
        root: folder of the ``.h5`` files.
        class_names: slice/subject class names (default ``grade_0..grade_{K-1}``).
        num_classes: K when ``class_names`` is not given.
        subjects_csv: subject table, relative to ``root``.
    """

    def __init__(self, root: str | Path, class_names: list[str] | None = None, num_classes: int = 3,
                 subjects_csv: str = "subject_label.csv") -> None:
        self.root = Path(root).expanduser()
        self.class_names = list(class_names) if class_names else [f"grade_{k}" for k in range(num_classes)]
        self.subjects_csv = subjects_csv

    def load(self) -> SliceTable:
        import h5py

        files = sorted(self.root.glob("*.h5"))
        if not files:
            raise DataError(f"{self.root}: no .h5 slice files found (expected <subject>_<slice>.h5)")
        rows = []
        for path in files:
            subject, _, index = path.stem.rpartition("_")
            if not subject or not index.isdigit():
                raise DataError(f"{path}: file name must be <subject>_<slice index>.h5")
            with h5py.File(path, "r") as f:
                raw = f["label"][()] if "label" in f else np.nan
            try:
                label = float(raw)
            except (TypeError, ValueError):
                raise DataError(f"{path}: 'label' is {raw!r}; expected a class index in [0, "
                                f"{len(self.class_names)}) or a negative value for unknown") from None
            rows.append({"image_id": path.stem, "subject_id": subject, "slice_index": int(index),
                         "label": label if label >= 0 else np.nan, "path": str(path), "mask_path": "", "kind": "h5"})
        slices = pd.DataFrame(rows)
        subjects = _subjects_frame(self.root / self.subjects_csv, slices["subject_id"].unique(), len(self.class_names))
        return SliceTable(slices, subjects, self.class_names, str(self.root))


class NiftiSliceReader:
    """NIfTI volumes with a per-slice CSV (see module doc).

    Args:
        root: folder holding the CSVs; relative paths inside them are relative to it.
        slices_csv, subjects_csv: file names.
        slice_axis: volume axis along which slices are taken (last by default).
        class_names, num_classes: as :class:`H5SliceReader`.
    """

    def __init__(self, root: str | Path, class_names: list[str] | None = None, num_classes: int = 3,
                 slices_csv: str = "slices.csv", subjects_csv: str = "subjects.csv", slice_axis: int = -1) -> None:
        self.root = Path(root).expanduser()
        self.class_names = list(class_names) if class_names else [f"grade_{k}" for k in range(num_classes)]
        self.slices_csv, self.subjects_csv, self.slice_axis = slices_csv, subjects_csv, slice_axis

    def load(self) -> SliceTable:
        path = self.root / self.slices_csv
        if not path.is_file():
            raise DataError(f"slice table not found: {path} (columns subject_id,image_path,slice_index,label)")
        frame = pd.read_csv(path, dtype={"subject_id": str, "image_path": str, "mask_path": str, "label": str})
        require_columns(frame, ["subject_id", "image_path", "slice_index", "label"], path)
        if "mask_path" not in frame.columns:
            frame["mask_path"] = ""
        resolve = lambda p: str(p if Path(p).is_absolute() else self.root / p)  # noqa: E731
        frame["path"] = frame["image_path"].map(resolve)
        frame["mask_path"] = frame["mask_path"].fillna("").map(lambda p: resolve(p) if p else "")
        missing = frame.loc[~frame["path"].map(lambda p: Path(p).is_file()), "path"]
        if len(missing):
            raise DataError(f"{path}: row {missing.index[0] + 2} names a missing volume {missing.iloc[0]}")
        frame["label"] = _class_values(frame["label"], len(self.class_names), "slice label", path, True)
        frame["slice_index"] = frame["slice_index"].astype(int)
        frame["image_id"] = frame["subject_id"] + "_" + frame["slice_index"].map("{:03d}".format)
        frame["kind"] = "nifti"
        if frame["image_id"].duplicated().any():
            raise DataError(f"{path}: slice {frame.loc[frame['image_id'].duplicated(), 'image_id'].iloc[0]} listed twice")
        slices = frame[["image_id", "subject_id", "slice_index", "label", "path", "mask_path", "kind"]]
        subjects = _subjects_frame(self.root / self.subjects_csv, slices["subject_id"].unique(), len(self.class_names))
        return SliceTable(slices, subjects, self.class_names, str(path), self.slice_axis)


@runtime_checkable
class SliceReader(Protocol):
    """Anything that reads slice stacks into a :class:`SliceTable` (:class:`H5SliceReader`, :class:`NiftiSliceReader`,
    ``datamodules.synthetic_slices.SyntheticSlices``). An optional ``prepare()`` runs once per node first."""

    def load(self) -> SliceTable: ...
