"""MAG-SD and DC-MT are evaluated as attention methods (issue 14 s2): the shared localisation metrics on the
same path as PCAM / GAP, MAG-SD's own protocol, and no localisation keys for data without boxes or masks."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_modules.magsd import MAGSDModule
from lightning_modules.dcmt import MeanTeacherModule
from networks.dcmt import DCMTOutput

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # Lightning's small-data / worker warnings


# ------------------------------------------------------------------------------- MAG-SD's protocol
def test_attention_region_accuracy_hand_case():
    """Image 0 (raw peak 0.4, so only the min-max normalised map crosses 0.85): a 4×4 block (1.0) on rows/cols
    2-5 and a diagonal of 4 pixels (0.9 → 0.9 normalised) on (10,10)…(13,13), one 8-connected component whose
    box is rows/cols 10-13. The region is the two filled boxes, 32 px. GT = rows/cols 10-13 (16 px):
    IoU = 16 / 32 = 0.5 > 0.3, a hit (with the bare components it would be 4 / 32 = 0.125, a miss).
    Image 1: attention on rows/cols 0-3, GT on rows 12-15: IoU 0, a miss. acc 1/2, mean IoU 0.25."""
    from lightning_modules.metrics import AttentionRegionAccuracy

    hm = torch.zeros(2, 1, 16, 16)
    hm[0, 0, 2:6, 2:6] = 1.0
    for i in range(10, 14):
        hm[0, 0, i, i] = 0.9
    hm[0, 0, 2:8, 2:8] = torch.where(hm[0, 0, 2:8, 2:8] > 0, hm[0, 0, 2:8, 2:8], torch.tensor(0.8))  # ring below 0.85
    hm[0] *= 0.4
    hm[1, 0, 0:4, 0:4] = 0.7
    gt = torch.zeros(2, 16, 16, dtype=torch.bool)
    gt[0, 10:14, 10:14] = True
    gt[1, 12:16, :] = True
    m = AttentionRegionAccuracy()
    m.update(hm, gt)
    out = m.compute()
    assert float(out["magsd_acc@0.3"]) == 0.5 and float(out["magsd_miou"]) == pytest.approx(0.25)
    raw = AttentionRegionAccuracy(normalize=False)  # the reference's absolute 0.85 on this map: nothing above it
    raw.update(hm, gt)
    assert float(raw.compute()["magsd_acc@0.3"]) == 0.0
    assert AttentionRegionAccuracy().compute()["magsd_miou"].isnan()  # no image: NaN, never logged


def test_attention_targets_prefer_the_lesion_mask_and_rasterize_boxes_by_pixel_centre():
    from lightning_modules.weak_localization import attention_targets

    mask = torch.zeros(3, 1, 8, 8)
    mask[0, 0, 1:3, 1:3] = 1
    batch = {"image": torch.zeros(3, 1, 8, 8), "attention_mask": mask,
             "has_attention_mask": torch.tensor([True, True, False]), "has_boxes": torch.tensor([True, True, True]),
             "boxes": [torch.tensor([[4.0, 4.0, 8.0, 8.0]]), torch.tensor([[0.4, 1.6, 2.5, 3.0]]), torch.zeros(0, 4)]}
    targets, present = attention_targets(batch)
    assert present.tolist() == [True, True, False]
    assert torch.equal(targets[0], mask[0, 0].bool())  # the mask wins over the box
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[2:3, 0:2] = True  # centres (0.5, 2.5), (1.5, 2.5) lie in x ∈ [0.4, 2.5), y ∈ [1.6, 3)
    assert torch.equal(targets[1], expected)  # empty attention mask: the boxes


# ------------------------------------------------------------------------------------------ modules
def _trainer(tmp_path) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path)


def _identity(batch: dict) -> dict:
    return batch


def _loader(batch: dict) -> DataLoader:
    """One ready-made batch (a plain list of batches would be read as several dataloaders)."""
    return DataLoader([batch], batch_size=None, collate_fn=_identity)


def _cxr_batch(with_targets: bool) -> dict:
    """Two 32² images, classes one-hot; image 0 has a lesion (rows 8-15, cols 8-19) as box and mask."""
    mask = torch.zeros(2, 1, 32, 32)
    mask[0, 0, 8:16, 8:20] = 1
    return {"image": torch.zeros(2, 1, 32, 32), "labels": torch.eye(2), "label_mask": torch.ones(2, 2, dtype=torch.bool),
            "boxes": [torch.tensor([[8.0, 8.0, 20.0, 16.0]]), torch.zeros(0, 4)],
            "box_labels": [torch.tensor([0]), torch.zeros(0, dtype=torch.long)],
            "has_boxes": torch.tensor([with_targets, False]), "attention_mask": mask,
            "has_attention_mask": torch.tensor([with_targets, False]), "image_id": ["a", "b"], "patient_id": ["a", "b"]}


class _MAGSDStub(nn.Module):
    """Mean attention 0.4 on image 0's lesion, 0 elsewhere (raw peak below both 0.5 and 0.85)."""

    num_classes = 2

    def __init__(self) -> None:
        super().__init__()
        self.classifier = nn.Linear(1, 2)
        mean = torch.zeros(2, 1, 32, 32)
        mean[0, 0, 8:16, 8:20] = 0.4
        self.register_buffer("mean", mean)

    def forward(self, x):
        return self.classifier.weight.sum() * 0 + torch.tensor([[2.0, 0.0], [0.0, 2.0]])

    def attention_maps(self, x, per_class=False):
        return torch.cat([self.mean, self.mean.roll(12, -2)], 1) if per_class else self.mean


def test_magsd_logs_shared_metrics_and_its_own_protocol(tmp_path):
    module = MAGSDModule(_MAGSDStub(), class_names=["a", "b"])
    trainer = _trainer(tmp_path)
    trainer.test(module, dataloaders=_loader(_cxr_batch(True)), verbose=False)
    out = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/loc/")}
    # the same map for every class; the sweeps normalise it (peak 0.4 → 1): the lesion box and mask exactly
    assert out["test/loc/maxboxacc_v2"] == 1.0 and out["test/loc/maxboxacc_v2_raw"] == 1.0
    assert out["test/loc/pxap"] == pytest.approx(1.0) and out["test/loc/pxap_raw"] == pytest.approx(1.0)
    assert out["test/loc/pointing"] == 1.0
    assert out["test/loc/iou@0.1"] == 0.0  # the fixed protocol thresholds the raw map at 0.5: nothing
    assert out["test/loc/magsd_acc@0.3"] == 1.0 and out["test/loc/magsd_miou"] == 1.0
    assert out["test/loc/maxboxacc_v2/a"] == 1.0 and "test/loc/maxboxacc_v2/b" not in out


def test_magsd_class_mode_uses_the_per_class_maps(tmp_path):
    module = MAGSDModule(_MAGSDStub(), class_names=["a", "b"], attention_mode="class")
    batch = _cxr_batch(True)
    batch["box_labels"] = [torch.tensor([1]), torch.zeros(0, dtype=torch.long)]  # class b's map: 12 rows lower
    trainer = _trainer(tmp_path)
    trainer.test(module, dataloaders=_loader(batch), verbose=False)
    out = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/loc/")}
    assert out["test/loc/maxboxacc_v2/b"] == 0.0  # rows 20-27: no overlap with the box on rows 8-15
    assert out["test/loc/magsd_acc@0.3"] == 1.0  # the protocol always reads the mean map


def test_magsd_without_boxes_or_masks_logs_no_localization(tmp_path):
    module = MAGSDModule(_MAGSDStub(), class_names=["a", "b"])
    trainer = _trainer(tmp_path)
    trainer.test(module, dataloaders=_loader(_cxr_batch(False)), verbose=False)
    assert "test/accuracy" in trainer.callback_metrics
    assert not [k for k in trainer.callback_metrics if "loc" in k]


class _DCMTStub(nn.Module):
    """Class maps = the feature map itself: class 0 is 1 on the slice's target region, class 1 on its mirror."""

    num_classes = 2

    def __init__(self) -> None:
        super().__init__()
        self.classifier = nn.Linear(1, 2)

    def forward_all(self, x):
        fm = torch.cat([x, x.flip(-1)], 1)
        logits = torch.tensor([[2.0, 0.0]]).expand(len(x), 2) + 0 * self.classifier.weight.sum()
        return DCMTOutput(logits, fm.mean((2, 3)), fm)

    def cams(self, feature_map):
        return feature_map

    def refine(self, cams, size):
        return cams


def _slice_batch(with_mask: bool) -> dict:
    image = torch.zeros(2, 1, 16, 16)
    image[:, 0, 4:8, 2:6] = 1
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    return {"image": image, "labels": labels, "label_mask": torch.ones(2, 2, dtype=torch.bool),
            "attention_mask": image.clone(), "has_attention_mask": torch.tensor([with_mask, with_mask]),
            "has_boxes": torch.tensor([False, False]), "stream": torch.ones(2, dtype=torch.long),
            "image_id": ["s0", "s1"], "patient_id": ["p", "p"]}


def test_dcmt_logs_pxap_for_student_and_teacher_and_no_box_metrics(tmp_path):
    """Slice 0 (class 0): its CAM is the mask. Slice 1 (class 1): the mirrored CAM misses the mask. Pooled:
    at τ > 0 the 16 lesion pixels of slice 0 and the 16 mirrored pixels of slice 1 are predicted (recall ½,
    precision ½); at τ = 0 everything (recall 1, precision 32/512). PxAP = ½·½ + ½·1/16 = 9/32."""
    module = MeanTeacherModule(_DCMTStub())
    trainer = _trainer(tmp_path)
    trainer.test(module, dataloaders=_loader(_slice_batch(True)), verbose=False)
    out = {k: float(v) for k, v in trainer.callback_metrics.items() if "loc" in k}
    assert set(out) == {f"test/{loc}/{key}" for loc in ("loc", "loc_teacher") for key in ("pxap", "pxap_raw")}
    assert out["test/loc/pxap"] == pytest.approx(9 / 32) and out["test/loc_teacher/pxap"] == pytest.approx(9 / 32)
    trainer = _trainer(tmp_path)
    trainer.test(MeanTeacherModule(_DCMTStub()), dataloaders=_loader(_slice_batch(False)), verbose=False)
    assert not [k for k in trainer.callback_metrics if "loc" in k]


def test_magsd_real_network_feeds_every_localization_key(tmp_path):
    """The real MAGSDNet (both ``attention_maps`` calls, class mode): every key present and in [0, 1]."""
    from networks.magsd import MAGSDNet

    torch.manual_seed(0)
    module = MAGSDModule(MAGSDNet(num_classes=2, backbone="test_resnet", num_maps=4), attention_mode="class")
    batch = _cxr_batch(True)
    batch["image"] = torch.randn(2, 1, 32, 32)
    batch["frame"] = torch.tensor([[32.0, 24.0, 1.0], [32.0, 32.0, 1.0]])  # image 0 letterboxed
    trainer = _trainer(tmp_path)
    trainer.test(module, dataloaders=_loader(batch), verbose=False)
    out = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/loc/")}
    for key in ("maxboxacc_v2", "maxboxacc_v2_raw", "maxboxacc@0.5", "threshold_raw@0.5", "pxap", "pxap_raw",
                "iou@0.3", "iobb@0.5", "pointing", "magsd_acc@0.3", "magsd_miou"):
        assert 0.0 <= out[f"test/loc/{key}"] <= 1.0, key
