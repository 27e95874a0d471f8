"""Slice-stack data: synthetic generator (deterministic, cached atomically), HDF5 and NIfTI readers agree,
subject splits, batch contract (streams, hidden labels, aligned views, dilated attention masks), bad input."""

from __future__ import annotations

import os
from types import SimpleNamespace

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from datamodules.manifest import DataError
from datamodules.readers.slices import H5SliceReader, NiftiSliceReader, normalize_intensity
from datamodules.slice_dataset import SliceTransform
from datamodules.slices import SliceStackDataModule
from datamodules.subject_splits import split_subjects
from datamodules.synthetic_slices import (CARTILAGE_LABEL, SyntheticSlices, SyntheticSlicesConfig, render_subject,
                                          write_synthetic_slices)

PARAMS = dict(n_subjects=10, image_size=32, min_slices=4, max_slices=6, seed=0)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_synthetic_slices(tmp_path_factory.mktemp("slices") / "data", **PARAMS)


def test_generator_is_deterministic_and_graded():
    config = SyntheticSlicesConfig(**PARAMS)
    plan_a, vol_a, seg_a = render_subject(config, 3)
    plan_b, vol_b, seg_b = render_subject(config, 3)
    assert np.array_equal(vol_a, vol_b) and np.array_equal(seg_a, seg_b)
    assert vol_a.shape == (32, 32, plan_a["n"]) and vol_a.dtype == np.uint16
    for i in range(10):
        plan = render_subject(config, i)[0]
        assert plan["grade"] == int(plan["slice_grades"].max())  # subject grade = worst slice
    assert not np.array_equal(render_subject(SyntheticSlicesConfig(**{**PARAMS, "seed": 1}), 3)[1], vol_a)


def test_cache_is_reused_and_foreign_dirs_are_refused(root, tmp_path):
    done = root / "DONE"
    stamp = done.stat().st_mtime_ns
    assert write_synthetic_slices(root, **PARAMS) == root and done.stat().st_mtime_ns == stamp
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left behind
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="DONE"):
        write_synthetic_slices(foreign, **PARAMS)
    assert (foreign / "notes.txt").exists()


def test_h5_and_nifti_layouts_agree(root):
    a = H5SliceReader(root / "h5").load()
    b = NiftiSliceReader(root / "nifti").load()
    cols = ["image_id", "subject_id", "slice_index", "label"]
    pd.testing.assert_frame_equal(a.slices[cols], b.slices[cols])
    pd.testing.assert_frame_equal(a.subjects, b.subjects)
    for i in (0, len(a.slices) - 1):
        (xa, sa), (xb, sb) = a.load_slice(i), b.load_slice(i)
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(sa, sb)
        assert xa.dtype == np.float32 and xa.min() == 0.0 and xa.max() == 1.0
    with h5py.File(a.slices["path"].iloc[0], "r") as f:
        assert set(f) == {"image", "masks", "label"}


def test_intensity_normalization_clips_percentiles():
    image = np.arange(10000, dtype=np.float32)
    image[0] = -1e6  # an outlier far below the 0.1 percentile
    out = normalize_intensity(image)
    assert out.min() == 0.0 and out.max() == 1.0 and out[5000] == pytest.approx(0.5, abs=0.01)
    assert normalize_intensity(np.full((4, 4), 7.0)).max() == 0.0


def test_split_subjects_by_subject_and_label_ratio():
    subjects = pd.DataFrame({"subject_id": [f"s{i:02d}" for i in range(40)], "subject_label": np.arange(40) % 3,
                             "fold": np.nan})
    held = []
    for fold in range(5):  # the reference protocol: no validation split, asked for explicitly
        split = split_subjects(subjects, 5, fold, 0.0, 0.25, seed=0, no_validation_split=True)
        assert not set(split["train"]) & set(split["test"]) and split["val"] == []
        assert set(split["labeled"]) <= set(split["train"])
        assert abs(len(split["labeled"]) - 0.25 * len(split["train"])) <= 2
        labels = subjects.set_index("subject_id").loc[split["labeled"], "subject_label"]
        assert set(labels) == {0, 1, 2}  # stratified
        assert set(subjects.set_index("subject_id").loc[split["test"], "subject_label"]) == {0, 1, 2}
        held += split["test"]
    assert sorted(held) == sorted(subjects["subject_id"])  # the folds partition the subjects
    assert split_subjects(subjects, 5, 2, seed=0) == split_subjects(subjects, 5, 2, seed=0)
    carved = split_subjects(subjects, 5, 0, 0.25, 0.25, seed=0)
    assert len(carved["val"]) == 8 and set(subjects.set_index("subject_id").loc[carved["val"], "subject_label"]) == {
        0, 1, 2}
    assert not set(carved["val"]) & set(carved["train"]) and not set(carved["val"]) & set(carved["test"])
    # explicit folds from the subject table win
    with_folds = subjects.assign(fold=np.arange(40) % 4)
    assert split_subjects(with_folds, 5, 3, 0.25, 0.25)["test"] == [f"s{i:02d}" for i in range(3, 40, 4)]


def _datamodule(root, **kw) -> SliceStackDataModule:
    reader = SyntheticSlices(cache_dir=root.parent, **{k: v for k, v in PARAMS.items()})
    reader.root = root  # the fixture's directory (same parameters)
    args = dict(image_size=32, labeled_batch_size=2, unlabeled_batch_size=4, eval_batch_size=8, label_ratio=0.3,
                cache=True, min_per_class=0)  # 10 subjects: class counts are not what these tests check
    args.update(kw)
    return SliceStackDataModule(reader, **args)


def test_training_batch_contract(root):
    dm = _datamodule(root)
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == batch["image_teacher"].shape == (6, 1, 32, 32)
    assert batch["stream"].tolist() == [1, 1, 2, 2, 2, 2]  # labeled first, as the reference
    assert batch["label_mask"][:2].all() and not batch["label_mask"][2:].any()
    assert batch["labels"][2:].abs().sum() == 0 and (batch["subject_label"][2:] == -1).all()
    assert (batch["labels"][:2].sum(1) == 1).all()
    labeled_subjects = set(dm.split["labeled"])
    assert all(s in labeled_subjects for s in batch["subject_id"][:2])
    assert all(s not in labeled_subjects for s in batch["subject_id"][2:])
    assert set(batch["attention_mask"].unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(batch["image"], batch["image_teacher"])  # independent photometry
    assert batch["slice_index"].dtype == torch.long and len(batch["image_id"]) == 6


def test_views_share_geometry():
    """Without photometric noise the two views are identical although flips/affines are random: the geometry
    is drawn once per slice (the reference drew it per view, dossier e.5)."""
    image = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    seg = np.zeros((32, 32), np.int64)
    seg[10:14, 5:20] = CARTILAGE_LABEL
    t = SliceTransform(32, train=True, two_views=True, flip_prob=1.0, affine_prob=1.0, rotate_deg=20, brightness=0,
                       contrast=0, blur_prob=0, noise_std=0, seed=1)
    out = t(image, seg)
    torch.testing.assert_close(out["image"], out["image_teacher"])
    plain = SliceTransform(32, train=False)(image, seg)
    assert not torch.equal(out["image"], plain["image"])  # the geometry did act
    assert not torch.equal(out["attention_mask"], plain["attention_mask"])  # the masks moved with the image


def test_attention_mask_is_dilated_cartilage():
    seg = np.zeros((64, 64), np.int64)
    seg[30:32, 20:40] = CARTILAGE_LABEL
    seg[40:50, 20:40] = 1  # bone: not an attention target
    out = SliceTransform(64, train=False, attention_dilation=18)(np.zeros((64, 64), np.float32), seg)
    mask = out["attention_mask"][0]
    assert mask[30:32, 20:40].all()  # contains the cartilage
    assert mask.sum() > 40 and mask[31, 18] == 1 and mask[31, 17] == 0  # diameter 18 at 256 px -> 5 px at 64
    assert mask[45, 30] == 0
    assert out["mask"][0, 45, 30] == 1  # the organ mask covers all labels


def test_eval_and_predict_loaders(root):
    dm = _datamodule(root)
    dm.setup()
    val = next(iter(dm.val_dataloader()))
    assert val["label_mask"].all() and "image_teacher" not in val
    assert set(val["subject_id"]) <= set(dm.split["val"])
    n = sum(len(b["image_id"]) for b in dm.predict_dataloader())
    assert n == len(dm.table.slices)
    assert dm.num_classes == 3 and dm.task == "multiclass"


def test_ddp_ranks_workers_draw_different_augmentations(root):
    """Augmentation is keyed per sample (``datamodules/dataset.py``): the same key (index, epoch, position) gives the
    same draw again whatever was drawn before (no worker history), another rank or epoch a different one."""
    from datamodules.dataset import SampleKey

    def draws(rank: int, epoch: int = 0, warm_up: bool = False) -> torch.Tensor:
        dm = _datamodule(root)
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2, is_global_zero=rank == 0)
        loader = dm.train_dataloader()
        assert loader.worker_init_fn is None and loader.sampler.keyed
        if warm_up:  # a worker that transformed other samples first
            for i in range(4):
                loader.dataset[SampleKey(i, epoch, 50 + i)]
        return torch.stack([loader.dataset[SampleKey(i, epoch, i)]["image"] for i in range(3)])

    rank0, rank1 = draws(0), draws(1)
    torch.testing.assert_close(draws(0, warm_up=True), rank0, rtol=0, atol=0)
    torch.testing.assert_close(draws(1), rank1, rtol=0, atol=0)
    assert not torch.allclose(rank0, rank1)
    assert not torch.allclose(draws(0, epoch=1), rank0)


def test_bad_inputs_name_the_file(tmp_path):
    bad = tmp_path / "h5"
    bad.mkdir()
    with pytest.raises(DataError, match="no .h5"):
        H5SliceReader(bad).load()
    with h5py.File(bad / "s1_000.h5", "w") as f:
        f.create_dataset("label", data=7)
        f.create_dataset("masks", data=np.zeros((4, 4)))
    with pytest.raises(DataError, match="s1_000"):
        H5SliceReader(bad).load()  # label 7 is not a class
    with h5py.File(bad / "s1_000.h5", "w") as f:
        f.create_dataset("label", data=1)
    with pytest.raises(DataError, match="no 'image' dataset"):
        H5SliceReader(bad).load().load_slice(0)
    (bad / "oops.h5").write_bytes(b"")
    with pytest.raises(DataError, match="oops"):
        H5SliceReader(bad).load()
    os.remove(bad / "oops.h5")
    nifti = tmp_path / "nifti"
    nifti.mkdir()
    pd.DataFrame({"subject_id": ["a"], "image_path": ["a.nii.gz"], "slice_index": [0]}).to_csv(nifti / "slices.csv")
    with pytest.raises(DataError, match="label"):
        NiftiSliceReader(nifti).load()
    pd.DataFrame({"subject_id": ["a"], "image_path": ["a.nii.gz"], "slice_index": [0], "label": [1]}).to_csv(
        nifti / "slices.csv", index=False)
    with pytest.raises(DataError, match="missing volume"):
        NiftiSliceReader(nifti).load()
