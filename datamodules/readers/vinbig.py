"""VinBigData chest X-ray abnormalities reader: boxes from several radiologists per image, optionally fused."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd

from datamodules.manifest import DataError, Manifest, require_columns
from datamodules.readers import _common as C

VINBIG_CLASSES = (
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Consolidation", "ILD", "Infiltration",
    "Lung Opacity", "Nodule/Mass", "Other lesion", "Pleural effusion", "Pleural thickening", "Pneumothorax",
    "Pulmonary fibrosis",
)
NO_FINDING = "No finding"
COLUMNS = ["image_id", "class_name", "rad_id", "x_min", "y_min", "x_max", "y_max"]


class VinBigData:
    """Read VinBigData ``train.csv`` (one row per radiologist finding) into a :class:`~datamodules.manifest.Manifest`.

    Nguyen et al., "VinDr-CXR: An open dataset of chest X-rays with radiologist's annotations", Scientific Data
    9, 429 (2022); Kaggle "VinBigData Chest X-ray Abnormalities Detection" (2020). PhysioNet credentialed licence.

    Expected layout::

        root/
          train.csv            # image_id, class_name, class_id, rad_id, x_min, y_min, x_max, y_max
          train/<image_id>.png # image_dir / image_id + image_ext (convert the DICOMs first: the loader reads PNG/JPEG)
          sizes.csv            # optional size_csv: image_id, width, height (or Kaggle meta's dim1, dim0)

    ``No finding`` rows have no box. Boxes are in pixels of the original DICOM; if the image files were resized,
    rescale the boxes first (this reader does not guess the resize rule).

    Choices:
        * Image labels: a class is positive when ``label_rule="any"`` radiologist marked it (default) or, with
          ``"majority"``, more than half of the radiologists who read that image did.
        * ``merge="all"`` keeps every radiologist's box (duplicates included; ``rad_id`` is kept in the box table).
          ``merge="wbf"`` fuses them per image and class with weighted boxes fusion (Solovyev et al., Image and
          Vision Computing 2021) from the ``ensemble_boxes`` package (``pip install ensemble-boxes``; not a core
          dependency), IoU threshold ``wbf_iou``, every radiologist weighted equally. WBF works in [0, 1]
          coordinates; boxes are divided by the image size from ``size_csv`` or, without it, by the image's
          largest coordinate (IoU is unchanged by per-axis scaling, so the fusion is the same) and scaled back.
        * VinBigData has no patient ids: every image is its own patient.

    Example:
        >>> manifest = VinBigData("/data/vinbig", merge="all").load()   # doctest: +SKIP
    """

    def __init__(
        self,
        root: str | Path,
        csv: str = "train.csv",
        image_dir: str = "train",
        image_ext: str = ".png",
        classes: list[str] | None = None,
        merge: str = "all",
        wbf_iou: float = 0.4,
        label_rule: str = "any",
        size_csv: str | None = None,
        require_images: bool = True,
        skip_missing: bool = False,
    ) -> None:
        self.root = Path(root)
        self.csv = csv
        self.image_dir = image_dir
        self.image_ext = image_ext
        self.classes = C.chosen_classes("VinBigData", classes, VINBIG_CLASSES)
        C.check_choice("VinBigData", "merge", merge, ("all", "wbf"))
        if merge == "wbf" and importlib.util.find_spec("ensemble_boxes") is None:
            raise ImportError(
                "VinBigData(merge='wbf') needs the ensemble_boxes library, which is not installed: "
                "pip install ensemble-boxes (or use merge='all')"
            )
        C.check_choice("VinBigData", "label_rule", label_rule, ("any", "majority"))
        self.merge = merge
        self.wbf_iou = wbf_iou
        self.label_rule = label_rule
        self.size_csv = size_csv
        self.require_images = require_images
        self.skip_missing = skip_missing
        self.report: dict[str, int] = {}

    def load(self) -> Manifest:
        self.report = {}
        path = Path(self.csv) if Path(self.csv).is_absolute() else self.root / self.csv
        table = C.read_csv(path, "VinBigData CSV", dtype={"image_id": str, "class_name": str, "rad_id": str})
        require_columns(table, COLUMNS, path)
        table["_row"] = np.arange(len(table))
        self.report["rows"] = len(table)
        name = table["class_name"].astype(str).str.strip()
        unknown = ~name.isin([*VINBIG_CLASSES, NO_FINDING])
        if unknown.any():
            i = int(np.flatnonzero(unknown.to_numpy())[0])
            raise DataError(f"{C.where(path, i)}, column 'class_name': unknown class {name.iloc[i]!r}; expected one of "
                            f"{list(VINBIG_CLASSES)} or {NO_FINDING!r}")  # fmt: skip
        table["class_name"] = name
        image_ids = pd.Index(pd.unique(table["image_id"].astype(str).str.strip()))
        table["image_id"] = table["image_id"].astype(str).str.strip()

        findings = table[table["class_name"] != NO_FINDING]
        boxes = findings[["image_id", "x_min", "y_min", "x_max", "y_max"]].copy()
        boxes["source_row"] = findings["_row"].to_numpy()
        for column in ("x_min", "y_min", "x_max", "y_max"):
            boxes[column] = C.numeric_column(findings, column, path)
        width, height = self._sizes(boxes["image_id"])
        C.check_boxes(boxes, path, findings["_row"].to_numpy(), width, height)

        labels = self._labels(findings, table, image_ids)
        records = pd.DataFrame({
            "image_id": image_ids,
            "image_path": C.attach_paths(pd.Series(image_ids + self.image_ext), self.root, self.image_dir),
            "patient_id": image_ids,
        })  # fmt: skip
        keep = C.check_images(
            records.assign(_pos=np.arange(len(records))), path, self.require_images, self.skip_missing, self.report
        )["_pos"].to_numpy()
        records, labels = records.iloc[keep].reset_index(drop=True), labels[keep]

        boxes["class_name"] = findings["class_name"].to_numpy()
        boxes["rad_id"] = findings["rad_id"].astype(str).to_numpy()
        boxes = boxes[boxes["class_name"].isin(self.classes) & boxes["image_id"].isin(set(records["image_id"]))]
        boxes["class_index"] = boxes["class_name"].map({c: k for k, c in enumerate(self.classes)}).astype(np.int64)
        self.report["boxes_read"] = len(boxes)
        if self.merge == "wbf":
            boxes = self._fuse(boxes, width is not None and self.size_csv is not None)
        self.report["images"], self.report["boxes"] = len(records), len(boxes)
        # size_csv holds the DICOM size the boxes were drawn on: CXRDataModule refuses a file decoding to another size
        frame = self._sizes(boxes["image_id"]) if self.size_csv is not None else (np.nan, np.nan)
        boxes = boxes.assign(frame_width=frame[0], frame_height=frame[1])
        if "source_row" not in boxes.columns:  # fused boxes come from several rows
            boxes["source_row"] = np.nan
        columns = ["image_id", "class_index", "x_min", "y_min", "x_max", "y_max", "rad_id", "frame_width",
                   "frame_height", "source_row"]
        return Manifest(records, labels, list(self.classes), boxes[columns].reset_index(drop=True), "multilabel",
                        str(path), str(path))

    def _labels(self, findings: pd.DataFrame, table: pd.DataFrame, image_ids: pd.Index) -> np.ndarray:
        """(N, K) counts of distinct radiologists per image and class, thresholded by ``label_rule``."""
        votes = (
            findings[findings["class_name"].isin(self.classes)]
            .drop_duplicates(["image_id", "class_name", "rad_id"])
            .groupby(["image_id", "class_name"]).size().unstack(fill_value=0)
            .reindex(index=image_ids, columns=self.classes, fill_value=0)
        )  # fmt: skip
        if self.label_rule == "any":
            return (votes.to_numpy() >= 1).astype(np.float32)
        readers = table.groupby("image_id")["rad_id"].nunique().reindex(image_ids).to_numpy()
        return (votes.to_numpy() > readers[:, None] / 2).astype(np.float32)

    def _sizes(self, image_id: pd.Series):
        if self.size_csv is None:
            return None, None
        path = Path(self.size_csv) if Path(self.size_csv).is_absolute() else self.root / self.size_csv
        sizes = C.read_csv(path, "VinBigData sizes", dtype={"image_id": str})
        if "width" not in sizes.columns and {"dim0", "dim1"} <= set(sizes.columns):
            sizes = sizes.rename(columns={"dim1": "width", "dim0": "height"})  # Kaggle meta: dim0 = rows
        require_columns(sizes, ["image_id", "width", "height"], path)
        sizes = sizes.set_index(sizes["image_id"].astype(str).str.strip())
        return (image_id.map(sizes["width"]).to_numpy(dtype=np.float64),
                image_id.map(sizes["height"]).to_numpy(dtype=np.float64))  # fmt: skip

    def _fuse(self, boxes: pd.DataFrame, known_size: bool) -> pd.DataFrame:
        """Weighted boxes fusion per image (the library groups by label itself)."""
        wbf = importlib.import_module("ensemble_boxes").weighted_boxes_fusion
        sizes = self._sizes(boxes["image_id"]) if known_size else (None, None)
        boxes = boxes.assign(_w=sizes[0], _h=sizes[1]) if known_size else boxes
        out = []
        xy = ["x_min", "y_min", "x_max", "y_max"]
        for image_id, group in boxes.groupby("image_id", sort=False):  # a library call per image: no vectorised form
            if known_size:
                scale = np.array([group["_w"].iloc[0], group["_h"].iloc[0]] * 2, dtype=np.float64)
            else:
                scale = np.array([group["x_max"].max(), group["y_max"].max()] * 2, dtype=np.float64)
            per_rad = [g for _, g in group.groupby("rad_id", sort=True)]
            fused, _, labels = wbf(
                [g[xy].to_numpy(np.float64) / scale for g in per_rad], [np.ones(len(g)) for g in per_rad],
                [g["class_index"].to_numpy() for g in per_rad], iou_thr=self.wbf_iou, skip_box_thr=0.0,
            )  # fmt: skip
            fused = np.asarray(fused, dtype=np.float64).reshape(-1, 4) * scale
            out.append(pd.DataFrame({"image_id": image_id, "class_index": np.asarray(labels).astype(np.int64),
                                     **{c: fused[:, k] for k, c in enumerate(xy)}, "rad_id": "wbf"}))  # fmt: skip
        if not out:
            return boxes.iloc[:0]
        return pd.concat(out, ignore_index=True)
