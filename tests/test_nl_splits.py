"""Subject splits of the volume DataModule: train / validation / test are disjoint, and the synthetic
Non-local U-Net config keeps the test subjects out of checkpoint selection (issue 14, section 3)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from datamodules.manifest import DataError
from datamodules.volume_segmentation import VolumeSegmentationDataModule
from datamodules.synthetic_volumes import SyntheticVolumes

ROOT = Path(__file__).resolve().parents[1]


class _Ids:
    """Only ``held_out`` is exercised: no volume is read."""

    def __init__(self, **kwargs):
        self.dm = VolumeSegmentationDataModule(reader=None, **kwargs)

    def __call__(self, ids):
        return self.dm.held_out(ids)


IDS = ["00", "01", "02", "03", "04"]


def test_default_split_keeps_validation_and_test_apart():
    assert _Ids()(IDS) == (["03"], ["04"])
    assert _Ids(val_subjects=["04"])(IDS) == (["04"], ["03"])  # test: the last subject not used for validation
    assert _Ids(test_subjects=["00", "01"])(IDS) == (["04"], ["00", "01"])
    assert _Ids(val_subjects=[4], test_subjects=[10])([str(i) for i in range(11)]) == (["4"], ["10"])  # as strings


@pytest.mark.parametrize("kwargs, message", [
    ({"val_subjects": ["03"], "test_subjects": ["03", "04"]}, r"val_subjects and test_subjects share \['03'\]"),
    ({"val_subjects": []}, "val_subjects is an empty list"),
    ({"test_subjects": []}, "test_subjects is an empty list"),
    ({"test_subjects": ["07"]}, r"test_subjects: subject ids \['07'\] are not among"),
    ({"val_subjects": ["x"]}, r"val_subjects: subject ids \['x'\] are not among"),
])
def test_bad_splits_name_the_argument(kwargs, message):
    with pytest.raises(DataError, match=message):
        _Ids(**kwargs)(IDS)


def test_one_subject_cannot_be_both_validation_and_test():
    with pytest.raises(DataError, match="val_subjects: no subject left"):
        _Ids()(["00"])


def test_synthetic_config_splits_by_subject_without_overlap(tmp_path):
    """The config's own data section, on a smaller grid: 4 / 1 / 2 subjects, disjoint, whatever the run seed."""
    config = yaml.safe_load((ROOT / "experiments/nonlocal_unet/synthetic.yaml").read_text())
    args = config["data"]["init_args"]
    reader_args = dict(args["reader"]["init_args"], shape=[32, 32, 32], cache_dir=tmp_path)
    reader = SyntheticVolumes(**reader_args)
    kwargs = {k: v for k, v in args.items() if k != "reader"}
    dm = VolumeSegmentationDataModule(reader, **kwargs)
    dm.setup("fit")
    split = {k: [v.subject_id for v in d.volumes] for k, d in dm.datasets.items()}
    assert split == {"train": ["00", "01", "02", "03"], "val": ["04"], "test": ["05", "06"]}
    # the subjects are a function of the data seed only: another run seed gives the same subjects, voxel for voxel
    import lightning.pytorch as pl
    import numpy as np

    pl.seed_everything(123)
    again = VolumeSegmentationDataModule(SyntheticVolumes(**reader_args), **kwargs)
    again.setup("fit")
    for stage in ("train", "val", "test"):
        for a, b in zip(dm.datasets[stage].volumes, again.datasets[stage].volumes):
            assert a.subject_id == b.subject_id and np.array_equal(a.image, b.image)
