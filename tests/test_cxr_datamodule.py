"""CXRDataModule on the built-in synthetic data: the batch contract, streams, two views, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datamodules.batch import STREAM_BOX, STREAM_LABEL, STREAM_UNLABELED
from datamodules.cxr import CXRDataModule
from datamodules.manifest import DataError, Manifest
from datamodules.synthetic import SyntheticCXR


# 120 tiny images: min_per_class=0 below, class counts per split are tested in test_splits_stratified.py
@pytest.fixture(scope="module")
def reader(tmp_path_factory):
    return SyntheticCXR(cache_dir=tmp_path_factory.mktemp("cache"), n_images=120, image_size=64, seed=0)


def test_mixed_batch_follows_the_contract(reader):
    dm = CXRDataModule(reader, min_per_class=0, image_size=48, box_fraction=0.1, unlabeled_fraction=0.3, box_batch_size=2,
                       labeled_batch_size=4, unlabeled_batch_size=3, two_views=True, seed=1)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == batch["image_teacher"].shape == (9, 1, 48, 48)
    assert batch["stream"].tolist() == [STREAM_BOX] * 2 + [STREAM_LABEL] * 4 + [STREAM_UNLABELED] * 3
    unlabeled = batch["stream"] == STREAM_UNLABELED
    assert not batch["label_mask"][unlabeled].any() and batch["labels"][unlabeled].abs().sum() == 0  # no leak
    assert batch["label_mask"][~unlabeled].all()
    assert batch["has_boxes"].tolist() == [True] * 2 + [False] * 7
    assert all(len(b) > 0 for b in batch["boxes"][:2]) and all(len(b) == 0 for b in batch["boxes"][2:])
    for boxes in batch["boxes"][:2]:
        assert boxes.shape[1] == 4 and (boxes[:, 2:] > boxes[:, :2]).all() and boxes.max() <= 48
    assert batch["attention_mask"].shape == (9, 1, 48, 48) and batch["has_attention_mask"].all()
    assert batch["frame"].shape == (9, 3)
    assert len(batch["image_id"]) == len(batch["patient_id"]) == 9
    summary = dm.summary.set_index("split")
    assert summary.loc["train/unlabeled", "images"] == round(0.3 * len(dm.splits["train"]))


def test_splits_are_patient_disjoint_and_eval_is_not_augmented(reader):
    dm = CXRDataModule(reader, min_per_class=0, image_size=48, seed=0)
    dm.setup("fit")
    pids = dm.manifest.records["patient_id"].to_numpy()
    sets = {name: set(pids[idx]) for name, idx in dm.splits.items()}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    first = next(iter(dm.val_dataloader()))
    again = next(iter(dm.val_dataloader()))
    assert torch.equal(first["image"], again["image"])


def test_bad_configuration_errors_name_the_problem(reader, tmp_path):
    with pytest.raises(DataError, match="unlabeled_batch_size=2 but the training split has no unlabeled"):
        dm = CXRDataModule(reader, min_per_class=0, image_size=32, unlabeled_batch_size=2)
        dm.train_dataloader()
    with pytest.raises(DataError, match="the test split is empty"):
        CXRDataModule(reader, min_per_class=0, image_size=32, test_fraction=0.001).setup("fit")

    class EmptyReader:
        def load(self):
            import pandas as pd

            return Manifest(pd.DataFrame(columns=["image_id", "image_path", "patient_id"]), np.zeros((0, 1)), ["a"],
                            source="empty.csv")

    with pytest.raises(DataError, match="returned no images"):
        CXRDataModule(EmptyReader()).setup("fit")


def test_missing_image_names_its_path(reader, tmp_path):
    manifest = reader.load()
    manifest.records.loc[0, "image_path"] = str(tmp_path / "gone.png")

    class Fixed:
        def load(self):
            return manifest

    dm = CXRDataModule(Fixed(), min_per_class=0, image_size=32, val_fraction=0.0, test_fraction=0.0, seed=0)
    dm.setup("fit")
    from datamodules.dataset import CXRDataset
    from datamodules.transforms import CXRTransform

    with pytest.raises(DataError, match="gone.png"):
        CXRDataset(manifest, CXRTransform(32), STREAM_LABEL)[0]


def test_skip_corrupt_drops_and_counts_unreadable_images(reader, tmp_path):
    manifest = reader.load()
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    manifest.records.loc[3, "image_path"] = str(broken)
    manifest.records.loc[5, "image_path"] = str(tmp_path / "absent.png")

    class Fixed:
        def load(self):
            return manifest

    dm = CXRDataModule(Fixed(), min_per_class=0, image_size=32, skip_corrupt=True)
    dm.setup("fit")
    assert len(dm.manifest) == len(manifest) - 2
    assert len(dm.report["skipped_corrupt"]) == 2
    assert any("broken.png" in m for m in dm.report["skipped_corrupt"])
    assert any("absent.png" in m for m in dm.report["skipped_corrupt"])


def test_train_masks_false_skips_mask_decoding_in_training_only(reader, tmp_path):
    """``train_masks=False``: training samples never open the mask files (a missing mask is no error there) and
    carry zero masks flagged absent; validation still reads the masks, so the missing file is reported there."""
    manifest = reader.load()
    manifest.records["attention_mask_path"] = str(tmp_path / "missing_mask.png")

    class Fixed:
        def load(self):
            return manifest

    dm = CXRDataModule(Fixed(), min_per_class=0, image_size=32, labeled_batch_size=4, train_masks=False, seed=0)
    batch = next(iter(dm.train_dataloader()))
    assert not batch["has_mask"].any() and not batch["has_attention_mask"].any()
    assert batch["mask"].abs().sum() == 0 and batch["attention_mask"].abs().sum() == 0
    with pytest.raises(DataError, match="missing_mask.png"):
        next(iter(dm.val_dataloader()))
    loaded = next(iter(CXRDataModule(reader, min_per_class=0, image_size=32, labeled_batch_size=4, seed=0).train_dataloader()))
    assert loaded["has_mask"].all() and loaded["mask"].sum() > 0  # the default reads the lung masks


def test_evaluation_split_smaller_than_the_ranks_is_refused_on_every_rank():
    """1 validation item and 2 DDP ranks: rank 1 would get nothing, fail alone in Lightning, and leave rank 0 waiting
    in a collective until the process-group timeout. Every rank must refuse at once, naming the split."""
    from datamodules.dataset import UnpaddedDistributedSampler
    from datamodules.manifest import DataError

    for rank in (0, 1):
        with pytest.raises(DataError, match=r"the val split has 1 item\(s\), fewer than the 2 DDP ranks"):
            UnpaddedDistributedSampler(1, 2, rank, "the val split")
    assert [list(UnpaddedDistributedSampler(3, 2, r)) for r in (0, 1)] == [[0, 2], [1]]  # no padding, none lost
    assert len(UnpaddedDistributedSampler(0, 2, 1)) == 0  # an empty split is the DataModule's to refuse
