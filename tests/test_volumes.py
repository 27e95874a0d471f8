"""Volume readers, synthetic volumes, patch sampling and the segmentation DataModules."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import torch

from datamodules.manifest import DataError
from datamodules.lung_segmentation import LungSegmentationDataModule
from datamodules.segmentation import zscore
from datamodules.volume_segmentation import (RandomPatchDataset, VolumeSegmentationDataModule, foreground_box,
                                             patch_start_range)
from datamodules.synthetic_volumes import SyntheticVolumes, render_subject
from datamodules.volumes import ISeg2017, MNI152Tissue, NiftiVolumes, Volume


def _save(path, array, analyze=False):
    cls = nib.AnalyzeImage if analyze else nib.Nifti1Image
    nib.save(cls(np.asarray(array), np.eye(4)), str(path))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return SyntheticVolumes(cache_dir=tmp_path_factory.mktemp("vols"), num_subjects=3, shape=(32, 32, 32))


# ------------------------------------------------------------------------------------------ synthetic
def test_synthetic_volumes_are_deterministic_tissue_like_and_cached(synthetic):
    subjects = synthetic.subjects()
    assert [s.subject_id for s in subjects] == ["00", "01", "02"]
    vol = synthetic.load(subjects[0])
    assert vol.image.shape == (2, 32, 32, 32) and vol.image.dtype == np.float32
    assert set(np.unique(vol.label)) == {0, 1, 2, 3}
    assert np.all(vol.image[:, vol.label == 0] == 0) and np.all(vol.image[:, vol.label > 0] > 0)
    t1 = [vol.image[0][vol.label == c].mean() for c in (1, 2, 3)]
    t2 = [vol.image[1][vol.label == c].mean() for c in (1, 2, 3)]
    assert t1[0] < t1[1] < t1[2] and t2[0] > t2[1] > t2[2]  # T1: CSF < GM < WM; T2 reversed
    a, b = render_subject((32, 32, 32), 0, 0), render_subject((32, 32, 32), 0, 0)
    assert np.array_equal(a["t1"], b["t1"]) and np.array_equal(a["label"], b["label"])
    assert not np.array_equal(a["label"], render_subject((32, 32, 32), 1, 0)["label"])
    done = synthetic.root / "DONE"
    stamp = done.stat().st_mtime_ns
    synthetic.prepare()  # cached: nothing rewritten
    assert done.stat().st_mtime_ns == stamp
    assert not list(synthetic.root.parent.glob(".*tmp*"))


def test_synthetic_refuses_to_overwrite_a_foreign_folder(tmp_path):
    from datamodules.synthetic_volumes import write_synthetic_volumes

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="refusing to overwrite"):
        write_synthetic_volumes(tmp_path / "mine", num_subjects=1, shape=(8, 8, 8))


# --------------------------------------------------------------------------------------------- readers
def test_iseg_analyze_layout_remaps_labels(tmp_path):
    rng = np.random.default_rng(0)
    raw = rng.choice(np.array([0, 10, 150, 250], dtype=np.uint8), size=(6, 7, 8))
    for sid in ("1", "2", "10"):
        _save(tmp_path / f"subject-{sid}-T1.hdr", rng.random((6, 7, 8)).astype(np.float32), analyze=True)
        _save(tmp_path / f"subject-{sid}-T2.hdr", rng.random((6, 7, 8)).astype(np.float32), analyze=True)
        _save(tmp_path / f"subject-{sid}-label.hdr", raw, analyze=True)
    _save(tmp_path / "subject-11-T1.hdr", rng.random((6, 7, 8)).astype(np.float32), analyze=True)  # test subject
    _save(tmp_path / "subject-11-T2.hdr", rng.random((6, 7, 8)).astype(np.float32), analyze=True)
    assert (tmp_path / "subject-1-T1.img").is_file()
    reader = ISeg2017(tmp_path)
    subjects = reader.subjects()
    assert [s.subject_id for s in subjects] == ["1", "2", "10"]  # numeric order, unlabelled 11 excluded
    assert [s.subject_id for s in ISeg2017(tmp_path, unlabeled=True).subjects()] == ["11"]
    vol = reader.load(subjects[0])
    assert vol.image.shape == (2, 6, 7, 8) and reader.class_names == ("background", "CSF", "GM", "WM")
    expected = np.select([raw == 10, raw == 150, raw == 250], [1, 2, 3], 0)
    assert np.array_equal(vol.label, expected)
    # an unexpected raw label value is named
    bad = raw.copy()
    bad[0, 0, 0] = 77
    _save(tmp_path / "subject-2-label.hdr", bad, analyze=True)
    with pytest.raises(DataError, match=r"unexpected label values \[77\]"):
        reader.load(subjects[1])


def test_nifti_glob_csv_and_bad_inputs(tmp_path):
    img = np.ones((8, 8, 8), np.float32)
    _save(tmp_path / "a_t1.nii.gz", img)
    _save(tmp_path / "a_seg.nii.gz", np.zeros((8, 8, 8), np.uint8))
    _save(tmp_path / "b_t1.nii.gz", img)
    _save(tmp_path / "b_seg.nii.gz", np.zeros((8, 8, 9), np.uint8))  # wrong shape
    reader = NiftiVolumes(tmp_path, images=["*_t1.nii.gz"], label="*_seg.nii.gz")
    a, b = reader.subjects()
    assert reader.load(a).label.shape == (8, 8, 8)
    with pytest.raises(DataError, match=r"label map .*b_seg.nii.gz has shape \(8, 8, 9\)"):
        reader.load(b)
    _save(tmp_path / "c_t1.nii.gz", img)  # no label file
    with pytest.raises(DataError, match="subject 'c'.*missing"):
        reader.subjects()
    # CSV with relative paths, two modalities of different shapes
    _save(tmp_path / "a_t2.nii.gz", np.ones((8, 8, 7), np.float32))
    (tmp_path / "list.csv").write_text("subject_id,t1,t2,label\na,a_t1.nii.gz,a_t2.nii.gz,a_seg.nii.gz\n")
    csv_reader = NiftiVolumes(tmp_path, images=["t1", "t2"], label="label", csv="list.csv")
    (subject,) = csv_reader.subjects()
    with pytest.raises(DataError, match="modalities must share one grid"):
        csv_reader.load(subject)
    (tmp_path / "list.csv").write_text("subject_id,t1,label\na,missing.nii.gz,a_seg.nii.gz\n")
    with pytest.raises(DataError, match=r"row 2, column 't1': file not found"):
        NiftiVolumes(tmp_path, images=["t1"], label="label", csv="list.csv").subjects()
    with pytest.raises(DataError, match="label values \\[2\\] are not class indices"):
        from datamodules.volumes import remap_labels
        remap_labels(np.array([0.0, 2.0]), None, 2, "x.nii")
    (tmp_path / "junk.nii.gz").write_bytes(b"not a volume")
    with pytest.raises(DataError, match="cannot read volume"):
        from datamodules.volumes import read_volume
        read_volume(tmp_path / "junk.nii.gz")


# -------------------------------------------------------------------------------------------- patches
def test_zscore_per_channel_and_clamp():
    x = torch.randn(2, 8, 8, 8) * torch.tensor([3.0, 0.5]).view(2, 1, 1, 1) + 7
    z = zscore(x)
    torch.testing.assert_close(z.mean(dim=(1, 2, 3)), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.std(dim=(1, 2, 3), unbiased=False), torch.ones(2), atol=1e-5, rtol=0)
    const = torch.full((1, 4, 4, 4), 5.0)
    const[0, 0, 0, 0] = 5.0 + 1e-3  # std far below 1/sqrt(64): divided by 1/8, not by the tiny std
    z = zscore(const)
    assert abs(float(z.max()) - (1e-3 - 1e-3 / 64) * 8) < 1e-4
    batch = torch.stack([x, 2 * x])
    torch.testing.assert_close(zscore(batch, channel_dim=1)[1], zscore(2 * x))


def test_patch_start_range_oracles():
    assert patch_start_range((10, 50), (0, 60), 32) == (10, 18)  # inside the box
    assert patch_start_range((10, 20), (0, 60), 32) == (0, 10)  # box smaller: patch covers it
    assert patch_start_range((2, 8), (0, 40), 32) == (0, 2)  # ... and stays in the volume
    assert patch_start_range((10, 50), (0, 30), 16) == (10, 14)  # limited (hemisphere)
    with pytest.raises(DataError, match="smaller than the patch size"):
        patch_start_range((0, 10), (0, 20), 32)


def test_random_patches_lie_in_the_foreground_box_and_are_zscored():
    image = np.zeros((2, 40, 40, 40), np.float32)
    image[:, 5:35, 8:30, 3:38] = np.random.default_rng(0).random((2, 30, 22, 35)) + 1
    label = (image[0] > 1.5).astype(np.int64)
    vol = Volume("s", image, label, (1.0, 1.0, 1.0))
    box = foreground_box(image[0] != 0)
    assert box == ((5, 35), (8, 30), (3, 38))
    ds = RandomPatchDataset([vol], [(box, ((0, 40),) * 3)], (16, 16, 16), length=50)
    torch.manual_seed(0)
    starts = []
    for i in range(len(ds)):
        item = ds[i]
        s = item["patch_start"].tolist()
        starts.append(s)
        for (lo, hi), st in zip(box, s):
            assert lo <= st and st + 16 <= hi
        patch = image[(slice(None), *(slice(a, a + 16) for a in s))]
        torch.testing.assert_close(item["image"], zscore(torch.from_numpy(patch)))
        assert torch.equal(item["label_map"][0], torch.from_numpy(label[tuple(slice(a, a + 16) for a in s)]))
    assert len({tuple(s) for s in starts}) > 40  # random, not one patch
    torch.manual_seed(0)
    assert [ds[i]["patch_start"].tolist() for i in range(len(ds))] == starts  # reproducible under a seed


def test_volume_datamodule_subject_and_hemisphere_holdout(synthetic):
    dm = VolumeSegmentationDataModule(synthetic, patch_size=16, batch_size=2, patches_per_epoch=4)
    dm.prepare_data()
    dm.setup("fit")
    # default: the last subject is the test split, the one before it validation: selection never sees test
    assert [v.subject_id for v in dm.datasets["train"].volumes] == ["00"]
    assert [v.subject_id for v in dm.datasets["val"].volumes] == ["01"]
    assert [v.subject_id for v in dm.datasets["test"].volumes] == ["02"]
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 2, 16, 16, 16) and batch["label_map"].shape == (2, 1, 16, 16, 16)
    val = next(iter(dm.val_dataloader()))
    box = dm.datasets["val"].boxes[0]
    assert val["image"].shape[2:] == tuple(hi - lo for lo, hi in box)
    assert float(val["image"].min()) >= 0  # raw intensities: the predictor z-scores the windows

    hemi = VolumeSegmentationDataModule(synthetic, patch_size=8, holdout="hemisphere", patches_per_epoch=20)
    hemi.setup("fit")
    for ranges, ebox in zip(hemi.datasets["train"].ranges, hemi.datasets["val"].boxes):
        mid = ebox[0][0]
        assert ranges[0][1] + 8 <= mid  # every training patch ends before the evaluated half starts
    with pytest.raises(DataError, match="no training subject left"):
        VolumeSegmentationDataModule(synthetic, val_subjects=["00", "01"], test_subjects=["02"], patch_size=8).setup()
    with pytest.raises(DataError, match="smaller than the patch size"):
        VolumeSegmentationDataModule(synthetic, patch_size=48).setup()


# ----------------------------------------------------------------------------------------- real data
@pytest.mark.needs_shared_data
def test_mni152_template_hemisphere_split(shared_data):
    root = shared_data / "mni152-tissue"
    if not root.is_dir():
        pytest.skip(f"{root} not found")
    reader = MNI152Tissue(root)
    (subject,) = reader.subjects()
    vol = reader.load(subject)
    assert vol.image.shape == (1, 99, 117, 95) and vol.spacing == (2.0, 2.0, 2.0)
    assert np.bincount(vol.label.ravel()).tolist() == [883983, 137614, 78788]  # README counts
    dm = VolumeSegmentationDataModule(reader, holdout="hemisphere")
    dm.setup("fit")
    (ebox,) = dm.datasets["val"].boxes
    assert ebox[0] == (49, 86)  # the T1 box spans 13..85 on axis 0; the split is at its middle
    assert dm.datasets["train"].ranges[0][0] == (13, 17)  # 32-voxel patches in [13, 49)


@pytest.mark.needs_shared_data
def test_covid_lung_masks_split_by_patient(shared_data):
    root = shared_data / "covid-cxr-mini"
    if not root.is_dir():
        pytest.skip(f"{root} not found")
    dm = LungSegmentationDataModule(root, image_size=64, batch_size=4)
    dm.setup("fit")
    assert len(dm.records) == 85 and dm.records["patient_id"].nunique() == 48  # v7labs masks (README)
    patients = {k: set(d.patients) for k, d in dm.datasets.items()}
    assert not (patients["train"] & patients["val"]) and not (patients["train"] & patients["test"])
    assert not (patients["val"] & patients["test"])
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 1, 64, 64) and set(batch["label_map"].unique().tolist()) <= {0, 1}
    assert 0.1 < float(batch["label_map"].float().mean()) < 0.6
    assert math.isclose(float(batch["image"][0].mean()), 0.0, abs_tol=1e-4)
    fallback = LungSegmentationDataModule(root, fallback_mask_dir="masks_lungvae")
    assert len(fallback.read_records()) == 100  # at least one mask (README)
    with pytest.raises(DataError, match="COVID metadata: file not found"):
        LungSegmentationDataModule(root / "nowhere").read_records()
