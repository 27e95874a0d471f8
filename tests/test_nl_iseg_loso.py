"""experiments/nonlocal_unet/iseg2017.yaml and the leave-one-subject-out driver, on tiny Analyze files written in
the iSeg-2017 layout (subject-<n>-{T1,T2,label}.hdr/.img; labels 0/10/150/250)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from datamodules.volume_segmentation import VolumeSegmentationDataModule
from datamodules.volumes import ISeg2017
from experiments.nonlocal_unet.loso import fold_plan, main, subjects_of

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "experiments/nonlocal_unet/iseg2017.yaml"


def write_iseg(root: Path, n: int = 3, shape=(16, 16, 16)) -> Path:
    """n subjects: a sphere of WM inside GM inside CSF, T1 bright in WM, T2 the reverse, zero background."""
    import nibabel as nib

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(s) - (s - 1) / 2 for s in shape], indexing="ij"))
    for i in range(1, n + 1):
        r = np.sqrt((grid ** 2).sum(0)) * (1 + 0.05 * i)
        label = np.select([r < 3, r < 5, r < 7], [250, 150, 10], 0).astype(np.uint8)
        t1 = np.select([label == 250, label == 150, label == 10], [800, 550, 250], 0) + rng.normal(0, 20, shape) * (label > 0)
        t2 = np.select([label == 250, label == 150, label == 10], [400, 600, 900], 0) + rng.normal(0, 20, shape) * (label > 0)
        for kind, data in (("T1", t1.astype(np.int16)), ("T2", t2.astype(np.int16)), ("label", label)):
            nib.save(nib.AnalyzeImage(data, np.eye(4)), str(root / f"subject-{i}-{kind}.hdr"))
    return root


def test_config_holds_the_paper_settings():
    config = yaml.safe_load((ROOT / CONFIG).read_text())
    net = config["model"]["init_args"]["net"]["init_args"]
    data = config["data"]["init_args"]
    assert config["data"]["init_args"]["reader"]["class_path"] == "datamodules.volumes.ISeg2017"
    assert (net["filters"], net["bottom_heads"], net["up_heads"], net["attn_drop"], net["drop"]) == (32, 2, 1, 0.5, 0.5)
    assert (data["patch_size"], data["batch_size"]) == (32, 5)
    model = config["model"]["init_args"]
    assert (model["loss"], model["overlap"], model["kernel_weight_decay"]) == ("ce", 0.75, 2e-6)
    assert model["optimizer"]["init_args"]["lr"] == 1e-3
    steps = config["trainer"]["max_epochs"] * data["patches_per_epoch"] // data["batch_size"]
    assert steps == 180_000  # the reference's train_epochs x 9 patches / batch 5


def test_folds_hold_each_subject_out_and_validate_on_the_next(tmp_path):
    root = write_iseg(tmp_path / "iseg")
    assert subjects_of([CONFIG], str(root)) == ["1", "2", "3"]
    assert fold_plan(["1", "2", "3"]) == [("1", "2"), ("2", "3"), ("3", "1")]
    assert fold_plan(["1", "2", "3"], ["3"]) == [("3", "1")]
    with pytest.raises(ValueError, match=r"--folds \['4'\] are not subject ids"):
        fold_plan(["1", "2", "3"], ["4"])
    with pytest.raises(ValueError, match="at least 3 subjects"):
        fold_plan(["1", "2"])
    # the config's data section with fold 1's split: 4 classes, T1 + T2, subjects disjoint
    args = yaml.safe_load((ROOT / CONFIG).read_text())["data"]["init_args"]
    kwargs = {k: v for k, v in args.items() if k != "reader"} | {"patch_size": 8, "test_subjects": ["1"],
                                                               "val_subjects": ["2"]}
    dm = VolumeSegmentationDataModule(ISeg2017(root), **kwargs)
    dm.setup("fit")
    assert dm.in_channels == 2 and dm.class_names == ["background", "CSF", "GM", "WM"]
    split = {k: [v.subject_id for v in d.volumes] for k, d in dm.datasets.items()}
    assert split == {"train": ["3"], "val": ["2"], "test": ["1"]}
    assert set(np.unique(dm.datasets["test"].volumes[0].label)) == {0, 1, 2, 3}


def test_dry_run_prints_one_fit_test_per_fold(tmp_path, capsys):
    root = write_iseg(tmp_path / "iseg")
    assert main(["-c", CONFIG, "--root", str(root), "--out", str(tmp_path / "runs"), "--dry-run"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("[loso]")]
    assert len(lines) == 3
    assert "test 2, validation 3" in lines[1] and "fit-test" in lines[1]
    assert "--data.init_args.test_subjects '[\"2\"]' --data.init_args.val_subjects '[\"3\"]'" in lines[1]


@pytest.mark.slow  # one fold in a child process: ~20-40 s on 2 cores
def test_one_fold_fits_tests_and_is_tabulated(tmp_path):
    root = write_iseg(tmp_path / "iseg")
    out = tmp_path / "runs"
    tiny = ["--trainer.max_epochs", "1", "--trainer.accelerator", "cpu", "--trainer.check_val_every_n_epoch", "1",
            "--data.init_args.patch_size", "8", "--data.init_args.patches_per_epoch", "4",
            "--data.init_args.batch_size", "2", "--model.init_args.net.init_args.filters", "4",
            "--model.init_args.overlap", "0.5", "--trainer.logger.init_args.offline", "true"]
    code = main(["-c", CONFIG, "--root", str(root), "--folds", "2", "--out", str(out), "--tag", "t", "--", *tiny])
    assert code == 0, list((out / "logs" / "t").glob("*.log"))[0].read_text()[-3000:]
    table = pd.read_csv(out / "compare" / "iseg2017_runs.csv")
    assert len(table) == 1 and 0.0 <= float(table["test/dice"].iloc[0]) <= 1.0
    assert {"test/dice_CSF", "test/dice_GM", "test/dice_WM"} <= set(table.columns)
    run_dir = out / "loso-iseg2017" / "iseg2017-fold2-t"
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["data"]["init_args"]["test_subjects"] == ["2"] and config["data"]["init_args"]["val_subjects"] == ["3"]
    assert "test/dice" in (out / "compare" / "iseg2017_loso.md").read_text()
