"""PCAMModule: loss oracles (method-pcam.md g.6), label policy, heatmaps, localisation wiring, training."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_modules import METHODS
from lightning_modules.pcam import PCAMModule, pcam_bce
from lightning_modules.weak_localization import heatmaps_at_input
from networks.cam_heads import PoolingClassifier

LN2 = math.log(2)


# ------------------------------------------------------------------------------------------- loss
def test_batch_weighted_bce_oracle():
    logits = torch.zeros(4, 1, requires_grad=True)
    total, per_task = pcam_bce(logits, torch.tensor([[1.0], [0.0], [0.0], [0.0]]))
    assert total.item() == pytest.approx(1.5 * LN2, abs=1e-6)  # pos_weight 3: (3 ln2 + 3 ln2) / 4
    assert total.item() == pytest.approx(1.039721, abs=1e-6)
    total.backward()
    assert logits.grad[0, 0] == pytest.approx(-3 * 0.5 / 4) and logits.grad[1, 0] == pytest.approx(0.5 / 4)


def test_batch_without_positive_gives_exactly_zero_and_no_gradient():
    logits = torch.randn(5, 2, requires_grad=True)
    labels = torch.tensor([[0.0, 1.0]] * 5)
    labels[0, 1] = 0.0
    total, per_task = pcam_bce(logits, labels)
    assert per_task[0].item() == 0.0 and per_task[1].item() > 0
    total.backward()
    assert torch.equal(logits.grad[:, 0], torch.zeros(5))
    # the "unweighted" policy falls back to plain BCE for that task
    _, per_task = pcam_bce(torch.zeros(3, 1), torch.zeros(3, 1), no_positive="unweighted")
    assert per_task.item() == pytest.approx(LN2)


def test_label_mask_is_honoured():
    logits = torch.zeros(5, 1, requires_grad=True)
    labels = torch.tensor([[1.0], [0.0], [0.0], [0.0], [1.0]])
    mask = torch.tensor([[True], [True], [True], [True], [False]])  # e.g. CheXpert U-Ignore
    total, _ = pcam_bce(logits, labels, mask)
    assert total.item() == pytest.approx(1.5 * LN2, abs=1e-6)  # as if the masked row were absent
    total.backward()
    assert logits.grad[4, 0] == 0
    all_masked, _ = pcam_bce(torch.randn(3, 1), torch.ones(3, 1), torch.zeros(3, 1, dtype=torch.bool))
    assert all_masked.item() == 0.0


def test_task_reduction_and_static_pos_weight():
    logits, labels = torch.zeros(4, 2), torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    assert pcam_bce(logits, labels)[0].item() == pytest.approx(3 * LN2, abs=1e-6)  # summed over 2 tasks
    assert pcam_bce(logits, labels, task_reduction="mean")[0].item() == pytest.approx(1.5 * LN2, abs=1e-6)
    assert pcam_bce(logits, labels, batch_weight=False)[0].item() == pytest.approx(2 * LN2, abs=1e-6)
    static = pcam_bce(logits, labels, batch_weight=False, pos_weight=[3.0, 3.0])[0]
    assert static.item() == pytest.approx(3 * LN2, abs=1e-6)
    with pytest.raises(ValueError):
        pcam_bce(logits, labels, no_positive="skip")


def test_chexpert_pcam_label_policy(tmp_path):
    from datamodules.readers.chexpert import CheXpert

    header = ("Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Enlarged Cardiomediastinum,Cardiomegaly,Lung Opacity,"
              "Lung Lesion,Edema,Consolidation,Pneumonia,Atelectasis,Pneumothorax,Pleural Effusion,Pleural Other,"
              "Fracture,Support Devices")
    row = "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,,,-1.0,,,-1.0,,,-1.0,,0.0,,,"
    (tmp_path / "train.csv").write_text(header + "\n" + row + "\n")
    manifest = CheXpert(tmp_path, uncertainty="pcam", blank="zero", require_images=False).load()
    assert manifest.labels.tolist() == [[0.0, 1.0, 0.0, 1.0, 0.0]]  # dossier g.6
    ignore = CheXpert(tmp_path, uncertainty="ignore", require_images=False).load()
    assert math.isnan(ignore.labels[0, 0]) and ignore.labels[0, 2] == 0.0  # U-Ignore -> NaN -> label_mask False


# --------------------------------------------------------------------------------------- heatmaps
def test_attention_maps_pcam_are_probabilities():
    net = PoolingClassifier("test_resnet", num_classes=3, pool="pcam")
    module = PCAMModule(net).eval()
    x = torch.randn(2, 1, 64, 64)
    maps = module.attention_maps(x)
    with torch.no_grad():
        logits, logit_maps = net.forward_with_maps(x)
    assert maps.shape == (2, 3, 2, 2)
    torch.testing.assert_close(maps, torch.sigmoid(logit_maps))
    assert (maps.flatten(2).amax(-1) >= torch.sigmoid(logits) - 1e-6).all()


def test_heatmaps_at_input_zero_the_letterbox_padding():
    maps = torch.ones(2, 1, 4, 4)
    frame = torch.tensor([[100.0, 50.0, 0.32], [64.0, 64.0, 0.5]])  # 32×16 valid region, then 32×32
    out = heatmaps_at_input(maps, (32, 32), frame)
    assert out[0, 0, :, :16].eq(1).all() and out[0, 0, :, 16:].eq(0).all()
    assert out[1].eq(1).all()


class _OracleNet(nn.Module):
    """Logit map = +20 where the image is bright, −20 elsewhere, at input resolution (a perfect localiser)."""

    num_classes = 2

    def forward_with_maps(self, x):
        s = torch.where(x > 0.5, 20.0, -20.0).repeat(1, 2, 1, 1)
        return s.mean((2, 3)), s

    def forward(self, x):
        return self.forward_with_maps(x)[0]

    def maps_to_heatmaps(self, s):
        return torch.sigmoid(s)


def test_test_step_feeds_localisation_metrics():
    module = PCAMModule(_OracleNet(), class_names=["a", "b"])
    image = torch.zeros(2, 1, 32, 32)
    image[0, 0, 4:12, 8:20] = 1
    image[1, 0, 20:30, 2:6] = 1
    batch = {
        "image": image, "labels": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "label_mask": torch.ones(2, 2, dtype=torch.bool),
        "boxes": [torch.tensor([[8.0, 4.0, 20.0, 12.0]]), torch.tensor([[2.0, 20.0, 6.0, 30.0]])],
        "box_labels": [torch.tensor([0]), torch.tensor([1])], "has_boxes": torch.tensor([True, True]),
        "attention_mask": image.clone(), "has_attention_mask": torch.tensor([True, True]),
        "frame": torch.tensor([[32.0, 32.0, 1.0], [32.0, 32.0, 1.0]]),
    }
    module.update_localization(batch, module.net.maps_to_heatmaps(module.net.forward_with_maps(image)[1]))
    out = module.test_localization.compute()
    assert out["test/loc/iou@0.7"] == 1.0 and out["test/loc/iobb@0.9"] == 1.0
    assert out["test/loc/maxboxacc_v2"] == 1.0 and out["test/loc/pointing"] == 1.0
    assert out["test/loc/pxap"] == pytest.approx(1.0)


# --------------------------------------------------------------------------------------- training
def _trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, **kwargs)


def test_registered_tiny_fit_and_test(tmp_path):
    spec = METHODS["pcam"]
    assert "2005.14480" in spec.paper
    module, data = spec.tiny(tmp_path)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = _trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, limit_test_batches=2)
    trainer.fit(module, data)
    assert any(not torch.equal(p, before[n]) for n, p in module.named_parameters())
    assert "train/loss" in trainer.callback_metrics and "val/loss" in trainer.callback_metrics
    results = trainer.test(module, data, verbose=False)[0]
    assert "test/auroc" in results and "test/loss" in results
    assert module.class_names == data.class_names


def test_class_count_mismatch_is_reported(tmp_path):
    _, data = METHODS["pcam"].tiny(tmp_path)
    module = PCAMModule(PoolingClassifier("test_resnet", num_classes=3))
    with pytest.raises(ValueError, match="num_classes=4"):
        _trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0).fit(module, data)


@pytest.mark.slow
def test_pcam_learns_the_synthetic_task(tmp_path):
    from datamodules.cxr import CXRDataModule
    from datamodules.synthetic import SyntheticCXR

    pl.seed_everything(0)
    data = CXRDataModule(SyntheticCXR(cache_dir=Path(tmp_path), n_images=240, image_size=128, seed=0),
                         image_size=64, labeled_batch_size=16, eval_batch_size=64)
    module = PCAMModule(PoolingClassifier("resnet10t", num_classes=4, pool="pcam"),
                        optimizer=lambda p: torch.optim.AdamW(p, lr=2e-3))
    trainer = _trainer(max_epochs=8, limit_val_batches=0)
    trainer.fit(module, data)
    assert trainer.test(module, data, verbose=False)[0]["test/auroc"] > 0.75
