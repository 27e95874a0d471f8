"""Synthetic knee-MR-like slice stacks: the default data of DC-MT (slice grading) and its subject stage.

Each subject is a stack of ``n`` ordered 2D slices (``n`` uniform in ``[min_slices, max_slices]``) through
a femoral-condyle-like structure: a bone ellipse whose size follows a dome over the stack, covered on its
upper side by a bright cartilage band. Geometry is in fractions of the image width, so ``image_size``
changes only the resolution.

Grades (3 classes, as the DC-MT knee data): a subject's grade is drawn with ``grade_probs``; grade-0
subjects have only normal slices. A grade-1 or grade-2 subject has a lesion run of consecutive slices
(30–60 % of the stack, at a random depth) at one position along the cartilage:

* grade 1 (partial-thickness defect): the outer part of the band darkened over a short arc;
* grade 2 (full-thickness defect): the whole band thickness gone over a longer arc, with a bright
  edema-like blob in the bone beneath. In a grade-2 subject the central half of the run is grade 2 and
  its flanks grade 1;
* the subject grade is the maximum slice grade.

Nuisances: per-subject position, size, gain and offset; smooth background texture; pixel noise; and, on
``distractor_prob`` of the slices, a bright band fragment with a gap in the soft tissue *outside* the
cartilage, unrelated to the grade (a localisation trap for networks that look at shapes only).

Attention target: the segmentation ``masks`` holds 1 = bone and 2 = cartilage (the DC-MT label of femoral
cartilage), so :class:`datamodules.slices.SliceStackDataModule` builds the dilated-cartilage attention mask
exactly as for the real layout.

Files under ``<root>`` (both layouts hold identical data):

* ``h5/<subject>_<slice:03d>.h5``: the DC-MT per-slice layout, datasets ``image`` (uint16 MR-like
  intensities), ``masks`` (uint8 labels) and ``label`` (int grade); ``h5/subject_label.csv``
  (``subject_id,subject_label``);
* ``nifti/volumes/<subject>.nii.gz`` (H, W, S) int16 and ``nifti/masks/<subject>.nii.gz`` uint8;
  ``nifti/slices.csv`` (``subject_id,image_path,mask_path,slice_index,label``, paths relative to
  ``nifti/``) and ``nifti/subjects.csv`` (``subject_id,subject_label``);
* ``DONE`` (JSON with the parameters and their hash), written last. The tree is written to a temporary
  directory and moved into place with ``os.replace``, so a reader never sees half a dataset and
  concurrent DDP ranks do not collide.

Example:
    >>> root = write_synthetic_slices(tmp / "slices", n_subjects=4, image_size=32)  # doctest: +SKIP
    >>> sorted(p.name for p in root.iterdir())  # doctest: +SKIP
    ['DONE', 'h5', 'nifti']
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

from datamodules.progress import progress
from datamodules.readers.slices import H5SliceReader, NiftiSliceReader, SliceTable
from datamodules.synthetic_cache import default_cache_root, write_atomically

GENERATOR_VERSION = 1
CARTILAGE_LABEL = 2
BONE_LABEL = 1
CLASS_NAMES = ["grade_0", "grade_1", "grade_2"]


@dataclasses.dataclass(frozen=True)
class SyntheticSlicesConfig:
    """Everything that determines the generated files; its hash names the cache directory."""

    n_subjects: int = 120
    image_size: int = 64
    min_slices: int = 16
    max_slices: int = 28
    grade_probs: tuple[float, float, float] = (0.3, 0.35, 0.35)
    noise_std: float = 0.06
    distractor_prob: float = 0.3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_subjects < 1 or self.image_size < 16 or not 1 <= self.min_slices <= self.max_slices:
            raise ValueError(f"bad synthetic-slices parameters: {self}")
        if len(self.grade_probs) != 3 or abs(sum(self.grade_probs) - 1) > 1e-6 or min(self.grade_probs) < 0:
            raise ValueError(f"grade_probs must be 3 probabilities summing to 1, got {self.grade_probs}")

    def params(self) -> dict:
        return {"generator_version": GENERATOR_VERSION, **dataclasses.asdict(self)}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.params(), sort_keys=True).encode()).hexdigest()[:12]


def subject_name(index: int) -> str:
    return f"subj{index:04d}"


# ------------------------------------------------------------------------------------------- plan
def plan_subject(config: SyntheticSlicesConfig, index: int) -> dict:
    """Grades and per-subject parameters of subject ``index`` (no pixels); deterministic for the seed."""
    rng = np.random.default_rng([config.seed, index, 0])
    n = int(rng.integers(config.min_slices, config.max_slices + 1))
    grade = int(rng.choice(3, p=np.asarray(config.grade_probs)))
    grades = np.zeros(n, np.int64)
    if grade > 0:
        length = min(n, max(2, int(round(rng.uniform(0.3, 0.6) * n))))
        start = int(rng.integers(0, n - length + 1))
        grades[start:start + length] = 1
        if grade == 2:
            core = max(1, length // 2)
            c0 = start + (length - core) // 2
            grades[c0:c0 + core] = 2
    return {
        "n": n, "grade": grade, "slice_grades": grades,
        "cx": 0.5 + rng.uniform(-0.05, 0.05), "cy": 0.64 + rng.uniform(-0.04, 0.04),
        "radius": 0.27 + rng.uniform(-0.03, 0.03), "thick": 0.05 + rng.uniform(-0.008, 0.008),
        "angle": rng.uniform(-0.9, 0.9), "gain": rng.uniform(0.8, 1.2), "offset": rng.uniform(-0.05, 0.05),
    }


def _smooth_noise(rng: np.random.Generator, size: int, cells: int = 6) -> np.ndarray:
    coarse = rng.standard_normal((cells, cells))
    axis = np.linspace(0, cells - 1, size)
    i0 = np.clip(np.floor(axis).astype(int), 0, cells - 2)
    t = axis - i0
    rows = coarse[i0] * (1 - t)[:, None] + coarse[i0 + 1] * t[:, None]
    return rows[:, i0] * (1 - t)[None, :] + rows[:, i0 + 1] * t[None, :]


def render_slice(config: SyntheticSlicesConfig, plan: dict, subject: int, s: int) -> tuple[np.ndarray, np.ndarray]:
    """One slice: float image in about [0, 1] and uint8 label map (1 bone, 2 cartilage)."""
    size = config.image_size
    rng = np.random.default_rng([config.seed, subject, s + 1])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    n = plan["n"]
    depth = (s - (n - 1) / 2) / max(n, 1)  # in [-0.5, 0.5]
    radius = plan["radius"] * (0.78 + 0.22 * np.cos(np.pi * depth))
    cx, cy = plan["cx"] + 0.01 * depth, plan["cy"]
    dx, dy = (xx - cx) / 1.15, yy - cy
    r = np.sqrt(dx**2 + dy**2)  # elliptic radius in units of width
    theta = np.arctan2(dx, -dy)  # 0 at the top of the condyle, positive to the right
    bone = r < radius
    band = (r >= radius) & (r < radius + plan["thick"]) & (np.abs(theta) < 1.45)

    image = 0.18 + 0.04 * _smooth_noise(rng, size)
    image[bone] = 0.45 + 0.05 * _smooth_noise(rng, size)[bone]
    image[band] = 0.85
    grade = int(plan["slice_grades"][s])
    if grade > 0:
        phi = plan["angle"] + 0.02 * (s - n / 2)
        half_arc = (0.16 if grade == 1 else 0.3) * (0.28 / radius)
        arc = np.abs(theta - phi) < half_arc
        if grade == 1:  # outer part of the band darkened
            outer = band & arc & (r > radius + 0.45 * plan["thick"])
            image[outer] = 0.45
        else:  # full thickness gone, edema beneath
            image[band & arc] = 0.2
            ex, ey = cx + 1.15 * np.sin(phi) * (radius - 0.06), cy - np.cos(phi) * (radius - 0.06)
            edema = ((xx - ex) ** 2 + (yy - ey) ** 2) < 0.045**2
            image[edema & bone] += 0.25
    if rng.random() < config.distractor_prob:
        # a bright band fragment with a gap, in the soft tissue at the bottom corners (outside the cartilage)
        fx = rng.choice([rng.uniform(0.08, 0.22), rng.uniform(0.78, 0.92)])
        fy = rng.uniform(0.2, 0.35) if rng.random() < 0.5 else rng.uniform(0.9, 0.95)
        frag = (np.abs(yy - fy) < 0.025) & (np.abs(xx - fx) < 0.08) & (np.abs(xx - fx) > 0.02) & ~bone & ~band
        image[frag] = 0.85
    image = plan["gain"] * image + plan["offset"] + config.noise_std * rng.standard_normal((size, size))
    labels = np.zeros((size, size), np.uint8)
    labels[bone] = BONE_LABEL
    labels[band] = CARTILAGE_LABEL
    return image.astype(np.float32), labels


def render_subject(config: SyntheticSlicesConfig, index: int) -> tuple[dict, np.ndarray, np.ndarray]:
    """(plan, uint16 volume (H, W, S), uint8 label volume (H, W, S))."""
    plan = plan_subject(config, index)
    images, masks = zip(*(render_slice(config, plan, index, s) for s in range(plan["n"])))
    volume = np.clip(np.stack(images, -1), 0.0, 1.5) * 2000.0  # MR-like integer intensities
    return plan, np.round(volume).astype(np.uint16), np.stack(masks, -1)


# ------------------------------------------------------------------------------------------ write
def _write_tree(root: Path, config: SyntheticSlicesConfig) -> None:
    import h5py
    import nibabel as nib

    h5_dir, vol_dir, mask_dir = root / "h5", root / "nifti" / "volumes", root / "nifti" / "masks"
    for d in (h5_dir, vol_dir, mask_dir):
        d.mkdir(parents=True)
    subjects, slices = [], []
    for i in progress(range(config.n_subjects), total=config.n_subjects, desc="synthetic slice subjects"):
        name = subject_name(i)
        plan, volume, labels = render_subject(config, i)
        subjects.append({"subject_id": name, "subject_label": plan["grade"]})
        for s in range(plan["n"]):
            with h5py.File(h5_dir / f"{name}_{s:03d}.h5", "w") as f:
                f.create_dataset("image", data=volume[:, :, s])
                f.create_dataset("masks", data=labels[:, :, s])
                f.create_dataset("label", data=int(plan["slice_grades"][s]))
            slices.append({"subject_id": name, "image_path": f"volumes/{name}.nii.gz",
                           "mask_path": f"masks/{name}.nii.gz", "slice_index": s,
                           "label": int(plan["slice_grades"][s])})
        affine = np.eye(4)
        nib.save(nib.Nifti1Image(volume.astype(np.int16), affine), vol_dir / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(labels, affine), mask_dir / f"{name}.nii.gz")
    pd.DataFrame(subjects).to_csv(h5_dir / "subject_label.csv", index=False)
    pd.DataFrame(subjects).to_csv(root / "nifti" / "subjects.csv", index=False)
    pd.DataFrame(slices).to_csv(root / "nifti" / "slices.csv", index=False)


def write_synthetic_slices(root: str | Path, config: SyntheticSlicesConfig | None = None, **params) -> Path:
    """Generate the dataset into ``root`` unless it already holds exactly this one (see the module doc).

    A non-empty ``root`` without a ``DONE`` marker is not ours and raises :class:`DataError` rather than
    being overwritten; an outdated synthetic dataset there is replaced
    (:func:`datamodules.synthetic_cache.write_atomically`).
    """
    config = config or SyntheticSlicesConfig(**params)
    return write_atomically(root, config.digest(), config.params(), lambda tmp: _write_tree(tmp, config),
                            "synthetic-slices")


class SyntheticSlices:
    """Reader of the synthetic slice stacks: writes them on first use (cached by parameter hash), then reads
    them with :class:`datamodules.readers.slices.H5SliceReader` or
    :class:`datamodules.readers.slices.NiftiSliceReader`.

    Args:
        cache_dir: parent of ``synthetic-slices-<hash>``; default ``$MEDATTN_CACHE`` or ``~/.cache/medattn``.
        layout: ``"h5"`` (the DC-MT per-slice HDF5 layout) or ``"nifti"`` (volumes + per-slice CSV).
        Other arguments: see :class:`SyntheticSlicesConfig`.
    """

    def __init__(self, cache_dir: str | Path | None = None, layout: str = "h5", n_subjects: int = 120,
                 image_size: int = 64, min_slices: int = 16, max_slices: int = 28,
                 grade_probs: tuple[float, float, float] = (0.3, 0.35, 0.35), noise_std: float = 0.06,
                 distractor_prob: float = 0.3, seed: int = 0) -> None:
        if layout not in ("h5", "nifti"):
            raise ValueError(f"layout must be 'h5' or 'nifti', got {layout!r}")
        self.layout = layout
        self.config = SyntheticSlicesConfig(n_subjects, image_size, min_slices, max_slices, tuple(grade_probs),
                                            noise_std, distractor_prob, seed)
        parent = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
        self.root = parent / f"synthetic-slices-{self.config.digest()}"

    def prepare(self) -> Path:
        return write_synthetic_slices(self.root, self.config)

    def reader(self) -> H5SliceReader | NiftiSliceReader:
        self.prepare()
        if self.layout == "h5":
            return H5SliceReader(self.root / "h5", class_names=CLASS_NAMES)
        return NiftiSliceReader(self.root / "nifti", class_names=CLASS_NAMES)

    def load(self) -> SliceTable:
        return self.reader().load()
