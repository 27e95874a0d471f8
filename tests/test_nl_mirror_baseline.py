"""The mirror-copy baseline of the hemisphere hold-out (experiments/nonlocal_unet/mirror_baseline.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from datamodules.volume_segmentation import VolumeSegmentationDataModule
from datamodules.volumes import NiftiVolumes
from experiments.nonlocal_unet.mirror_baseline import mirror_dice, mirror_prediction


def _write(root: Path, label: np.ndarray) -> NiftiVolumes:
    import nibabel as nib

    root.mkdir(parents=True, exist_ok=True)
    image = (label.astype(np.float32) + 1.0) * 100.0  # non-zero everywhere: the box is the whole volume
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(root / "s_img.nii.gz"))
    nib.save(nib.Nifti1Image(label.astype(np.uint8), np.eye(4)), str(root / "s_seg.nii.gz"))
    return NiftiVolumes(root, images=["*_img.nii.gz"], label="*_seg.nii.gz", class_names=["bg", "a", "b"])


def _symmetric_label(seed: int = 0) -> np.ndarray:
    half = np.random.default_rng(seed).integers(0, 3, size=(8, 12, 12))
    return np.concatenate([half, half[::-1]], axis=0)  # axis 0: 16 voxels, mirror plane between 7 and 8


def _dm(reader, **kwargs):
    dm = VolumeSegmentationDataModule(reader, patch_size=8, holdout="hemisphere", split_axis=0, **kwargs)
    dm.setup("test")
    return dm


@pytest.mark.parametrize("train_side", ["low", "high"])
def test_perfect_symmetry_gives_dice_one(tmp_path, train_side):
    result = mirror_dice(_dm(_write(tmp_path, _symmetric_label()), train_side=train_side))
    assert result == {"test/dice": 1.0, "test/dice_a": 1.0, "test/dice_b": 1.0}


def test_asymmetry_is_scored_by_hand(tmp_path):
    label = _symmetric_label()
    label[8:][label[8:] == 2] = 1  # the evaluated (high) half has no class b; the training half keeps it
    pred = _symmetric_label()[:8][::-1]
    truth = label[8:]
    hand_a = 2 * ((pred == 1) & (truth == 1)).sum() / ((pred == 1).sum() + (truth == 1).sum())
    result = mirror_dice(_dm(_write(tmp_path, label)))
    assert result["test/dice_b"] == 0.0 and result["test/dice_a"] == pytest.approx(hand_a)
    assert result["test/dice"] == pytest.approx(hand_a / 2)


def test_only_training_half_labels_are_read():
    """An odd box (0..5 along axis 0, split at 2): evaluated slices 2, 3, 4 mirror onto 2, 1, 0; slice 2 is the
    evaluated midline, so its prediction comes from the nearest training slice (1), never from itself."""
    label = np.arange(5)[:, None, None] * np.ones((1, 2, 2), dtype=int)
    pred = mirror_prediction(label, ((2, 5), (0, 2), (0, 2)), ((0, 2), (0, 2), (0, 2)), axis=0, centre2=4)
    assert pred[:, 0, 0].tolist() == [1, 1, 0]


def test_needs_a_hemisphere_datamodule(tmp_path):
    dm = VolumeSegmentationDataModule(_write(tmp_path, _symmetric_label()), patch_size=8)
    with pytest.raises(ValueError, match="holdout='hemisphere'"):
        mirror_dice(dm)
