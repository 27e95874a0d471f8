"""NIH ChestX-ray14 reader: 14 image-level findings, 984 hand-drawn boxes, official train_val/test lists."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from datamodules.manifest import DataError, Manifest, require_columns
from datamodules.readers import _common as C

NIH_CLASSES = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)
NO_FINDING = "No Finding"
# BBox_List_2017.csv spells one finding differently from Data_Entry.
BBOX_ALIASES = {"Infiltrate": "Infiltration"}
ENTRY_COLUMNS = ["Image Index", "Finding Labels", "Patient ID"]
# The header "Bbox [x,y,w,h]" is split by the CSV reader at its commas.
BBOX_COLUMNS = ["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]"]


class NIHChestXray14:
    """Read NIH ChestX-ray14 into a :class:`~datamodules.manifest.Manifest`.

    Wang et al., "ChestX-ray8: Hospital-scale Chest X-ray Database and Benchmarks on Weakly-Supervised
    Classification and Localization of Common Thorax Diseases", CVPR 2017. https://nihcc.app.box.com/v/ChestXray-NIHCC
    (NIH asks for this citation and an acknowledgement of the NIH Clinical Center.)

    Expected layout (every name configurable; relative names are under ``root``)::

        root/
          Data_Entry_2017.csv or Data_Entry_2017_v2020.csv   # data_entry (glob; must match exactly one file)
          BBox_List_2017.csv                                   # bbox_list (None = no boxes; absent = a warning)
          train_val_list.txt, test_list.txt                    # official split (needed for an official test split)
          images/00000001_000.png ...                          # image_dir; a glob such as "images_*/images"
                                                               # reads the 12-archive layout of the NIH release
          masks/<image stem>.png, lesion_masks/<stem>.png      # mask_dir / attention_mask_dir (optional)

    ``Data_Entry`` columns used: ``Image Index``, ``Finding Labels`` (``|``-separated findings or ``No Finding``),
    ``Patient ID``; kept when present: ``View Position``, ``Follow-up #``, ``Patient Age``, ``Patient Gender`` and
    ``OriginalImage[Width``/``Height]`` (the header name holds a comma, so a CSV reader splits it in two).
    ``BBox_List_2017.csv``: ``Image Index, Finding Label, Bbox [x, y, w, h]`` (again split at its commas, plus
    empty trailing columns). Its ``Infiltrate`` is mapped to Data_Entry's ``Infiltration``.

    Choices:
        * Gzipped label files as NIH ships them (``Data_Entry_2017_v2020.csv.gz``, ``BBox_List_2017.csv.gz``) are
          found by the default names (``<name>.gz`` is tried when ``<name>`` matches nothing) and read as they are.
        * A missing box file is a loud ``UserWarning`` naming the path (and ``report["box_file_missing"] = 1``):
          0 boxes silently would turn a localisation run into a classification run. ``bbox_list=None`` means
          "no boxes" and is silent.
        * ``No Finding`` is an all-zero row; there is no "No Finding" class. Findings outside ``classes`` are
          ignored; a finding that is not one of the 14 raises (it is a typo or a different file).
        * Boxes are ``xywh`` in pixels of the released 1024x1024 PNGs (``OriginalImage[Width,Height]`` is the
          size *before* NIH downsampled them, so it is not the box frame); they become ``x_min..y_max`` and are
          checked to lie in ``image_size`` (1 px tolerance). Boxes on images that are not in the records (for
          example after a view filter) or of classes not in ``classes`` are dropped and counted in ``report``.
        * ``records.official_split`` is ``"train_val"``, ``"test"`` or ``""`` (lists absent or image in neither);
          ``official_test_ids`` is the set of test image ids (empty without ``test_list.txt``);
          ``official_split_sources`` maps each list file it looked for to what it found there, so that
          ``CXRDataModule(use_official_test_split=True)`` can name them when the official test split is empty.

    Args:
        root: dataset folder.
        data_entry: label CSV name or glob. bbox_list: box CSV name, or None.
        image_dir: image folder (or glob of folders). classes: subset/order of the 14 findings (default all 14
            in the order of Wang et al.). mask_dir / attention_mask_dir: folders of ``<stem>.png`` masks; records
            get ``mask_path`` / ``attention_mask_path`` (``""`` where no file exists).
        view_positions: keep only these ``View Position`` values (e.g. ``["PA"]``); None keeps all.
        require_images: check at load time that every image file exists (no decoding). False reads labels only.
        skip_missing: drop missing images instead of raising; the count is ``report["missing_images"]``.
        box_images_only: keep only images that have at least one (kept) box.
        image_size: ``(width, height)`` or an int for square images: the box frame; ``"original"`` takes each
            image's ``OriginalImage[Width,Height]`` (for data re-saved at that size); None skips the range check.
        train_val_list / test_list: official split files (None or absent = no official split).

    Example:
        >>> reader = NIHChestXray14("/data/nih", view_positions=["PA"])          # doctest: +SKIP
        >>> manifest = reader.load(); manifest.labels.shape, reader.report       # doctest: +SKIP
    """

    def __init__(
        self,
        root: str | Path,
        data_entry: str = "Data_Entry_2017*.csv",
        bbox_list: str | None = "BBox_List_2017.csv",
        image_dir: str = "images",
        classes: list[str] | None = None,
        mask_dir: str | None = None,
        attention_mask_dir: str | None = None,
        view_positions: list[str] | None = None,
        require_images: bool = True,
        skip_missing: bool = False,
        box_images_only: bool = False,
        image_size: int | tuple[int, int] | str | None = 1024,
        train_val_list: str | None = "train_val_list.txt",
        test_list: str | None = "test_list.txt",
    ) -> None:
        self.root = Path(root)
        self.data_entry = data_entry
        self.bbox_list = bbox_list
        self.image_dir = image_dir
        self.classes = C.chosen_classes("NIHChestXray14", classes, NIH_CLASSES)
        self.mask_dir = mask_dir
        self.attention_mask_dir = attention_mask_dir
        self.view_positions = None if view_positions is None else list(view_positions)
        self.require_images = require_images
        self.skip_missing = skip_missing
        self.box_images_only = box_images_only
        if isinstance(image_size, str) and image_size != "original":
            raise ValueError(
                f"NIHChestXray14: image_size must be an int, (width, height), 'original' or None; got {image_size!r}"
            )
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else image_size
        self.train_val_list = train_val_list
        self.test_list = test_list
        self.report: dict[str, int] = {}
        self.official_test_ids: set[str] = set()
        self.official_split_sources: dict[str, str] = {}

    # ------------------------------------------------------------------------------------------------------------
    def load(self) -> Manifest:
        self.report = {}
        entry_path = C.resolve_one(self.root, C.or_gz(self.root, self.data_entry),
                                   f"NIH Data_Entry (tried {self.data_entry} and {self.data_entry}.gz)")
        entry = C.read_csv(entry_path, "NIH Data_Entry", dtype={"Image Index": str, "Patient ID": str})
        require_columns(entry, ENTRY_COLUMNS, entry_path)
        C.require_unique(entry, "Image Index", entry_path)  # else pandas fails later with InvalidIndexError
        entry["_row"] = np.arange(len(entry))
        self.report["rows"] = len(entry)

        if self.view_positions is not None:
            require_columns(entry, ["View Position"], entry_path)
            before = len(entry)
            entry = entry[entry["View Position"].isin(self.view_positions)]
            C.require_nonempty(entry, f"the view filter view_positions={self.view_positions}", entry_path, before)
        self.report["dropped_view"] = self.report["rows"] - len(entry)

        records = self._records(entry, entry_path)
        labels = self._labels(entry, entry_path)
        boxes = self._boxes(records)
        if self.box_images_only:
            before = len(records)
            keep = records["image_id"].isin(set(boxes["image_id"])).to_numpy()
            records, labels = records[keep], labels[keep]
            C.require_nonempty(records, "box_images_only=True (images with a kept box)", entry_path, before)

        keep_index = C.check_images(
            records.assign(_pos=np.arange(len(records))), entry_path, self.require_images, self.skip_missing, self.report
        )["_pos"].to_numpy()
        records, labels = records.iloc[keep_index], labels[keep_index]
        boxes = boxes[boxes["image_id"].isin(set(records["image_id"]))].reset_index(drop=True)
        # A box should mark a finding the image is labelled with; count (not raise) the exceptions.
        position = pd.Series(np.arange(len(records)), index=records["image_id"].to_numpy())
        box_row = boxes["image_id"].map(position).to_numpy(dtype=np.int64)
        box_label = labels[box_row, boxes["class_index"].to_numpy(dtype=np.int64)]
        self.report["boxes_label_not_positive"] = int((box_label != 1).sum())
        self.report["images"] = len(records)
        self.report["boxes"] = len(boxes)
        return Manifest(records.reset_index(drop=True), labels, list(self.classes), boxes, "multilabel", str(entry_path),
                        boxes_source=self._box_path)

    # ------------------------------------------------------------------------------------------------------------
    def _records(self, entry: pd.DataFrame, source: Path) -> pd.DataFrame:
        names = entry["Image Index"].astype(str).str.strip()
        stems = C.strip_extension(names)
        records = pd.DataFrame(
            {
                "image_id": names,
                "image_path": C.attach_paths(names, self.root, self.image_dir),
                "patient_id": entry["Patient ID"].astype(str).str.strip(),
                "mask_path": C.optional_files(stems, self.root, self.mask_dir),
                "attention_mask_path": C.optional_files(stems, self.root, self.attention_mask_dir),
            }
        )
        extra = {
            "View Position": "view", "Follow-up #": "follow_up", "Patient Age": "age", "Patient Gender": "sex",
            "OriginalImage[Width": "original_width", "Height]": "original_height",
        }
        for column, name in extra.items():
            if column in entry.columns:
                records[name] = entry[column].to_numpy()
        records["official_split"] = self._official_split(names)
        records["source_row"] = entry["_row"].to_numpy()
        return records

    def _official_split(self, names: pd.Series) -> np.ndarray:
        split = np.full(len(names), "", dtype=object)
        self.official_split_sources = {}
        self.official_test_ids = set()
        for filename, value in ((self.train_val_list, "train_val"), (self.test_list, "test")):
            if filename is None:
                continue
            path = Path(filename) if Path(filename).is_absolute() else self.root / filename
            if not path.is_file():
                self.official_split_sources[str(path)] = "missing"
                continue
            ids = set(path.read_text().split())
            found = int(names.isin(ids).sum())
            self.official_split_sources[str(path)] = f"{len(ids)} ids, {found} of them among the {len(names)} records"
            if value == "test":
                self.official_test_ids = ids
            split[names.isin(ids).to_numpy()] = value
        return split

    def _labels(self, entry: pd.DataFrame, source: Path) -> np.ndarray:
        findings = entry["Finding Labels"]
        blank = findings.isna() | (findings.astype(str).str.strip() == "")
        if blank.any():
            i = int(entry["_row"].to_numpy()[np.flatnonzero(blank.to_numpy())[0]])
            raise DataError(f"{C.where(source, i)}, column 'Finding Labels': empty (use 'No Finding' for no finding)")
        # ~800 distinct label strings among 112k rows: parse each distinct string once, then gather.
        codes, uniques = pd.factorize(findings.astype(str))
        dummies = pd.Series(uniques).str.replace(r"\s*\|\s*", "|", regex=True).str.strip().str.get_dummies(sep="|")
        unknown = [c for c in dummies.columns if c not in NIH_CLASSES and c != NO_FINDING]
        if unknown:
            first_code = int(np.flatnonzero(dummies[unknown[0]].to_numpy())[0])
            i = int(entry["_row"].to_numpy()[np.flatnonzero(codes == first_code)[0]])
            raise DataError(
                f"{C.where(source, i)}, column 'Finding Labels': unknown finding {unknown[0]!r}; expected "
                f"'|'-separated values from {list(NIH_CLASSES)} or {NO_FINDING!r}"
            )
        return dummies.reindex(columns=self.classes, fill_value=0).to_numpy(dtype=np.float32)[codes]

    def _boxes(self, records: pd.DataFrame) -> pd.DataFrame:
        self.report.update(boxes_read=0, boxes_dropped_class=0, boxes_dropped_no_image=0, box_file_missing=0)
        self._box_path = ""  # the box file, named by the manifest's box checks
        if self.bbox_list is None:
            return C.empty_boxes()
        name = C.or_gz(self.root, self.bbox_list)
        path = Path(name) if Path(name).is_absolute() else self.root / name
        if not path.is_file():
            self.report["box_file_missing"] = 1
            warnings.warn(
                f"NIHChestXray14: the label file was found but the box file is not: no {path} (nor {path}.gz). "
                f"Reading 0 boxes, so there is no box stream and no localisation metric. Put BBox_List_2017.csv "
                f"there, point bbox_list at it, or pass bbox_list=None to say there are no boxes.",
                UserWarning, stacklevel=3,
            )
            return C.empty_boxes()
        self._box_path = str(path)
        table = C.read_csv(path, "NIH BBox_List", dtype={"Image Index": str, "Finding Label": str})
        require_columns(table, BBOX_COLUMNS, path)
        rows = np.arange(len(table))
        self.report["boxes_read"] = len(table)
        x, y = C.numeric_column(table, "Bbox [x", path), C.numeric_column(table, "y", path)
        w, h = C.numeric_column(table, "w", path), C.numeric_column(table, "h]", path)
        label = table["Finding Label"].astype(str).str.strip().replace(BBOX_ALIASES)
        unknown = ~label.isin(NIH_CLASSES)
        if unknown.any():
            i = int(np.flatnonzero(unknown.to_numpy())[0])
            raise DataError(
                f"{C.where(path, i)}, column 'Finding Label': unknown finding {table['Finding Label'].iloc[i]!r}; "
                f"expected one of {list(NIH_CLASSES)} (or 'Infiltrate')"
            )
        boxes = pd.DataFrame(
            {
                "image_id": table["Image Index"].astype(str).str.strip(),
                "class_name": label,
                "x_min": x, "y_min": y, "x_max": x + w, "y_max": y + h,
            }
        )
        if self.image_size == "original":
            # Per-image size from Data_Entry (right for re-saved datasets such as datamodules.synthetic; for the
            # NIH release it is the pre-downsampling size, a loose bound). Boxes of unlisted images are not checked.
            if "original_width" not in records.columns or "original_height" not in records.columns:
                raise DataError(f"{path}: image_size='original' needs the Data_Entry columns 'OriginalImage[Width', 'Height]'")
            size = records.set_index("image_id")[["original_width", "original_height"]].apply(pd.to_numeric, errors="coerce")
            width = boxes["image_id"].map(size["original_width"]).to_numpy(dtype=np.float64)
            height = boxes["image_id"].map(size["original_height"]).to_numpy(dtype=np.float64)
        else:
            width, height = (None, None) if self.image_size is None else self.image_size
        C.check_boxes(boxes, path, rows, width, height)
        in_class = boxes["class_name"].isin(self.classes).to_numpy()
        in_records = boxes["image_id"].isin(set(records["image_id"])).to_numpy()
        self.report["boxes_dropped_class"] = int((~in_class).sum())
        self.report["boxes_dropped_no_image"] = int((in_class & ~in_records).sum())
        boxes = boxes[in_class & in_records].copy()
        boxes["class_index"] = boxes["class_name"].map({c: i for i, c in enumerate(self.classes)}).astype(np.int64)
        boxes["source_row"] = rows[in_class & in_records]
        columns = ["image_id", "class_index", "x_min", "y_min", "x_max", "y_max", "class_name", "source_row"]
        return boxes[columns].reset_index(drop=True)
