"""Probe (issue 14 s7): OXnet's distillation exercised through ``OXnetModule.compute_losses``.

The EMA teacher is made confident (class 0 at q = 0.9 on every anchor) by one EMA update (α = 0, what the first
optimiser step of ``EMATeacher`` does) from a confident copy of the student. Its pseudo-boxes then exist on the box
and unlabeled images, are filtered away on the image whose class 0 is a known negative, and the module's soft focal
loss (SFL) and regression consistency must equal a recomputation written here from the formulas of the dossier
(a.10): SFL = Σ_{valid anchors, classes} α(q) |q − p|^γ BCE(p, q) / N_pos, α(q) = α₀ + (α₁ − α₀) q; consistency =
Σ_pos smooth-L1(δ_student − encode(pseudo-box)) / (4 N_pos); both averaged over the distillation images.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from datamodules.batch import STREAM_BOX, STREAM_LABEL, STREAM_UNLABELED
from lightning_modules.oxnet import OXnetModule
from networks.ema import ema_update_
from networks.oxnet import Distillation, OXnet, pseudo_boxes
from networks.retina import RetinaNet, encode_targets, match_anchors

Q0 = 0.9  # teacher confidence for class 0 on every anchor; classes 1, 2 at σ(−10)
K = 3


def _module(**kwargs) -> OXnetModule:
    torch.manual_seed(0)
    net = OXnet(RetinaNet(num_classes=K, backbone="test_resnet", fpn_channels=16, head_depth=1, fpn_levels=(3, 4, 5),
                          anchor_size_factor=2.0))
    # image-dependent student heads (their reference init is zero), so every image's terms differ
    torch.nn.init.normal_(net.retina.cls_head.cls_logits.weight, std=0.05)
    torch.nn.init.normal_(net.retina.box_head.bbox_reg.weight, std=0.05)
    module = OXnetModule(net, **kwargs)
    confident = copy.deepcopy(module.student)
    with torch.no_grad():
        head = confident.retina.cls_head.cls_logits
        head.weight.zero_()  # the logits no longer depend on the image: q is known exactly
        bias = head.bias.view(-1, K)  # channel = anchor * K + class (networks.retina._flatten)
        bias[:, 0] = math.log(Q0 / (1 - Q0))
        bias[:, 1:] = -10.0
        reg = confident.retina.box_head.bbox_reg
        reg.weight.zero_()
        reg.bias.zero_()  # zero deltas: every teacher box is its (clipped) anchor
    ema_update_(module.teacher, confident, alpha=0.0)
    module.train()
    return module


def _batch(size: int = 64) -> dict:
    g = torch.Generator().manual_seed(1)
    image = torch.randn(3, 1, size, size, generator=g)
    return {
        "image": image, "image_teacher": image + 0.01 * torch.randn(image.shape, generator=g),
        # image 1 is labelled negative for class 0: every pseudo-box (all class 0) is filtered away there
        "labels": torch.tensor([[1.0, 0, 0], [0, 1, 1], [0, 0, 0]]),
        "label_mask": torch.tensor([[True] * 3, [True] * 3, [False] * 3]),
        "stream": torch.tensor([STREAM_BOX, STREAM_LABEL, STREAM_UNLABELED]),
        "has_boxes": torch.tensor([True, False, False]),
        "boxes": [torch.tensor([[10.0, 12.0, 30.0, 28.0]]), torch.zeros(0, 4), torch.zeros(0, 4)],
        "box_labels": [torch.tensor([0]), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)],
    }


def _oracle(module: OXnetModule, batch: dict, rows_with_boxes: list[int], n_rows: int):
    """(SFL, consistency) by hand from a fresh student forward; graph kept for the gradient comparison."""
    retina = module.student.retina
    out = module.student(batch["image"])
    anchors = retina.anchors(batch["image"].shape[-2:], out["cls_maps"])
    q = torch.full((len(anchors), K), 1 / (1 + math.exp(10.0)))
    q[:, 0] = Q0
    q = q.clamp(1e-4, 1 - 1e-4)  # the SFL clamp of the dossier
    boxes = pseudo_boxes(q, torch.zeros(len(anchors), 4), anchors,
                         lambda d, a: retina.decode(d, a, batch["image"].shape[-2:]))["boxes"]
    assert len(boxes) > 0
    matched = match_anchors(anchors, boxes)  # fg IoU ≥ 0.5, ignored in [0.4, 0.5)
    valid = (matched != -2)[:, None].float()
    pos = (matched >= 0).nonzero().squeeze(1)
    assert len(pos) > 0
    targets = encode_targets(retina.box_coder, boxes[matched[pos]], anchors[pos])
    sfl, reg = 0.0, 0.0
    for i in rows_with_boxes:
        z = out["cls_logits"][i]
        p = torch.sigmoid(z)
        alpha = 0.05 + (0.95 - 0.05) * q
        bce = -(q * F.logsigmoid(z) + (1 - q) * F.logsigmoid(-z))
        sfl = sfl + (alpha * (q - p).abs() ** 2 * bce * valid).sum() / len(pos)
        d = out["box_deltas"][i][pos] - targets
        beta = 1 / 9
        sl1 = torch.where(d.abs() < beta, 0.5 * d ** 2 / beta, d.abs() - 0.5 * beta)
        reg = reg + sl1.sum() / (4 * len(pos))
    return sfl / n_rows, reg / n_rows


def test_confident_teacher_distils_through_the_module():
    module = _module()
    batch = _batch()
    terms = module.compute_losses(batch)
    # distillation images: all three (distill_box_stream=True); image 1's pseudo-boxes are all filtered (class 0 is a
    # known negative there), so it contributes 0 to the mean over 3
    want_sfl, want_reg = _oracle(module, batch, rows_with_boxes=[0, 2], n_rows=3)
    assert float(terms["sfl"].detach()) > 0.05  # the student (p ≈ 0.01) disagrees with the teacher (q = 0.9)
    assert float(terms["sfl"].detach()) == pytest.approx(float(want_sfl.detach()), rel=1e-4)
    assert float(terms["consistency"].detach()) == pytest.approx(float(want_reg.detach()), rel=1e-4, abs=1e-7)
    # gradients reach the student's classification head exactly as the formula's do
    cls_bias = module.student.retina.cls_head.cls_logits.bias
    got = torch.autograd.grad(terms["sfl"], cls_bias)[0]
    want = torch.autograd.grad(want_sfl, cls_bias)[0]
    assert got.abs().sum() > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    # and the total carries both terms with weight 1 (the reference)
    others = sum(terms[n] for n in ("focal", "box", "daa", "intra", "inter"))
    total = others + terms["sfl"] + terms["consistency"]
    assert float(terms["total"].detach()) == pytest.approx(float(total.detach()), rel=1e-5)


def test_without_box_stream_distillation_only_label_and_unlabeled_images_count():
    module = _module(distillation=Distillation(distill_box_stream=False))
    batch = _batch()
    terms = module.compute_losses(batch)
    want_sfl, want_reg = _oracle(module, batch, rows_with_boxes=[2], n_rows=2)  # rows 1 (filtered) and 2
    assert float(terms["sfl"].detach()) == pytest.approx(float(want_sfl.detach()), rel=1e-4)
    assert float(terms["consistency"].detach()) == pytest.approx(float(want_reg.detach()), rel=1e-4, abs=1e-7)
