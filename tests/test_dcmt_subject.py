"""DC-MT stage 2: aggregator size and sequence building (dossier g.6), the stage-2 ramp, subject metrics,
feature export from stage 1 and the subject DataModule/module end to end."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from callbacks.feature_export import SliceFeatureWriter
from datamodules.manifest import DataError
from datamodules.subject_features import SubjectFeatureDataModule, read_slice_features
from lightning_modules.dcmt_metrics import SubjectMetrics
from lightning_modules.dcmt_subject import SubjectAggregationModule
from lightning_modules.tiny import write_tiny_features
from networks.dcmt_subject import BiGRUAggregator, center_crop_or_pad
from networks.dcmt import subject_consistency_weight


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def test_parameter_count_oracle():
    net = BiGRUAggregator(in_features=512, num_classes=3, seq_len=24, hidden_size=96, num_layers=2, dropout=0.5)
    assert _count(net) == 1_937_344
    assert _count(net.embed) == 164_608
    gru = dict(net.gru.named_parameters())
    assert sum(v.numel() for k, v in gru.items() if "_l0" in k) == 130_176
    assert sum(v.numel() for k, v in gru.items() if "_l1" in k) == 167_040
    assert _count(net.skip) == 590_016 and _count(net.recurrent_head) == 884_928 and _count(net.classifier) == 576


def test_forward_shape_and_length_check():
    net = BiGRUAggregator().eval()
    assert net(torch.randn(3, 24, 512)).shape == (3, 3)
    with pytest.raises(ValueError, match="center_crop_or_pad"):
        net(torch.randn(3, 18, 512))


def test_center_crop_or_pad_oracles():
    short = torch.arange(1, 19, dtype=torch.float32)[:, None]  # 18 slices
    seq, mask = center_crop_or_pad(short, 24)
    assert mask.nonzero().flatten().tolist() == list(range(3, 21))
    assert seq[3, 0] == 1 and seq[20, 0] == 18 and seq[:3].abs().sum() == 0 and seq[21:].abs().sum() == 0
    long = torch.arange(30, dtype=torch.float32)[:, None]  # 30 slices -> slices 3..26
    seq, mask = center_crop_or_pad(long, 24)
    assert mask.all() and seq[:, 0].tolist() == list(range(3, 27))
    seq, mask = center_crop_or_pad(torch.ones(24, 2), 24)
    assert mask.all() and seq.shape == (24, 2)


def test_stage2_ramp_oracles():
    assert subject_consistency_weight(19) == 0.0
    assert subject_consistency_weight(20) == pytest.approx(0.006738, abs=1e-6)
    assert subject_consistency_weight(50) == pytest.approx(0.086294, abs=1e-6)
    assert subject_consistency_weight(100) == subject_consistency_weight(140) == pytest.approx(0.818731, abs=1e-6)
    assert subject_consistency_weight(120, ramp="shifted") == pytest.approx(1.0)


def test_subject_metrics_oracle():
    metric = SubjectMetrics(3, class_names=["a", "b", "c"])
    target = torch.tensor([0, 0, 1, 2])
    pred = torch.tensor([0, 1, 1, 2])
    metric.update(torch.eye(3)[pred] * 0.9 + 0.1 / 3, target)
    out = metric.compute()
    # class a: TP1 FN1 TN2 FP0; class b: TP1 FP1 TN2 FN0; class c: perfect
    assert out["sensitivity/a"] == pytest.approx(0.5) and out["specificity/b"] == pytest.approx(2 / 3)
    assert out["accuracy/a"] == pytest.approx(0.75) and out["f1/b"] == pytest.approx(2 / 3)
    assert out["sensitivity"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert out["auroc/c"] == pytest.approx(1.0)


def test_feature_export_roundtrip(tmp_path):
    """Stage 1 predict writes one feature + probabilities per slice of every subject, sorted, with names."""
    from lightning_modules.tiny import dcmt

    module, data = dcmt(tmp_path)
    out = tmp_path / "export" / "features.npz"
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[SliceFeatureWriter(out)])
    trainer.predict(module, data, return_predictions=False)
    feats = read_slice_features(out)
    table = data.table.slices
    assert len(feats["image_id"]) == len(table)
    assert feats["features"].shape == (len(table), module.student.num_features)
    np.testing.assert_allclose(feats["probabilities"].sum(1), 1.0, rtol=1e-5)
    assert list(feats["image_id"]) == list(table["image_id"])  # subject then slice order
    assert list(feats["class_names"]) == data.class_names
    assert (feats["subject_label"] >= 0).all() and (feats["slice_label"] == table["label"].to_numpy()).all()


def test_subject_datamodule_split_is_the_recorded_stage1_split(tmp_path):
    from datamodules.subject_splits import split_subjects

    path = write_tiny_features(tmp_path / "f.npz", n_subjects=15, split=dict(num_folds=3, fold=1, seed=3))
    dm = SubjectFeatureDataModule(path, seq_len=6, labeled_batch_size=2, unlabeled_batch_size=2, seed=3)
    dm.setup()
    recorded = read_slice_features(path)
    role_of = dict(zip(recorded["subject_id"], recorded["subject_role"]))
    for role, key in (("labeled", "labeled"), ("val", "val"), ("test", "test")):
        assert dm.split[key] == sorted(s for s, r in role_of.items() if r == role), role
    assert dm.split["train"] == sorted(s for s, r in role_of.items() if r in ("labeled", "unlabeled"))
    subjects = dm._subjects.assign(fold=np.nan)
    assert dm.split == split_subjects(subjects, 3, 1, 0.15, 0.5, 3)  # what the writer of the file computed
    assert set(dm.split["labeled"]) <= set(dm.split["train"]) and not set(dm.split["train"]) & set(dm.split["test"])
    batch = next(iter(dm.train_dataloader()))
    assert batch["features"].shape == (4, 6, 16) and batch["stream"].tolist() == [1, 1, 2, 2]
    assert not batch["label_mask"][2:].any() and batch["labels"][2:].abs().sum() == 0
    torch.testing.assert_close(batch["features"], batch["features_teacher"])  # identical views by default
    val = next(iter(dm.val_dataloader()))
    assert val["label_mask"].all() and val["mean_probabilities"].shape == (len(dm.split["val"]), 3)
    with pytest.raises(DataError, match="not found"):
        read_slice_features(tmp_path / "missing.npz")


def test_subject_module_learns_and_logs_meanpool(tmp_path):
    from functools import partial

    torch.manual_seed(0)
    path = write_tiny_features(tmp_path / "f.npz", n_subjects=18)
    data = SubjectFeatureDataModule(path, seq_len=6, num_folds=3, label_ratio=0.5, labeled_batch_size=3,
                                    unlabeled_batch_size=3, eval_batch_size=8)
    net = BiGRUAggregator(in_features=16, seq_len=6, embed_channels=(16, 8), hidden_size=8, dropout=0.1)
    module = SubjectAggregationModule(net, consistency_start=0, optimizer=partial(torch.optim.Adam, lr=1e-2))
    trainer = pl.Trainer(accelerator="cpu", max_epochs=15, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                         check_val_every_n_epoch=15)
    trainer.fit(module, data)
    metrics = trainer.callback_metrics
    for key in ("val/auroc", "val/sensitivity", "val/specificity", "val/f1", "val/accuracy", "val/auroc_teacher",
                "val/meanpool_auroc", "train/loss_cons_cls"):
        assert key in metrics, key
    assert metrics["train/loss_cls"] < 1.0  # below ln 3 = 1.10: it learned the planted signal
    assert all(not p.requires_grad for p in module.teacher.parameters())


@pytest.mark.parametrize("inputs, width", [("features", 16), ("probabilities", 3), ("features+probabilities", 19)])
def test_subject_datamodule_inputs(tmp_path, inputs, width):
    """``inputs`` picks the per-slice vector: the stage-1 feature, the K slice probabilities, or both (in that
    order), placed at the same centred positions."""
    path = write_tiny_features(tmp_path / "f.npz", n_subjects=9)
    dm = SubjectFeatureDataModule(path, seq_len=10, num_folds=3, inputs=inputs, eval_batch_size=16)
    dm.setup()
    assert dm.num_features == width
    batch = next(iter(dm.predict_dataloader()))
    assert batch["features"].shape[-1] == width
    raw = read_slice_features(path)
    sid, n = batch["subject_id"][0], int(batch["num_slices"][0])
    rows = np.flatnonzero(raw["subject_id"] == sid)
    rows = rows[np.argsort(raw["slice_index"][rows])]
    features, probabilities = raw["features"][rows], raw["probabilities"][rows]
    expected = {"features": features, "probabilities": probabilities,
                "features+probabilities": np.concatenate([features, probabilities], 1)}[inputs]
    start = (10 - n) // 2
    torch.testing.assert_close(batch["features"][0, start:start + n], torch.from_numpy(expected).float())
    assert batch["features"][0, :start].abs().sum() == 0


def test_subject_module_rejects_input_width_mismatch(tmp_path):
    path = write_tiny_features(tmp_path / "f.npz", n_subjects=9)
    data = SubjectFeatureDataModule(path, seq_len=6, num_folds=3, inputs="probabilities")
    net = BiGRUAggregator(in_features=16, seq_len=6, embed_channels=(8, 8), hidden_size=4)
    module = SubjectAggregationModule(net)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="takes 16 inputs per slice but the data gives 3"):
        trainer.fit(module, data)
    with pytest.raises(ValueError, match="inputs must be one of"):
        SubjectFeatureDataModule(path, inputs="logits")


@pytest.mark.parametrize("inputs, width", [(None, 16), ("probabilities", 3), ("features+probabilities", 19)])
def test_stage2_width_follows_the_feature_file_and_inputs(tmp_path, inputs, width):
    """The suite's dcmt_subject arm passes only the features file: the CLI sizes the aggregator from the stage-2
    config's ``inputs`` (or an override) on that file (DATA_LINKS num_features -> in_features). (Rows of seeds run
    as separate processes need no merging any more: every run is a run directory that medattn compare reads.)"""
    from pathlib import Path

    from experiments.cli import MedAttnCLI

    path = write_tiny_features(tmp_path / "f.npz", n_subjects=6, dim=16, k=3)
    config = Path(__file__).resolve().parents[1] / "experiments" / "dcmt_subject" / "synthetic.yaml"
    args = ["-c", str(config), "--data.init_args.features_file", str(path), "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}", *(["--data.init_args.inputs", inputs] if inputs else [])]
    cli = MedAttnCLI(args=args, run=False)
    assert cli.datamodule.num_features == width
    assert cli.model.hparams.net["init_args"]["in_features"] == width  # the built network got it


def test_meanpool_prior_starts_at_mean_pooling_and_learns_a_correction(tmp_path):
    """With ``meanpool_prior`` the untrained module predicts exactly the mean slice probabilities (zero-initialised
    classifier), a batch without them is a clear error, and training moves the prediction away from the prior."""
    from functools import partial

    torch.manual_seed(0)
    path = write_tiny_features(tmp_path / "f.npz", n_subjects=18)
    data = SubjectFeatureDataModule(path, seq_len=6, num_folds=3, label_ratio=0.5, labeled_batch_size=3,
                                    unlabeled_batch_size=3, eval_batch_size=8)
    net = BiGRUAggregator(in_features=16, seq_len=6, embed_channels=(16, 8), hidden_size=8, dropout=0.1)
    module = SubjectAggregationModule(net, consistency_start=0, meanpool_prior=True,
                                      optimizer=partial(torch.optim.Adam, lr=1e-2))
    data.setup()
    batch = next(iter(data.val_dataloader()))
    module.eval()
    start = module(batch["features"], batch["mean_probabilities"]).softmax(-1)
    torch.testing.assert_close(start, batch["mean_probabilities"], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="mean_probabilities"):
        module(batch["features"])
    trainer = pl.Trainer(accelerator="cpu", max_epochs=5, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, data)
    module.eval()
    after = module(batch["features"], batch["mean_probabilities"]).softmax(-1)
    assert (after - start).abs().max() > 1e-3
    assert module.student.classifier.weight.abs().sum() > 0 and module.teacher.classifier.weight.abs().sum() > 0
