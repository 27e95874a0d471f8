"""Probes (issue 14 s7): OXnet / RetinaNet components that a silent edit could remove or bend, each checked against
the dossier's formula (``../shared/research/method-oxnet.md`` a.6–a.10).

* Dual attention alignment: the image logit is s_c = Σ_hw X_c ⊙ R_c with R_c = A_c / Σ A_c (not a plain average).
* Per-stream masks: the supervised focal / smooth-L1 terms come from the box-stream images only, with the focal
  loss's α = 0.25 and γ = 2 (both in OXnet and in the stage-1 RetinaNet module).
* Box coder: normalised deltas with weights (10, 10, 5, 5), by hand.
* Distillation: the teacher sees its own view (``image_teacher``), and unlabeled images use their own confidence
  threshold (``unlabeled_score_thresh``).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from datamodules.batch import STREAM_BOX, STREAM_LABEL, STREAM_UNLABELED
from lightning_modules.oxnet import OXnetModule
from lightning_modules.retinanet import RetinaNetModule
from networks.ema import ema_update_
from networks.oxnet import Distillation, OXnet
from networks.retina import DetectionSettings, RetinaNet, detection_losses, encode_targets, local_attention_map

K = 3


def _retina() -> RetinaNet:
    torch.manual_seed(0)
    net = RetinaNet(num_classes=K, backbone="test_resnet", fpn_channels=16, head_depth=1, fpn_levels=(3, 4, 5),
                    anchor_size_factor=2.0)
    # image-dependent heads (their reference init is zero), so anchors and images differ in loss
    torch.nn.init.normal_(net.cls_head.cls_logits.weight, std=0.05)
    torch.nn.init.normal_(net.box_head.bbox_reg.weight, std=0.05)
    return net


def _batch(size: int = 64) -> dict:
    """Two box images, one image-labelled, one unlabeled."""
    g = torch.Generator().manual_seed(1)
    image = torch.randn(4, 1, size, size, generator=g)
    return {
        "image": image, "image_teacher": image + 0.3 * torch.randn(image.shape, generator=g),
        "labels": torch.tensor([[1.0, 0, 0], [0, 0, 1], [0, 1, 1], [0, 0, 0]]),
        "label_mask": torch.tensor([[True] * 3, [True] * 3, [True] * 3, [False] * 3]),
        "stream": torch.tensor([STREAM_BOX, STREAM_BOX, STREAM_LABEL, STREAM_UNLABELED]),
        "has_boxes": torch.tensor([True, True, False, False]),
        "boxes": [torch.tensor([[10.0, 12.0, 30.0, 28.0]]), torch.tensor([[30.0, 20.0, 60.0, 44.0]]),
                  torch.zeros(0, 4), torch.zeros(0, 4)],
        "box_labels": [torch.tensor([0]), torch.tensor([2]), torch.zeros(0, dtype=torch.long),
                       torch.zeros(0, dtype=torch.long)],
    }


def _supervised_by_hand(retina: RetinaNet, out: dict, batch: dict, rows: list[int], alpha: float = 0.25,
                        gamma: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    anchors = retina.anchors(batch["image"].shape[-2:], out["cls_maps"])
    cls, reg = detection_losses(out["cls_logits"][rows], out["box_deltas"][rows], anchors,
                                [batch["boxes"][i] for i in rows], [batch["box_labels"][i] for i in rows],
                                retina.box_coder, DetectionSettings(focal_alpha=alpha, focal_gamma=gamma,
                                                                    smooth_l1_beta=1 / 9, fg_iou=0.5, bg_iou=0.4))
    return cls.mean(), reg.mean()


# ------------------------------------------------------------------------------------------------ a.7 DAA
def test_image_logit_is_the_attention_weighted_sum_of_the_global_map():
    net = OXnet(_retina())
    torch.nn.init.normal_(net.retina.cls_head.cls_logits.weight, std=0.5)  # class-specific, non-uniform attention
    torch.nn.init.normal_(net.global_head.weight, std=0.5)
    with torch.no_grad():
        out = net(torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(2)))
        local = local_attention_map(out["cls_maps"], K, out["global_map"].shape[-2:])
    r = local / local.sum(dim=(-2, -1), keepdim=True)
    torch.testing.assert_close(out["attention"], r)
    torch.testing.assert_close(out["global_logits"], (out["global_map"] * r).sum(dim=(-2, -1)), rtol=1e-5, atol=1e-6)
    assert (out["global_logits"] - out["global_map"].mean(dim=(-2, -1))).abs().max() > 1e-3  # R is not uniform


# ------------------------------------------------------------------------------ a.6 per-stream supervision
def test_oxnet_supervised_terms_use_box_images_only_with_focal_alpha_and_gamma():
    module = OXnetModule(OXnet(_retina()), freeze_bn=False).eval()  # eval: the forward passes are repeatable
    batch = _batch()
    terms = module.compute_losses(batch)
    with torch.no_grad():
        out = module.student(batch["image"])
    focal, box = _supervised_by_hand(module.student.retina, out, batch, [0, 1])
    torch.testing.assert_close(terms["focal"], focal, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(terms["box"], box, rtol=1e-5, atol=1e-7)
    # the probe can tell the stream mask and the focal parameters apart
    assert abs(_supervised_by_hand(module.student.retina, out, batch, [0, 1, 2, 3])[0].item() - focal.item()) > 1e-4
    assert abs(_supervised_by_hand(module.student.retina, out, batch, [0, 1], alpha=2.0, gamma=0.25)[0].item()
               - focal.item()) > 1e-4


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # training_step called without a Trainer
def test_retinanet_stage1_loss_uses_box_images_only_with_focal_alpha_and_gamma():
    module = RetinaNetModule(_retina()).eval()
    batch = _batch()
    loss = module.training_step(batch, 0)
    with torch.no_grad():
        out = module.net(batch["image"][:2])
    focal, box = _supervised_by_hand(module.net, out, {**batch, "boxes": batch["boxes"][:2],
                                                       "box_labels": batch["box_labels"][:2]}, [0, 1])
    torch.testing.assert_close(loss, focal + box, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------- box coder
def test_box_encoding_uses_the_weights_10_10_5_5():
    """anchor (0, 0, 20, 10), box (2, 1, 26, 13): dx = 10·(14 − 10)/20, dy = 10·(7 − 5)/10, dw = 5 ln(24/20),
    dh = 5 ln(12/10)."""
    retina = _retina()
    anchor, box = torch.tensor([[0.0, 0.0, 20.0, 10.0]]), torch.tensor([[2.0, 1.0, 26.0, 13.0]])
    want = torch.tensor([[2.0, 2.0, 5 * math.log(1.2), 5 * math.log(1.2)]])
    torch.testing.assert_close(encode_targets(retina.box_coder, box, anchor), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(retina.decode(want[None], anchor, (64, 64))[0], box, rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------------------------ a.10 teacher
def _confident_module(q0: float = 0.9, **kwargs) -> OXnetModule:
    """A teacher whose class-0 probability is ``q0`` on every anchor whatever the image (as in
    test_probe_oxnet_distillation), so its pseudo-boxes are known."""
    module = OXnetModule(OXnet(_retina()), freeze_bn=False, **kwargs)
    confident = copy.deepcopy(module.student)
    with torch.no_grad():
        head = confident.retina.cls_head.cls_logits
        head.weight.zero_()
        bias = head.bias.view(-1, K)  # channel = anchor * K + class
        bias[:, 0] = math.log(q0 / (1 - q0))
        bias[:, 1:] = -10.0
        confident.retina.box_head.bbox_reg.weight.zero_()
        confident.retina.box_head.bbox_reg.bias.zero_()
    ema_update_(module.teacher, confident, alpha=0.0)
    return module.eval()


def test_teacher_runs_on_the_teacher_view_of_the_distillation_images():
    module = _confident_module()
    seen = []
    original = module.forward_teacher
    module.forward_teacher = lambda image: seen.append(image.clone()) or original(image)
    batch = _batch()
    module.compute_losses(batch)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], batch["image_teacher"])  # every stream distils (distill_box_stream=True)


@pytest.mark.parametrize("unlabeled_thresh,unlabeled_counts", [(0.5, True), (0.95, False)])
def test_unlabeled_images_use_their_own_confidence_threshold(unlabeled_thresh, unlabeled_counts):
    """Teacher class-0 confidence 0.9 everywhere: with ``unlabeled_score_thresh`` 0.95 the unlabeled image gets no
    pseudo-box (distillation 0 for it), with 0.5 it does; the labelled images keep theirs (threshold 0.5)."""
    module = _confident_module(distillation=Distillation(unlabeled_score_thresh=unlabeled_thresh,
                                                         distill_box_stream=False))
    batch = _batch()
    with torch.no_grad():
        out = module.student(batch["image"])
        anchors = module.student.retina.anchors(batch["image"].shape[-2:], out["cls_maps"])
        terms = {row: module.distillation_terms(out, anchors, batch, [row], (64, 64))[0] for row in (0, 2, 3)}
        both = module.distillation_terms(out, anchors, batch, [0, 3], (64, 64))[0]
    assert terms[0].item() > 0  # labelled positive for class 0: its pseudo-boxes pass the 0.5 threshold
    assert terms[2].item() == 0.0  # labelled negative for class 0: its pseudo-boxes (all class 0) are filtered
    assert (terms[3].item() > 0) == unlabeled_counts
    torch.testing.assert_close(both, (terms[0] + terms[3]) / 2)


# ------------------------------------------------------------------------------------------- frozen BN
def test_student_batchnorm_statistics_stay_at_their_stage1_values_in_training():
    """``freeze_bn=True`` (the default, as the reference): in training every student BatchNorm uses and keeps its
    stage-1 running statistics, the teacher is in eval mode, and each epoch start re-applies both."""
    module = OXnetModule(OXnet(_retina()))
    module.student.train()  # as if something had switched every layer to training
    module.on_train_epoch_start()
    norms = [m for m in module.student.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and not any(m.training for m in norms)
    assert module.student.training and not module.teacher.training
    before = {k: v.clone() for k, v in module.student.state_dict().items() if "running_" in k}
    module.compute_losses(_batch())
    for key, value in before.items():
        assert torch.equal(module.student.state_dict()[key], value), f"{key} moved during training"
