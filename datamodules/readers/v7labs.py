"""Reader of a v7labs-style label table (``id``, ``annotations``), the layout MAG-SD's code trains on.

The MAG-SD reference (StonHamA/MAG-SD, ``dataset/covid19.py``) reads ``labels_csv.csv`` from the V7 Labs
COVID-19 X-ray dataset (github.com/v7labs/covid-19-xray-dataset): one row per image, ``id`` = the image file
name, ``annotations`` = one class string. It keeps rows whose annotation is one of *Viral Pneumonia, Bacterial
Pneumonia, COVID-19, Healthy* and one-hot encodes them in that order (K = 4). Lung masks, when present, have the
image's file name in a mask folder.

Layout::

    root/
      labels_csv.csv            # id, annotations[, <patient column>]
      images/<id>               # image_dir
      masks/<id>                # mask_dir (optional): lung mask, 0/255, same name as the image

Choices (the table has no patient column, and the reference split by image):
    * Patient ids come from ``patient_column`` of the table if given, else from a COVID-19 image data
      collection ``metadata.csv`` (``metadata_csv``: ``filename`` -> ``patientid``; the v7labs images are that
      collection's files under the same names), else each image is its own patient. The last option cannot
      prevent patient leakage across splits; ``report["own_patient"]`` counts the images it applies to.
    * ``annotation_map`` renames annotations before matching (e.g. ``{"Normal": "Healthy"}``); rows whose
      annotation is not in ``classes`` are dropped (``report["dropped_unmapped"]``) or, with ``strict=True``,
      raise. A repeated ``id`` raises.

Example:
    >>> manifest = V7LabsLabels("/data/covid-19-xray-dataset", metadata_csv="/data/covid/metadata.csv").load()  # doctest: +SKIP
    >>> manifest.class_names
    ['Viral Pneumonia', 'Bacterial Pneumonia', 'COVID-19', 'Healthy']
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from datamodules.manifest import DataError, Manifest, require_columns
from datamodules.readers import _common as C

MAGSD_V7LABS_CLASSES = ("Viral Pneumonia", "Bacterial Pneumonia", "COVID-19", "Healthy")

__all__ = ["V7LabsLabels", "MAGSD_V7LABS_CLASSES"]


class V7LabsLabels:
    """Read ``labels_csv`` (``id``, ``annotations``) into a multiclass :class:`~datamodules.manifest.Manifest`.

    Args:
        root: dataset folder.
        labels_csv: the label table (absolute or relative to ``root``).
        image_dir, mask_dir: image and optional lung-mask folders (absolute or relative to ``root``).
        classes: kept annotations, in label-column order (default MAG-SD's four).
        annotation_map: optional renaming of annotation strings before matching ``classes``.
        id_column, annotation_column: column names of the table.
        patient_column: a patient-id column of the table, if it has one.
        metadata_csv: a COVID-19 image data collection ``metadata.csv`` giving ``patientid`` per ``filename``.
        strict: raise on an annotation outside ``classes`` instead of dropping the row.
        require_images, skip_missing: check that image files exist; drop missing ones instead of raising.
    """

    def __init__(
        self,
        root: str | Path,
        labels_csv: str = "labels_csv.csv",
        image_dir: str = "images",
        mask_dir: str | None = None,
        classes: list[str] | tuple[str, ...] = MAGSD_V7LABS_CLASSES,
        annotation_map: dict[str, str] | None = None,
        id_column: str = "id",
        annotation_column: str = "annotations",
        patient_column: str | None = None,
        metadata_csv: str | None = None,
        strict: bool = False,
        require_images: bool = True,
        skip_missing: bool = False,
    ) -> None:
        self.root = Path(root)
        self.labels_csv, self.image_dir, self.mask_dir = labels_csv, image_dir, mask_dir
        self.classes = list(classes)
        if not self.classes or len(set(self.classes)) != len(self.classes):
            raise ValueError(f"V7LabsLabels: classes must be non-empty and unique, got {self.classes}")
        self.annotation_map = dict(annotation_map or {})
        self.id_column, self.annotation_column = id_column, annotation_column
        self.patient_column, self.metadata_csv = patient_column, metadata_csv
        self.strict, self.require_images, self.skip_missing = strict, require_images, skip_missing
        self.report: dict[str, int] = {}

    def _path(self, name: str) -> Path:
        return Path(name) if Path(name).is_absolute() else self.root / name

    def load(self) -> Manifest:
        self.report = {}
        path = self._path(self.labels_csv)
        table = C.read_csv(path, "v7labs labels_csv", dtype=str, keep_default_na=False)
        required = [self.id_column, self.annotation_column] + ([self.patient_column] if self.patient_column else [])
        require_columns(table, required, path)
        table["_row"] = np.arange(len(table))
        self.report["rows"] = len(table)

        ids = table[self.id_column].str.strip()
        if (ids == "").any():
            raise DataError(f"{C.where(path, int(np.flatnonzero((ids == '').to_numpy())[0]))}, column "
                            f"{self.id_column!r}: empty image id")
        duplicate = ids.duplicated().to_numpy()
        if duplicate.any():
            i = int(np.flatnonzero(duplicate)[0])
            raise DataError(f"{C.where(path, i)}, column {self.id_column!r}: {ids.iloc[i]!r} listed twice")

        annotations = table[self.annotation_column].str.strip().replace(self.annotation_map)
        known = annotations.isin(self.classes).to_numpy()
        if self.strict and not known.all():
            i = int(np.flatnonzero(~known)[0])
            raise DataError(f"{C.where(path, i)}, column {self.annotation_column!r}: {annotations.iloc[i]!r} is not "
                            f"one of {self.classes} (annotation_map: {self.annotation_map})")
        self.report["dropped_unmapped"] = int((~known).sum())
        before = len(table)
        table, ids, annotations = table[known], ids[known], annotations[known]
        C.require_nonempty(table, f"keeping annotations in {self.classes}", path, before)

        index = {c: k for k, c in enumerate(self.classes)}
        labels = np.zeros((len(table), len(self.classes)), dtype=np.float32)
        labels[np.arange(len(table)), annotations.map(index).to_numpy(dtype=np.int64)] = 1.0

        records = pd.DataFrame({
            "image_id": ids.to_numpy(),
            "image_path": C.attach_paths(ids, self.root, self.image_dir).to_numpy(),
            "patient_id": self._patients(table, ids).to_numpy(),
            "mask_path": C.optional_files(ids, self.root, self.mask_dir, suffix="").to_numpy(),
            "annotation": annotations.to_numpy(),
        })  # fmt: skip
        keep = C.check_images(records.assign(_pos=np.arange(len(records))), path, self.require_images,
                              self.skip_missing, self.report)["_pos"].to_numpy()
        records, labels = records.iloc[keep].reset_index(drop=True), labels[keep]
        self.report["images"] = len(records)
        return Manifest(records, labels, list(self.classes), task="multiclass", source=str(path))

    def _patients(self, table: pd.DataFrame, ids: pd.Series) -> pd.Series:
        """Patient id per row (see the class docstring for the order of sources)."""
        patients = pd.Series("", index=ids.index, dtype=object)
        if self.patient_column:
            patients = table[self.patient_column].astype(str).str.strip()
        elif self.metadata_csv:
            meta_path = self._path(self.metadata_csv)
            meta = C.read_csv(meta_path, "COVID-19 collection metadata (patient ids)", dtype=str, keep_default_na=False)
            require_columns(meta, ["filename", "patientid"], meta_path)
            meta = meta.assign(filename=meta["filename"].str.strip()).drop_duplicates("filename")
            patients = ids.map(meta.set_index("filename")["patientid"].str.strip()).fillna("")
        own = patients == ""
        self.report["own_patient"] = int(own.sum())
        return patients.where(~own, "img:" + ids)
