"""DC-MT stage 1: dossier oracle values (LSE, refinement, ramps, losses), network properties, the
MeanTeacherModule's loss assembly (no label leakage, epoch-20 switch) and per-slice localisation metrics."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch

from callbacks.ema_teacher import EMATeacher
from lightning_modules.dcmt_metrics import MaskLocalizationRate, SliceMetrics
from lightning_modules.dcmt import MeanTeacherModule
from networks.dcmt import (DCMTNet, FABlock, bound_loss, class_activation_maps, consistency_weights, normalize_cams,
                           normalized_mse, offset_sigmoid_rampup, refine_cams, select_class, sigmoid_rampup,
                           softmax_mse)
from networks.pooling import LSEPool


def _tiny_net(**kw) -> DCMTNet:
    torch.manual_seed(0)
    return DCMTNet("test_resnet", num_classes=3, fa_channels=8, head_channels=8, **kw)


# ----------------------------------------------------------------------------------- g.1 LSE
def test_lse_oracles():
    pool = LSEPool(gamma=6.0)
    one = torch.zeros(1, 1, 16, 16)
    one[0, 0, 3, 5] = 1.0
    assert pool(one).item() == pytest.approx(0.157446, abs=1e-6)
    half = torch.zeros(1, 1, 16, 16)
    half[..., :8, :] = 1.0
    assert pool(half).item() == pytest.approx(0.884888, abs=1e-6)
    assert pool(torch.full((1, 1, 16, 16), 0.37)).item() == pytest.approx(0.37, abs=1e-6)
    z = torch.randn(4, 5, 16, 16)
    lse = pool(z)
    assert torch.all(z.mean((2, 3)) <= lse + 1e-6) and torch.all(lse <= z.amax((2, 3)) + 1e-6)
    assert _tiny_net().pool.gamma == 6.0


# ---------------------------------------------------------------------------- g.2 refinement
def _refined_value(m_hat: float) -> float:
    cam = torch.zeros(1, 1, 1, 3)
    cam[..., 1] = 1.0  # min 0, max 1: the normalised value of the last entry is m_hat
    cam[..., 2] = m_hat
    return refine_cams(cam).flatten()[2].item()


@pytest.mark.parametrize("m_hat,expected,tol", [(0.4, 0.5, 1e-6), (0.45, 0.993307, 1e-6),
                                                (0.5, 0.9999546, 1e-7), (0.3, 4.54e-5, 1e-7)])
def test_refinement_oracles(m_hat, expected, tol):
    assert _refined_value(m_hat) == pytest.approx(expected, abs=tol)


def test_refinement_threshold_invariance_and_constant_map():
    threshold = 0.4 + math.log(999) / 100
    assert threshold == pytest.approx(0.469068, abs=1e-6)
    assert _refined_value(threshold + 1e-4) >= 0.999 > _refined_value(threshold - 1e-4)
    cams = torch.rand(2, 3, 5, 5)
    torch.testing.assert_close(refine_cams(cams), refine_cams(3.0 * cams + 7.0), atol=1e-5, rtol=0)
    constant = refine_cams(torch.full((1, 1, 4, 4), 2.5))
    torch.testing.assert_close(constant, torch.full_like(constant, 1 / (1 + math.exp(40))), rtol=1e-3, atol=0)
    assert normalize_cams(torch.full((1, 1, 2, 2), 3.0)).abs().max() == 0
    # upsampling to the requested size with align_corners=True keeps the corners
    up = refine_cams(cams, (9, 9))
    assert up.shape == (2, 3, 9, 9)
    torch.testing.assert_close(up[..., 0, 0], refine_cams(cams)[..., 0, 0])


# ------------------------------------------------------------------------------ g.3 schedules
def test_ramp_oracles():
    cls = lambda e: 5 * sigmoid_rampup(e, 40)  # noqa: E731
    assert cls(1) == pytest.approx(0.043124, abs=1e-6)
    assert cls(19) == pytest.approx(1.260254, abs=1e-6)
    assert cls(20) == pytest.approx(1.432524, abs=1e-6)
    assert cls(30) == pytest.approx(3.658078, abs=1e-6)
    assert cls(40) == cls(55) == 5.0
    for e, value in [(20, 0.006738), (25, 0.021750), (30, 0.060055), (40, 0.286505), (50, 0.286505)]:
        assert offset_sigmoid_rampup(e, 20, 40) == pytest.approx(value, abs=1e-6)
    assert consistency_weights(19) == (0.0, 0.0)  # the switch: nothing before epoch 20 although ω_cls(19) > 0
    w_cls, w_att = consistency_weights(20)
    assert (w_cls, w_att) == (pytest.approx(1.432524, abs=1e-6), pytest.approx(0.006738, abs=1e-6))
    assert consistency_weights(60, att_ramp="shifted")[1] == pytest.approx(1.0)  # start + rampup


# ------------------------------------------------------------------------------- g.5 losses
def test_loss_oracles():
    n = 64
    c = torch.zeros(1, 1, 8, 8)
    c.view(-1)[: n // 4] = 1.0
    assert normalized_mse(c, c).item() == 0.0
    assert normalized_mse(torch.ones(2, 1, 4, 4), torch.zeros(2, 1, 4, 4)).item() == pytest.approx(1.0)
    assert normalized_mse(c, torch.full_like(c, 0.5)).item() == pytest.approx(1 / 3, abs=1e-6)
    assert normalized_mse(c, torch.full_like(c, 0.5)).item() == pytest.approx(0.25 * n / (n / 4 + 0.5 * n))
    a_inside = c * 0.7
    assert bound_loss(c, a_inside, 1).item() == pytest.approx(0.0, abs=1e-6)
    assert bound_loss(c, 1 - c, 1).item() == pytest.approx(1.0)
    # 10 labeled samples, all disjoint, in a batch of 40 -> 10/40
    cs, disjoint = c.expand(10, -1, -1, -1), (1 - c).expand(10, -1, -1, -1)
    assert bound_loss(cs, disjoint, 40).item() == pytest.approx(0.25)
    s, t = torch.zeros(1, 3), torch.tensor([[math.log(2.0), 0.0, 0.0]])
    assert softmax_mse(s, t).item() == pytest.approx(1 / 72, abs=1e-7)


# ------------------------------------------------------------------------------------ network
def test_fa_block_starts_as_identity_and_learns_gamma():
    block = FABlock(16, reduction=8)
    u = torch.randn(2, 16, 5, 5)
    assert block.gamma.item() == 0.0
    torch.testing.assert_close(block(u), u)
    block(u).sum().backward()
    assert block.gamma.grad is not None and block.gamma.grad.abs() > 0


def test_network_shapes_and_output_stride():
    net = _tiny_net().eval()
    x = torch.randn(2, 1, 64, 64)
    out = net.forward_all(x)
    assert out.logits.shape == (2, 3) and out.features.shape == (2, 8) and out.feature_map.shape == (2, 8, 4, 4)
    assert net.attention_maps(x).shape == (2, 3, 64, 64)
    a = net.attention_maps(x)
    assert a.min() >= 0 and a.max() <= 1


@pytest.mark.slow
def test_paper_network_shapes():
    """g.6: a 256² slice gives backbone 2048×16×16, Z 512×16×16, 3 logits, CAMs 3×256², a 512-d feature."""
    net = DCMTNet().eval()
    x = torch.randn(1, 1, 256, 256)
    with torch.no_grad():
        assert net.backbone(x)[-1].shape == (1, 2048, 16, 16)
        out = net.forward_all(x)
        assert out.feature_map.shape == (1, 512, 16, 16) and out.features.shape == (1, 512)
        assert net.attention_maps(x).shape == (1, 3, 256, 256)


def test_cams_use_detached_classifier_weights():
    net = _tiny_net()
    out = net.forward_all(torch.randn(2, 1, 64, 64))
    cams = net.cams(out.feature_map)
    torch.testing.assert_close(cams, torch.relu(torch.einsum("bdhw,kd->bkhw", out.feature_map, net.classifier.weight)))
    refine_cams(select_class(cams, torch.tensor([0, 2])), (64, 64)).sum().backward()
    assert net.classifier.weight.grad is None and net.classifier.bias.grad is None
    assert net.head[0][0].weight.grad is not None
    assert class_activation_maps(out.feature_map, net.classifier.weight).shape == (2, 3, 4, 4)


# ------------------------------------------------------------------------------------- module
def _batch(b_lab: int = 2, b_unl: int = 3, size: int = 64, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    b = b_lab + b_unl
    labels = torch.zeros(b, 3)
    labels[torch.arange(b_lab), torch.randint(0, 3, (b_lab,), generator=g)] = 1.0
    mask = torch.zeros(b, 1, size, size)
    mask[..., 10:30, 10:40] = 1.0
    return {"image": torch.randn(b, 1, size, size, generator=g), "image_teacher": torch.randn(b, 1, size, size, generator=g),
            "labels": labels, "label_mask": (torch.arange(b) < b_lab)[:, None].expand(b, 3).clone(),
            "stream": torch.tensor([1] * b_lab + [2] * b_unl), "attention_mask": mask,
            "has_attention_mask": torch.ones(b, dtype=torch.bool)}


def _module(**kw) -> MeanTeacherModule:
    module = MeanTeacherModule(_tiny_net(), **kw)
    module.train()
    return module


def test_no_consistency_before_switch(monkeypatch):
    module = _module()
    monkeypatch.setattr(module, "ramp_time", lambda: 19.0)
    terms = module.compute_losses(_batch())
    assert "cons_cls" not in terms and "cons_att" not in terms
    expected = terms["cls"] + 0.5 * terms["mse"] + 0.001 * terms["bound"]
    torch.testing.assert_close(terms["total"], expected)
    monkeypatch.setattr(module, "ramp_time", lambda: 30.0)
    terms = module.compute_losses(_batch())
    w_cls, w_att = consistency_weights(30)
    expected = terms["cls"] + 0.5 * terms["mse"] + 0.001 * terms["bound"] + w_cls * terms["cons_cls"] + w_att * terms["cons_att"]
    torch.testing.assert_close(terms["total"], expected)


def test_unlabeled_ground_truth_never_used(monkeypatch):
    """Changing the (hidden) labels of unlabeled slices changes nothing; attention consistency follows the
    teacher's predicted class."""
    module = _module(consistency_start=0)
    module.eval()  # no dropout: deterministic forward passes
    batch = _batch()
    torch.manual_seed(0)
    base = module.compute_losses(batch)
    poisoned = {k: v.clone() for k, v in batch.items()}
    poisoned["labels"][2:] = torch.eye(3)[torch.tensor([2, 1, 0])]  # label_mask stays False
    other = module.compute_losses(poisoned)
    for key in base:
        torch.testing.assert_close(base[key], other[key])
    # recompute the attention consistency by hand with the teacher's argmax
    with torch.no_grad():
        s, t = module.student.forward_all(batch["image"]), module.teacher.forward_all(batch["image_teacher"])
        pred = t.logits[2:].argmax(1)
        a_s = refine_cams(select_class(module.student.cams(s.feature_map[2:]), pred), (64, 64))
        a_t = refine_cams(select_class(module.teacher.cams(t.feature_map[2:]), pred), (64, 64))
    torch.testing.assert_close(base["cons_att"], normalized_mse(a_s, a_t))


def test_attention_losses_ablation_and_gradients():
    module = _module(attention_losses=False, consistency_start=0)
    terms = module.compute_losses(_batch())
    assert "mse" not in terms and "bound" not in terms
    terms["total"].backward()
    assert all(p.grad is None for p in module.teacher.parameters())
    assert module.student.classifier.weight.grad is not None


def test_module_registers_ema_teacher_and_frozen_teacher():
    module = _module(ema_decay=0.95)
    callbacks = module.configure_callbacks()
    assert len(callbacks) == 1 and isinstance(callbacks[0], EMATeacher) and callbacks[0].decay == 0.95
    assert all(not p.requires_grad for p in module.teacher.parameters())
    assert not module.teacher.training and module.student.training
    with pytest.raises(ValueError):
        MeanTeacherModule(_tiny_net(), eval_model="ema")


def test_short_training_reduces_the_loss(tmp_path):
    """Learning check on a fixed batch: 25 Adam steps lower the supervised loss."""
    module = _module(consistency_start=0)
    batch = _batch(4, 4, size=32)
    opt = torch.optim.Adam(module.student.parameters(), lr=3e-3)
    first = None
    for _ in range(25):
        terms = module.compute_losses(batch)
        opt.zero_grad()
        terms["total"].backward()
        opt.step()
        first = terms["cls"].item() if first is None else first
    assert terms["cls"].item() < 0.5 * first


def test_fit_validate_with_trainer(tmp_path):
    from lightning_modules.tiny import dcmt

    module, data = dcmt(tmp_path)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                         log_every_n_steps=1)
    trainer.fit(module, data)
    keys = trainer.callback_metrics
    for key in ("train/loss", "val/auroc", "val/tiou@0.3", "val/tior@0.5", "val/auroc_teacher", "val/mtiou_teacher",
                "val/balanced_accuracy", "val/f1", "train/ema_alpha", "train/w_cls", "train/w_att"):
        assert key in keys, key
    assert keys["train/ema_alpha"].item() == pytest.approx(2 / 3)  # two steps: alpha(2)


# ------------------------------------------------------------------------------------ metrics
def test_localization_rate_is_per_slice():
    metric = MaskLocalizationRate(2, tiou_thresholds=(0.5,), tior_thresholds=(0.5,))
    target = torch.zeros(3, 4, 4, dtype=torch.bool)
    target[:, :2, :] = True  # 8 pixels
    perfect = target[0].clone()
    half = torch.zeros(4, 4, dtype=torch.bool)
    half[0, :] = True  # IoU 4/8 = 0.5, IoR 1
    disjoint = ~target[0]
    metric.update(torch.stack([perfect, half, disjoint]), target, torch.tensor([0, 0, 1]))
    metric.update(torch.zeros(1, 4, 4, dtype=torch.bool), torch.zeros(1, 4, 4, dtype=torch.bool), torch.tensor([1]))
    out = metric.compute()
    torch.testing.assert_close(out["tiou"], torch.tensor([[1.0], [0.0]]))  # class 0: both slices ≥ 0.5
    torch.testing.assert_close(out["tior"], torch.tensor([[1.0], [0.0]]))
    assert metric.count.tolist() == [2.0, 1.0]  # the empty-target slice is skipped


def test_slice_metrics_keys_and_values():
    metrics = SliceMetrics(3, class_names=["a", "b", "c"], suffix="_teacher")
    probs = torch.eye(3)[torch.tensor([0, 1, 2, 0])] * 0.8 + 0.2 / 3
    target = torch.tensor([0, 1, 2, 0])
    metrics.classification.update(probs, target)
    masks = torch.ones(4, 8, 8, dtype=torch.bool)
    metrics.localization.update(masks, masks, target)
    out = metrics.compute()
    assert out["auroc_teacher"] == 1.0 and out["balanced_accuracy_teacher"] == 1.0
    assert out["f1_teacher"] == 1.0 and out["tiou@0.7_teacher"] == 1.0 and out["mtior_teacher/b"] == 1.0
    assert len([k for k in out if k.startswith("tiou@")]) == 7 and len([k for k in out if k.startswith("tior@")]) == 5
