"""External testing with ``split: all`` beyond the CXR DataModule (issue 14 s6).

``--data.init_args.split all`` means the same for the volume, lung-mask, slice-stack (DC-MT stage 1) and
subject-feature (DC-MT stage 2) DataModules as for ``CXRDataModule``: every item of the data is the test split,
exactly once, also when the evaluation sampler shards it over 1, 2 or 3 DDP ranks; the split arguments that were
set are named as ignored; ``fit``/``validate`` are refused with an error naming the option; ``describe_split``
names the reader's root and ``split=all`` (the ``Test data`` line of ``medattn test`` and summary.json's
``test_data``). Stage 2 tests a whole features file only when stage 1 recorded every subject as a test subject.
End to end: ``medattn test`` of a Non-local U-Net checkpoint on another set of synthetic volumes.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from datamodules.lung_segmentation import LungSegmentationDataModule
from datamodules.manifest import DataError
from datamodules.slices import SliceStackDataModule
from datamodules.subject_features import SubjectFeatureDataModule
from datamodules.synthetic_slices import SyntheticSlices
from datamodules.synthetic_volumes import SyntheticVolumes
from datamodules.volume_segmentation import VolumeSegmentationDataModule, foreground_box

REPO = Path(__file__).resolve().parents[1]
REFUSED = r"split='all' \(--data.init_args.split all\)"


def _each_once(dm, loader, key: str, expected: list[str]) -> None:
    """The ranks' evaluation shards, for 1, 2 and 3 ranks, together hold every expected id exactly once."""
    for world in (1, 2, 3):
        seen = []
        for rank in range(world):
            dm.trainer = SimpleNamespace(world_size=world, global_rank=rank, is_global_zero=rank == 0)
            seen += [item for batch in loader() for item in batch[key]]
        assert sorted(seen) == sorted(expected), f"{world} ranks: {sorted(seen)}"
    dm.trainer = None


def _refuses_fit_and_validate(dm, loaders=("train_dataloader", "val_dataloader")) -> None:
    for stage in ("fit", "validate"):
        with pytest.raises(DataError, match=REFUSED):
            dm.setup(stage)
    for name in loaders:
        with pytest.raises(DataError, match=REFUSED):
            getattr(dm, name)()


# --------------------------------------------------------------------------------------------- volumes
def test_volumes_split_all_every_volume_once_whole_box(tmp_path):
    """Four volumes: all four are tested, each on its whole foreground box (even with holdout='hemisphere',
    which would evaluate half of it), once per rank count; the config's held-out subjects are named as ignored."""
    reader = SyntheticVolumes(cache_dir=tmp_path, num_subjects=4, shape=(12, 12, 12))
    dm = VolumeSegmentationDataModule(reader, patch_size=8, split="all", holdout="hemisphere",
                                      val_subjects=["x"], test_subjects=["y"])  # not checked: ignored
    dm.setup("test")
    ids = [s.subject_id for s in reader.subjects()]
    assert len(ids) == 4 and set(dm.datasets) == {"test"}
    boxes = [foreground_box(reader.load(s).image[0] != 0) for s in reader.subjects()]
    assert dm.datasets["test"].boxes == boxes
    assert dm.notes["test"] == ("every volume (split=all); holdout=hemisphere, val_subjects=['x'], "
                                "test_subjects=['y'] ignored")
    _each_once(dm, dm.test_dataloader, "subject_id", ids)
    _each_once(dm, dm.predict_dataloader, "subject_id", ids)
    assert dm.describe_split("test") == (f"SyntheticVolumes {Path(reader.root).resolve()}, test split: every volume "
                                         f"(split=all), 4 volumes ({', '.join(ids)})")
    _refuses_fit_and_validate(dm)
    with pytest.raises(ValueError, match=r"split must be one of \('patients', 'all'\).*'everything'"):
        VolumeSegmentationDataModule(reader, split="everything")
    default = VolumeSegmentationDataModule(reader, patch_size=8)  # the Test data line of an in-distribution test
    assert default.describe_split().endswith("test split: held-out subjects (holdout=subject), 1 volumes (03)")


# ------------------------------------------------------------------------------------------------ lungs
def _lung_folder(root: Path, patients: list[str]) -> Path:
    """covid-chestxray-dataset layout with a lung mask per image; one image (``nomask.png``) has no mask."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i, patient in enumerate([*patients, "99"]):
        name = f"img{i:02d}.png" if patient != "99" else "nomask.png"
        Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8), "L").save(root / "images" / name)
        if patient != "99":
            mask = np.zeros((20, 24), np.uint8)
            mask[4:16, 3 + i % 5:12] = 255
            Image.fromarray(mask, "L").save(root / "masks" / name)
        rows.append({"patientid": patient, "filename": name, "view": "PA", "modality": "X-ray"})
    pd.DataFrame(rows).to_csv(root / "metadata.csv", index=False)
    return root


def test_lungs_split_all_every_image_once(tmp_path):
    root = _lung_folder(tmp_path / "ext", ["1", "1", "2", "3", "4"])
    dm = LungSegmentationDataModule(root, image_size=16, eval_batch_size=2, split="all", val_fraction=0.3)
    dm.setup("test")
    names = [f"img{i:02d}.png" for i in range(5)]
    assert len(dm.datasets["train"]) == 0 and len(dm.datasets["val"]) == 0 and len(dm.datasets["test"]) == 5
    assert dm.notes["test"] == "every image (split=all); val_fraction=0.3, test_fraction=0.2 ignored"
    _each_once(dm, dm.test_dataloader, "image_id", names)
    assert dm.describe_split() == (f"LungSegmentationDataModule {root.resolve()}, test split: every image "
                                   "(split=all), 5 images of 4 patients")
    _refuses_fit_and_validate(dm)
    default = LungSegmentationDataModule(root, image_size=16, val_fraction=0.25, test_fraction=0.25)
    assert "test split: patient-level split, seed 0, 1 images of 1 patients" in default.describe_split()


# ---------------------------------------------------------------------------------------- DC-MT stage 1
def _slices_reader(tmp_path: Path, **kwargs) -> SyntheticSlices:
    return SyntheticSlices(cache_dir=tmp_path / "slices", n_subjects=6, image_size=16, min_slices=2, max_slices=3,
                           **kwargs)


def _slice_data(reader, **kwargs) -> SliceStackDataModule:
    return SliceStackDataModule(reader, image_size=16, eval_batch_size=4, cache=True, **kwargs)


def test_slices_split_all_every_subject_once(tmp_path):
    """Six subjects: every slice of every subject is tested once per rank count; the subject-count minimum is
    not enforced but named (warning and summary note); the export record makes every subject a test subject."""
    reader = _slices_reader(tmp_path)
    dm = _slice_data(reader, split="all", fold=2)
    with pytest.warns(UserWarning, match=r"fewer than min_per_class=10: "):
        dm.setup("test")
    table = dm.table
    subjects = sorted(table.subjects["subject_id"])
    assert dm.split["test"] == subjects and not dm.split["train"] and not dm.split["val"]
    note = dm.summary.set_index("split").loc["test", "note"]
    assert note.startswith("every subject (split=all); num_folds=5, fold=2, val_fraction=0.15, label_ratio=0.25 "
                           "ignored; fewer than min_per_class=10")
    _each_once(dm, dm.test_dataloader, "image_id", list(table.slices["image_id"]))
    roles, info = dm.split_record()
    assert set(roles["role"]) == {"test"} and set(roles["fold"]) == {-1} and info["split"] == "all"
    root = Path(reader.root).resolve()
    assert dm.describe_split() == (f"SyntheticSlices {root}, test split: every subject (split=all), 6 subjects, "
                                   f"{len(table.slices)} slices")
    _refuses_fit_and_validate(dm)
    # a checkpoint trained on another split of other subjects is tested without the same-split check
    other = {"train": ["a", "b"], "val": ["c"], "test": ["d"], "labeled": ["a"]}
    dm.load_state_dict({"split": other})
    with pytest.warns(UserWarning, match="1 of the 6 tested subjects have the ids of subjects this checkpoint"):
        dm.load_state_dict({"split": {**other, "train": [subjects[0], "b"]}})


# ---------------------------------------------------------------------------------------- DC-MT stage 2
def _export(tmp_path: Path, data: SliceStackDataModule, name: str) -> Path:
    import lightning.pytorch as pl

    from callbacks.feature_export import SliceFeatureWriter
    from lightning_modules.dcmt import MeanTeacherModule
    from networks.dcmt import DCMTNet

    module = MeanTeacherModule(DCMTNet("test_resnet", num_classes=3, fa_channels=8, head_channels=8))
    out = tmp_path / name
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[SliceFeatureWriter(out)], default_root_dir=tmp_path)
    trainer.predict(module, datamodule=data, return_predictions=False)
    return out


def test_subject_features_split_all_needs_a_file_of_test_subjects(tmp_path):
    """Stage 2 with split='all' tests every subject of a file that stage 1 exported with split='all' (another
    cohort: every subject recorded as test), once per rank count. A file of the training cohort (labeled,
    unlabeled and val subjects) is refused, counting them: the models were trained or selected on them."""
    from lightning_modules.tiny import write_tiny_features

    stage1 = _slice_data(_slices_reader(tmp_path), split="all", min_per_class=0)
    features = _export(tmp_path, stage1, "external.npz")
    dm = SubjectFeatureDataModule(features, seq_len=4, eval_batch_size=2, split="all", fold=0)
    dm.setup("test")
    subjects = stage1.split["test"]
    assert dm.split["test"] == subjects and not dm.split["train"]
    assert dm.test_note.startswith("every subject (split=all); fold=0 ignored")
    _each_once(dm, dm.test_dataloader, "subject_id", subjects)
    assert dm.describe_split() == (f"SubjectFeatureDataModule {features.resolve()}, test split: every subject "
                                   "(split=all), 6 subjects")
    _refuses_fit_and_validate(dm)
    # the stage-1 default split's export is refused with split=all; its held-out subjects are tested by default
    trained = write_tiny_features(tmp_path / "trained.npz")
    with pytest.raises(DataError, match=r"trained\.npz: split='all' \(--data.init_args.split all\) tests every "
                                        r"subject of the file, but stage 1 recorded \d+ labeled, \d+ unlabeled"):
        SubjectFeatureDataModule(trained, seq_len=4, split="all").setup("test")
    default = SubjectFeatureDataModule(trained, seq_len=4, min_per_class=0)
    described = default.describe_split()
    assert f"test split: stage 1's recorded split, {len(default.split['test'])} subjects" in described
    assert 0 < len(default.split["test"]) < 12


# ------------------------------------------------------------------------------------------ end to end
NONLOCAL = str(REPO / "experiments" / "nonlocal_unet" / "synthetic.yaml")
SHRINK = ["--data.init_args.reader.init_args.shape", "[24, 24, 24]", "--data.init_args.patch_size", "16",
          "--model.init_args.net.init_args.filters", "8", "--trainer.precision", "32-true"]


def test_medattn_test_nonlocal_unet_on_other_volumes(tmp_path, monkeypatch, capsys):
    """A Non-local U-Net checkpoint of the synthetic config, tested with ``medattn test ... --data.init_args.split
    all`` on three volumes of another data seed (the config's held-out subjects 04-06 do not exist there): each
    volume reaches test_step exactly once, and the printed ``Test data`` line and summary.json name the reader's
    root and split=all."""
    import lightning.pytorch as pl

    from experiments.cli import MedAttnCLI, main
    from lightning_modules.nonlocal_unet import NonLocalUNetModule

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MEDATTN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.delenv("MEDATTN_RUN_DIR", raising=False)
    cli = MedAttnCLI(args=["-c", NONLOCAL, *SHRINK, "--trainer.logger", "false", "--trainer.callbacks", "[]"],
                     run=False)
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu")
    trainer.strategy.connect(cli.model)
    ckpt = tmp_path / "trained.ckpt"
    trainer.save_checkpoint(ckpt, weights_only=True)

    tested = []
    original = NonLocalUNetModule.test_step
    monkeypatch.setattr(NonLocalUNetModule, "test_step",
                        lambda self, batch, i: (tested.extend(batch["subject_id"]), original(self, batch, i))[1])
    monkeypatch.setenv("MEDATTN_RUN_ID", "external")
    capsys.readouterr()
    main(["test", "-c", NONLOCAL, *SHRINK, "--ckpt_path", str(ckpt), "--data.init_args.reader.init_args.seed", "7",
          "--data.init_args.reader.init_args.num_subjects", "3", "--data.init_args.split", "all"])
    printed = capsys.readouterr().out
    assert sorted(tested) == ["00", "01", "02"]
    root = SyntheticVolumes(cache_dir=tmp_path / "cache", num_subjects=3, shape=(24, 24, 24), seed=7).root
    described = f"SyntheticVolumes {Path(root).resolve()}, test split: every volume (split=all), 3 volumes (00, 01, 02)"
    assert f"Test data: {described}" in printed
    assert "val_subjects=['04'], test_subjects=['05', '06'] ignored" in printed
    (summary_file,) = (tmp_path / "runs").rglob("summary.json")
    summary = json.loads(summary_file.read_text())
    assert summary["test_data"] == described and np.isfinite(summary["test/dice"])
    monkeypatch.setenv("MEDATTN_RUN_ID", "fit_all")
    with pytest.raises(SystemExit) as stop:  # fit on split=all: one line naming the option, exit status 2
        main(["fit", "-c", NONLOCAL, *SHRINK, "--data.init_args.split", "all", "--trainer.max_epochs", "1"])
    assert stop.value.code == 2 and "--data.init_args.split all" in capsys.readouterr().err


# ------------------------------------------------------------------------------- default split under DDP
def test_default_test_split_is_evaluated_once_per_subject_on_any_rank_count(tmp_path):
    """The held-out test subjects of the default split are each evaluated exactly once however many ranks share
    them (Lightning's padded sampler evaluated one of 3 test subjects twice on 2 ranks, so it weighed double in
    test/dice); a validation split smaller than the ranks keeps the padded sampler with a warning when the repeats
    are uneven."""
    reader = SyntheticVolumes(cache_dir=tmp_path, num_subjects=5, shape=(12, 12, 12))
    dm = VolumeSegmentationDataModule(reader, patch_size=8, val_subjects=["00"], test_subjects=["02", "03", "04"])
    dm.setup("test")
    for world in (2, 3):
        seen = []
        for rank in range(world):
            dm.trainer = SimpleNamespace(world_size=world, global_rank=rank, is_global_zero=rank == 0)
            seen += [item for batch in dm.test_dataloader() for item in batch["subject_id"]]
        assert sorted(seen) == ["02", "03", "04"], f"{world} ranks: {sorted(seen)}"
    dm.setup("fit")
    dm.trainer = SimpleNamespace(world_size=2, global_rank=0, is_global_zero=True)
    from datamodules.dataset import UnpaddedDistributedSampler

    # one validation subject on two ranks: Lightning's padded sampler (each rank the same subject: exact mean)
    assert not isinstance(dm.val_dataloader().sampler, UnpaddedDistributedSampler)
    dm.trainer = None
