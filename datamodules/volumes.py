"""3D volume readers: NIfTI and Analyze (``.hdr/.img``) images, several modalities as channels, label maps.

A reader lists subjects (:class:`VolumeSubject`: an id, one file per modality, an optional label file) and loads
them (:meth:`VolumeReader.load` -> :class:`Volume`: float32 (C, D, H, W) image, int64 (D, H, W) class map and the
voxel spacing). Files are read with nibabel, which recognises NIfTI-1/2 (``.nii``, ``.nii.gz``), NIfTI pairs
and Analyze 7.5 (``.hdr`` + ``.img``) from the file itself. Every file is reoriented to the closest canonical
orientation, RAS+ (``nibabel.as_closest_canonical``: axis flips and permutations only, no resampling; MONAI's
``Orientationd(axcodes="RAS")`` does the same), so an image and a label map stored with different axis
orders or flips still overlap voxel for voxel. After that every modality and the label map of a subject must
share one grid: the same shape and the same affine (within 1e-3 mm), else :class:`DataError` names both files.
Files that state no orientation (Analyze 7.5, NIfTI with qform and sform codes 0) keep their on-disk axis order:
nibabel gives them one default affine, the same for every such file of a grid, so they stay mutually aligned
and the same-grid check still applies. A NaN or infinite voxel is refused with the file name.

Readers:
  * :class:`NiftiVolumes`: generic. Either a CSV (``subject_id``, one column per modality, a label column;
    relative paths resolve against the CSV's folder) or glob patterns with one ``*`` standing for the subject
    id, e.g. ``images=["*_t1.nii.gz", "*_t2.nii.gz"], label="*_seg.nii.gz"``.
  * :class:`ISeg2017`: the MICCAI iSeg-2017 training layout ``subject-<n>-T1.hdr``, ``subject-<n>-T2.hdr``,
    ``subject-<n>-label.hdr`` (Analyze), T1 and T2 as channels, raw labels 10/150/250 (CSF/GM/WM) -> 1/2/3.
  * :class:`MNI152Tissue`: the MNI152 2009a template in ``shared/data/mni152-tissue`` (T1; 0 = background or
    CSF, 1 = GM, 2 = WM).

Label maps: ``label_values`` maps raw values to class indices (unlisted values raise :class:`DataError`);
without it the map must already hold class indices ``0..K-1``. Non-integer label voxels raise.

Example:
    >>> reader = ISeg2017("/data/iSeg-2017-Training")  # doctest: +SKIP
    >>> vol = reader.load(reader.subjects()[0])  # doctest: +SKIP
    >>> vol.image.shape, vol.label.max()  # doctest: +SKIP
    ((2, 144, 192, 256), 3)
"""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from datamodules.manifest import DataError, require_columns

__all__ = ["VolumeSubject", "Volume", "VolumeReader", "NiftiVolumes", "ISeg2017", "MNI152Tissue",
           "read_volume", "read_volume_affine", "ISEG_LABELS", "ISEG_CLASSES"]

ISEG_CLASSES = ("background", "CSF", "GM", "WM")
ISEG_LABELS = {0: 0, 10: 1, 150: 2, 250: 3}


@dataclass(frozen=True)
class VolumeSubject:
    subject_id: str
    images: tuple[str, ...]
    label: str | None = None


@dataclass
class Volume:
    """One loaded subject. ``image`` float32 (C, *S); ``label`` int64 (*S) or None; ``spacing`` per axis (mm)."""

    subject_id: str
    image: np.ndarray
    label: np.ndarray | None
    spacing: tuple[float, ...]
    affine: np.ndarray | None = None  # voxel -> world (mm), RAS+, of every channel and of the label map


AFFINE_TOLERANCE_MM = 1e-3


def read_volume_affine(path: str | Path) -> tuple[np.ndarray, tuple[float, ...], np.ndarray]:
    """Read one 3D volume with nibabel, reoriented to RAS+: (float32 array, voxel spacing, 4x4 affine).

    A trailing singleton dimension (Analyze and some NIfTI files store (X, Y, Z, 1)) is dropped. NaN or infinite
    voxels raise :class:`DataError` naming the file.
    """
    import nibabel as nib  # local: only volume code needs it

    path = Path(path)
    if not path.is_file():
        raise DataError(f"volume file not found: {path}")
    try:
        img = nib.load(str(path))
        while len(img.shape) > 3 and img.shape[-1] == 1:
            img = img.slicer[..., 0]
        if len(img.shape) != 3:
            raise DataError(f"{path}: expected a 3D volume, got shape {img.shape}")
        header = img.header
        if "sform_code" in header and (int(header["sform_code"]) > 0 or int(header["qform_code"]) > 0):
            img = nib.as_closest_canonical(img)  # the file states its orientation: reorient to RAS+
        data = np.asarray(img.dataobj, dtype=np.float32)
    except DataError:
        raise
    except Exception as err:  # nibabel raises many types (ImageFileError, EOFError, zlib errors)
        raise DataError(f"cannot read volume {path} (expected NIfTI .nii/.nii.gz or Analyze .hdr/.img): {err}") from err
    finite = np.isfinite(data)
    if not finite.all():
        raise DataError(f"{path}: {int((~finite).sum())} voxel(s) are NaN or infinite (first at index "
                        f"{tuple(int(i) for i in np.argwhere(~finite)[0])} after reorientation to RAS); fix the file "
                        "(medattn does not guess a fill value)")
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    return data, zooms, np.asarray(img.affine, dtype=np.float64)


def read_volume(path: str | Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """:func:`read_volume_affine` without the affine: (float32 array (D, H, W) in RAS+, voxel spacing)."""
    data, zooms, _ = read_volume_affine(path)
    return data, zooms


def _same_grid(subject: str, path: str, affine: np.ndarray, ref_path: str, ref: np.ndarray, what: str) -> None:
    if not np.allclose(affine, ref, rtol=0.0, atol=AFFINE_TOLERANCE_MM):
        import nibabel as nib

        raise DataError(
            f"subject {subject}: {what} {path} and the image {ref_path} lie on different grids after reorientation "
            f"to RAS (axis codes {''.join(nib.aff2axcodes(affine))} vs {''.join(nib.aff2axcodes(ref))}; affines "
            f"{np.round(affine, 3).tolist()} vs {np.round(ref, 3).tolist()}); resample one onto the other first")


def remap_labels(raw: np.ndarray, label_values: Mapping[int, int] | None, num_classes: int, source: str) -> np.ndarray:
    """Raw label voxels -> int64 class indices, with a :class:`DataError` for unexpected values."""
    if not np.all(np.isfinite(raw)) or not np.array_equal(raw, np.round(raw)):
        raise DataError(f"{source}: label map holds non-integer values; expected integer labels")
    values = np.unique(raw).astype(np.int64)
    if label_values is None:
        bad = values[(values < 0) | (values >= num_classes)]
        if bad.size:
            raise DataError(f"{source}: label values {bad.tolist()} are not class indices 0..{num_classes - 1}; "
                            "pass label_values to map raw values to classes")
        return raw.astype(np.int64)
    bad = [int(v) for v in values if int(v) not in label_values]
    if bad:
        raise DataError(f"{source}: unexpected label values {bad}; expected only {sorted(label_values)}")
    lut = np.zeros(int(values.max()) + 1, dtype=np.int64)
    for raw_value, cls in label_values.items():
        if raw_value <= values.max():
            lut[raw_value] = cls
    return lut[raw.astype(np.int64)]


class VolumeReader:
    """Base reader. Subclasses implement :meth:`subjects`; :meth:`load` reads and checks one subject."""

    modalities: tuple[str, ...] = ("image",)
    class_names: tuple[str, ...] = ("background", "foreground")
    label_values: Mapping[int, int] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def in_channels(self) -> int:
        return len(self.modalities)

    def prepare(self) -> None:
        """Hook for readers that generate or download their data (run once, on rank 0 first)."""

    def subjects(self) -> list[VolumeSubject]:  # pragma: no cover - abstract
        raise NotImplementedError

    def load(self, subject: VolumeSubject) -> Volume:
        if len(subject.images) != len(self.modalities):
            raise DataError(f"subject {subject.subject_id}: {len(subject.images)} image files for modalities "
                            f"{list(self.modalities)}")
        arrays, spacing, affine = [], None, None
        for path in subject.images:
            data, zooms, aff = read_volume_affine(path)
            if arrays and data.shape != arrays[0].shape:
                raise DataError(f"subject {subject.subject_id}: {path} has shape {data.shape} but "
                                f"{subject.images[0]} has {arrays[0].shape}; modalities must share one grid")
            if arrays:
                _same_grid(subject.subject_id, path, aff, subject.images[0], affine, "modality")
            arrays.append(data)
            spacing, affine = spacing or zooms, aff if affine is None else affine
        label = None
        if subject.label is not None:
            raw, _, label_affine = read_volume_affine(subject.label)
            if raw.shape != arrays[0].shape:
                raise DataError(f"subject {subject.subject_id}: label map {subject.label} has shape {raw.shape} "
                                f"but the image {subject.images[0]} has {arrays[0].shape}")
            _same_grid(subject.subject_id, subject.label, label_affine, subject.images[0], affine, "label map")
            label = remap_labels(raw, self.label_values, self.num_classes, subject.label)
        return Volume(subject.subject_id, np.stack(arrays), label, tuple(spacing), affine)


def _pattern_regex(pattern: str) -> re.Pattern:
    if pattern.count("*") != 1:
        raise ValueError(f"pattern {pattern!r} must contain exactly one '*' (the subject id)")
    head, tail = pattern.split("*")
    return re.compile(re.escape(head) + "(.+)" + re.escape(tail) + "$")


class NiftiVolumes(VolumeReader):
    """Generic volumes from a CSV or from glob patterns (NIfTI or Analyze; nibabel decides from the file).

    Args:
        root: folder the patterns (or the CSV's relative paths) are relative to.
        images: with patterns, one pattern per modality with one ``*`` = subject id (``"*_t1.nii.gz"``);
            with ``csv``, the modality column names.
        label: label pattern / column, or None for unlabelled volumes.
        csv: optional CSV file (relative to ``root``) with ``subject_column``, the ``images`` columns and
            ``label``. Relative paths inside resolve against the CSV's folder.
        class_names: class names, background first; their count is K.
        label_values: raw label value -> class index (e.g. ``{0: 0, 10: 1, 150: 2, 250: 3}``).
        modalities: names of the channels (default: derived from ``images``).
    """

    def __init__(
        self,
        root: str | Path,
        images: Sequence[str] = ("*.nii.gz",),
        label: str | None = None,
        csv: str | None = None,
        subject_column: str = "subject_id",
        class_names: Sequence[str] = ("background", "foreground"),
        label_values: Mapping[int, int] | None = None,
        modalities: Sequence[str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.images = tuple(images)
        self.label = label
        self.csv = csv
        self.subject_column = subject_column
        self.class_names = tuple(class_names)
        self.label_values = {int(k): int(v) for k, v in label_values.items()} if label_values else None
        if self.label_values and max(self.label_values.values()) >= len(self.class_names):
            raise ValueError(f"label_values {self.label_values} map to classes beyond class_names {self.class_names}")
        self.modalities = tuple(modalities) if modalities else tuple(Path(p).name.replace("*", "") for p in self.images)
        if csv is None:
            for p in (*self.images, *([label] if label else [])):
                _pattern_regex(p)

    def subjects(self) -> list[VolumeSubject]:
        return self._from_csv() if self.csv is not None else self._from_patterns()

    def _from_patterns(self) -> list[VolumeSubject]:
        if not self.root.is_dir():
            raise DataError(f"volume folder not found: {self.root}")
        regex = _pattern_regex(self.images[0])
        ids = sorted(
            m.group(1) for f in glob.glob(str(self.root / self.images[0]))
            if (m := regex.match(str(Path(f).relative_to(self.root))))
        )
        if not ids:
            raise DataError(f"{self.root}: no file matches {self.images[0]!r}")
        subjects = []
        for sid in ids:
            paths = [self.root / p.replace("*", sid) for p in self.images]
            label = self.root / self.label.replace("*", sid) if self.label else None
            missing = [str(p) for p in (*paths, *([label] if label else [])) if not p.is_file()]
            if missing:
                raise DataError(f"subject {sid!r} in {self.root}: missing file(s) {missing}")
            subjects.append(VolumeSubject(sid, tuple(map(str, paths)), str(label) if label else None))
        return subjects

    def _from_csv(self) -> list[VolumeSubject]:
        path = self.root / self.csv
        if not path.is_file():
            raise DataError(f"volume CSV not found: {path}")
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        require_columns(frame, [self.subject_column, *self.images, *([self.label] if self.label else [])], path)
        if frame[self.subject_column].duplicated().any():
            dup = frame.loc[frame[self.subject_column].duplicated(), self.subject_column].iloc[0]
            raise DataError(f"{path}: subject {dup!r} is listed more than once")
        base, subjects = path.parent, []
        for row_index, row in enumerate(frame.to_dict("records")):
            def resolve(column: str) -> str:
                value = row[column].strip()
                if not value:
                    raise DataError(f"{path}, row {row_index + 2}: empty cell in column {column!r}")
                p = Path(value) if Path(value).is_absolute() else base / value
                if not p.is_file():
                    raise DataError(f"{path}, row {row_index + 2}, column {column!r}: file not found: {p}")
                return str(p)
            subjects.append(VolumeSubject(str(row[self.subject_column]), tuple(resolve(c) for c in self.images),
                                          resolve(self.label) if self.label else None))
        if not subjects:
            raise DataError(f"{path}: no rows")
        return subjects


class ISeg2017(NiftiVolumes):
    """MICCAI iSeg-2017 (6-month infant brain MRI): ``subject-<n>-{T1,T2,label}.hdr`` Analyze files.

    Wang et al., "Benchmark on automatic 6-month-old infant brain segmentation algorithms: the iSeg-2017
    challenge", IEEE TMI 2019. Channels: T1, T2. Labels 10/150/250 -> CSF 1 / GM 2 / WM 3 (0 stays
    background). ``unlabeled=True`` lists the challenge test subjects (no label file) instead.
    """

    def __init__(self, root: str | Path, unlabeled: bool = False) -> None:
        super().__init__(
            root, images=("subject-*-T1.hdr", "subject-*-T2.hdr"), label=None if unlabeled else "subject-*-label.hdr",
            class_names=ISEG_CLASSES, label_values=ISEG_LABELS, modalities=("T1", "T2"),
        )
        self.unlabeled = unlabeled

    def subjects(self) -> list[VolumeSubject]:
        # The training release (subjects 1-10) has label files; the challenge test subjects (11-23) have none.
        # Both may share a folder, so a subject's label file decides which list it belongs to.
        if not self.root.is_dir():
            raise DataError(f"iSeg-2017 folder not found: {self.root}")
        regex = _pattern_regex("subject-*-T1.hdr")
        ids = sorted({m.group(1) for f in self.root.glob("subject-*-T1.hdr") if (m := regex.match(f.name))},
                     key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))
        subjects = []
        for sid in ids:
            t1, t2, label = (self.root / f"subject-{sid}-{kind}.hdr" for kind in ("T1", "T2", "label"))
            if label.is_file() == self.unlabeled:
                continue
            if not t2.is_file():
                raise DataError(f"iSeg-2017 subject {sid}: {t1} has no matching T2 file {t2}")
            subjects.append(VolumeSubject(sid, (str(t1), str(t2)), None if self.unlabeled else str(label)))
        if not subjects:
            kind = "unlabelled" if self.unlabeled else "labelled (subject-<n>-label.hdr)"
            raise DataError(f"{self.root}: no {kind} iSeg-2017 subjects (subject-<n>-T1.hdr / -T2.hdr expected)")
        return subjects


class MNI152Tissue(NiftiVolumes):
    """The 2 mm MNI152 2009a template of ``shared/data/mni152-tissue`` (one subject, ``mni152_2009a``).

    Channel: T1. Classes: 0 background *or CSF* (the data does not separate them), 1 GM, 2 WM.
    Fonov et al., NeuroImage 2011; ICBM 2009a nonlinear symmetric template.
    """

    def __init__(self, root: str | Path) -> None:
        super().__init__(root, images=("*_t1_2mm.nii.gz",), label="*_tissue_labels_2mm.nii.gz",
                         class_names=("background", "GM", "WM"), modalities=("T1",))
