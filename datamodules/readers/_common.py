"""Checks and small helpers shared by the 2D readers. Every failure is a :class:`DataError` that names the file,
the row and the column, because a reader error is usually read by someone pointing the code at a new copy of a
dataset.

Row numbers in messages count *data* rows from 1 (the header is not counted); ``line`` is the line of the file
(header = line 1), which is what an editor or ``sed -n`` shows when no field holds a newline.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from datamodules.manifest import BOX_COLUMNS, DataError

GLOB_CHARS = set("*?[")


def chosen_classes(reader: str, classes: Iterable[str] | None, known: Iterable[str],
                   default: Iterable[str] | None = None) -> list[str]:
    """``classes`` (``default``, else all of ``known``, when None) as a list; a ValueError naming the reader when
    one of them is not in ``known`` or none is chosen (a typo would otherwise train on an all-zero column)."""
    known = list(known)
    chosen = list(known if default is None else default) if classes is None else list(classes)
    unknown = [c for c in chosen if c not in known]
    if unknown or not chosen:
        raise ValueError(f"{reader}: unknown classes {unknown}; choose from {known}")
    return chosen


def check_choice(reader: str, name: str, value, choices: tuple) -> None:
    """A ValueError ``"<reader>: <name> must be 'a' or 'b', got 'c'"`` when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{reader}: {name} must be {' or '.join(map(repr, choices))}, got {value!r}")


def where(source: str | Path, row: int) -> str:
    """``"file.csv: row 5 (line 6)"`` for the 0-based data row ``row``."""
    return f"{source}: row {row + 1} (line {row + 2})"


def read_csv(path: str | Path, what: str, **kwargs) -> pd.DataFrame:
    """``pd.read_csv`` that turns a missing or unparsable file into a :class:`DataError` saying what it was for."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what}: file not found: {path}")
    try:
        return pd.read_csv(path, **kwargs)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as err:
        raise DataError(f"{what}: cannot parse {path}: {err}") from err


def resolve_one(root: Path, pattern: str, what: str) -> Path:
    """``pattern`` (absolute, or relative to ``root``; may be a glob) resolved to exactly one existing file."""
    full = Path(pattern) if Path(pattern).is_absolute() else root / pattern
    if not GLOB_CHARS & set(str(full)):
        if not full.is_file():
            raise DataError(f"{what}: file not found: {full}")
        return full
    matches = sorted(glob.glob(str(full)))
    if not matches:
        raise DataError(f"{what}: no file matches {full}")
    if len(matches) > 1:
        raise DataError(f"{what}: {len(matches)} files match {full}: {matches}. Name one of them explicitly")
    return Path(matches[0])


def or_gz(root: Path, pattern: str) -> str:
    """``pattern`` if it matches a file (absolute, or under ``root``; may be a glob), else ``pattern + ".gz"`` when
    that matches: label files ship gzipped (NIH ``Data_Entry_2017_v2020.csv.gz``, ``BBox_List_2017.csv.gz``) and
    pandas reads them as they are. An uncompressed copy wins; with neither, ``pattern`` comes back unchanged, so the
    caller's "not found" names it (and may add the ``.gz`` it also tried)."""
    full = Path(pattern) if Path(pattern).is_absolute() else root / pattern
    if glob.glob(str(full)) or str(pattern).endswith(".gz") or not glob.glob(str(full) + ".gz"):
        return str(pattern)
    return str(pattern) + ".gz"


def require_nonempty(frame: pd.DataFrame, what: str, source: str | Path, before: int) -> None:
    """Raise when a filter removed every row, naming the filter."""
    if len(frame) == 0:
        raise DataError(f"{source}: no rows left after {what} ({before} rows before it)")


def require_unique(frame: pd.DataFrame, column: str, source: str | Path) -> None:
    """Raise naming both rows when a value of ``column`` (an image or subject key) appears twice."""
    cells = frame[column].astype(str).str.strip()
    again = cells.duplicated().to_numpy()
    if again.any():
        i = int(np.flatnonzero(again)[0])
        first = int(np.flatnonzero((cells == cells.iloc[i]).to_numpy())[0])
        raise DataError(f"{where(source, i)}, column {column!r}: {cells.iloc[i]!r} is listed again (first at row "
                        f"{first + 1}); each {column!r} must appear once")


def numeric_column(frame: pd.DataFrame, column: str, source: str | Path) -> np.ndarray:
    """Column as float64; a non-numeric cell raises naming its row and column."""
    values = pd.to_numeric(frame[column], errors="coerce")
    bad = values.isna() & frame[column].notna() & (frame[column].astype(str).str.strip() != "")
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"{where(source, i)}, column {column!r}: expected a number, got {frame[column].iloc[i]!r}")
    return values.to_numpy(dtype=np.float64)


def check_label_values(
    values: np.ndarray, allowed: Iterable[float], columns: list[str], rows: np.ndarray, source: str | Path
) -> None:
    """``values`` (N, K) float with NaN = blank: every non-NaN entry must be in ``allowed``.

    ``rows`` maps each of the N rows to its 0-based data row in ``source`` (rows may have been filtered).
    """
    ok = np.isnan(values) | np.isin(values, np.asarray(list(allowed), dtype=np.float64))
    if not ok.all():
        i, k = np.argwhere(~ok)[0]
        raise DataError(
            f"{where(source, int(rows[i]))}, column {columns[k]!r}: label {values[i, k]:g} is not one of "
            f"{sorted(allowed)} (blank = unknown)"
        )


def labels_from_cells(frame: pd.DataFrame, columns: list[str], source: str | Path, rows: np.ndarray) -> np.ndarray:
    """Label columns as float64 (N, K); blank cells become NaN, a non-numeric cell such as ``"yes"`` raises."""
    out = np.empty((len(frame), len(columns)), dtype=np.float64)
    for k, column in enumerate(columns):
        cells = frame[column]
        values = pd.to_numeric(cells, errors="coerce")
        bad = values.isna() & cells.notna() & (cells.astype(str).str.strip() != "")
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(
                f"{where(source, int(rows[i]))}, column {column!r}: label {cells.iloc[i]!r} is not a number "
                f"(expected 1, 0 or blank)"
            )
        out[:, k] = values.to_numpy(dtype=np.float64)
    return out


def check_boxes(
    boxes: pd.DataFrame, source: str | Path, rows: np.ndarray, width=None, height=None, tolerance: float = 1.0
) -> None:
    """Boxes ``x_min, y_min, x_max, y_max`` must be finite, non-negative, non-inverted (max > min) and, when the
    image size is known (scalars or arrays aligned with ``boxes``; NaN = unknown), inside the image up to
    ``tolerance`` pixels (annotation tools often put an edge on pixel ``W`` itself). ``rows`` gives the
    0-based data row of each box in ``source``."""
    if not len(boxes):
        return
    xy = boxes[["x_min", "y_min", "x_max", "y_max"]].to_numpy(dtype=np.float64)
    problems = [
        (~np.isfinite(xy).all(axis=1), "a coordinate is missing or not finite"),
        ((xy < -tolerance).any(axis=1), "a coordinate is negative"),
        (
            (xy[:, 2] <= xy[:, 0]) | (xy[:, 3] <= xy[:, 1]),
            "the box is empty or inverted (needs x_max > x_min and y_max > y_min)",
        ),
    ]
    if width is not None:
        w = np.broadcast_to(np.asarray(width, dtype=np.float64), (len(xy),))
        problems.append((np.nan_to_num(xy[:, 2] - w, nan=0.0) > tolerance, "x_max is beyond the image width"))
    if height is not None:
        h = np.broadcast_to(np.asarray(height, dtype=np.float64), (len(xy),))
        problems.append((np.nan_to_num(xy[:, 3] - h, nan=0.0) > tolerance, "y_max is beyond the image height"))
    for bad, reason in problems:
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            size = ""
            if width is not None or height is not None:
                w = np.broadcast_to(np.asarray(width if width is not None else np.nan, dtype=np.float64), (len(xy),))[i]
                h = np.broadcast_to(np.asarray(height if height is not None else np.nan, dtype=np.float64), (len(xy),))[i]
                size = f" for an image of width {w:g}, height {h:g}"
            raise DataError(
                f"{where(source, int(rows[i]))}: bad box (x_min, y_min, x_max, y_max) = "
                f"({', '.join(f'{v:g}' for v in xy[i])}): {reason}{size} (tolerance {tolerance:g} px)"
            )


def empty_boxes() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="object" if c == "image_id" else "float64") for c in BOX_COLUMNS})


def list_files(directory: Path) -> set[str]:
    """Names of the entries of ``directory`` (empty when it does not exist): one ``listdir`` instead of one
    ``stat`` per image, which matters for 112k NIH images on a network file system."""
    try:
        return set(os.listdir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return set()


def index_images(root: Path, image_dir: str) -> tuple[dict[str, str] | None, Path]:
    """For a glob ``image_dir`` (such as NIH's ``images_*/images``) map every file name to its full path;
    for a plain folder return ``None`` and the folder."""
    full = Path(image_dir) if Path(image_dir).is_absolute() else root / image_dir
    if not GLOB_CHARS & set(str(full)):
        return None, full
    index: dict[str, str] = {}
    for folder in sorted(glob.glob(str(full))):
        for name in list_files(Path(folder)):
            index.setdefault(name, os.path.join(folder, name))
    return index, full


def attach_paths(names: pd.Series, root: Path, image_dir: str) -> pd.Series:
    """Absolute image paths for file ``names`` under ``image_dir`` (absolute or relative to ``root``, may be a glob;
    a name absent from every globbed folder gets the path it would have in the first one)."""
    index, full = index_images(root, image_dir)
    if index is None:
        return str(full) + os.sep + names.astype(str)
    first = sorted(glob.glob(str(full)))
    fallback = (first[0] if first else str(full)) + os.sep
    return names.astype(str).map(lambda n: index.get(n, fallback + n))


def existing(paths: pd.Series) -> np.ndarray:
    """Boolean array: does each path exist (one ``listdir`` per distinct folder)."""
    paths = paths.astype(str)
    folders = paths.map(os.path.dirname)
    out = np.zeros(len(paths), dtype=bool)
    for folder, idx in folders.groupby(folders, sort=False).groups.items():
        present = list_files(Path(folder))
        pos = paths.index.get_indexer(idx)
        out[pos] = paths.iloc[pos].map(os.path.basename).isin(present).to_numpy()
    return out


def check_images(
    records: pd.DataFrame, source: str | Path, require_images: bool, skip_missing: bool, report: dict
) -> pd.DataFrame:
    """Existence check of ``records.image_path`` (no decoding). With ``skip_missing`` the missing ones are dropped
    and counted in ``report["missing_images"]``; otherwise the first missing one raises naming its path."""
    report["missing_images"] = 0
    if not require_images:
        return records
    present = existing(records["image_path"])
    if present.all():
        return records
    first = records["image_path"].iloc[int(np.flatnonzero(~present)[0])]
    if not skip_missing:
        raise DataError(
            f"{source}: image file not found: {first} ({int((~present).sum())} of {len(records)} images missing; "
            f"pass skip_missing=True to drop them, or require_images=False to read labels only)"
        )
    report["missing_images"] = int((~present).sum())
    before = len(records)
    records = records[present]
    require_nonempty(records, f"dropping missing image files (first missing: {first})", source, before)
    return records


def optional_files(stems: pd.Series, root: Path, directory: str | None, suffix: str = ".png") -> pd.Series:
    """``<directory>/<stem><suffix>`` where that file exists, else ``""`` (masks exist for some images only)."""
    if directory is None:
        return pd.Series("", index=stems.index, dtype=object)
    full = Path(directory) if Path(directory).is_absolute() else root / directory
    present = list_files(full)
    names = stems.astype(str) + suffix
    return (str(full) + os.sep + names).where(names.isin(present), "")


def strip_extension(names: pd.Series) -> pd.Series:
    """File name without its last extension (``a.b.jpg`` -> ``a.b``), vectorised."""
    return names.astype(str).str.replace(r"\.[^./\\]*$", "", regex=True)
