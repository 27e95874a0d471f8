"""Probes (issue 14 s7): each DC-MT component, checked against the dossier's formula so that removing or bending it
turns a test red (``../shared/research/method-dcmt.md`` a.3, a.4, a.6, a.7, a.10).

* LSE pooling: the exported slice feature is f = (logsumexp(r Z) − log HW) / r with r = 6 (a plain mean differs).
* FA block with γ ≠ 0 (γ = 0 at init hides every FA bug): context attention pooling, channel gate, position gate.
* Attention supervision (L_mse, L_bound): labeled slices only, on the CAM of each slice's *true* class.
* Classification consistency: MSE of softmaxes over *all* slices, the teacher on its own view.
* Stage 2: the subject logits depend on the skip path, on both GRU directions and on the recurrent read-out; the
  teacher gets the mean-pooling prior as the student does.
Every module runs in eval mode (no dropout), so the recomputations are exact.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lightning_modules.dcmt import MeanTeacherModule
from networks.dcmt_subject import BiGRUAggregator
from networks.dcmt import DCMTNet, FABlock, FAModule, bound_loss, normalized_mse, select_class, softmax_mse

SIZE = 32


def _net() -> DCMTNet:
    torch.manual_seed(0)
    return DCMTNet("test_resnet", num_classes=3, fa_channels=8, head_channels=8)


def _batch(labels_of_labeled: list[int]) -> dict:
    """2 labeled + 3 unlabeled slices, a rectangular attention mask, an independent teacher view."""
    g = torch.Generator().manual_seed(3)
    b, n_lab = 5, len(labels_of_labeled)
    labels = torch.zeros(b, 3)
    labels[torch.arange(n_lab), torch.tensor(labels_of_labeled)] = 1.0
    mask = torch.zeros(b, 1, SIZE, SIZE)
    mask[..., 4:20, 6:26] = 1.0
    return {"image": torch.randn(b, 1, SIZE, SIZE, generator=g),
            "image_teacher": torch.randn(b, 1, SIZE, SIZE, generator=g),
            "labels": labels, "label_mask": (torch.arange(b) < n_lab)[:, None].expand(b, 3).clone(),
            "stream": torch.tensor([1] * n_lab + [2] * (b - n_lab)), "attention_mask": mask,
            "has_attention_mask": torch.ones(b, dtype=torch.bool)}


# ----------------------------------------------------------------------------------------------- a.4 LSE
def test_pooled_feature_is_lse_with_r6_of_the_feature_map():
    net = _net().eval()
    with torch.no_grad():
        out = net.forward_all(torch.randn(3, 1, 64, 64, generator=torch.Generator().manual_seed(1)))
    z = out.feature_map.flatten(2)
    want = (torch.logsumexp(6.0 * z, dim=-1) - math.log(z.shape[-1])) / 6.0
    torch.testing.assert_close(out.features, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logits, net.classifier(want), rtol=1e-5, atol=1e-6)
    assert (want - z.mean(-1)).abs().max() > 1e-3  # the probe can tell LSE from a plain mean


# ------------------------------------------------------------------------------------------------ a.3 FA
def _fa_by_hand(block: FABlock, u: torch.Tensor) -> torch.Tensor:
    a = torch.softmax(block.context(u).flatten(2), dim=-1)  # (B, 1, HW) context attention
    g = (u.flatten(2) * a).sum(-1)  # attention pooling (B, C)
    w1, w2 = block.gate[0].weight, block.gate[2].weight
    c = torch.sigmoid(F.linear(F.relu(F.linear(g, w1)), w2))  # channel gate
    v = block.value(u) * c[:, :, None, None]
    m = block.position(v)
    conv, bn = block.position_gate[0], block.position_gate[1]
    z = torch.sigmoid(bn(conv(m)))  # position gate (BN in eval: its running statistics)
    return u + block.gamma * (m * z)


def test_fa_block_and_module_follow_the_dossier_when_gamma_is_not_zero():
    torch.manual_seed(0)
    fa = FAModule(12, 16, reduction=8).eval()
    with torch.no_grad():
        fa.block.gamma.fill_(0.8)
        bn = fa.block.position_gate[1]
        bn.running_mean.fill_(0.3)
        bn.running_var.fill_(2.0)
        x = torch.randn(2, 12, 6, 5)
        u = fa.conva(x)
        got_block = fa.block(u)
        torch.testing.assert_close(got_block, _fa_by_hand(fa.block, u), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fa(x), fa.convb(got_block), rtol=1e-5, atol=1e-6)
        # the probe is sensitive: the module output moves with the FA block (γ m') and with its channel gate
        assert (fa(x) - fa.convb(u)).abs().max() > 1e-3
        g = (u.flatten(2) * torch.softmax(fa.block.context(u).flatten(2), dim=-1)).sum(-1)
        assert (fa.block.gate(g) - 1).abs().min() > 0.05  # the channel gate really scales v


# ------------------------------------------------------------------------------------ a.6 attention losses
def _module(**kw) -> MeanTeacherModule:
    module = MeanTeacherModule(_net(), **kw)
    module.eval()  # no dropout: the forward passes below are the module's
    return module


def test_attention_supervision_uses_labeled_slices_and_their_true_class():
    module = _module(consistency_start=10_000)  # no consistency term: the supervised terms alone
    probe = _batch([0, 0])
    with torch.no_grad():
        logits = module.student.forward_all(probe["image"]).logits
    # give each labeled slice the class the student ranks lowest, so its true class is not its predicted class
    true = logits[:2].argmin(1)
    batch = _batch(true.tolist())
    terms = module.compute_losses(batch)
    with torch.no_grad():
        out = module.student.forward_all(batch["image"])
        cams = module.student.cams(out.feature_map[:2])
        attention = module.student.refine(select_class(cams, true), (SIZE, SIZE))
        mask = batch["attention_mask"][:2]
        want_mse, want_bound = normalized_mse(mask, attention), bound_loss(mask, attention, 5)
        wrong = module.student.refine(select_class(cams, out.logits[:2].argmax(1)), (SIZE, SIZE))
    torch.testing.assert_close(terms["mse"], want_mse, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(terms["bound"], want_bound, rtol=1e-5, atol=1e-7)
    assert abs(float(normalized_mse(mask, wrong)) - float(want_mse)) > 1e-4  # the class choice matters here
    # the masks of unlabeled slices train nothing (DC-MT supervises attention on labeled slices only)
    poisoned = {k: v.clone() for k, v in batch.items()}
    poisoned["attention_mask"][2:] = 1.0 - poisoned["attention_mask"][2:]
    other = module.compute_losses(poisoned)
    for key in ("mse", "bound", "total"):
        torch.testing.assert_close(other[key], terms[key])


# ---------------------------------------------------------------------------------- a.7 dual consistency
def test_classification_consistency_covers_every_slice_with_the_teacher_on_its_own_view():
    module = _module(consistency_start=0)
    with torch.no_grad():  # a teacher different from the student, as after some EMA steps
        for p in module.teacher.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    batch = _batch([1, 2])
    terms = module.compute_losses(batch)
    with torch.no_grad():
        s = module.student.forward_all(batch["image"]).logits
        t = module.teacher.forward_all(batch["image_teacher"]).logits
        t_same_view = module.teacher.forward_all(batch["image"]).logits
    torch.testing.assert_close(terms["cons_cls"], softmax_mse(s, t), rtol=1e-5, atol=1e-8)
    # the probe is sensitive to the slice set (not the unlabeled or labeled ones alone) and to the teacher's view
    for wrong in (softmax_mse(s[2:], t[2:]), softmax_mse(s[:2], t[:2]), softmax_mse(s, t_same_view)):
        assert abs(wrong.item() - terms["cons_cls"].item()) > 1e-3 * terms["cons_cls"].item()


# ------------------------------------------------------------------------------------- a.10 stage 2
def _aggregator() -> BiGRUAggregator:
    torch.manual_seed(0)
    return BiGRUAggregator(in_features=16, seq_len=6, embed_channels=(16, 8), hidden_size=8, dropout=0.1).eval()


def test_subject_logits_depend_on_skip_both_gru_directions_and_recurrent_readout():
    net = _aggregator()
    x = torch.randn(4, 6, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = net(x)
        for name in ("skip.weight", "gru.weight_ih_l0", "gru.weight_ih_l0_reverse", "gru.weight_hh_l1",
                     "gru.weight_hh_l1_reverse", "recurrent_head.weight"):
            param = dict(net.named_parameters())[name]
            saved = param.clone()
            param.add_(0.5 * torch.randn(param.shape, generator=torch.Generator().manual_seed(7)))
            moved = (net(x) - base).abs().max()
            param.copy_(saved)
            assert moved > 1e-4, f"the subject logits ignore {name}"
    assert net.gru.bidirectional and net.gru.num_layers == 2


def test_teacher_predicts_from_the_meanpool_prior_like_the_student():
    from lightning_modules.dcmt_subject import SubjectAggregationModule

    module = SubjectAggregationModule(_aggregator(), meanpool_prior=True).eval()
    features = torch.randn(3, 6, 16, generator=torch.Generator().manual_seed(4))
    prior = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.4, 0.3]])
    # zero-initialised classifiers: both networks start exactly at the mean-pooling decision
    torch.testing.assert_close(module.forward_teacher(features, prior).softmax(-1), prior, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(module.forward_student(features, prior).softmax(-1), prior, atol=1e-5, rtol=1e-5)
