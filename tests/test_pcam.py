"""PCAMModule: loss oracles (method-pcam.md g.6), label policy, heatmaps, localisation wiring, training."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_modules import METHODS
from lightning_modules.pcam import PCAMModule
from lightning_modules.weak_localization import heatmaps_at_input
from networks.cam_heads import PoolingClassifier
from networks.pcam_loss import pcam_bce
from pcam_fixtures import BrightRegionNet, two_box_batch

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


def test_test_step_feeds_localization_metrics():
    module = PCAMModule(BrightRegionNet(20.0, -20.0), class_names=["a", "b"])  # a perfect localiser
    batch = two_box_batch()
    image = batch["image"]
    module.update_localization(batch, module.net.maps_to_heatmaps(module.net.forward_with_maps(image)[1]))
    out = module.test_localization.compute()
    assert out["test/loc/iou@0.7"] == 1.0 and out["test/loc/iobb@0.9"] == 1.0
    assert out["test/loc/maxboxacc_v2"] == 1.0 and out["test/loc/pointing"] == 1.0
    assert out["test/loc/pxap"] == pytest.approx(1.0)


# --------------------------------------------------------------------------------------- training
def _trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, **kwargs)


def _masked_bce_per_image(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unweighted BCE summed over the known tasks of each image (torch's BCE, masked by hand): (B,)."""
    raw = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return (raw * mask).sum(1)


def _mann_whitney_auroc(scores: list[float], positive: list[bool]) -> float:
    """P(score of a positive > score of a negative), ties counted 1/2: the AUROC by its definition."""
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    return sum((a > b) + 0.5 * (a == b) for a in pos for b in neg) / (len(pos) * len(neg))


def test_registered_tiny_fit_and_test(tmp_path):
    """The tiny recipe trains, and what it logs is what an independent recomputation from the trained model gives:
    val/test loss (per-image mean of the unweighted BCE over every evaluated image), test/auroc (macro Mann-Whitney
    AUROC over the classes with both outcomes) and the per-image probabilities written to test_predictions.csv."""
    import pandas as pd

    spec = METHODS["pcam"]
    assert "2005.14480" in spec.paper
    module, data = spec.tiny(tmp_path)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    # limits cover the whole val (6 images, one batch) and test split (9 images: batches of 8 and 1)
    trainer = _trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, limit_test_batches=2,
                       default_root_dir=tmp_path)
    trainer.fit(module, data)
    assert any(not torch.equal(p, before[n]) for n, p in module.named_parameters())
    assert "train/loss" in trainer.callback_metrics
    assert module.class_names == data.class_names

    def recompute(loader):
        module.eval()
        rows = []
        with torch.no_grad():
            for batch in loader:
                logits = module(batch["image"])
                per_image = _masked_bce_per_image(logits, batch["labels"], batch["label_mask"].float())
                rows += [(i, l, p, y, m) for i, l, p, y, m in zip(batch["image_id"], per_image.tolist(),
                                                                   torch.sigmoid(logits).tolist(), batch["labels"].tolist(),
                                                                   batch["label_mask"].tolist())]
        return rows

    val = recompute(data.val_dataloader())
    assert len(val) == 6 and all(all(m) for *_, m in val)  # every label known: per-image mean = per-label mean
    assert abs(float(trainer.callback_metrics["val/loss"]) - sum(r[1] for r in val) / len(val)) < 1e-5

    results = trainer.test(module, data, verbose=False)[0]
    test = recompute(data.test_dataloader())
    assert len(test) == 9
    assert abs(results["test/loss"] - sum(r[1] for r in test) / len(test)) < 1e-5
    frame = pd.read_csv(tmp_path / "test_predictions.csv")  # in the run's folder, never the working directory
    written = frame.set_index("image_id")[[f"score/{c}" for c in data.class_names]]
    for image_id, _, probs, _, _ in test:
        assert written.loc[image_id].tolist() == pytest.approx(probs, abs=1e-5)
    # AUROC from the scores of the logged pass itself (the CSV): after two steps the tiny net's scores differ
    # between images by ~1e-6, so a second forward pass may order them differently and move a rank statistic
    aurocs = []
    for k, name in enumerate(data.class_names):
        positive = [bool(r[3][k]) for r in test]
        if any(positive) and not all(positive):
            aurocs.append(_mann_whitney_auroc([written.loc[r[0], f"score/{name}"] for r in test], positive))
    assert results["test/auroc_classes"] == len(aurocs)
    assert abs(results["test/auroc"] - sum(aurocs) / len(aurocs)) < 1e-5


def test_class_count_mismatch_is_reported(tmp_path):
    _, data = METHODS["pcam"].tiny(tmp_path)
    module = PCAMModule(PoolingClassifier("test_resnet", num_classes=3))
    with pytest.raises(ValueError, match="num_classes=4"):
        _trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0).fit(module, data)


class _TinyBackbone(nn.Module):
    """Stride-4 conv net: 8×8 feature maps at 32 px (timm-style ``forward_features`` / ``num_features``)."""

    num_features = 32

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        )

    def forward_features(self, x):
        return self.body(x)


def _toy_batch(n: int, generator: torch.Generator) -> dict:
    """Noise images; class 0 = a bright 6×6 square, class 1 = a dark one, each present with p = 0.5."""
    image = 0.3 * torch.randn(n, 1, 32, 32, generator=generator)
    labels = (torch.rand(n, 2, generator=generator) < 0.5).float()
    boxes, box_labels = [], []
    for i in range(n):
        b, lab = [], []
        for k, value in ((0, 2.0), (1, -2.0)):
            if labels[i, k]:
                x, y = (int(v) for v in torch.randint(0, 26, (2,), generator=generator))
                image[i, 0, y:y + 6, x:x + 6] = value
                b.append([x, y, x + 6, y + 6])
                lab.append(k)
        boxes.append(torch.tensor(b, dtype=torch.float32).reshape(-1, 4))
        box_labels.append(torch.tensor(lab, dtype=torch.long))
    return {"image": image, "labels": labels, "label_mask": torch.ones(n, 2, dtype=torch.bool), "boxes": boxes,
            "box_labels": box_labels, "has_boxes": labels.any(1)}


def test_pcam_learns_to_classify_and_localize_a_toy_task():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    # pointing tolerance = one feature cell (4 px): an 8×8 map cannot point more finely than that
    module = PCAMModule(PoolingClassifier(_TinyBackbone(), num_classes=2, pool="pcam"), class_names=["bright", "dark"],
                        pointing_tolerance=4)
    opt = torch.optim.Adam(module.parameters(), lr=3e-3)
    module.train()
    for _ in range(60):
        batch = _toy_batch(32, g)
        loss, _ = pcam_bce(module(batch["image"]), batch["labels"], batch["label_mask"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    module.eval()
    test = _toy_batch(64, g)
    with torch.no_grad():
        logits, maps = module.forward_with_maps(test["image"])
    module.test_metrics.update(logits, test["labels"])
    assert module.test_metrics.compute()["auroc"] > 0.95
    heat = module.net.maps_to_heatmaps(maps)
    module.update_localization(test, heat)
    assert module.test_localization.compute()["test/loc/pointing"] > 0.85
    # the class's probability mass sits on its square: mean inside the box > 2× mean outside, for most squares
    heat = heatmaps_at_input(heat, (32, 32))
    ratios = []
    for i, (boxes, labels) in enumerate(zip(test["boxes"], test["box_labels"])):
        for (x0, y0, x1, y1), k in zip(boxes.long().tolist(), labels.tolist()):
            inside = torch.zeros(32, 32, dtype=torch.bool)
            inside[y0:y1, x0:x1] = True
            ratios.append(float(heat[i, k][inside].mean() / heat[i, k][~inside].mean()))
    assert sum(r > 2 for r in ratios) > 0.85 * len(ratios)
