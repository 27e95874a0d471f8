"""OXnet: dossier (g) oracles 2, 4, 6, the reference bugs that must not come back, and the LightningModule."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from callbacks.checkpoint_io import load_checkpoint_file
from datamodules.batch import STREAM_BOX, STREAM_LABEL, STREAM_UNLABELED
from networks.oxnet import (OXnet, class_feature_sums, daa_loss, distillation_losses, gpa_losses, pseudo_boxes,
                            soft_focal_loss)
from networks.retina import RetinaNet, encode_targets


def tiny_oxnet(num_classes: int = 3, **kwargs) -> OXnet:
    torch.manual_seed(0)
    defaults = dict(backbone="test_resnet", fpn_channels=16, head_depth=1, fpn_levels=(3, 4, 5),
                    anchor_size_factor=2.0)
    return OXnet(RetinaNet(num_classes=num_classes, **{**defaults, **kwargs}))


# --------------------------------------------------------------------------------------------- DAA (g.2)
def test_daa_is_ln2_at_init_and_attention_normalized():
    net = tiny_oxnet()
    out = net(torch.randn(2, 1, 64, 64))
    labels = torch.tensor([[1.0, 0, 1], [0, 0, 0]])
    assert float(daa_loss(out["global_logits"], labels, torch.ones(2, 3, dtype=torch.bool))) == pytest.approx(
        math.log(2), abs=1e-6)
    assert torch.allclose(out["attention"].sum(dim=(-2, -1)), torch.ones(2, 3), atol=1e-6)


def test_fresh_head_reduces_to_gap():
    """Every anchor probability is 0.01 at init, so R is uniform and s_c = mean_hw X_c."""
    net = tiny_oxnet()
    torch.nn.init.normal_(net.global_head.weight)
    out = net(torch.randn(2, 1, 64, 64))
    h, w = out["global_map"].shape[-2:]
    assert torch.allclose(out["attention"], torch.full_like(out["attention"], 1 / (h * w)), atol=1e-7)
    assert torch.allclose(out["global_logits"], out["global_map"].mean(dim=(-2, -1)), atol=1e-5)


def test_daa_ignores_unknown_labels_and_counts_labelled_images():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.5]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    mask = torch.tensor([[True, True], [False, False]])  # second image unlabeled
    want = F.binary_cross_entropy_with_logits(logits[0], labels[0], reduction="sum") / 2
    assert float(daa_loss(logits, labels, mask)) == pytest.approx(float(want))


def test_category_features_are_not_scrambled():
    """F[b, c] = Σ_hw ReLU(C5)_b ⊙ R_{b,c}: the reference's .view(B, C, D) mixed channels and classes."""
    net = tiny_oxnet()
    net.retina.cls_head.cls_logits.weight.data.normal_(std=0.5)  # class-specific attention
    x = torch.randn(2, 1, 64, 64)
    out = net(x)
    c5 = F.relu(out["features"][-1])
    for b in range(2):
        for c in range(3):
            want = (c5[b] * out["attention"][b, c]).sum(dim=(-2, -1))
            assert torch.allclose(out["category_features"][b, c], want, atol=1e-5)
    assert not torch.allclose(out["attention"][0, 0], out["attention"][0, 1])


def test_daa_gradient_reaches_the_classification_head():
    net = tiny_oxnet()
    torch.nn.init.normal_(net.global_head.weight)
    out = net(torch.randn(2, 1, 64, 64))
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    daa_loss(out["global_logits"], labels, torch.ones(2, 3, dtype=torch.bool)).backward()
    assert net.retina.cls_head.cls_logits.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------- GPA (g.6)
@pytest.mark.parametrize("distance,expected", [(0.25, 0.316406), (0.5, 0.0625), (0.9, 1e-4), (1.0, 0.0), (1.5, 0.0)])
def test_inter_hinge_values(distance, expected):
    d = 8
    class_mean = torch.zeros(2, d)
    prototypes = torch.stack([torch.zeros(d), torch.full((d,), distance)])  # mean squared difference = D²
    present = torch.tensor([True, False])
    initialized = torch.tensor([True, True])
    intra, inter = gpa_losses(class_mean, present, prototypes, initialized, margin=1.0)
    assert float(intra) == 0.0  # identical mean and own prototype
    assert float(inter) == pytest.approx(expected, abs=1e-6)


def test_gpa_empty_sets_are_zero():
    intra, inter = gpa_losses(torch.randn(3, 4), torch.zeros(3, dtype=torch.bool), torch.randn(3, 4),
                              torch.ones(3, dtype=torch.bool))
    assert float(intra) == 0.0 and float(inter) == 0.0


def test_prototype_target_is_probability_weighted():
    """(g.1): one image with class c at p = 0.9, another at p = 0.1 -> target (0.9 F1 + 0.1 F2) / 1.0."""
    features = torch.randn(2, 1, 5)
    sums, weights = class_feature_sums(features, torch.tensor([[0.9], [0.1]]))
    assert torch.allclose(sums[0] / weights[0], 0.9 * features[0, 0] + 0.1 * features[1, 0], atol=1e-6)


# --------------------------------------------------------------------------------------------- SFL (g.4)
def test_soft_focal_value():
    value = soft_focal_loss(torch.tensor([math.log(0.2 / 0.8)]), torch.tensor([0.6]))
    assert float(value) == pytest.approx(0.0995845, abs=1e-6)


def test_soft_focal_zero_when_equal_and_hard_reduction():
    q = torch.tensor([0.3, 0.7, 0.5])
    assert torch.allclose(soft_focal_loss(torch.log(q / (1 - q)), q), torch.zeros(3), atol=1e-7)
    p = torch.tensor([0.3])
    z = torch.log(p / (1 - p))
    # q = 1 (clamped to 1 - 1e-4): ~0.95 (1 - p)² (−log p); q = 0: ~0.05 p² (−log(1 − p))
    assert float(soft_focal_loss(z, torch.ones(1))) == pytest.approx(0.95 * 0.49 * -math.log(0.3), rel=2e-3)
    assert float(soft_focal_loss(z, torch.zeros(1))) == pytest.approx(0.05 * 0.09 * -math.log(0.7), rel=2e-3)


def test_soft_focal_weight_is_per_image():
    """The reference broadcast α over the whole teacher batch; here image 0's loss ignores image 1."""
    z = torch.randn(2, 10, 3)
    q = torch.rand(2, 10, 3)
    alone = soft_focal_loss(z[:1], q[:1])
    q_other = q.clone()
    q_other[1] = 1 - q[1]
    assert torch.allclose(soft_focal_loss(z, q_other)[0], alone[0])


# --------------------------------------------------------------------------------------- pseudo-boxes
def test_pseudo_boxes_use_composed_indices():
    """The NMS survivor's box must be the one decoded from *its* anchor (the reference used post-NMS positions
    on the pre-NMS list)."""
    anchors = torch.tensor([[0.0, 0, 10, 10], [30, 30, 50, 50], [1, 1, 11, 11], [100, 100, 120, 120]])
    probs = torch.tensor([[0.6, 0.1], [0.2, 0.1], [0.9, 0.0], [0.1, 0.8]])  # anchor 1 below threshold
    identity = lambda deltas, anc: anc.clone()  # noqa: E731 - zero deltas decode to the anchors
    got = pseudo_boxes(probs, torch.zeros(4, 4), anchors, identity, score_thresh=0.5, nms_thresh=0.5)
    # candidates 0, 2, 3; anchor 2 (0.9) suppresses anchor 0 (IoU 0.68); survivors sorted by score: 2, 3
    assert got["boxes"].tolist() == [anchors[2].tolist(), anchors[3].tolist()]
    assert got["labels"].tolist() == [0, 1] and got["scores"].tolist() == pytest.approx([0.9, 0.8])
    filtered = pseudo_boxes(probs, torch.zeros(4, 4), anchors, identity, allowed_classes=torch.tensor([False, True]))
    assert filtered["boxes"].tolist() == [anchors[3].tolist()]


def test_distillation_terms():
    net = tiny_oxnet(num_classes=2)
    anchors = net.retina.anchors((64, 64), [torch.empty(1, 1, 64 // s, 64 // s) for s in net.retina.strides])
    n = len(anchors)
    logits = torch.randn(n, 2, requires_grad=True)
    deltas = torch.zeros(n, 4, requires_grad=True)
    q = torch.rand(n, 2)
    sfl, reg = distillation_losses(logits, deltas, q, anchors, torch.zeros(0, 4), net.retina.box_coder)
    assert float(sfl) == 0.0 and float(reg) == 0.0 and sfl.requires_grad
    box = anchors[100:101].clone()
    sfl, reg = distillation_losses(logits, deltas, q, anchors, box, net.retina.box_coder)
    from networks.retina import match_anchors
    matched = match_anchors(anchors, box)
    pos = (matched >= 0).nonzero().squeeze(1)
    valid = (matched != -2)[:, None]
    assert float(sfl) == pytest.approx(float((soft_focal_loss(logits, q) * valid).sum() / len(pos)), rel=1e-5)
    targets = encode_targets(net.retina.box_coder, box[matched[pos]], anchors[pos])
    assert float(reg) == pytest.approx(float(F.smooth_l1_loss(deltas[pos], targets, beta=1 / 9, reduction="sum")
                                             / (4 * len(pos))), rel=1e-5)


# ------------------------------------------------------------------------------------------ module
def _batch(k: int = 3, size: int = 64) -> dict:
    torch.manual_seed(1)
    image = torch.randn(3, 1, size, size)
    return {
        "image": image, "image_teacher": image + 0.01 * torch.randn_like(image),
        "labels": torch.tensor([[1.0, 0, 0], [0, 1, 1], [0, 0, 0]])[:, :k],
        "label_mask": torch.tensor([[True] * 3, [True] * 3, [False] * 3])[:, :k],
        "stream": torch.tensor([STREAM_BOX, STREAM_LABEL, STREAM_UNLABELED]),
        "has_boxes": torch.tensor([True, False, False]),
        "boxes": [torch.tensor([[10.0, 12.0, 30.0, 28.0]]), torch.zeros(0, 4), torch.zeros(0, 4)],
        "box_labels": [torch.tensor([0]), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)],
    }


def test_module_step_losses_and_prototype_stats(tmp_path):
    from lightning_modules.oxnet import OXnetModule

    module = OXnetModule(tiny_oxnet(), freeze_bn=False)
    batch = _batch()
    loss = module.training_step(batch, 0)
    loss.backward()
    sums, weights = module.prototype_stats
    assert sums.shape == (3, module.student.feature_dim) and not sums.requires_grad
    assert weights.tolist() == pytest.approx([0.5, 0.5, 0.5])  # y · σ(0) for the labelled positives
    assert all(p.grad is None for p in module.teacher.parameters())
    assert module.student.global_head.weight.grad.abs().sum() > 0
    assert module.student.retina.box_head.bbox_reg.weight.grad is not None


def test_loss_weights_by_term_name_default_to_one():
    from lightning_modules.oxnet import LOSS_NAMES, OXnetModule

    module = OXnetModule(tiny_oxnet(), freeze_bn=False, loss_weights={"daa": 2.0, "consistency": 0.0}).eval()
    terms = module.compute_losses(_batch())
    weights = {name: 1.0 for name in LOSS_NAMES} | {"daa": 2.0, "consistency": 0.0}
    want = sum(weights[name] * float(terms[name].detach()) for name in LOSS_NAMES)
    assert float(terms["daa"].detach()) > 0 and float(terms["total"].detach()) == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match=r"loss_weights: unknown loss term\(s\) \['sfl_weight'\]"):
        OXnetModule(tiny_oxnet(), loss_weights={"sfl_weight": 1.0})


def test_stage1_checkpoint_initializes_student_and_teacher(tmp_path):
    from lightning_modules.oxnet import OXnetModule
    from lightning_modules.retinanet import RetinaNetModule

    stage1 = RetinaNetModule(tiny_oxnet().retina)
    for p in stage1.net.parameters():
        p.data.normal_()
    path = tmp_path / "stage1.ckpt"
    torch.save({"state_dict": stage1.state_dict()}, path)
    module = OXnetModule(tiny_oxnet(), init_checkpoint=str(path))
    for a, b, c in zip(stage1.net.parameters(), module.student.retina.parameters(), module.teacher.retina.parameters()):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert torch.count_nonzero(module.student.global_head.weight) == 0


def test_trainer_fit_updates_teacher_and_prototypes_and_checkpoints_them(tmp_path):
    from callbacks.ema_teacher import EMATeacher
    from callbacks.prototype_momentum import PrototypeMomentum
    from lightning_modules.oxnet import OXnetModule

    class Data(pl.LightningDataModule):
        def train_dataloader(self):
            return torch.utils.data.DataLoader([_batch()] * 3, batch_size=None)  # each item is a whole batch

    module = OXnetModule(tiny_oxnet(), freeze_bn=False,
                         optimizer=lambda params: torch.optim.SGD(params, lr=0.01))
    teacher_before = [p.clone() for p in module.teacher.parameters()]
    trainer = pl.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[EMATeacher(0.99), PrototypeMomentum(0.7)],
                         default_root_dir=tmp_path)
    trainer.fit(module, datamodule=Data())
    assert module.prototype_updates.tolist() == [3.0, 3.0, 3.0]
    assert any(not torch.equal(a, b) for a, b in zip(teacher_before, module.teacher.parameters()))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    state = load_checkpoint_file(tmp_path / "last.ckpt", map_location="cpu")["state_dict"]
    assert torch.equal(state["prototypes"], module.prototypes)
    restored = OXnetModule(tiny_oxnet())
    restored.load_state_dict(state)
    assert torch.equal(restored.prototypes, module.prototypes)
    assert torch.equal(restored.prototype_updates, module.prototype_updates)
