"""COVID-19 image data collection reader: finding strings mapped to classes, lung masks and lung boxes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from datamodules.manifest import DataError, Manifest, require_columns
from datamodules.readers import _common as C

MAGSD_CLASSES = ("COVID-19", "Viral Pneumonia", "Bacterial Pneumonia", "Normal")
_VIRAL = ("SARS", "MERS", "MERS-CoV", "Influenza", "H1N1", "Varicella", "Herpes", "Herpes pneumonia")
_BACTERIAL = (
    "Streptococcus", "Klebsiella", "Legionella", "Chlamydophila", "E.Coli", "Staphylococcus", "MRSA", "Mycoplasma",
    "Mycoplasma Bacterial Pneumonia", "Nocardia", "Bacterial", "Bacterial Pneumonia",
)
FINDING_PRESETS: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    # MAG-SD (Li et al., IEEE JBHI 2021): COVID-19 / other viral / bacterial pneumonia / normal. Fungal
    # (Pneumocystis), lipoid, aspiration, ARDS alone, tuberculosis and unspecified "Pneumonia" map to nothing.
    "magsd": (
        MAGSD_CLASSES,
        {
            "COVID-19": "COVID-19",
            **{k: "Viral Pneumonia" for k in _VIRAL},
            "Pneumonia/Viral": "Viral Pneumonia",
            **{k: "Bacterial Pneumonia" for k in _BACTERIAL},
            "Pneumonia/Bacterial": "Bacterial Pneumonia",
            "No Finding": "Normal",
        },
    ),
    # COVID-19 against every other finding, "No Finding" included.
    "covid_binary": (("COVID-19", "Other"), {"COVID-19": "COVID-19", "*": "Other"}),
}
# Placeholders in the metadata that are not findings: never matched by the "*" wildcard.
NOT_A_FINDING = ("", "todo", "unknown", "nan")
DEFAULT_VIEWS = ("PA", "AP", "AP Supine")


def match_finding(finding: str, mapping: dict[str, object]) -> object | None:
    """Value of ``mapping`` for one finding string, or None. Precedence: the exact string, the exact last
    ``/`` component (``Pneumonia/Viral/COVID-19`` -> ``COVID-19``), the longest key that is a prefix of the last
    component (``COVID-19, ARDS`` -> ``COVID-19``), the longest key that is a prefix of the whole string
    (``Pneumonia/Viral/Foo`` -> ``Pneumonia/Viral``), then the wildcard ``"*"``."""
    finding = str(finding).strip()
    if finding in mapping:
        return mapping[finding]
    last = finding.rsplit("/", 1)[-1].strip()
    if last in mapping:
        return mapping[last]
    keys = sorted((k for k in mapping if k != "*"), key=len, reverse=True)
    for text in (last, finding):
        for key in keys:
            if key and text.startswith(key):
                return mapping[key]
    if "*" in mapping and finding.lower() not in NOT_A_FINDING:
        return mapping["*"]
    return None


class COVIDChestXray:
    """Read the COVID-19 image data collection (``metadata.csv``) into a :class:`~datamodules.manifest.Manifest`.

    Cohen, Morrison, Dao, Roth, Duong, Ghassemi, "COVID-19 Image Data Collection: Prospective Predictions Are the
    Future", arXiv:2006.11988, 2020; Cohen, Morrison, Dao, "COVID-19 image data collection", arXiv:2003.11597.
    https://github.com/ieee8023/covid-chestxray-dataset (each image has its own license: ``license`` column).

    Expected layout (as the upstream repository and ``shared/data/covid-cxr-mini``)::

        root/
          metadata.csv                   # patientid, finding, view, modality, filename, ... (upstream schema)
          images/<filename>              # image_dir
          masks/<stem>.png               # mask_dir: lung masks, 0/255, same size as the image (optional)
          masks_lungvae/<stem>.png       # fallback_mask_dir: used where mask_dir has none (optional)
          boxes.csv                      # boxes_csv: filename, label, x_min, y_min, x_max, y_max[, width, height]

    ``<stem>`` is ``filename`` without its last extension. Columns used from ``metadata.csv``: ``patientid``
    (kept as a string: one is ``331b``), ``finding``, ``view``, ``modality``, ``filename``.

    Labels: ``finding`` is mapped to classes by ``finding_map`` (see :func:`match_finding`), which works for the
    flat June-2020 values (``COVID-19``, ``COVID-19, ARDS``, ``Streptococcus``) and the later hierarchical ones
    (``Pneumonia/Viral/COVID-19``). Presets: ``"magsd"`` (default; classes COVID-19, Viral Pneumonia, Bacterial
    Pneumonia, Normal = ``No Finding``; MAG-SD's code orders them viral, bacterial, COVID-19, healthy) and
    ``"covid_binary"`` (COVID-19 / Other). A dict maps a finding (or its last component, or a prefix, or ``"*"``
    for anything else) to a class name; in ``task="multilabel"`` a value may be a list of class names, and ``[]``
    keeps the image with all-negative labels. ``classes`` defaults to the preset's, or to the dict's values in
    order of appearance. Rows whose finding maps to nothing are dropped (``report["dropped_unmapped"]``) or, with
    ``strict=True``, raise. ``finding_map=None`` reads the images whatever their finding (the ``finding`` column may
    then be absent), all of one class (``classes``, default ``["X-ray"]``): for tasks that use the images and masks
    but not the labels (:class:`datamodules.lung_segmentation.LungSegmentationDataModule`).

    Choices:
        * Rows are filtered on ``modality`` (default ``X-ray``) and ``views`` (default PA, AP, AP Supine).
        * A ``filename`` listed twice (upstream has duplicated rows) keeps its first row; counted in
          ``report["dropped_duplicate"]``, or raises with ``strict=True``.
        * The lung masks are organ masks (``mask_path``); ``attention_mask_path`` is filled only from
          ``attention_mask_dir`` (the data has no lesion masks).
        * Lung boxes are anatomy, not findings: each box's ``class_index`` is the *image's* class (the lungs are
          where the finding is sought), and the box's own ``label`` (``Right Lung`` = patient's right = image
          left, ``Left Lung``) is kept in the ``region`` column. Boxes are in image pixels, checked against the
          CSV's ``width``/``height`` when present (1 px tolerance).

    Example:
        >>> reader = COVIDChestXray("/data/covid-chestxray-dataset", fallback_mask_dir="masks_lungvae")  # doctest: +SKIP
        >>> manifest = reader.load(); reader.report["dropped_unmapped"]                                 # doctest: +SKIP
    """

    def __init__(
        self,
        root: str | Path,
        metadata: str = "metadata.csv",
        image_dir: str = "images",
        finding_map: str | dict[str, str | list[str]] | None = "magsd",
        classes: list[str] | None = None,
        task: str = "multiclass",
        views: list[str] | None = DEFAULT_VIEWS,
        modality: str | None = "X-ray",
        mask_dir: str | None = "masks",
        fallback_mask_dir: str | None = None,
        attention_mask_dir: str | None = None,
        mask_suffix: str = ".png",
        boxes_csv: str | None = "boxes.csv",
        strict: bool = False,
        require_images: bool = True,
        skip_missing: bool = False,
    ) -> None:
        self.root = Path(root)
        self.metadata = metadata
        self.image_dir = image_dir
        if finding_map is None:  # every image, one class: the labels are not used
            self.classes = list(classes) if classes else ["X-ray"]
            if len(self.classes) != 1:
                raise ValueError(f"COVIDChestXray: finding_map=None reads one class, got classes={self.classes}")
            mapping = {"*": self.classes[0]}
        elif isinstance(finding_map, str):
            if finding_map not in FINDING_PRESETS:
                raise ValueError(
                    f"COVIDChestXray: unknown finding_map preset {finding_map!r}; use {list(FINDING_PRESETS)} or a dict"
                )
            preset_classes, mapping = FINDING_PRESETS[finding_map]
            self.classes = list(preset_classes) if classes is None else list(classes)
        else:
            mapping = dict(finding_map)
            seen = [c for v in mapping.values() for c in ([v] if isinstance(v, str) else v)]
            self.classes = list(dict.fromkeys(seen)) if classes is None else list(classes)
        if task not in ("multiclass", "multilabel"):
            raise ValueError(f"COVIDChestXray: task must be 'multiclass' or 'multilabel', got {task!r}")
        self.task = task
        self.label_findings = finding_map is not None
        self.finding_map = {}
        for key, value in mapping.items():
            targets = [value] if isinstance(value, str) else list(value)
            unknown = [t for t in targets if t not in self.classes]
            if unknown:
                # A preset restricted by `classes` simply drops the classes left out.
                if isinstance(finding_map, str):
                    continue
                raise ValueError(f"COVIDChestXray: finding_map[{key!r}] -> {unknown}, not in classes {self.classes}")
            if task == "multiclass" and len(targets) != 1:
                raise ValueError(f"COVIDChestXray: finding_map[{key!r}] must name exactly one class when task='multiclass'")
            self.finding_map[key] = targets
        if not self.classes:
            raise ValueError("COVIDChestXray: no classes")
        self.views = None if views is None else list(views)
        self.modality = modality
        self.mask_dir = mask_dir
        self.fallback_mask_dir = fallback_mask_dir
        self.attention_mask_dir = attention_mask_dir
        self.mask_suffix = mask_suffix
        self.boxes_csv = boxes_csv
        self.strict = strict
        self.require_images = require_images
        self.skip_missing = skip_missing
        self.report: dict[str, int] = {}

    # ------------------------------------------------------------------------------------------------------------
    def load(self) -> Manifest:
        self.report = {}
        path = Path(self.metadata) if Path(self.metadata).is_absolute() else self.root / self.metadata
        meta = C.read_csv(path, "COVID metadata", dtype={"patientid": str, "filename": str, "finding": str})
        require_columns(meta, ["patientid", "finding", "filename"] if self.label_findings else ["patientid", "filename"],
                        path)
        meta["_row"] = np.arange(len(meta))
        self.report["rows"] = len(meta)

        filters = []
        if self.modality is not None:
            filters.append(("modality", [self.modality], f"modality={self.modality!r}"))
        if self.views is not None:
            filters.append(("view", self.views, f"the view filter views={self.views}"))
        for column, allowed, what in filters:
            require_columns(meta, [column], path)
            before = len(meta)
            meta = meta[meta[column].astype(str).str.strip().isin(allowed)]
            C.require_nonempty(meta, what, path, before)
            self.report[f"dropped_{column}"] = before - len(meta)

        targets = self._map_findings(meta, path)
        before = len(meta)
        mapped = targets.notna().to_numpy()
        meta, targets = meta[mapped], targets[mapped]
        self.report["dropped_unmapped"] = before - len(meta)
        C.require_nonempty(meta, f"mapping findings to classes {self.classes}", path, before)

        names = meta["filename"].astype(str).str.strip()
        duplicate = names.duplicated().to_numpy()
        if duplicate.any() and self.strict:
            i = int(meta["_row"].to_numpy()[np.flatnonzero(duplicate)[0]])
            raise DataError(f"{C.where(path, i)}, column 'filename': {names.iloc[np.flatnonzero(duplicate)[0]]!r} listed twice")
        meta, targets, names = meta[~duplicate], targets[~duplicate], names[~duplicate]
        self.report["dropped_duplicate"] = int(duplicate.sum())

        index = {c: k for k, c in enumerate(self.classes)}
        labels = np.zeros((len(meta), len(self.classes)), dtype=np.float32)
        for i, classes in enumerate(targets.to_numpy()):  # one short list per image, no pandas call inside
            labels[i, [index[c] for c in classes]] = 1.0

        records = self._records(meta, names)
        keep = C.check_images(
            records.assign(_pos=np.arange(len(records))), path, self.require_images, self.skip_missing, self.report
        )["_pos"].to_numpy()
        records, labels = records.iloc[keep].reset_index(drop=True), labels[keep]
        boxes = self._boxes(records, labels)
        self.report["images"] = len(records)
        self.report["masks"] = int((records["mask_path"] != "").sum())
        self.report["boxes"] = len(boxes)
        return Manifest(records, labels, list(self.classes), boxes, self.task, str(path),
                        str(getattr(self, "_boxes_path", "") or ""))

    def _map_findings(self, meta: pd.DataFrame, path: Path) -> pd.Series:
        """Per row: the list of class names, or None when the finding maps to nothing (mapped once per value)."""
        if not self.label_findings:  # finding_map=None: every row, the one class
            return pd.Series([self.finding_map["*"]] * len(meta), index=meta.index, dtype=object)
        findings = meta["finding"].fillna("").astype(str).str.strip()
        table = {f: match_finding(f, self.finding_map) for f in findings.unique()}
        targets = findings.map(table)
        if self.strict and targets.isna().any():
            i = int(np.flatnonzero(targets.isna().to_numpy())[0])
            raise DataError(
                f"{C.where(path, int(meta['_row'].iloc[i]))}, column 'finding': {findings.iloc[i]!r} maps to no class "
                f"of {self.classes} (finding_map keys: {list(self.finding_map)})"
            )
        return targets

    def _records(self, meta: pd.DataFrame, names: pd.Series) -> pd.DataFrame:
        stems = C.strip_extension(names)
        mask = C.optional_files(stems, self.root, self.mask_dir, self.mask_suffix)
        source = pd.Series(np.where(mask != "", self.mask_dir or "", ""), index=mask.index)
        if self.fallback_mask_dir is not None:
            fallback = C.optional_files(stems, self.root, self.fallback_mask_dir, self.mask_suffix)
            use = (mask == "") & (fallback != "")
            mask, source = mask.where(~use, fallback), source.where(~use, self.fallback_mask_dir)
        records = pd.DataFrame(
            {
                "image_id": names,
                "image_path": C.attach_paths(names, self.root, self.image_dir),
                "patient_id": meta["patientid"].astype(str).str.strip(),
                "mask_path": mask,
                "mask_source": source,
                "attention_mask_path": C.optional_files(stems, self.root, self.attention_mask_dir, self.mask_suffix),
            }
        )
        for column in ("finding", "view", "modality", "offset", "sex", "age", "license"):
            if column in meta.columns:
                records[column] = meta[column].to_numpy()
        records["source_row"] = meta["_row"].to_numpy()
        return records.reset_index(drop=True)

    def _boxes(self, records: pd.DataFrame, labels: np.ndarray) -> pd.DataFrame:
        self.report.update(boxes_read=0, boxes_dropped_no_image=0)
        self._boxes_path = None
        if self.boxes_csv is None:
            return C.empty_boxes()
        path = Path(self.boxes_csv) if Path(self.boxes_csv).is_absolute() else self.root / self.boxes_csv
        if not path.is_file():
            return C.empty_boxes()
        table = C.read_csv(path, "COVID boxes", dtype={"filename": str, "label": str})
        require_columns(table, ["filename", "x_min", "y_min", "x_max", "y_max"], path)
        rows = np.arange(len(table))
        boxes = pd.DataFrame({"image_id": table["filename"].astype(str).str.strip()})
        for column in ("x_min", "y_min", "x_max", "y_max"):
            boxes[column] = C.numeric_column(table, column, path)
        width = C.numeric_column(table, "width", path) if "width" in table.columns else None
        height = C.numeric_column(table, "height", path) if "height" in table.columns else None
        C.check_boxes(boxes, path, rows, width, height)
        for column, size in (("frame_width", width), ("frame_height", height)):  # the size the boxes were drawn on
            boxes[column] = np.nan if size is None else size
        boxes["region"] = table["label"].astype(str).to_numpy() if "label" in table.columns else ""
        boxes["source_row"] = rows
        self._boxes_path = path
        self.report["boxes_read"] = len(boxes)

        position = pd.Series(np.arange(len(records)), index=records["image_id"].to_numpy())
        known = boxes["image_id"].isin(position.index).to_numpy()
        self.report["boxes_dropped_no_image"] = int((~known).sum())
        boxes = boxes[known]
        # One box row per positive class of its image (exactly one in multiclass).
        img, cls = np.nonzero(labels[boxes["image_id"].map(position).to_numpy(dtype=np.int64)] == 1)
        out = boxes.iloc[img].copy()
        out["class_index"] = cls.astype(np.int64)
        self.report["boxes_dropped_no_class"] = int(len(boxes) - len(np.unique(img)))
        columns = ["image_id", "class_index", "x_min", "y_min", "x_max", "y_max", "frame_width", "frame_height",
                   "region", "source_row"]
        return out[columns].reset_index(drop=True)
