"""Tiny instances of every method, for tests and contract checks (not for experiments).

Each factory ``f(tmp_dir) -> (module, datamodule)`` builds the method's LightningModule on a tiny network
(``test_resnet`` backbones, a few filters) and its DataModule on small synthetic data cached under ``tmp_dir``, so
that a CPU forward/backward takes about a second. :data:`FACTORIES` maps the registry name to the factory;
:func:`lightning_modules.registry.register_method` points every registered method's ``MethodSpec.tiny`` here, so
``METHODS["pcam"].tiny(tmp_dir)`` and ``lightning_modules.tiny.pcam(tmp_dir)`` are the same call.

Imports are inside the factories: the method files import nothing from here, and importing this module builds no
network and reads no data.

Example:
    >>> module, data = FACTORIES["pcam"](tmp_dir)  # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

__all__ = ["FACTORIES", "cam_baseline", "dcmt", "dcmt_subject", "magsd", "nonlocal_unet", "oxnet", "pcam",
           "retinanet", "write_tiny_features"]

# Tiny datasets cannot hold the per-class minimum a real split asks for; class counts are not what these test.
NO_CLASS_MINIMUM = dict(min_per_class=0)


# ---------------------------------------------------------------------------------- classification (CXR)
def cam_baseline(tmp_dir: Path):
    """CAM (GAP + linear head) on ``test_resnet``, 48 synthetic multi-label 64 px images shown at 32 px."""
    from datamodules.cxr import CXRDataModule
    from datamodules.synthetic import SyntheticCXR
    from lightning_modules.cam_baseline import CAMClassifierModule
    from networks.cam_classifier import CAMNet

    data = CXRDataModule(SyntheticCXR(cache_dir=Path(tmp_dir) / "synthetic", n_images=48, image_size=64, seed=0),
                         image_size=32, labeled_batch_size=4, eval_batch_size=8, **NO_CLASS_MINIMUM)
    module = CAMClassifierModule(CAMNet("test_resnet", num_classes=data.num_classes))
    return module, data


def pcam(tmp_dir: Path):
    """PCAM pooling on ``test_resnet``, 48 synthetic multi-label 64 px images shown at 32 px."""
    from datamodules.cxr import CXRDataModule
    from datamodules.synthetic import SyntheticCXR
    from lightning_modules.pcam import PCAMModule
    from networks.cam_heads import PoolingClassifier

    data = CXRDataModule(SyntheticCXR(cache_dir=Path(tmp_dir) / "synthetic", n_images=48, image_size=64, seed=0),
                         image_size=32, labeled_batch_size=4, eval_batch_size=8, **NO_CLASS_MINIMUM)
    module = PCAMModule(PoolingClassifier("test_resnet", num_classes=data.num_classes, pool="pcam"),
                        class_names=data.class_names)
    return module, data


def magsd(tmp_dir: Path):
    """A tiny MAG-SD (``test_resnet``, 8 maps, 64 px) on a small single-label synthetic dataset."""
    from datamodules.cxr import CXRDataModule
    from datamodules.synthetic import SyntheticCXR
    from lightning_modules.magsd import MAGSDModule
    from networks.magsd import MAGSDNet

    reader = SyntheticCXR(cache_dir=Path(tmp_dir) / "synthetic", n_images=48, image_size=64, single_label=True)
    datamodule = CXRDataModule(reader, image_size=64, labeled_batch_size=4, eval_batch_size=8,
                               val_fraction=0.2, test_fraction=0.2, **NO_CLASS_MINIMUM)
    module = MAGSDModule(MAGSDNet(num_classes=4, backbone="test_resnet", num_maps=8))
    return module, datamodule


# -------------------------------------------------------------------------------------- detection (CXR)
def retinanet(tmp_dir: Path):
    """RetinaNet with a P3-P5 pyramid of 16 channels on 48 synthetic 64 px images, half of them with boxes."""
    from datamodules.cxr import CXRDataModule
    from datamodules.synthetic import SyntheticCXR
    from lightning_modules.retinanet import RetinaNetModule
    from networks.retina import RetinaNet

    data = CXRDataModule(SyntheticCXR(cache_dir=Path(tmp_dir) / "synthetic", n_images=48, image_size=64, seed=0,
                                      box_fraction=0.5),
                         image_size=64, box_fraction=0.3, box_batch_size=2, labeled_batch_size=0, eval_batch_size=8,
                         **NO_CLASS_MINIMUM)
    net = RetinaNet(num_classes=data.num_classes, backbone="test_resnet", fpn_levels=(3, 4, 5), fpn_channels=16,
                    head_depth=1, anchor_size_factor=2.0)
    return RetinaNetModule(net), data


def oxnet(tmp_dir: Path):
    """OXnet on the tiny RetinaNet, 60 synthetic images in the three streams (boxes, labels, unlabeled)."""
    from datamodules.cxr import CXRDataModule
    from datamodules.synthetic import SyntheticCXR
    from lightning_modules.oxnet import OXnetModule
    from networks.oxnet import OXnet
    from networks.retina import RetinaNet

    data = CXRDataModule(SyntheticCXR(cache_dir=Path(tmp_dir) / "synthetic", n_images=60, image_size=64, seed=0,
                                      box_fraction=0.5),
                         image_size=64, box_fraction=0.2, unlabeled_fraction=0.3, box_batch_size=1,
                         labeled_batch_size=1, unlabeled_batch_size=1, two_views=True, eval_batch_size=8,
                         **NO_CLASS_MINIMUM)
    net = OXnet(RetinaNet(num_classes=data.num_classes, backbone="test_resnet", fpn_levels=(3, 4, 5),
                          fpn_channels=16, head_depth=1, anchor_size_factor=2.0))
    return OXnetModule(net, freeze_bn=False), data


# ---------------------------------------------------------------------------------------- DC-MT (MRI)
def dcmt(tmp_dir: Path):
    """DC-MT stage 1 on 10 synthetic subjects of 4-6 slices at 32 px, half of them labeled, consistency from the
    first epoch (``consistency_start=0``) so every loss term runs."""
    from datamodules.slices import SliceStackDataModule
    from datamodules.synthetic_slices import SyntheticSlices
    from lightning_modules.dcmt import MeanTeacherModule
    from networks.dcmt import DCMTNet

    data = SliceStackDataModule(SyntheticSlices(cache_dir=Path(tmp_dir) / "synthetic", n_subjects=10, image_size=32,
                                                min_slices=4, max_slices=6),
                                image_size=32, labeled_batch_size=2, unlabeled_batch_size=4, eval_batch_size=8,
                                label_ratio=0.5, cache=True, **NO_CLASS_MINIMUM)
    net = DCMTNet("test_resnet", num_classes=3, fa_channels=16, head_channels=16)
    return MeanTeacherModule(net, consistency_start=0), data


def dcmt_subject(tmp_dir: Path):
    """DC-MT stage 2 (bi-GRU) on a 12-subject slice-feature file from :func:`write_tiny_features`."""
    from datamodules.subject_features import SubjectFeatureDataModule
    from lightning_modules.dcmt_subject import SubjectAggregationModule
    from networks.dcmt_subject import BiGRUAggregator

    # 2 validation subjects, so that a 2-process DDP run gives each rank one
    path = write_tiny_features(Path(tmp_dir) / "tiny_slice_features.npz", split={"val_fraction": 0.25})
    data = SubjectFeatureDataModule(path, seq_len=6, labeled_batch_size=2, unlabeled_batch_size=2, eval_batch_size=8)
    net = BiGRUAggregator(in_features=16, seq_len=6, embed_channels=(16, 8), hidden_size=8)
    return SubjectAggregationModule(net, consistency_start=0), data


def write_tiny_features(path: Path, n_subjects: int = 12, dim: int = 16, k: int = 3, seed: int = 0,
                        split: dict | None = None) -> Path:
    """A small slice-feature file with a learnable signal, in the SliceFeatureWriter format, with the stage-1 split
    record of ``datamodules.subject_splits.split_subjects(subjects, **split)`` (default: 3 folds, fold 0, label
    ratio 0.5); ``split=False`` writes no record (a file from before the record existed)."""
    rng = np.random.default_rng(seed)
    rows = {k_: [] for k_ in ("features", "probabilities", "image_id", "subject_id", "slice_index", "slice_label",
                              "subject_label")}
    for s in range(n_subjects):
        grade, n = s % k, int(rng.integers(4, 9))
        for i in range(n):
            f = rng.standard_normal(dim).astype(np.float32)
            f[grade] += 2.0
            rows["features"].append(f)
            rows["probabilities"].append(np.eye(k, dtype=np.float32)[grade] * 0.5 + 0.5 / k)
            rows["image_id"].append(f"s{s:03d}_{i:03d}")
            rows["subject_id"].append(f"s{s:03d}")
            rows["slice_index"].append(i)
            rows["slice_label"].append(grade)
            rows["subject_label"].append(grade)
    arrays = {key: np.asarray(v) for key, v in rows.items()}
    if split is not False:
        import pandas as pd

        from datamodules.subject_splits import role_frame, split_subjects, subject_folds

        args = {"num_folds": 3, "fold": 0, "label_ratio": 0.5, "seed": 0, **(split or {})}
        subjects = pd.DataFrame({"subject_id": [f"s{s:03d}" for s in range(n_subjects)],
                                 "subject_label": np.arange(n_subjects) % k * 1.0, "fold": np.nan})
        roles = role_frame(split_subjects(subjects, **args), subject_folds(subjects, args["num_folds"], args["seed"]))
        roles = roles.set_index("subject_id").reindex(arrays["subject_id"])
        arrays.update(subject_role=roles["role"].to_numpy().astype(str), subject_fold=roles["fold"].to_numpy(),
                      # min_per_class 0: a dozen subjects cannot hold 10 per class; counts are not what it is for
                      split_info=np.asarray(json.dumps({**args, "min_per_class": 0})))
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, class_names=np.array([f"grade_{i}" for i in range(k)]), **arrays)
    return path


# ------------------------------------------------------------------------------------- segmentation (3D)
def nonlocal_unet(tmp_dir: Path):
    """A 3D Non-local U-Net with 4 filters on three 24^3 synthetic subjects (train, val, test), 16^3 patches."""
    from datamodules.volume_segmentation import VolumeSegmentationDataModule
    from datamodules.synthetic_volumes import SyntheticVolumes
    from lightning_modules.nonlocal_unet import NonLocalUNetModule
    from networks.nonlocal_unet import NonLocalUNet

    reader = SyntheticVolumes(cache_dir=Path(tmp_dir), num_subjects=3, shape=(24, 24, 24))  # train, val, test
    data = VolumeSegmentationDataModule(reader, patch_size=16, batch_size=2, patches_per_epoch=4)
    net = NonLocalUNet(3, in_channels=reader.in_channels, num_classes=reader.num_classes, filters=4)
    module = NonLocalUNetModule(net, class_names=list(reader.class_names), roi_size=16, overlap=0.5)
    return module, data


FACTORIES: dict[str, Callable[[Path], tuple]] = {
    "cam_baseline": cam_baseline, "pcam": pcam, "magsd": magsd, "retinanet": retinanet, "oxnet": oxnet,
    "dcmt": dcmt, "dcmt_subject": dcmt_subject, "nonlocal_unet": nonlocal_unet,
}
