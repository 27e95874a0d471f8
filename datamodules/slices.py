"""Slice stacks: subjects made of ordered 2D slices with slice-level and subject-level labels (DC-MT).

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

:class:`SliceStackDataModule` splits **by subject** (:mod:`datamodules.subject_splits`: the held-out fold is the
test split, ``val_fraction`` of the other subjects are validation subjects unless the config asks for the
reference protocol with ``no_validation_split: true``), checks that every split holds ``min_per_class`` subjects
of every class (default 10), makes ``label_ratio`` of the remaining
training subjects labeled (stratified by subject label) and returns batches that follow
``datamodules/batch.py``: every training batch holds ``labeled_batch_size`` labeled slices followed by
``unlabeled_batch_size`` unlabeled ones (``stream``), two views with shared geometry and independent
photometry (``image`` / ``image_teacher``), and the dilated-cartilage ``attention_mask``. Unlabeled slices
carry zero labels, an all-False ``label_mask`` and ``subject_label = -1``: the ground truth never reaches a
training step through them (the reference read unlabeled grades for its attention consistency, e.4).
Extra keys: ``subject_id``, ``slice_index``, ``subject_label``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal, Protocol, Sequence, runtime_checkable

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from monai.transforms import (Compose, RandAffined, RandFlipd, RandGaussianNoise, RandGaussianSmooth,
                              RandScaleIntensity, RandShiftIntensity)
from torch.utils.data import DataLoader, Dataset

from datamodules.batch import STREAM_LABEL, STREAM_UNLABELED
from datamodules.dataset import (MixedStreamSampler, SampleKey, UnpaddedDistributedSampler, run_seed, sample_seed,
                                 split_key)
from datamodules.manifest import DataError, require_columns
from datamodules.readers._common import where
from datamodules.splits import check_split_choice, describe_evaluated, refuse_split_all_stage, split_all_note
from datamodules.subject_splits import (DEFAULT_VAL_FRACTION, ROLES, check_subject_counts, role_frame,  # noqa: F401
                                        split_subjects, subject_folds)
from datamodules.transforms import find_random_states, letterbox, reseed_random_states


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
        return normalise_intensity(image), seg


def normalise_intensity(image: np.ndarray, low: float = 0.1, high: float = 99.9) -> np.ndarray:
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


# --------------------------------------------------------------------------------------- transform
class SliceTransform:
    """Letterbox to ``image_size``, dilated attention mask, shared geometry, per-view photometry.

    Geometry (training): horizontal flip and a small affine (±``rotate_deg``, ±``shift``, ±``scale``), drawn
    **once** per sample and applied to the image and both masks, so the student and teacher views (and their
    CAMs) align pixel for pixel. The reference drew them per view and compared misaligned maps (e.5).
    Photometry (training, drawn per view): brightness/contrast, Gaussian blur, Gaussian noise (the
    reference's GaussNoise reaches σ = 0.32, too strong for MR; here ``noise_std`` bounds a uniform σ).
    Then ``(x − mean) / std``.

    ``attention_labels``: label values of the segmentation that form the attention target (2 = femoral
    cartilage); ``None`` = every non-zero label. ``attention_dilation``: diameter of the elliptical
    dilation in pixels *of a 256-pixel image* (18 in DC-MT), scaled to ``image_size``.
    """

    def __init__(self, image_size: int = 256, train: bool = False, two_views: bool = False,
                 flip_prob: float = 0.5, affine_prob: float = 0.5, rotate_deg: float = 3.0, shift: float = 0.01,
                 scale: float = 0.01, brightness: float = 0.05, contrast: float = 0.05, blur_prob: float = 0.5,
                 noise_std: float = 0.05, mean: float = 0.5, std: float = 0.25,
                 attention_labels: Sequence[int] | None = (2,), attention_dilation: float = 18.0,
                 seed: int = 0) -> None:
        self.image_size, self.train, self.two_views = image_size, train, two_views
        self.mean, self.std = mean, std
        self.attention_labels = None if attention_labels is None else list(attention_labels)
        diameter = int(round(attention_dilation * image_size / 256.0)) | 1  # odd, centred
        r = (diameter - 1) / 2
        yy, xx = torch.meshgrid(torch.arange(diameter) - r, torch.arange(diameter) - r, indexing="ij")
        self.kernel = ((yy**2 + xx**2) <= max(r, 0.5) ** 2 + 1e-6).float()[None, None]
        keys = ["image", "attention_mask", "mask"]
        geometric = []
        if train and flip_prob > 0:
            geometric.append(RandFlipd(keys, prob=flip_prob, spatial_axis=1))
        if train and affine_prob > 0:
            geometric.append(RandAffined(keys, prob=affine_prob, rotate_range=(np.deg2rad(rotate_deg),),
                                         translate_range=(shift * image_size, shift * image_size),
                                         scale_range=(scale, scale), mode=["bilinear", "nearest", "nearest"],
                                         padding_mode="zeros"))
        self.geometric = Compose(geometric) if geometric else None
        photometric = []
        if train:
            photometric += [RandShiftIntensity(offsets=brightness, prob=0.9), RandScaleIntensity(factors=contrast, prob=0.9)]
            if blur_prob > 0:
                photometric.append(RandGaussianSmooth(sigma_x=(0.25, 0.75), sigma_y=(0.25, 0.75), prob=blur_prob))
            if noise_std > 0:
                photometric.append(RandGaussianNoise(prob=1.0, std=noise_std, sample_std=True))
        self.photometric = Compose(photometric) if photometric else None
        self._states = find_random_states([self.geometric, self.photometric])
        self.set_random_state(seed)

    def set_random_state(self, seed: int) -> None:
        """Reseed geometry and photometry in place (training datasets do it per sample, from the sample's key)."""
        reseed_random_states(self._states, seed)

    def dilate(self, mask: torch.Tensor) -> torch.Tensor:
        if self.kernel.shape[-1] <= 1:
            return mask
        pad = self.kernel.shape[-1] // 2
        return (F.conv2d(mask[None], self.kernel, padding=pad)[0] > 0).float()

    def __call__(self, image: np.ndarray, seg: np.ndarray | None) -> dict[str, torch.Tensor]:
        h0, w0 = image.shape
        sample: dict[str, torch.Tensor] = {}
        sample["image"], scale = letterbox(torch.from_numpy(np.ascontiguousarray(image))[None], self.image_size)
        if seg is not None:
            seg_t, _ = letterbox(torch.from_numpy(np.asarray(seg, np.int64))[None], self.image_size, is_mask=True)
            target = (seg_t > 0) if self.attention_labels is None else torch.isin(seg_t, torch.tensor(self.attention_labels))
            sample["attention_mask"] = self.dilate(target.float())
            sample["mask"] = (seg_t > 0).float()
        else:
            sample["attention_mask"] = sample["mask"] = torch.zeros(1, self.image_size, self.image_size)
        if self.geometric is not None:
            sample = {k: torch.as_tensor(v).as_subclass(torch.Tensor) for k, v in self.geometric(sample).items()}
        out = {"attention_mask": sample["attention_mask"].round(), "mask": sample["mask"].round()}
        for view in (["image", "image_teacher"] if self.two_views else ["image"]):
            pixels = sample["image"].clone()
            if self.photometric is not None:
                pixels = torch.as_tensor(self.photometric(pixels)).as_subclass(torch.Tensor)
            out[view] = pixels.clamp_(0.0, 1.0).sub_(self.mean).div_(self.std)
        out["frame"] = torch.tensor([h0, w0, scale], dtype=torch.float32)
        return out


# ----------------------------------------------------------------------------------------- dataset
class SliceDataset(Dataset):
    """Rows ``index`` of a :class:`SliceTable` shaped by the batch contract.

    ``streams[i]`` is the stream of row ``index[i]``; unlabeled rows hide their slice and subject labels.
    ``cache=True`` keeps decoded, intensity-normalised slices in memory (per worker process).
    ``seed_base``: a training transform is reseeded per sample from it and the sample's key
    (``datamodules.dataset.sample_seed``), so augmentation does not depend on workers or their history.
    """

    def __init__(self, table: SliceTable, index: np.ndarray, streams: np.ndarray, transform: SliceTransform,
                 cache: bool = False, seed_base: Sequence[int] = (0,)) -> None:
        self.seed_base = tuple(int(v) for v in seed_base)
        self.table, self.index = table, np.asarray(index, np.int64)
        self.streams = np.asarray(streams, np.int64)
        self.transform = transform
        self.cache: dict[int, tuple] | None = {} if cache else None
        self.k = len(table.class_names)
        self.subject_labels = table.subjects.set_index("subject_id")["subject_label"]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: int | SampleKey) -> dict:
        i = split_key(item)[0]
        row_index = int(self.index[i])
        if self.cache is not None and row_index in self.cache:
            image, seg = self.cache[row_index]
        else:
            image, seg = self.table.load_slice(row_index)
            if self.cache is not None:
                self.cache[row_index] = (image, seg)
        if self.transform.train:
            self.transform.set_random_state(sample_seed(self.seed_base, item))
        sample = self.transform(image, seg)
        row = self.table.slices.iloc[row_index]
        stream = int(self.streams[i])
        known = stream != STREAM_UNLABELED and not np.isnan(row["label"])
        labels = torch.zeros(self.k)
        if known:
            labels[int(row["label"])] = 1.0
        subject_label = self.subject_labels.get(row["subject_id"], np.nan)
        sample.update({
            "labels": labels, "label_mask": torch.full((self.k,), known),
            "stream": torch.tensor(stream), "has_boxes": torch.tensor(False),
            "has_mask": torch.tensor(seg is not None), "has_attention_mask": torch.tensor(seg is not None),
            "slice_index": torch.tensor(int(row["slice_index"])),
            "subject_label": torch.tensor(-1 if stream == STREAM_UNLABELED or np.isnan(subject_label)
                                          else int(subject_label)),
            "image_id": str(row["image_id"]), "patient_id": str(row["subject_id"]), "subject_id": str(row["subject_id"]),
        })
        return sample


def collate_slices(samples: Sequence[dict]) -> dict:
    return {k: [s[k] for s in samples] if isinstance(samples[0][k], str) else torch.stack([s[k] for s in samples])
            for k in samples[0]}


# ------------------------------------------------------------------------------------- datamodule
class SliceStackDataModule(pl.LightningDataModule):
    """Subject-split slice stacks with labeled and unlabeled training streams (see module doc).

    Args:
        reader: any object with ``load() -> SliceTable`` (:class:`H5SliceReader`, :class:`NiftiSliceReader`,
            :class:`datamodules.synthetic_slices.SyntheticSlices`); ``prepare()`` is called if present.
        image_size: network input side.
        split: ``"patients"`` (default): the subject split of the arguments below. ``"all"``: every subject (all
            its slices) is the test split, exactly once (under DDP too), for testing a trained model on another
            cohort (``medattn test ... --ckpt_path <ckpt> --data.init_args.reader.init_args.root <folder>
            --data.init_args.split all``); ``num_folds``, ``fold``, ``val_fraction``, ``label_ratio``,
            ``labeled_subjects`` and ``no_validation_split`` are ignored (the summary note names those that were
            set), ``min_per_class`` is not enforced (classes below it are named in the note and a warning), the
            checkpoint's saved split is not compared (it is another cohort's), and ``fit``/``validate`` are
            refused with an error naming this option. ``medattn predict`` with the feature writer then records
            every subject as ``test`` (``split_info["split"] = "all"``), which DC-MT stage 2 tests with its own
            ``split: all``.
        num_folds, fold, val_fraction, label_ratio, labeled_subjects, no_validation_split: see
            :func:`datamodules.subject_splits.split_subjects`. By default 15 % of the training subjects are
            validation subjects (stratified by subject label), so ``best.ckpt`` is never chosen on the test fold;
            the reference protocol (no validation split, the last epoch is tested) needs ``val_fraction: 0`` and
            ``no_validation_split: true``, and ``val_fraction: 0`` alone is an error.
            ``label_ratio`` is the single label-ratio knob (fraction of training subjects labeled).
        min_per_class: smallest number of **subjects** of each subject class in the train, val and test splits
            (default 10, as ``CXRDataModule``); fewer is an error naming the split, the class and the counts
            (:func:`datamodules.subject_splits.check_subject_counts`: subjects, because the split is drawn over
            subjects and the subject-level metrics are per subject). ``0`` turns the check off.
        labeled_batch_size, unlabeled_batch_size: per-rank slices of each stream per training batch (10 + 30
            in DC-MT). ``unlabeled_batch_size = 0`` trains on the labeled slices alone.
        epoch_stream: ``"unlabeled"`` (one pass over the unlabeled slices per epoch, as the reference) or
            ``"label"``; default: unlabeled when it has a batch.
        eval_batch_size: validation/test/predict batch size.
        two_views: add ``image_teacher``.
        augment, augment_kwargs: training augmentation and :class:`SliceTransform` options
            (e.g. ``attention_labels``, ``attention_dilation``, ``noise_std``).
        cache: keep decoded slices in memory (fast for small data; costs H·W·4 bytes per slice and worker).
        num_workers, seed: DataLoader workers and the split/sampling/augmentation seed.
    """

    def __init__(self, reader: SliceReader, image_size: int = 256, split: Literal["patients", "all"] = "patients",
                 num_folds: int = 5, fold: int = 0,
                 val_fraction: float = DEFAULT_VAL_FRACTION, label_ratio: float = 0.25,
                 labeled_subjects: list[str] | None = None,
                 labeled_batch_size: int = 10, unlabeled_batch_size: int = 30, epoch_stream: str | None = None,
                 eval_batch_size: int = 40, two_views: bool = True, augment: bool = True,
                 augment_kwargs: dict | None = None, cache: bool = False, num_workers: int = 0,
                 seed: int = 0, no_validation_split: bool = False, min_per_class: int = 10) -> None:
        super().__init__()
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"SliceStackDataModule: image_size must be a positive int, got {image_size!r}")
        check_split_choice(type(self).__name__, split)
        self.save_hyperparameters(ignore=["reader"])
        self.reader = reader
        self.table: SliceTable | None = None
        self.split: dict[str, list[str]] = {}
        self.test_note = ""  # how the test split was chosen, for split="all" (summary, describe_split)

    def _ensure_table(self) -> SliceTable:
        if self.table is None:
            self.table = self.reader.load()
        return self.table

    @property
    def class_names(self) -> list[str]:
        return list(self._ensure_table().class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def task(self) -> str:
        return "multiclass"

    @property
    def in_channels(self) -> int:
        return 1

    def prepare_data(self) -> None:
        prepare = getattr(self.reader, "prepare", None)
        if callable(prepare):
            prepare()

    def setup(self, stage: str | None = None) -> None:
        refuse_split_all_stage(self.hparams.split, stage, f"subject of {type(self.reader).__name__}")
        if self.split:
            return
        hp = self.hparams
        table = self._ensure_table()
        if hp.split == "all":
            self._split_all(table)
            return
        split = split_subjects(table.subjects, hp.num_folds, hp.fold, hp.val_fraction, hp.label_ratio,
                               hp.seed, hp.labeled_subjects, hp.no_validation_split)
        # checked before it is kept: a refused split must not be used by a later setup() call
        check_subject_counts(table.subjects, split, table.class_names, hp.min_per_class,
                             f"{type(self.reader).__name__} ({table.source})")
        self.split = split
        if self.trainer is None or self.trainer.is_global_zero:
            n = {k: len(v) for k, v in self.split.items()}
            train = table.slices["subject_id"].isin(set(self.split["train"]))
            lab = table.slices["subject_id"].isin(set(self.split["labeled"])) & table.slices["label"].notna()
            note = ("; no validation split (no_validation_split: true): no model selection, the last epoch is tested"
                    if not self.split["val"] else "")
            print(f"[medattn] slice split: {n} subjects; {int(train.sum())} training slices, {int(lab.sum())} labeled "
                  f"({lab.sum() / max(1, train.sum()):.1%}){note}")

    # the arguments split="all" ignores, with the value at which each would have no effect
    _SPLIT_ARGS = {"num_folds": 1, "fold": 0, "val_fraction": 0, "label_ratio": 0, "labeled_subjects": None,
                   "no_validation_split": False}

    def _split_all(self, table: SliceTable) -> None:
        """split="all": every subject is a test subject (see the class doc)."""
        hp = self.hparams
        ids = sorted(table.subjects["subject_id"].astype(str))
        if not ids:
            raise DataError(f"split='all': {table.source} holds no subjects")
        label = table.subjects["subject_label"].to_numpy(dtype=float)
        counts = {name: int((label == k).sum()) for k, name in enumerate(table.class_names)}
        self.test_note = split_all_note("subject", dict(hp), self._SPLIT_ARGS, counts, hp.min_per_class)
        if "min_per_class" in self.test_note:
            warnings.warn(f"{type(self.reader).__name__} ({table.source}), split='all': {self.test_note}", stacklevel=3)
        self.split = {"train": [], "val": [], "test": ids, "labeled": []}
        if self.trainer is None or self.trainer.is_global_zero:
            print(f"[medattn] slice split: {len(ids)} test subjects, {len(table.slices)} slices; {self.test_note}")

    def describe_split(self, split: str = "test") -> str:
        """Which subjects an evaluation of ``split`` ran on (``Test data: ...`` of ``medattn test``,
        summary.json), e.g. ``H5SliceReader /data/ext, test split: every subject (split=all), 30 subjects, 540
        slices``."""
        self.setup("test" if split == "test" else None)
        hp, ids = self.hparams, self.split[split]
        how = (self.test_note.split(";")[0] if hp.split == "all"
               else f"subject split, fold {hp.fold} of {hp.num_folds}, seed {hp.seed}")
        n_slices = int(self.table.slices["subject_id"].isin(set(ids)).sum())
        return describe_evaluated(type(self.reader).__name__, getattr(self.reader, "root", None) or self.table.source,
                                  split, how, f"{len(ids)} subjects, {n_slices} slices")

    def split_record(self) -> tuple[pd.DataFrame, dict]:
        """Each subject's role (labeled / unlabeled / val / test) and fold, and the split arguments: what the
        stage-1 feature export stores so that DC-MT stage 2 uses exactly these subjects."""
        self.setup()
        hp = self.hparams
        folds = (pd.Series(dtype=np.int64) if hp.split == "all"  # no folds: recorded as -1
                 else subject_folds(self.table.subjects, hp.num_folds, hp.seed))
        roles = role_frame(self.split, folds)
        info = {"split": str(hp.split), "num_folds": int(hp.num_folds), "fold": int(hp.fold),
                "val_fraction": float(hp.val_fraction),
                "label_ratio": float(hp.label_ratio), "seed": int(hp.seed),
                "no_validation_split": bool(hp.no_validation_split), "source": str(self.table.source),
                "min_per_class": int(hp.min_per_class)}
        return roles, info

    def state_dict(self) -> dict:
        """The subject split, saved in every checkpoint: a checkpoint used with another split is an error."""
        return {"split": {k: list(v) for k, v in self.split.items()}} if self.split else {}

    def load_state_dict(self, state_dict: dict) -> None:
        # Lightning calls this after setup() when a run restores a checkpoint (fit resume, test, predict): a
        # model must be tested and exported on the subjects it was trained with, never on another split's.
        saved = state_dict.get("split")
        self.setup()
        if saved is None or saved == self.split:
            return
        if self.hparams.split == "all":  # the checkpoint's split is over its training cohort, not this one
            seen = sorted(set(saved.get("train", [])) | set(saved.get("val", [])))
            overlap = sorted(set(self.split["test"]) & set(seen))
            if overlap:
                warnings.warn(f"split='all': {len(overlap)} of the {len(self.split['test'])} tested subjects have the "
                              f"ids of subjects this checkpoint was trained or validated on (e.g. {overlap[0]}); if "
                              "this is the training cohort, the result is not an external test", stacklevel=2)
            return
        def role(split: dict, subject: str) -> str:
            names = {"test": "test", "val": "val", "labeled": "labeled", "train": "unlabeled"}
            return next((v for k, v in names.items() if subject in split.get(k, ())), "absent")

        moved = sorted(s for k in saved for s in set(saved[k]) ^ set(self.split.get(k, [])))
        raise DataError(f"the checkpoint was trained on another subject split than this DataModule's: e.g. subject "
                        f"{moved[0]} is {role(saved, moved[0])} there and {role(self.split, moved[0])} here. Use the "
                        "training run's split arguments (num_folds, fold, val_fraction, label_ratio, labeled_subjects, "
                        "seed, no_validation_split)")

    @property
    def summary(self) -> pd.DataFrame | None:
        """Subjects and slices per role and subject class (``split_summary.csv`` via ``SplitSummaryLogger``); an
        absent validation split is a row that says so."""
        if not self.split:
            return None
        roles = self.split_record()[0]
        slices = self.table.slices.groupby("subject_id").size()
        label = self.table.subjects.set_index("subject_id")["subject_label"]
        rows = []
        for role in ROLES:
            ids = roles.loc[roles["role"] == role, "subject_id"]
            row = {"split": role, "subjects": len(ids), "slices": int(slices.reindex(ids).fillna(0).sum()), "note": ""}
            for k, name in enumerate(self.class_names):
                row[f"subjects {name}"] = int((label.reindex(ids) == k).sum())
            if role == "test" and self.hparams.split == "all":
                row["note"] = self.test_note
            elif role == "val" and not len(ids) and self.hparams.split != "all":
                row["note"] = "no validation split (no_validation_split: true): the last epoch is tested"
            rows.append(row)
        return pd.DataFrame(rows)

    def rows(self, split: str) -> np.ndarray:
        self.setup()
        return np.flatnonzero(self.table.slices["subject_id"].isin(set(self.split[split])).to_numpy())

    def train_streams(self) -> tuple[np.ndarray, np.ndarray]:
        rows = self.rows("train")
        slices = self.table.slices.iloc[rows]
        labeled = slices["subject_id"].isin(set(self.split["labeled"])).to_numpy() & slices["label"].notna().to_numpy()
        return rows, np.where(labeled, STREAM_LABEL, STREAM_UNLABELED)

    def _transform(self, train: bool) -> SliceTransform:
        hp = self.hparams
        rank = self.trainer.global_rank if self.trainer is not None else 0
        return SliceTransform(hp.image_size, train=train and hp.augment, two_views=hp.two_views and train,
                              seed=hp.seed + 1000 * rank, **(hp.augment_kwargs or {}))

    def _world(self) -> tuple[int, int]:
        return (1, 0) if self.trainer is None else (self.trainer.world_size, self.trainer.global_rank)

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        refuse_split_all_stage(hp.split, "fit", f"subject of {type(self.reader).__name__}")
        rows, streams = self.train_streams()
        sizes = {STREAM_LABEL: hp.labeled_batch_size, STREAM_UNLABELED: hp.unlabeled_batch_size}
        if hp.epoch_stream is not None:
            epoch_stream = {"label": STREAM_LABEL, "unlabeled": STREAM_UNLABELED}[hp.epoch_stream]
        else:
            epoch_stream = STREAM_UNLABELED if hp.unlabeled_batch_size > 0 else STREAM_LABEL
        world, rank = self._world()
        sampler = MixedStreamSampler(streams, sizes, epoch_stream, world, rank, hp.seed, keyed=True)
        # augmentation = f(data seed, run seed, rank, epoch, position, index): exact resume with any workers
        dataset = SliceDataset(self.table, rows, streams, self._transform(True), hp.cache,
                               seed_base=(hp.seed, run_seed(), rank))
        return DataLoader(dataset, batch_size=sampler.batch_size, sampler=sampler, drop_last=True,
                          collate_fn=collate_slices, num_workers=hp.num_workers,
                          persistent_workers=hp.num_workers > 0)

    def _eval_loader(self, rows: np.ndarray) -> DataLoader:
        hp = self.hparams
        streams = np.where(self.table.slices["label"].iloc[rows].notna().to_numpy(), STREAM_LABEL, STREAM_UNLABELED)
        dataset = SliceDataset(self.table, rows, streams, self._transform(False), hp.cache)
        world, rank = self._world()
        return DataLoader(dataset, batch_size=hp.eval_batch_size, sampler=UnpaddedDistributedSampler(len(rows), world, rank),
                          collate_fn=collate_slices, num_workers=hp.num_workers, persistent_workers=hp.num_workers > 0)

    def val_dataloader(self) -> DataLoader | list:
        refuse_split_all_stage(self.hparams.split, "validate", f"subject of {type(self.reader).__name__}")
        self.setup()
        if not self.split["val"]:  # no_validation_split: Lightning skips validation for an empty list
            return []
        return self._eval_loader(self.rows("val"))

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.rows("test"))

    def predict_dataloader(self) -> DataLoader:
        """Every slice of every subject, in subject and slice order, labels visible (for feature export)."""
        self.setup()
        return self._eval_loader(np.arange(len(self.table.slices)))
