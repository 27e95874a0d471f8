"""Synthetic brain-like 3D volumes: two MR-like modalities and a 4-class tissue map, written as NIfTI.

Each subject is an ellipsoidal "brain" (random radii and a smooth, lobed outline) on a zero background, as a
skull-stripped scan would be. From outside in: a CSF-like rim, a GM-like cortex whose inner boundary is folded
(a smooth random field), and a WM-like core with two CSF-like "ventricles". Intensities, in the range of a
T1/T2 pair: T1 CSF < GM < WM and T2 the reverse, times a smooth bias field, blurred a little (partial volume)
and with Gaussian noise. Labels: 0 background, 1 CSF, 2 GM, 3 WM (iSeg-2017 order).

Everything is a pure function of the parameters and ``seed``; writing 4 subjects of 48^3 takes about a second.
The files are cached like the 2D synthetic data: written into a temporary folder whose ``DONE`` marker (with a
hash of the parameters) comes last, then moved into place with ``os.replace``, so a reader never sees a
half-written dataset and DDP ranks may generate concurrently.

Example:
    >>> reader = SyntheticVolumes(cache_dir="/tmp/medattn-doc", num_subjects=2, shape=(24, 24, 24))
    >>> reader.prepare()
    >>> vol = reader.load(reader.subjects()[0])
    >>> vol.image.shape, sorted(set(vol.label.ravel().tolist()))
    ((2, 24, 24, 24), [0, 1, 2, 3])
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

from datamodules.progress import progress
from datamodules.synthetic_cache import default_cache_root, write_atomically
from datamodules.volumes import ISEG_CLASSES, NiftiVolumes, VolumeSubject

__all__ = ["SyntheticVolumes", "render_subject", "write_synthetic_volumes"]

VERSION = 1
# (T1, T2) mean intensity of CSF, GM, WM: the contrast of an adult T1/T2 pair, on an arbitrary 0-1000 scale.
TISSUE_INTENSITY = {1: (250.0, 900.0), 2: (550.0, 600.0), 3: (800.0, 400.0)}


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """A smooth random field with unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-8)


def render_subject(shape: Sequence[int], seed: int, index: int, noise: float = 0.04) -> dict[str, np.ndarray]:
    """One subject: ``t1``, ``t2`` float32 and ``label`` uint8 arrays of ``shape``."""
    rng = np.random.default_rng([seed, index])
    shape = tuple(int(s) for s in shape)
    axes = [np.linspace(-1.0, 1.0, s, dtype=np.float64) for s in shape]
    grid = np.meshgrid(*axes, indexing="ij")
    centre = rng.uniform(-0.05, 0.05, size=3)
    radii = rng.uniform(0.72, 0.88, size=3)
    r = np.sqrt(sum(((g - c) / a) ** 2 for g, c, a in zip(grid, centre, radii)))
    coarse = max(1.0, min(shape) / 10)
    r = r * (1.0 + 0.04 * _smooth_field(rng, shape, 1.5 * coarse))  # lobed outline
    folds = 0.08 * _smooth_field(rng, shape, 0.7 * coarse)  # cortical folding of the GM/WM border
    wm_edge = rng.uniform(0.58, 0.66)

    label = np.zeros(shape, dtype=np.uint8)
    label[r <= 1.0] = 1  # CSF rim
    label[r <= 0.9] = 2  # GM
    label[r <= wm_edge + folds] = 3  # WM
    for side in (-1, 1):  # two ventricles beside the midline of axis 0
        offset = np.array([0.12 * side, rng.uniform(-0.1, 0.1), rng.uniform(-0.05, 0.05)])
        v_radii = rng.uniform([0.05, 0.18, 0.08], [0.08, 0.26, 0.12])
        v = sum(((g - c - o) / a) ** 2 for g, c, o, a in zip(grid, centre, offset, v_radii))
        label[v <= 1.0] = 1

    brain = label > 0
    bias = 1.0 + 0.08 * _smooth_field(rng, shape, 3 * coarse)
    out = {}
    for m, name in enumerate(("t1", "t2")):
        img = np.zeros(shape, dtype=np.float64)
        for cls, means in TISSUE_INTENSITY.items():
            img[label == cls] = means[m] * rng.uniform(0.95, 1.05)
        img = ndimage.gaussian_filter(img, 0.6) * bias
        img += noise * 1000.0 * rng.standard_normal(shape)
        img = np.where(brain, np.clip(img, 1.0, None), 0.0)  # skull-stripped: background exactly 0
        out[name] = img.astype(np.float32)
    out["label"] = label
    return out


def _params(num_subjects: int, shape: Sequence[int], seed: int, noise: float) -> dict:
    return {"version": VERSION, "num_subjects": int(num_subjects), "shape": [int(s) for s in shape],
            "seed": int(seed), "noise": float(noise)}


def _digest(params: dict) -> str:
    return hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]


def write_synthetic_volumes(root: str | Path, num_subjects: int = 4, shape: Sequence[int] = (48, 48, 48),
                            seed: int = 0, noise: float = 0.04) -> Path:
    """Write ``sub-<i>_{t1,t2,label}.nii.gz`` into ``root`` unless it already holds this exact dataset
    (atomically: :func:`datamodules.synthetic_cache.write_atomically`)."""
    params = _params(num_subjects, shape, seed, noise)

    def write_tree(tmp: Path) -> None:
        _write_tree(tmp, num_subjects, shape, seed, noise)

    return write_atomically(root, _digest(params), params, write_tree, "synthetic-volumes")


def _write_tree(tmp: Path, num_subjects: int, shape: Sequence[int], seed: int, noise: float) -> None:
    import nibabel as nib

    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    for i in progress(range(num_subjects), total=num_subjects, desc="synthetic volumes"):
        arrays = render_subject(shape, seed, i, noise)
        for name, array in arrays.items():
            # int16 intensities (0-1000 scale) compress several times faster than float32
            data = array if name == "label" else np.round(array).astype(np.int16)
            nib.save(nib.Nifti1Image(data, affine), str(tmp / f"sub-{i:02d}_{name}.nii.gz"))


class SyntheticVolumes(NiftiVolumes):
    """Reader of the synthetic volumes; generates them on first use (:meth:`prepare`).

    Args:
        cache_dir: parent of the data folder ``synthetic-volumes-<hash>``; default ``$MEDATTN_CACHE`` or
            ``~/.cache/medattn``.
        num_subjects: subjects ``sub-00``, ``sub-01``, ...
        shape: volume size (D, H, W).
        seed: generation seed.
        noise: Gaussian noise standard deviation relative to the 0-1000 intensity scale.

    Channels ``t1``, ``t2``; classes background, CSF, GM, WM (as iSeg-2017 after remapping).
    """

    def __init__(self, cache_dir: str | Path | None = None, num_subjects: int = 4,
                 shape: Sequence[int] = (48, 48, 48), seed: int = 0, noise: float = 0.04) -> None:
        if num_subjects < 1 or len(shape) != 3 or min(shape) < 8:
            raise ValueError(f"need num_subjects >= 1 and a 3D shape of at least 8^3, got {num_subjects}, {shape}")
        self.params = _params(num_subjects, shape, seed, noise)
        parent = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
        super().__init__(parent / f"synthetic-volumes-{_digest(self.params)}",
                         images=("sub-*_t1.nii.gz", "sub-*_t2.nii.gz"), label="sub-*_label.nii.gz",
                         class_names=ISEG_CLASSES, modalities=("t1", "t2"))

    def prepare(self) -> None:
        p = self.params
        write_synthetic_volumes(self.root, p["num_subjects"], p["shape"], p["seed"], p["noise"])

    def subjects(self) -> list[VolumeSubject]:
        self.prepare()
        return super().subjects()
