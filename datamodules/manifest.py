"""The in-memory form every 2D reader produces: one table of images, one label matrix, one box table."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import pandas as pd

RECORD_COLUMNS = ("image_id", "image_path", "patient_id")
OPTIONAL_RECORD_COLUMNS = ("mask_path", "attention_mask_path")
BOX_COLUMNS = ("image_id", "class_index", "x_min", "y_min", "x_max", "y_max")


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
    """

    records: pd.DataFrame
    labels: np.ndarray
    class_names: list[str]
    boxes: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=list(BOX_COLUMNS)))
    task: str = "multilabel"
    source: str = ""

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
        return Manifest(records, self.labels[index], list(self.class_names), boxes, self.task, self.source)

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
