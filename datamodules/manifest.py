"""The in-memory form every 2D reader produces: one table of images, one label matrix, one box table."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import pandas as pd

RECORD_COLUMNS = ("image_id", "image_path", "patient_id")
OPTIONAL_RECORD_COLUMNS = ("mask_path", "attention_mask_path")
BOX_COLUMNS = ("image_id", "class_index", "x_min", "y_min", "x_max", "y_max")
# Optional box columns: the image size the reader says a box was drawn on (NaN = not stated).
FRAME_COLUMNS = ("frame_width", "frame_height")
BOX_TOLERANCE_PX = 1.0


class DataError(ValueError):
    """Bad input: the message names the file, the row or the column and says what was expected."""


@dataclass
class Manifest:
    """Images, labels and boxes of one dataset, before splitting.

    Attributes:
        records: one row per image with at least ``image_id`` (unique), ``image_path`` (absolute),
            ``patient_id`` (str); optionally ``mask_path`` / ``attention_mask_path`` (absolute or empty).
        labels: float32 (N, K): 1 positive, 0 negative, NaN unknown (masked out of every loss).
        class_names: the K class names, in column order of ``labels``.
        boxes: one row per box, columns ``BOX_COLUMNS``, coordinates in *original* image pixels.
        task: ``"multilabel"`` or ``"multiclass"`` (one-hot rows).
        source: human-readable origin (a path) used in error messages.
        boxes_source: the box file, for messages (``""``: the box table's ``source_row`` is still named).

    Checks on construction: unique ``image_id``; no image *file* listed twice (paths compared after
    normalisation, so ``img/x.png`` and ``./img/x.png`` are one file: under two patient ids it could land in
    train and test). :meth:`check_boxes_against_images` compares the boxes with the decoded image sizes.
    """

    records: pd.DataFrame
    labels: np.ndarray
    class_names: list[str]
    boxes: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=list(BOX_COLUMNS)))
    task: str = "multilabel"
    source: str = ""
    boxes_source: str = ""

    def __post_init__(self) -> None:
        missing = [c for c in RECORD_COLUMNS if c not in self.records.columns]
        if missing:
            raise DataError(f"{self.source}: manifest records lack columns {missing}; found {list(self.records.columns)}")
        self.records = self.records.reset_index(drop=True)
        self.records["patient_id"] = self.records["patient_id"].astype(str)
        for col in OPTIONAL_RECORD_COLUMNS:
            if col not in self.records.columns:
                self.records[col] = ""
            self.records[col] = self.records[col].fillna("").astype(str)
        self.labels = np.asarray(self.labels, dtype=np.float32).reshape(len(self.records), len(self.class_names))
        if self.records["image_id"].duplicated().any():
            dup = self.records.loc[self.records["image_id"].duplicated(), "image_id"].iloc[0]
            raise DataError(f"{self.source}: image_id {dup!r} appears more than once")
        self._refuse_duplicate_files()
        if self.task not in ("multilabel", "multiclass"):
            raise DataError(f"{self.source}: task must be 'multilabel' or 'multiclass', got {self.task!r}")
        if len(self.boxes):
            missing = [c for c in BOX_COLUMNS if c not in self.boxes.columns]
            if missing:
                raise DataError(f"{self.source}: box table lacks columns {missing}; found {list(self.boxes.columns)}")
        else:
            self.boxes = pd.DataFrame({c: pd.Series(dtype="float64") for c in BOX_COLUMNS})

    def __len__(self) -> int:
        return len(self.records)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, index: np.ndarray | list[int]) -> "Manifest":
        """Rows ``index`` (positions) with their boxes."""
        index = np.asarray(index, dtype=np.int64)
        records = self.records.iloc[index].reset_index(drop=True)
        boxes = self.boxes[self.boxes["image_id"].isin(set(records["image_id"]))].reset_index(drop=True)
        return Manifest(records, self.labels[index], list(self.class_names), boxes, self.task, self.source,
                        self.boxes_source)

    def _row(self, position: int, table: pd.DataFrame) -> str:
        """``"row 5 (line 6)"`` of the reader's file when the table kept ``source_row``, else the position."""
        if "source_row" in table.columns and pd.notna(table["source_row"].iloc[position]):
            row = int(table["source_row"].iloc[position])
            return f"row {row + 1} (line {row + 2})"
        return f"entry {position + 1}"

    def _refuse_duplicate_files(self) -> None:
        paths = self.records["image_path"].astype(str)
        normal = paths.map(os.path.normpath)
        again = normal.duplicated(keep=False).to_numpy()
        if not again.any():
            return
        first = normal[again].iloc[0]
        rows = np.flatnonzero((normal == first).to_numpy())[:2]
        said = [f"{self._row(int(i), self.records)} as {paths.iloc[i]!r} (image_id {self.records['image_id'].iloc[i]!r}, "
                f"patient {self.records['patient_id'].iloc[i]!r})" for i in rows]
        raise DataError(f"{self.source}: image file {first} is listed twice: {said[0]} and {said[1]}. One file "
                        "must be one record (under two patients it could land in train and test); remove one row")

    def check_boxes_against_images(self, tolerance: float = BOX_TOLERANCE_PX) -> None:
        """Every box must lie inside its image as decoded (``datamodules.io.image_size``: the file header, EXIF
        orientation applied; no decoding), up to ``tolerance`` pixels (annotation tools put an edge on pixel
        ``W`` itself; a box beyond it is cut by every crop and flip, and a box from another image size is wrong
        everywhere). Where the reader recorded the size the box was drawn on (``frame_width`` /
        ``frame_height``, e.g. CSV width/height columns) it must equal the decoded size: a resized image with
        boxes of the original size is refused, never rescaled silently. Sizes a reader records only as metadata
        (NIH ``OriginalImage[Width,Height]``, the size before NIH downsampled the release) are not compared.
        Raises :class:`DataError` naming the image file and the box row.
        """
        if not len(self.boxes):
            return
        from datamodules.io import image_size  # io imports this module

        paths = dict(zip(self.records["image_id"].astype(str), self.records["image_path"].astype(str)))
        boxes = self.boxes.reset_index(drop=True)
        where = self.boxes_source or f"box file of the reader of {self.source}"
        sizes: dict[str, tuple[int, int]] = {}
        for i, box in enumerate(boxes.itertuples(index=False)):
            image_id = str(box.image_id)
            if image_id not in paths:
                continue
            if image_id not in sizes:
                sizes[image_id] = image_size(paths[image_id])
            height, width = sizes[image_id]
            coords = f"({box.x_min:g}, {box.y_min:g}, {box.x_max:g}, {box.y_max:g})"
            frame = [getattr(box, c, np.nan) for c in FRAME_COLUMNS]
            if all(pd.notna(v) for v in frame) and (float(frame[0]), float(frame[1])) != (width, height):
                raise DataError(
                    f"{where}: {self._row(i, boxes)}: box {coords} was drawn on a {frame[0]:g} x {frame[1]:g} "
                    f"(W x H) image, but {paths[image_id]} decodes to {width} x {height}. Rescale the boxes "
                    "or use the images they were drawn on")
            if box.x_max > width + tolerance or box.y_max > height + tolerance or min(box.x_min, box.y_min) < -tolerance:
                raise DataError(
                    f"{where}: {self._row(i, boxes)}: box (x_min, y_min, x_max, y_max) = {coords} lies outside "
                    f"{paths[image_id]}, which decodes to {width} x {height} (W x H; tolerance {tolerance:g} px). "
                    "Were the images resized after annotation?")

    def boxes_by_image(self) -> dict[str, np.ndarray]:
        """``image_id -> float32 (N, 5)`` rows ``(x_min, y_min, x_max, y_max, class_index)``."""
        out: dict[str, np.ndarray] = {}
        cols = ["x_min", "y_min", "x_max", "y_max", "class_index"]
        for image_id, group in self.boxes.groupby("image_id", sort=False):
            out[str(image_id)] = group[cols].to_numpy(np.float32)
        return out


def require_columns(frame: pd.DataFrame, required: list[str] | tuple[str, ...], source: str | Path) -> None:
    """Raise :class:`DataError` naming the expected and the found columns."""
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(
            f"{source}: missing column(s) {missing}. Expected columns {list(required)}; found {list(frame.columns)}"
        )


@runtime_checkable
class Reader(Protocol):
    """Anything that turns a dataset on disk into a :class:`Manifest` (NIH, CheXpert, COVID, CSV, synthetic).

    An optional ``prepare()`` method (e.g. writing the synthetic data) is called once per node before ``load()``.
    """

    def load(self) -> Manifest: ...
