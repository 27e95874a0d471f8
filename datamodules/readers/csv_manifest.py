"""Generic CSV manifest: the adaptor for any 2D dataset (one row per image, one column per class)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from datamodules.manifest import DataError, Manifest, require_columns
from datamodules.readers import _common as C

UNCERTAIN_POLICIES = {"ones": 1.0, "zeros": 0.0, "ignore": np.nan}
BOX_XY = ["x_min", "y_min", "x_max", "y_max"]


class CSVManifest:
    """Read a plain CSV (and optionally a box CSV) into a :class:`~datamodules.manifest.Manifest`.

    Layout::

        images.csv    image_path, patient_id, <label columns ...>[, mask_path, attention_mask_path, width, height]
        boxes.csv     image_id (or the image column), class_name (or class_index), x_min, y_min, x_max, y_max
                      [, width, height]

    Label cells: ``1`` / ``0``, or blank = unknown (NaN, masked out of the loss). Anything else (``2``, ``yes``,
    ``-1``) raises naming the row and column; ``uncertain_value="ones"|"zeros"|"ignore"`` admits ``-1`` and maps
    it (CheXpert-style U-Ones / U-Zeros / U-Ignore). With ``task="multiclass"`` a labelled row has exactly one 1
    (its other blanks become 0); an all-blank row is an unlabeled image.

    Choices:
        * Relative paths (image, mask, box CSV) are under ``root``, which defaults to the CSV's folder.
        * ``image_id`` is ``image_id_column`` if given, else the image cell as written in the CSV.
        * ``patient_column=None`` makes every image its own patient (say so in a paper: patient-level splits
          then cannot prevent leakage).
        * A mask cell that names a missing file raises like a missing image (``require_images``). A box whose
          image is not in the CSV raises; boxes are checked (finite, not inverted, non-negative, and inside
          ``width``/``height`` from the box CSV or from ``width_column``/``height_column``, 1 px tolerance).
          That stated size is the frame the boxes were drawn on: ``CXRDataModule`` refuses an image whose file
          decodes to another size (resized after annotation), and, without stated sizes, any box outside the
          decoded image (``Manifest.check_boxes_against_images``).

    :meth:`write` is the inverse: it writes any Manifest in this format, so another reader's output (say, a filtered
    NIH subset) can be frozen into a CSV and read back identically.

    Example:
        >>> reader = CSVManifest("/data/mine/images.csv", label_columns=["opacity", "effusion"])  # doctest: +SKIP
        >>> manifest = reader.load()                                                              # doctest: +SKIP
    """

    def __init__(
        self,
        csv_path: str | Path,
        *,
        label_columns: list[str],
        image_column: str = "image_path",
        patient_column: str | None = "patient_id",
        task: str = "multilabel",
        mask_column: str | None = None,
        attention_mask_column: str | None = None,
        boxes_csv: str | Path | None = None,
        root: str | Path | None = None,
        image_id_column: str | None = None,
        uncertain_value: str | None = None,
        width_column: str | None = None,
        height_column: str | None = None,
        require_images: bool = True,
        skip_missing: bool = False,
    ) -> None:
        self.csv_path = Path(csv_path)
        self.label_columns = list(label_columns)
        if not self.label_columns:
            raise ValueError("CSVManifest: label_columns is empty")
        C.check_choice("CSVManifest", "task", task, ("multilabel", "multiclass"))
        if uncertain_value is not None and uncertain_value not in UNCERTAIN_POLICIES:
            raise ValueError(f"CSVManifest: uncertain_value must be None or one of {list(UNCERTAIN_POLICIES)}")
        self.image_column = image_column
        self.patient_column = patient_column
        self.task = task
        self.mask_column = mask_column
        self.attention_mask_column = attention_mask_column
        self.boxes_csv = boxes_csv
        self.root = self.csv_path.parent if root is None else Path(root)
        self.image_id_column = image_id_column
        self.uncertain_value = uncertain_value
        self.width_column = width_column
        self.height_column = height_column
        self.require_images = require_images
        self.skip_missing = skip_missing
        self.report: dict[str, int] = {}

    def _absolute(self, cells: pd.Series) -> pd.Series:
        """Relative cells joined to ``root``; blank cells stay ``""``."""
        cells = cells.fillna("").astype(str).str.strip()
        relative = (cells != "") & ~cells.map(os.path.isabs)
        return cells.where(~relative, str(self.root) + os.sep + cells)

    # ------------------------------------------------------------------------------------------------------------
    def load(self) -> Manifest:
        self.report = {}
        source = self.csv_path
        table = C.read_csv(source, "CSV manifest", dtype=str, keep_default_na=False, na_values=[""])
        required = [self.image_column, *self.label_columns]
        for column in (self.patient_column, self.mask_column, self.attention_mask_column, self.image_id_column,
                       self.width_column, self.height_column):
            if column is not None:
                required.append(column)
        require_columns(table, required, source)
        C.require_nonempty(table, "reading (the CSV has a header but no rows)", source, 0)
        rows = np.arange(len(table))
        self.report["rows"] = len(table)

        blank_image = table[self.image_column].isna()
        if blank_image.any():
            i = int(np.flatnonzero(blank_image.to_numpy())[0])
            raise DataError(f"{C.where(source, i)}, column {self.image_column!r}: empty image path")
        labels = self._labels(table, rows, source)

        image_id = table[self.image_id_column if self.image_id_column else self.image_column].astype(str).str.strip()
        records = pd.DataFrame(
            {
                "image_id": image_id,
                "image_path": self._absolute(table[self.image_column]),
                "patient_id": image_id if self.patient_column is None
                else table[self.patient_column].fillna("").astype(str).str.strip(),
                "mask_path": self._absolute(table[self.mask_column]) if self.mask_column else "",
                "attention_mask_path": self._absolute(table[self.attention_mask_column]) if self.attention_mask_column else "",
            }
        )
        if self.patient_column is not None and (records["patient_id"] == "").any():
            i = int(np.flatnonzero((records["patient_id"] == "").to_numpy())[0])
            raise DataError(f"{C.where(source, i)}, column {self.patient_column!r}: empty patient id")
        duplicate = records["image_id"].duplicated().to_numpy()
        if duplicate.any():
            i = int(np.flatnonzero(duplicate)[0])
            raise DataError(f"{C.where(source, i)}: image id {records['image_id'].iloc[i]!r} appears more than once")
        sizes = {}
        for key, column in (("width", self.width_column), ("height", self.height_column)):
            if column is not None:
                records[key] = sizes[key] = C.numeric_column(table, column, source)
        records["source_row"] = rows

        if self.require_images:
            for column in ("mask_path", "attention_mask_path"):
                given = records[column] != ""
                missing = given.to_numpy() & ~C.existing(records[column])
                if missing.any():
                    i = int(np.flatnonzero(missing)[0])
                    kind = column.replace("_path", "")
                    raise DataError(f"{C.where(source, i)}: {kind} file not found: {records[column].iloc[i]}")
        keep = C.check_images(
            records.assign(_pos=rows), source, self.require_images, self.skip_missing, self.report
        )["_pos"].to_numpy()
        boxes = self._boxes(records)
        records, labels = records.iloc[keep].reset_index(drop=True), labels[keep]
        kept = boxes["image_id"].isin(set(records["image_id"])).to_numpy()
        self.report["boxes_dropped_missing_image"] = int((~kept).sum())
        boxes = boxes[kept].reset_index(drop=True)
        self.report["images"], self.report["boxes"] = len(records), len(boxes)
        return Manifest(records, labels, list(self.label_columns), boxes, self.task, str(source),
                        str(self._boxes_path or ""))

    def _labels(self, table: pd.DataFrame, rows: np.ndarray, source: Path) -> np.ndarray:
        values = C.labels_from_cells(table, self.label_columns, source, rows)
        allowed = (0.0, 1.0) if self.uncertain_value is None else (0.0, 1.0, -1.0)
        C.check_label_values(values, allowed, self.label_columns, rows, source)
        if self.uncertain_value is not None:
            values[values == -1] = UNCERTAIN_POLICIES[self.uncertain_value]
        if self.task == "multiclass":
            known = ~np.isnan(values)
            ones = (values == 1).sum(axis=1)
            bad = known.any(axis=1) & (ones != 1)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise DataError(
                    f"{C.where(source, int(rows[i]))}: task='multiclass' needs exactly one 1 among {self.label_columns} "
                    f"(or all blank for an unlabeled image); found {int(ones[i])}"
                )
            values[known.any(axis=1)[:, None] & ~known] = 0.0
        return values.astype(np.float32)

    def _boxes(self, records: pd.DataFrame) -> pd.DataFrame:
        self._boxes_path = None
        if self.boxes_csv is None:
            return C.empty_boxes()
        path = Path(self.boxes_csv) if Path(self.boxes_csv).is_absolute() else self.root / self.boxes_csv
        table = C.read_csv(path, "CSV manifest boxes", dtype={"image_id": str, self.image_column: str, "class_name": str})
        key = "image_id" if "image_id" in table.columns else self.image_column
        klass = "class_name" if "class_name" in table.columns else "class_index"
        require_columns(table, [key, klass, *BOX_XY], path)
        rows = np.arange(len(table))
        boxes = pd.DataFrame({"image_id": table[key].astype(str).str.strip()})
        for column in BOX_XY:
            boxes[column] = C.numeric_column(table, column, path)

        if klass == "class_name":
            index = table["class_name"].astype(str).str.strip().map({c: k for k, c in enumerate(self.label_columns)})
        else:
            index = pd.Series(C.numeric_column(table, "class_index", path))
            index = index.where(index.isin(range(len(self.label_columns))))
        if index.isna().any():
            i = int(np.flatnonzero(index.isna().to_numpy())[0])
            raise DataError(
                f"{C.where(path, i)}, column {klass!r}: {table[klass].iloc[i]!r} is not one of the classes {self.label_columns}"
            )
        boxes["class_index"] = index.to_numpy().astype(np.int64)

        position = pd.Series(np.arange(len(records)), index=records["image_id"].to_numpy())
        unknown = ~boxes["image_id"].isin(position.index).to_numpy()
        if unknown.any():
            i = int(np.flatnonzero(unknown)[0])
            raise DataError(
                f"{C.where(path, i)}, column {key!r}: image {boxes['image_id'].iloc[i]!r} is not in {self.csv_path}"
            )
        width = height = None
        if "width" in table.columns:
            width = C.numeric_column(table, "width", path)
        elif "width" in records.columns:
            width = records["width"].to_numpy()[boxes["image_id"].map(position).to_numpy(dtype=np.int64)]
        if "height" in table.columns:
            height = C.numeric_column(table, "height", path)
        elif "height" in records.columns:
            height = records["height"].to_numpy()[boxes["image_id"].map(position).to_numpy(dtype=np.int64)]
        C.check_boxes(boxes, path, rows, width, height)
        # The stated size is the frame the boxes were drawn on: the DataModule refuses an image that decodes
        # to another size (Manifest.check_boxes_against_images) instead of letting the boxes point elsewhere.
        nan = np.full(len(boxes), np.nan)
        boxes["frame_width"] = nan if width is None else np.asarray(width, dtype=np.float64)
        boxes["frame_height"] = nan if height is None else np.asarray(height, dtype=np.float64)
        boxes["source_row"] = rows
        self._boxes_path = path
        return boxes[["image_id", "class_index", *BOX_XY, "frame_width", "frame_height", "source_row"]]

    # ------------------------------------------------------------------------------------------------------------
    @staticmethod
    def write(manifest: Manifest, csv_path: str | Path, boxes_csv: str | Path | None = None) -> None:
        """Write ``manifest`` as ``image_id, image_path, patient_id, mask_path, attention_mask_path, <classes>``
        (NaN labels as blank cells, paths absolute) and, if given, its boxes as
        ``image_id, class_name, x_min, y_min, x_max, y_max``. Read back with
        ``CSVManifest(csv_path, label_columns=manifest.class_names, image_id_column="image_id",
        mask_column="mask_path", attention_mask_column="attention_mask_path", boxes_csv=boxes_csv, task=manifest.task)``.
        """
        columns = ["image_id", "image_path", "patient_id", "mask_path", "attention_mask_path"]
        clash = [c for c in manifest.class_names if c in columns]
        if clash:
            raise DataError(f"CSVManifest.write: class names {clash} clash with the record columns {columns}")
        frame = manifest.records[columns].copy()
        frame = pd.concat([frame, pd.DataFrame(manifest.labels, columns=manifest.class_names)], axis=1)
        frame.to_csv(csv_path, index=False, float_format="%g")
        if boxes_csv is not None:
            boxes = manifest.boxes[["image_id", "class_index", *BOX_XY]].copy()
            boxes.insert(1, "class_name", [manifest.class_names[int(k)] for k in boxes.pop("class_index")])
            boxes.to_csv(boxes_csv, index=False, float_format="%.17g")
