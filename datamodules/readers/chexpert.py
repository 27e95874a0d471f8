"""CheXpert reader: 14 observations with uncertain (-1) and blank labels, per-class uncertainty policies."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from datamodules.manifest import DataError, Manifest, require_columns
from datamodules.readers import _common as C

CHEXPERT_CLASSES = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
    "Support Devices",
)
# The five tasks of the CheXpert competition, in the order of Irvin et al. (and of PCAM).
COMPETITION_CLASSES = ("Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Pleural Effusion")
POLICY_VALUES = {"ones": 1.0, "zeros": 0.0, "ignore": math.nan}
# PCAM (Ye et al., arXiv:2005.14480; /work/shared/research/method-pcam.md a.7): U-Ones where the CheXpert paper
# found them best (Edema, Atelectasis), U-Zeros elsewhere; blanks are 0 in PCAM.
UNCERTAINTY_PRESETS = {
    "pcam": {
        "Cardiomegaly": "zeros", "Edema": "ones", "Consolidation": "zeros", "Atelectasis": "ones",
        "Pleural Effusion": "zeros",
    },
}


def _policy_name(policy: str) -> str:
    """``"U-Ones"``, ``"u_ones"``, ``"ones"`` ... -> ``"ones"``."""
    name = str(policy).strip().lower().replace("_", "-")
    name = name[2:] if name.startswith("u-") else name
    if name not in POLICY_VALUES:
        raise ValueError(f"CheXpert: unknown uncertainty policy {policy!r}; use one of U-Ones, U-Zeros, U-Ignore")
    return name


class CheXpert:
    """Read CheXpert ``train.csv`` / ``valid.csv`` into a :class:`~datamodules.manifest.Manifest`.

    Irvin et al., "CheXpert: A Large Chest Radiograph Dataset with Uncertainty Labels and Expert Comparison",
    AAAI 2019. https://stanfordmlgroup.github.io/competitions/chexpert/ (Stanford research use agreement).

    Expected layout (the official archive; ``CheXpert-v1.0`` or ``CheXpert-v1.0-small``)::

        root/                                  # the folder that holds the CSVs
          train.csv, valid.csv
          train/patient00001/study1/view1_frontal.jpg ...
          valid/patient64541/study1/view1_frontal.jpg ...

    CSV columns: ``Path`` (``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg``), ``Sex``, ``Age``,
    ``Frontal/Lateral``, ``AP/PA``, then the 14 observations. Values: ``1.0`` positive, ``0.0`` negative, ``-1.0``
    uncertain, blank = not mentioned; anything else raises naming the row and column.

    Choices:
        * ``Path`` is relative to the *parent* of the dataset folder. With ``image_root=None`` a leading component
          starting with ``CheXpert`` is replaced by ``root`` (so a renamed dataset folder still works); other
          paths are taken relative to ``root``. With ``image_root`` set, images are ``image_root / Path``.
        * ``patient_id`` is the ``patientNNNNN`` component of ``Path``; ``study_id`` is ``patientNNNNN/studyN``;
          ``image_id`` is ``Path`` without its first component (unique across train and valid); ``folder`` is
          its first component (``train``/``valid``) and ``official_split`` is ``train_val`` for ``train/`` and
          ``test`` for ``valid/`` (the official test set is not public and papers report on ``valid``), so
          ``CXRDataModule(use_official_test_split=True)`` with ``csv=["train.csv", "valid.csv"]`` tests on it
          (without ``valid.csv`` in ``csv`` that is an error naming it: ``official_split_sources``).
        * A CSV name that matches no file is also tried with ``.gz`` (``train.csv.gz``); pandas reads it as it is.
        * ``uncertainty`` (a policy for every class, a dict ``class -> policy``, or the preset ``"pcam"``):
          U-Ones -> 1, U-Zeros -> 0, U-Ignore -> NaN (masked out of the loss). Default ``"ignore"``: it invents
          no label. Classes missing from a dict use U-Ignore; the ``"pcam"`` preset covers its five classes only.
        * ``blank="zero"`` (default, as PCAM and most CheXpert baselines: not mentioned = negative) or ``"ignore"``.

    Args:
        root: dataset folder. csv: CSV name(s) under ``root`` (or absolute); a list is concatenated in order.
        image_root: see above. classes: any of the 14 (default the 5 competition tasks).
        uncertainty, blank: label policies (above). frontal_only: keep ``Frontal/Lateral == "Frontal"``.
        require_images / skip_missing: existence check at load time, as in every reader (``report``).

    Example:
        >>> manifest = CheXpert("/data/CheXpert-v1.0-small", uncertainty="pcam").load()   # doctest: +SKIP
    """

    def __init__(
        self,
        root: str | Path,
        csv: str | list[str] = "train.csv",
        image_root: str | Path | None = None,
        classes: list[str] | None = None,
        uncertainty: str | dict[str, str] = "ignore",
        blank: str = "zero",
        frontal_only: bool = False,
        require_images: bool = True,
        skip_missing: bool = False,
    ) -> None:
        self.root = Path(root)
        self.csv = [csv] if isinstance(csv, (str, Path)) else list(csv)
        self.image_root = None if image_root is None else Path(image_root)
        self.classes = C.chosen_classes("CheXpert", classes, CHEXPERT_CLASSES, default=COMPETITION_CLASSES)
        self.uncertainty = uncertainty
        self.policies = self._policies(uncertainty)
        C.check_choice("CheXpert", "blank", blank, ("zero", "ignore"))
        self.blank = blank
        self.frontal_only = frontal_only
        self.require_images = require_images
        self.skip_missing = skip_missing
        self.report: dict[str, int] = {}
        self.official_split_sources: dict[str, str] = {}

    def _policies(self, uncertainty: str | dict[str, str]) -> dict[str, str]:
        if isinstance(uncertainty, str) and uncertainty.lower() in UNCERTAINTY_PRESETS:
            preset = UNCERTAINTY_PRESETS[uncertainty.lower()]
            missing = [c for c in self.classes if c not in preset]
            if missing:
                raise ValueError(
                    f"CheXpert: the {uncertainty!r} uncertainty preset defines {list(preset)} only, not {missing}; "
                    f"pass a dict class -> policy instead"
                )
            return {c: preset[c] for c in self.classes}
        if isinstance(uncertainty, str):
            return {c: _policy_name(uncertainty) for c in self.classes}
        unknown = [c for c in uncertainty if c not in self.classes]
        if unknown:
            raise ValueError(f"CheXpert: uncertainty policy given for {unknown}, which are not in classes {self.classes}")
        return {c: _policy_name(uncertainty.get(c, "ignore")) for c in self.classes}

    # ------------------------------------------------------------------------------------------------------------
    def load(self) -> Manifest:
        self.report = {}
        frames = []
        for name in self.csv:
            name = C.or_gz(self.root, str(name))
            path = Path(name) if Path(name).is_absolute() else self.root / name
            frame = C.read_csv(path, "CheXpert CSV", dtype={"Path": str})
            require_columns(frame, ["Path", *self.classes], path)
            frames.append(frame.assign(_row=np.arange(len(frame)), _source=str(path)))
        table = pd.concat(frames, ignore_index=True)
        source = frames[0]["_source"].iloc[0] if len(frames) == 1 else ", ".join(str(n) for n in self.csv)
        self.report["rows"] = len(table)

        if self.frontal_only:
            require_columns(table, ["Frontal/Lateral"], source)
            before = len(table)
            table = table[table["Frontal/Lateral"].astype(str).str.strip() == "Frontal"]
            C.require_nonempty(table, "frontal_only=True (Frontal/Lateral == 'Frontal')", source, before)
        self.report["dropped_lateral"] = self.report["rows"] - len(table)

        raw = self._raw_labels(table)
        labels = raw.copy()
        for k, name in enumerate(self.classes):
            column = labels[:, k]
            column[raw[:, k] == -1] = POLICY_VALUES[self.policies[name]]
            column[np.isnan(raw[:, k])] = 0.0 if self.blank == "zero" else np.nan
        self.report["uncertain"] = int((raw == -1).sum())
        self.report["blank"] = int(np.isnan(raw).sum())

        records = self._records(table)
        keep = C.check_images(
            records.assign(_pos=np.arange(len(records))), source, self.require_images, self.skip_missing, self.report
        )["_pos"].to_numpy()
        records, labels = records.iloc[keep].reset_index(drop=True), labels[keep]
        self.report["images"] = len(records)
        self._record_official_sources(records)
        return Manifest(records, labels, list(self.classes), task="multilabel", source=str(source))

    def _record_official_sources(self, records: pd.DataFrame) -> None:
        """What the official test split (``valid/`` rows) was looked for in, for the DataModule's error."""
        self.official_split_sources = {}
        for name in self.csv:
            path = Path(name) if Path(name).is_absolute() else self.root / name
            self.official_split_sources[str(path)] = "read"
        n_test = int((records["official_split"] == "test").sum())
        if n_test:
            self.official_split_sources["valid/ rows"] = f"{n_test} images"
            return
        if any(Path(str(name)).name.startswith("valid") for name in self.csv):
            self.official_split_sources["valid/ rows"] = "none kept (after frontal_only / missing images), or no Path under valid/"
            return
        valid = self.root / "valid.csv"
        state = "exists" if valid.is_file() or Path(f"{valid}.gz").is_file() else "missing"
        self.official_split_sources[str(valid)] = f"{state}, not in csv={self.csv}: no valid/ rows were read"

    def _raw_labels(self, table: pd.DataFrame) -> np.ndarray:
        """(N, K) float: 1, 0, -1 or NaN (blank); anything else raises with its file, row and column."""
        raw = np.empty((len(table), len(self.classes)), dtype=np.float64)
        for (src, part) in table.groupby("_source", sort=False):
            pos = table.index.get_indexer(part.index)
            raw[pos] = C.labels_from_cells(part, self.classes, src, part["_row"].to_numpy())
            C.check_label_values(raw[pos], (1.0, 0.0, -1.0), self.classes, part["_row"].to_numpy(), src)
        return raw

    def _records(self, table: pd.DataFrame) -> pd.DataFrame:
        path = table["Path"].astype(str).str.strip().str.replace("\\", "/", regex=False)
        parts = path.str.extract(r"(?:^|/)(?P<patient>patient\d+)/(?P<study>study\d+)/")
        bad = parts["patient"].isna()
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(
                f"{C.where(table['_source'].iloc[i], int(table['_row'].iloc[i]))}, column 'Path': {path.iloc[i]!r} "
                f"has no '.../patientNNNNN/studyN/...' component to take the patient from"
            )
        first = path.str.split("/", n=1).str[0]
        has_prefix = first.str.lower().str.startswith("chexpert") & path.str.contains("/", regex=False)
        image_id = path.where(~has_prefix, path.str.split("/", n=1).str[1])
        if self.image_root is not None:
            image_path = str(self.image_root) + os.sep + path
        else:
            image_path = str(self.root) + os.sep + image_id
        records = pd.DataFrame(
            {
                "image_id": image_id,
                "image_path": image_path,
                "patient_id": parts["patient"],
                "study_id": parts["patient"] + "/" + parts["study"],
            }
        )
        folder = image_id.str.split("/", n=1).str[0].where(image_id.str.contains("/"), "")
        records["folder"] = folder.to_numpy()
        # The official test set is hidden; papers report on valid/, so it plays the official test split here.
        records["official_split"] = folder.map({"train": "train_val", "valid": "test"}).fillna("").to_numpy()
        for column, name in {"Frontal/Lateral": "view", "AP/PA": "ap_pa", "Sex": "sex", "Age": "age"}.items():
            if column in table.columns:
                records[name] = table[column].to_numpy()
        records["source_row"] = table["_row"].to_numpy()
        return records.reset_index(drop=True)
