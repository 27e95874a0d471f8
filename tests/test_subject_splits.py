"""DC-MT splits cannot quietly mislead (issue 19.3, 19.4).

* Stage 2 uses exactly stage 1's subjects: the stage-1 feature export records each subject's role and fold, and
  the stage-2 split is compared with what stage 1 *used* (its DataModule's split), with and without a ``fold``
  column in the subject table.
* No model selection on the test set: validation subjects are separate by default; the reference protocol
  (no validation split) must be asked for explicitly, and then nothing is validated and the last epoch is tested.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest

from callbacks.feature_export import SliceFeatureWriter
from datamodules.manifest import DataError
from datamodules.slices import SliceStackDataModule
from datamodules.subject_features import SubjectFeatureDataModule
from datamodules.synthetic_slices import SyntheticSlices


class _FoldReader:
    """SyntheticSlices with a ``fold`` column in the subject table (the documented real-data layout)."""

    def __init__(self, reader, folds: int) -> None:
        self.reader, self.folds = reader, folds

    def prepare(self) -> None:
        self.reader.prepare()

    def load(self):
        table = self.reader.load()
        table.subjects["fold"] = (np.arange(len(table.subjects)) % self.folds).astype(float)
        return table


def _stage1_data(tmp_path: Path, fold_column: bool, **kwargs) -> SliceStackDataModule:
    reader = SyntheticSlices(cache_dir=Path(tmp_path) / "synthetic", n_subjects=20, image_size=32, min_slices=3,
                             max_slices=4)
    args = dict(image_size=32, labeled_batch_size=2, unlabeled_batch_size=4, eval_batch_size=32, label_ratio=0.5,
                cache=True, min_per_class=0)  # 20 subjects: class counts are not what these tests check
    return SliceStackDataModule(_FoldReader(reader, 5) if fold_column else reader, **{**args, **kwargs})


def _export(tmp_path: Path, data: SliceStackDataModule) -> Path:
    from lightning_modules.dcmt import MeanTeacherModule
    from networks.dcmt import DCMTNet

    module = MeanTeacherModule(DCMTNet("test_resnet", num_classes=3, fa_channels=8, head_channels=8))
    out = Path(tmp_path) / "features.npz"
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[SliceFeatureWriter(out)], default_root_dir=tmp_path)
    trainer.predict(module, datamodule=data, return_predictions=False)
    return out


@pytest.mark.parametrize("fold_column", [False, True], ids=["seeded_folds", "fold_column"])
def test_stage2_split_is_stage1_split(tmp_path, fold_column):
    stage1 = _stage1_data(tmp_path, fold_column, fold=2, seed=4)
    features = _export(tmp_path, stage1)
    # stage 2 gets only the file: the split arguments of stage 1 (fold 2, seed 4, label ratio 0.5) are not repeated
    stage2 = SubjectFeatureDataModule(features, seq_len=4, labeled_batch_size=2, unlabeled_batch_size=2)
    stage2.setup()
    for key in ("train", "val", "test", "labeled"):
        assert stage2.split[key] == stage1.split[key], key
    if fold_column:  # the held-out fold of the subject table is the test split of both stages
        assert stage1.split["test"] == sorted(stage1.table.subjects.loc[stage1.table.subjects["fold"] == 2,
                                                                        "subject_id"])
    with np.load(features) as f:
        roles = dict(zip(f["subject_id"].astype(str), f["subject_role"].astype(str)))
        folds = dict(zip(f["subject_id"].astype(str), f["subject_fold"]))
    assert {s for s, r in roles.items() if r == "unlabeled"} == set(stage1.split["train"]) - set(stage1.split["labeled"])
    assert {s for s, f in folds.items() if f == 2} == set(stage1.split["test"])


def test_stage2_refuses_a_file_without_roles_or_with_other_split_arguments(tmp_path):
    from lightning_modules.tiny import write_tiny_features

    old = write_tiny_features(tmp_path / "old.npz", split=False)
    with pytest.raises(DataError, match=r"old\.npz: no stage-1 subject roles"):
        SubjectFeatureDataModule(old, seq_len=6).setup()
    new = write_tiny_features(tmp_path / "new.npz")  # stage 1: 3 folds, fold 0, label ratio 0.5
    with pytest.raises(DataError, match=r"new\.npz: stage 1 used fold=0, but stage 2 was given fold=1"):
        SubjectFeatureDataModule(new, seq_len=6, fold=1).setup()
    with pytest.raises(DataError, match=r"label_ratio=0.5, but stage 2 was given label_ratio=0.25"):
        SubjectFeatureDataModule(new, seq_len=6, label_ratio=0.25).setup()


def test_default_split_validates_on_separate_stratified_subjects(tmp_path):
    data = _stage1_data(tmp_path, fold_column=False)
    data.setup()
    split = data.split
    assert len(split["val"]) == round(0.15 * 16), "no validation subjects by default"
    assert not set(split["val"]) & set(split["test"]) and not set(split["val"]) & set(split["train"])
    assert sorted(split["train"] + split["val"] + split["test"]) == sorted(data.table.subjects["subject_id"])
    label = data.table.subjects.set_index("subject_id")["subject_label"]
    wider = _stage1_data(tmp_path, fold_column=False, val_fraction=0.2)
    wider.setup()
    assert set(label[wider.split["val"]]) == {0, 1, 2}  # stratified: 3 of 16 training subjects, one per grade
    rows_val, rows_test = data.rows("val"), data.rows("test")
    assert not set(rows_val) & set(rows_test)
    summary = data.summary.set_index("split")
    assert summary.loc["val", "subjects"] == len(split["val"]) and summary.loc["val", "note"] == ""


def test_val_fraction_zero_needs_the_explicit_flag(tmp_path):
    with pytest.raises(DataError, match="no_validation_split: true"):
        _stage1_data(tmp_path, fold_column=False, val_fraction=0.0).setup()
    with pytest.raises(DataError, match="choose one"):
        _stage1_data(tmp_path, fold_column=False, val_fraction=0.2, no_validation_split=True).setup()


def test_no_validation_split_runs_without_validation_and_tests_the_last_epoch(tmp_path, capsys):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_modules.dcmt import MeanTeacherModule
    from networks.dcmt import DCMTNet

    data = _stage1_data(tmp_path, fold_column=False, val_fraction=0.0, no_validation_split=True)
    data.setup()
    assert data.split["val"] == [] and data.val_dataloader() == []
    assert "no validation split" in capsys.readouterr().out
    note = data.summary.set_index("split").loc["val", "note"]
    assert note.startswith("no validation split")
    module = MeanTeacherModule(DCMTNet("test_resnet", num_classes=3, fa_channels=8, head_channels=8))
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/auroc_teacher", mode="max", save_last=True)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[checkpoint],
                         default_root_dir=tmp_path, num_sanity_val_steps=0)
    with pytest.warns(UserWarning, match="could not find the monitored key"):
        trainer.fit(module, datamodule=data)
    assert not any(k.startswith("val/") for k in trainer.callback_metrics)  # nothing was validated
    assert checkpoint.best_model_path == ""  # so the CLI and the suite test the final weights
    assert (tmp_path / "ckpt" / "last.ckpt").is_file()


def test_checkpoint_of_another_split_is_refused(tmp_path):
    """Predicting (exporting stage-2 roles) or testing with other split arguments than training is an error."""
    from lightning_modules.dcmt import MeanTeacherModule
    from networks.dcmt import DCMTNet

    module = MeanTeacherModule(DCMTNet("test_resnet", num_classes=3, fa_channels=8, head_channels=8))
    trained = _stage1_data(tmp_path, fold_column=False, val_fraction=0.0, no_validation_split=True)
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, enable_checkpointing=False)
    trainer.fit(module, datamodule=trained)
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    other = _stage1_data(tmp_path, fold_column=False)  # default: validation subjects carved from training
    predictor = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                           callbacks=[SliceFeatureWriter(tmp_path / "f.npz")], default_root_dir=tmp_path)
    with pytest.raises(DataError, match=r"another subject split.*subject subj\d+ is \w+ there and \w+ here"):
        predictor.predict(module, datamodule=other, ckpt_path=tmp_path / "model.ckpt", return_predictions=False)
    same = _stage1_data(tmp_path, fold_column=False, val_fraction=0.0, no_validation_split=True)
    predictor.predict(module, datamodule=same, ckpt_path=tmp_path / "model.ckpt", return_predictions=False)
    assert (tmp_path / "f.npz").is_file()
