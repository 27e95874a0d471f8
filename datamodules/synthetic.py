"""The built-in default dataset: synthetic chest-X-ray-like images written in the NIH ChestX-ray14 layout.

Every method's default config trains on this data, so the same readers and DataModules run on every default
run without downloads. On first use :class:`SyntheticCXR` writes the dataset to a cache directory (seconds,
deterministic for a seed), then reads it back with the real NIH reader
(:class:`datamodules.readers.nih.NIHChestXray14`).

What an image holds (all sizes are fractions of the image width, so ``image_size`` only changes resolution):

* chest-like background: body outline, two dark lung fields with a domed diaphragm and sharp
  costophrenic angles, bright spine / mediastinum / heart, clavicles and rib arcs, vascular texture,
  smooth tissue inhomogeneity, pixel noise, and a per-image contrast / brightness / gamma jitter;
* per-patient anatomy (lung size and position, heart, rib spacing) shared by all follow-ups of a
  patient (each follow-up is a shifted crop of the patient's canvas: positioning);
* four lesion classes of distinct appearance and size, placed inside the lung fields (NIH names):

  ============  =========================================================  ===================
  class         appearance                                                 size (of width)
  ============  =========================================================  ===================
  Nodule        small, sharp-edged bright disc; 1 (75 %) or 2 (25 %)       diameter 3.2-5.2 %
  Mass          larger, irregular (lobulated) soft-edged bright blob       diameter 11-17 %
  Effusion      homogeneous opacity filling one lung base, with a          base 12-32 % of the
                meniscus that rises laterally                              lung height
  Infiltration  patchy, textured cloud (thresholded fine noise)            diameter 14-22 %
  ============  =========================================================  ===================

* a distracting "L" or "R" letter (bright, lead-marker-like, about nodule brightness) in a random corner of
  ``marker_prob`` of the images, drawn independently of the labels.

Labels are multi-label: each class is present with probability ``prevalence`` (default 0.28), and a
follow-up image keeps its predecessor's value of a class with probability 0.5 (so findings persist within
a patient, which is why the split must be by patient). With ``single_label=True`` every image has exactly
one lesion class (uniform), which is the 4-class multiclass problem MAG-SD uses; the reader then returns a
``task="multiclass"`` manifest. Those are *different* datasets (different cache directories), not a filter.

Files (``<root>`` = the dataset directory):

* ``images/<8-digit patient>_<3-digit follow-up>.png``: 8-bit grayscale, ``image_size`` square;
* ``masks/<name>.png``: lung mask (0/255); ``lesion_masks/<name>.png``: union of all lesions (0/255);
* ``Data_Entry_2017.csv``: the real NIH header and formatting (``|``-joined labels in alphabetical
  order, ``No Finding`` when none; original size = ``image_size``);
* ``BBox_List_2017.csv``: the real header, one row per lesion of the boxed images (about ``box_fraction``
  of all images, drawn among images with a finding, every lesion of such an image boxed), with the real
  quirk ``Infiltrate`` for ``Infiltration``. Boxes are tight around that lesion's mask pixels, in pixels
  (pixel-edge convention: ``x`` = first column, ``w`` = number of columns);
* ``train_val_list.txt`` / ``test_list.txt``: split by patient (about ``test_fraction`` of the images);
* extra, not NIH: ``synthetic_lesions.csv`` (every lesion instance of every image with its box, and
  whether it is in ``BBox_List``) and ``synthetic_markers.csv`` (the marker letter and box per image), for
  evaluating localisation on all images and measuring attention on the distractor;
* ``DONE``: JSON with the generator version, parameters and their hash, written last.

The pixels are drawn by :mod:`datamodules.synthetic_cxr_render`; the cache folder is written atomically by
:mod:`datamodules.synthetic_cache`.

Example:
    >>> from datamodules.synthetic import SyntheticCXR
    >>> manifest = SyntheticCXR(n_images=40, image_size=64, cache_dir=tmp).load()  # doctest: +SKIP
    >>> manifest.class_names
    ['Nodule', 'Mass', 'Effusion', 'Infiltration']
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from datamodules.manifest import Manifest
from datamodules.progress import progress
from datamodules.synthetic_cache import default_cache_root, write_atomically
from datamodules.synthetic_cxr_render import render_image, render_patient

GENERATOR_VERSION = 3  # bump whenever the pixels or tables change: it is part of the cache hash
CLASSES = ("Nodule", "Mass", "Effusion", "Infiltration")
BBOX_NAME = {"Infiltration": "Infiltrate"}  # BBox_List_2017 spells this class differently from Data_Entry
DATA_ENTRY_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"
FIELD_OF_VIEW_MM = 360.0  # the image spans about 36 cm, so pixel spacing = 360 / image_size
_PERSIST = 0.5  # probability that a follow-up keeps its predecessor's value of a class


@dataclasses.dataclass(frozen=True)
class SyntheticCXRConfig:
    """Everything that determines the generated files; its hash names the cache directory."""

    n_images: int = 800
    image_size: int = 256
    seed: int = 0
    single_label: bool = False
    prevalence: float = 0.28
    box_fraction: float = 0.2
    marker_prob: float = 0.5
    test_fraction: float = 0.2
    max_follow_ups: int = 5

    def __post_init__(self) -> None:
        if self.n_images < 2 or self.image_size < 16:
            raise ValueError(f"need n_images >= 2 and image_size >= 16, got {self.n_images}, {self.image_size}")
        for name in ("prevalence", "box_fraction", "marker_prob", "test_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")

    def params(self) -> dict:
        return {"generator_version": GENERATOR_VERSION, **dataclasses.asdict(self)}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.params(), sort_keys=True).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------- plan
def plan_synthetic_cxr(config: SyntheticCXRConfig) -> pd.DataFrame:
    """The tabular part of the dataset, no pixels: one row per image with patient, follow-up,
    demographics, the K label columns (bool, named by class), ``boxed``, ``marker`` (``"L"``, ``"R"`` or
    ``""``), ``marker_corner`` (0-3: TL, TR, BL, BR) and ``split`` (``"train_val"`` / ``"test"``).
    Cheap, so statistical properties can be tested on thousands of rows."""
    rng = np.random.default_rng([config.seed, 0])
    counts = []
    while sum(counts) < config.n_images:
        counts.append(int(rng.integers(1, config.max_follow_ups + 1)))
    counts[-1] -= sum(counts) - config.n_images
    patient = np.repeat(np.arange(1, len(counts) + 1), counts)
    follow_up = np.concatenate([np.arange(c) for c in counts])
    n, k = config.n_images, len(CLASSES)

    labels = np.zeros((n, k), dtype=bool)
    for i in range(n):
        if config.single_label:
            fresh = np.eye(k, dtype=bool)[rng.integers(k)]
            labels[i] = labels[i - 1] if follow_up[i] > 0 and rng.random() < _PERSIST else fresh
        else:
            fresh = rng.random(k) < config.prevalence
            keep = (follow_up[i] > 0) & (rng.random(k) < _PERSIST)
            labels[i] = np.where(keep, labels[i - 1] if i else fresh, fresh)

    # Boxes for about box_fraction of *all* images, drawn among images with a finding (as in NIH, a box
    # needs a finding).
    with_finding = np.flatnonzero(labels.any(axis=1))
    n_boxed = min(len(with_finding), round(config.box_fraction * n))
    boxed = np.zeros(n, dtype=bool)
    boxed[rng.choice(with_finding, size=n_boxed, replace=False)] = True

    # Independent of everything above: the marker is a distractor, not a shortcut.
    has_marker = rng.random(n) < config.marker_prob
    letter = np.where(rng.random(n) < 0.5, "L", "R")
    corner = rng.choice(4, size=n, p=[0.4, 0.4, 0.1, 0.1])  # mostly upper corners, as on real films

    # Split by patient: shuffle patients, take them until test_fraction of the images is reached.
    test_patients: set[int] = set()
    n_test = 0
    for p in rng.permutation(len(counts)) + 1:
        if n_test >= config.test_fraction * n:
            break
        test_patients.add(int(p))
        n_test += counts[p - 1]

    age0 = rng.integers(18, 80, size=len(counts))
    gender = rng.choice(np.array(["M", "F"]), size=len(counts))
    frame = pd.DataFrame(
        {
            "image_index": [f"{p:08d}_{f:03d}.png" for p, f in zip(patient, follow_up)],
            "patient_id": patient,
            "follow_up": follow_up,
            "age": age0[patient - 1] + follow_up,
            "gender": gender[patient - 1],
            "view": rng.choice(np.array(["PA", "AP"]), size=n, p=[0.6, 0.4]),
            **{name: labels[:, j] for j, name in enumerate(CLASSES)},
            "boxed": boxed,
            "marker": np.where(has_marker, letter, ""),
            "marker_corner": corner,
            "split": np.where(np.isin(patient, list(test_patients)), "test", "train_val"),
        }
    )
    return frame


# --------------------------------------------------------------------------------------------- write
def _save_png(array: np.ndarray, path: Path) -> None:
    # compress_level=1: 3-4x faster than the default and only ~10 % larger for these images.
    Image.fromarray(array, mode="L").save(path, format="PNG", compress_level=1)


def _write_tree(root: Path, config: SyntheticCXRConfig) -> None:
    plan = plan_synthetic_cxr(config)
    for sub in ("images", "masks", "lesion_masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    s = config.image_size
    spacing = repr(FIELD_OF_VIEW_MM / s)
    entries, bbox_rows, lesion_rows, marker_rows = [], [], [], []
    patient: dict = {}
    records = plan.to_dict("records")
    for i, row in enumerate(progress(records, total=len(records), desc="synthetic CXR images")):
        if patient.get("id") != row["patient_id"]:  # rows are grouped by patient
            patient = {"id": row["patient_id"], **render_patient(config, int(row["patient_id"]))}
        out = render_image(config, row, i, patient)
        name = row["image_index"]
        union = np.zeros((s, s), dtype=bool)
        for j, (cls, mask, (bx, by, bw, bh)) in enumerate(out["lesions"]):
            union |= mask
            box = ",".join(repr(float(v)) for v in (bx, by, bw, bh))
            if row["boxed"]:
                bbox_rows.append(f"{name},{BBOX_NAME.get(cls, cls)},{box}")
            lesion_rows.append(f"{name},{j},{cls},{box},{int(bool(row['boxed']))}")
        _save_png(out["image"], root / "images" / name)
        _save_png(out["lung_mask"].astype(np.uint8) * 255, root / "masks" / name)
        _save_png(union.astype(np.uint8) * 255, root / "lesion_masks" / name)
        findings = "|".join(sorted(c for c in CLASSES if row[c])) or "No Finding"
        entries.append(
            f"{name},{findings},{row['follow_up']},{row['patient_id']},{row['age']},{row['gender']},"
            f"{row['view']},{s},{s},{spacing},{spacing}"
        )
        mb = out["marker_box"]
        marker_rows.append(f"{name},{row['marker']}," + (",".join(str(v) for v in mb) if mb else ",,,"))

    def write_lines(fname: str, lines: list[str]) -> None:
        (root / fname).write_text("".join(line + "\n" for line in lines), encoding="utf-8")

    write_lines("Data_Entry_2017.csv", [DATA_ENTRY_HEADER, *entries])
    write_lines("BBox_List_2017.csv", [BBOX_HEADER, *bbox_rows])
    write_lines("synthetic_lesions.csv", ["Image Index,instance,class,x,y,w,h,in_bbox_list", *lesion_rows])
    write_lines("synthetic_markers.csv", ["Image Index,marker,x,y,w,h", *marker_rows])
    write_lines("train_val_list.txt", sorted(plan.loc[plan["split"] == "train_val", "image_index"]))
    write_lines("test_list.txt", sorted(plan.loc[plan["split"] == "test", "image_index"]))


def write_synthetic_cxr(root: str | Path, config: SyntheticCXRConfig | None = None, **params) -> Path:
    """Generate the dataset into ``root`` (created), unless it already holds this exact dataset.

    Atomic and rank-safe (:func:`datamodules.synthetic_cache.write_atomically`): a reader never sees a
    half-written dataset, concurrent DDP ranks do not collide, a ``root`` holding an older synthetic dataset is
    replaced, and a non-empty ``root`` that is not a synthetic dataset raises ``DataError`` rather than being
    deleted.

    Args:
        root: the dataset directory.
        config: the parameters; or give them as keyword arguments (see :class:`SyntheticCXRConfig`).
    """
    config = config or SyntheticCXRConfig(**params)
    return write_atomically(root, config.digest(), config.params(), lambda tmp: _write_tree(tmp, config),
                            "synthetic-cxr")


# --------------------------------------------------------------------------------------------- reader
class SyntheticCXR:
    """Reader of the synthetic NIH-layout dataset: generates it on first use, then reads it with
    :class:`datamodules.readers.nih.NIHChestXray14` (lung masks as ``mask``, lesion masks as
    ``attention_mask``, ``BBox_List`` boxes).

    Args:
        cache_dir: parent directory of the cache; the data goes to
            ``<cache_dir>/synthetic-cxr-<hash of the parameters>``. Default :func:`default_cache_root`.
        n_images, image_size, seed, prevalence, box_fraction, marker_prob, test_fraction: generation
            parameters (see :class:`SyntheticCXRConfig` and the module docstring).
        classes: the classes to read, a subset of ``CLASSES`` (default all four, in ``CLASSES`` order).
        single_label: generate the single-label variant (exactly one lesion class per image) and return a
            ``task="multiclass"`` manifest. With a ``classes`` subset, images of other classes are dropped.
    """

    def __init__(
        self,
        cache_dir: str | Path | None = None,
        n_images: int = 800,
        image_size: int = 256,
        seed: int = 0,
        classes: list[str] | None = None,
        single_label: bool = False,
        prevalence: float = 0.28,
        box_fraction: float = 0.2,
        marker_prob: float = 0.5,
        test_fraction: float = 0.2,
    ) -> None:
        self.config = SyntheticCXRConfig(
            n_images=n_images, image_size=image_size, seed=seed, single_label=single_label,
            prevalence=prevalence, box_fraction=box_fraction, marker_prob=marker_prob, test_fraction=test_fraction,
        )  # fmt: skip
        self.classes = list(classes) if classes is not None else list(CLASSES)
        unknown = [c for c in self.classes if c not in CLASSES]
        if unknown or not self.classes:
            raise ValueError(f"classes must be a non-empty subset of {list(CLASSES)}, got {classes}")
        parent = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
        self.root = parent / f"synthetic-cxr-{self.config.digest()}"

    def prepare(self) -> Path:
        """Generate the files if they are not there yet (safe to call from every rank)."""
        return write_synthetic_cxr(self.root, self.config)

    def load(self) -> Manifest:
        from datamodules.readers.nih import NIHChestXray14  # lazy: the reader imports heavier pieces

        self.prepare()
        # image_size="original": boxes are checked against each image's own size (Data_Entry holds it).
        manifest = NIHChestXray14(
            self.root, classes=self.classes, mask_dir="masks", attention_mask_dir="lesion_masks", image_size="original"
        ).load()
        if not self.config.single_label:
            return manifest
        keep = np.flatnonzero(np.nansum(manifest.labels, axis=1) == 1)
        manifest = manifest.subset(keep)
        return Manifest(manifest.records, manifest.labels, manifest.class_names, manifest.boxes, "multiclass",
                        manifest.source)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the synthetic chest-X-ray dataset (NIH layout).")
    parser.add_argument("--out", required=True, help="dataset directory (created)")
    for field in dataclasses.fields(SyntheticCXRConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.type in (bool, "bool"):
            parser.add_argument(flag, action="store_true")
        else:
            kind = {"int": int, "float": float}[field.type if isinstance(field.type, str) else field.type.__name__]
            parser.add_argument(flag, type=kind, default=field.default)
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    config = SyntheticCXRConfig(**args)
    start = time.perf_counter()
    root = write_synthetic_cxr(out, config)
    print(f"{root}: {config.n_images} images of {config.image_size} px in {time.perf_counter() - start:.1f} s "
          f"(hash {config.digest()})")  # fmt: skip


if __name__ == "__main__":
    main()
