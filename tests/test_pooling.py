"""Pooling zoo and CAM heads: the oracle checks of method-pcam.md section (g), plus DC-MT's LSE oracle."""

from __future__ import annotations

import math

import pytest
import timm
import torch

from networks.cam_heads import CAMHeads, PoolingClassifier, minmax_normalize
from networks.pooling import (
    AvgPool, ConcatPool, LSEPool, NormalizedAttentionPool, PCAMPool, create_pool, pcam_weights,
)

torch.manual_seed(0)
X22 = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])  # (1, 1, 2, 2)


def sigmoid(v: float) -> float:
    return 1 / (1 + math.exp(-v))


# ------------------------------------------------------------------------------------------ (g).4
@pytest.mark.parametrize("name, kwargs, expected", [
    ("avg", {}, 1.5),
    ("max", {}, 3.0),
    ("lse", {"gamma": 0.5}, 1.802089),
    ("exp", {}, 2.492653),
    ("linear", {}, 14 / 6),
])
def test_worked_2x2_example(name, kwargs, expected):
    assert create_pool(name, **kwargs)(X22).item() == pytest.approx(expected, abs=1e-6)


def test_worked_2x2_example_pcam():
    s = torch.tensor([[[[0.0, 0.0], [0.0, 2.0]]]])
    expected = (0.5 * (0 + 1 + 2) + 3 * sigmoid(2)) / (1.5 + sigmoid(2))
    assert expected == pytest.approx(1.739918, abs=1e-6)
    assert create_pool("pcam")(X22, s).item() == pytest.approx(expected, abs=1e-6)


# ------------------------------------------------------------------------------------------ (g).1
@pytest.mark.parametrize("c", [0.37, -5.0, 12.0])
def test_pcam_with_constant_logit_map_equals_avg(c):
    x = torch.rand(2, 8, 5, 6)
    s = torch.full((2, 3, 5, 6), c)
    out = PCAMPool()(x, s)
    assert out.shape == (2, 3, 8)
    torch.testing.assert_close(out, AvgPool()(x).unsqueeze(1).expand(-1, 3, -1))


# ------------------------------------------------------------------------------------------ (g).3
def test_pcam_peaked_logits_select_one_location():
    x = torch.rand(2, 8, 5, 6)
    s = torch.full((2, 1, 5, 6), -30.0)
    s[:, :, 2, 3] = 30.0
    torch.testing.assert_close(PCAMPool()(x, s)[:, 0], x[:, :, 2, 3], atol=1e-5, rtol=0)


def test_pcam_is_stable_for_very_negative_logits_and_passes_gradients():
    x = torch.rand(2, 4, 3, 3)
    s = torch.full((2, 1, 3, 3), -1000.0, requires_grad=True)
    out = PCAMPool()(x, s)
    assert torch.isfinite(out).all()  # naive σ/Σσ is 0/0 here
    torch.testing.assert_close(out[:, 0], x.mean((2, 3)))
    s2 = torch.randn(2, 1, 3, 3, requires_grad=True)
    PCAMPool()(x, s2).sum().backward()
    assert s2.grad.abs().sum() > 0  # ω is not detached
    torch.testing.assert_close(pcam_weights(s2).sum((2, 3)), torch.ones(2, 1))


def test_pcam_requires_logit_map_and_checks_shapes():
    with pytest.raises(ValueError, match="logit map"):
        PCAMPool()(torch.rand(2, 4, 3, 3))
    with pytest.raises(ValueError, match="spatial"):
        PCAMPool()(torch.rand(2, 4, 3, 3), torch.rand(2, 1, 4, 3))


# ------------------------------------------------------------------------------------------ (g).5
@pytest.mark.parametrize("name", ["lse", "exp", "linear", "avg", "max"])
def test_pools_of_a_constant_map_are_that_constant(name):
    x = torch.full((2, 3, 4, 5), 0.8)
    torch.testing.assert_close(create_pool(name)(x), torch.full((2, 3), 0.8))


def test_lse_limits():
    x = torch.rand(2, 6, 5, 5, dtype=torch.float64)
    avg, mx = x.mean((2, 3)), x.amax((2, 3))
    assert (LSEPool(1e-4)(x) - avg).abs().max() < 3e-5
    # second-order term: LSE_γ − AVG ≈ γ·Var/2
    var = x.flatten(2).var(-1, unbiased=False)
    torch.testing.assert_close(LSEPool(1e-3)(x) - avg, 1e-3 * var / 2, rtol=0.05, atol=0)
    assert (LSEPool(1e4)(x) - mx).abs().max() < 1e-3
    torch.testing.assert_close(LSEPool(0.0)(x), avg)  # exact limits
    torch.testing.assert_close(LSEPool(float("inf"))(x), mx)
    # float32 input with small γ is evaluated in float64 internally
    assert (LSEPool(1e-4)(x.float()).double() - avg).abs().max() < 1e-4
    for g in (0.1, 0.5, 2.0, 6.0, 50.0):  # mean ≤ LSE ≤ max, and no overflow at large γx
        v = LSEPool(g)(x * 100)
        assert torch.isfinite(v).all()
        assert (v >= avg * 100 - 1e-9).all() and (v <= mx * 100 + 1e-9).all()
    with pytest.raises(ValueError):
        LSEPool(-1.0)


def test_lse_dcmt_oracle_r6():
    one = torch.zeros(1, 1, 16, 16)
    one[0, 0, 3, 7] = 1
    assert LSEPool(6.0)(one).item() == pytest.approx(0.157446, abs=1e-6)
    half = torch.zeros(1, 1, 16, 16)
    half[0, 0, :8] = 1
    assert LSEPool(6.0)(half).item() == pytest.approx(0.884888, abs=1e-6)


def test_linear_and_exp_lie_between_mean_and_max_for_nonnegative_inputs():
    x = torch.rand(3, 7, 4, 4)
    avg, mx = x.mean((2, 3)), x.amax((2, 3))
    for name in ("linear", "exp"):
        v = create_pool(name)(x)
        assert (v >= avg - 1e-6).all() and (v <= mx + 1e-6).all(), name


def test_factory_and_concat_pools():
    x = torch.rand(2, 8, 5, 6)
    am = create_pool("AVG_MAX")
    assert isinstance(am, ConcatPool) and am.expand == 2
    torch.testing.assert_close(am(x), torch.cat([x.mean((2, 3)), x.amax((2, 3))], 1))
    assert create_pool("avg_max_lse", gamma=2.0)(x).shape == (2, 24)
    with pytest.raises(ValueError, match="unknown pool"):
        create_pool("prob")


def test_normalized_attention_pool_modes():
    x, a = torch.rand(2, 8, 5, 6), torch.rand(2, 3, 5, 6)
    r = a.flatten(2) / a.flatten(2).sum(-1, keepdim=True)
    torch.testing.assert_close(NormalizedAttentionPool("sum")(x, a), torch.einsum("bkl,bcl->bkc", r, x.flatten(2)))
    torch.testing.assert_close(NormalizedAttentionPool("sigmoid")(x, a), PCAMPool()(x, a))
    uniform = torch.ones(2, 1, 5, 6)
    torch.testing.assert_close(NormalizedAttentionPool("softmax")(x, uniform)[:, 0], x.mean((2, 3)))


def test_pools_accept_3d_features():
    x, s = torch.rand(2, 4, 3, 4, 5), torch.randn(2, 2, 3, 4, 5)
    assert PCAMPool()(x, s).shape == (2, 2, 4)
    torch.testing.assert_close(create_pool("avg")(x), x.mean((2, 3, 4)))


# ------------------------------------------------------------------------------------------ (g).2
@pytest.mark.parametrize("pool", ["pcam", "avg", "attention_softmax"])
def test_shared_classifier_identity(pool):
    heads = CAMHeads(16, 4, NormalizedAttentionPool("softmax") if pool == "attention_softmax" else pool).double()
    torch.nn.init.normal_(heads.weight, std=0.5)
    torch.nn.init.normal_(heads.bias, std=0.5)
    x = torch.rand(3, 16, 6, 7, dtype=torch.float64)
    z, s = heads(x)
    assert z.shape == (3, 4) and s.shape == (3, 4, 6, 7)
    if pool == "pcam":
        w = pcam_weights(s)
    elif pool == "avg":
        w = torch.full_like(s, 1 / 42)
    else:
        w = torch.softmax(s.flatten(2), -1).view_as(s)
    torch.testing.assert_close(z, (w * s).sum((2, 3)), atol=1e-6, rtol=0)
    flat = s.flatten(2)
    assert (z >= flat.amin(-1) - 1e-12).all() and (z <= flat.amax(-1) + 1e-12).all()


def test_fc_bn_breaks_the_identity():
    heads = CAMHeads(16, 2, "pcam", fc_bn=True).double().train()
    torch.nn.init.normal_(heads.weight, std=0.5)
    x = torch.rand(4, 16, 5, 5, dtype=torch.float64)
    z, s = heads(x)
    assert not torch.allclose(z, (pcam_weights(s) * s).sum((2, 3)), atol=1e-3)


def test_pcam_heatmap_bounds_the_image_probability():
    net = PoolingClassifier("test_resnet", num_classes=3, pool="pcam", in_chans=1).eval()
    torch.nn.init.normal_(net.heads.weight, std=0.2)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        z, s = net.forward_with_maps(x)
    heat = net.attention_maps(x)
    torch.testing.assert_close(heat, torch.sigmoid(s))
    assert (heat.flatten(2).amax(-1) >= torch.sigmoid(z) - 1e-6).all()


def test_cam_style_heatmaps_are_minmax_normalized():
    net = PoolingClassifier("test_resnet", num_classes=2, pool="avg", in_chans=1).eval()
    heat = net.attention_maps(torch.randn(2, 1, 96, 96))
    flat = heat.flatten(2)
    assert net.heatmap == "minmax"
    torch.testing.assert_close(flat.amin(-1), torch.zeros(2, 2))
    torch.testing.assert_close(flat.amax(-1), torch.ones(2, 2))
    assert minmax_normalize(torch.full((1, 1, 3, 3), 4.0)).eq(0).all()


def test_minmax_normalize_oracle_and_range_rules():
    """The one min-max of CAMs (CAM baseline, PCAM's CAM-style heatmaps, DC-MT refinement): per (image, class),
    float32 out; the range is floored at eps, or (DC-MT rule) only an exactly zero range is replaced."""
    maps = torch.tensor([[1.0, 3.0, 2.0, 3.0], [5.0, 5.0, 5.0, 5.0]]).view(1, 2, 2, 2).bfloat16()
    out = minmax_normalize(maps)
    assert out.dtype == torch.float32
    assert out.flatten().tolist() == [0.0, 1.0, 0.5, 1.0, 0.0, 0.0, 0.0, 0.0]
    tiny = torch.tensor([0.0, 1e-6, 0.0, 5e-7]).view(1, 1, 2, 2)
    torch.testing.assert_close(minmax_normalize(tiny, eps=1e-5).flatten(), torch.tensor([0.0, 0.1, 0.0, 0.05]))
    torch.testing.assert_close(minmax_normalize(tiny, eps=1e-5, zero_range_only=True).flatten(),
                               torch.tensor([0.0, 1.0, 0.0, 0.5]))
    assert minmax_normalize(torch.full((1, 1, 2, 2), 3.0), 1e-5, zero_range_only=True).eq(0).all()


@pytest.mark.parametrize("pool", ["pcam", "avg", "max", "lse", "exp", "linear", "avg_max"])
def test_pooling_classifier_forward_backward(pool):
    net = PoolingClassifier("test_resnet", num_classes=3, pool=pool, in_chans=1)
    z = net(torch.randn(2, 1, 64, 64))
    assert z.shape == (2, 3)
    z.sum().backward()
    missing = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize("pool", ["pcam", "lse"])
def test_bf16_autocast_and_channels_last(pool):
    net = PoolingClassifier("test_resnet", num_classes=3, pool=pool).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        ref = net(x)
        net_cl = net.to(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z, s = net_cl.forward_with_maps(x.contiguous(memory_format=torch.channels_last))
    assert torch.isfinite(z.float()).all() and torch.isfinite(s.float()).all()
    torch.testing.assert_close(z.float(), ref, atol=0.05, rtol=0.05)


def test_pooling_classifier_attention_layer_is_applied_once():
    calls = []

    class Probe(torch.nn.Identity):
        def forward(self, x):
            calls.append(1)
            return x

    net = PoolingClassifier("test_resnet", num_classes=5, pool="pcam", attn_layer=lambda c: Probe())
    net(torch.randn(1, 1, 64, 64))
    assert len(calls) == 1


def test_backbone_from_local_file_only(tmp_path):
    ref = timm.create_model("test_resnet", num_classes=0, global_pool="", in_chans=3)
    path = tmp_path / "w.pth"
    torch.save(ref.state_dict(), path)
    net = PoolingClassifier("test_resnet", num_classes=2, in_chans=3, weights_file=str(path))
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(net.backbone.state_dict()[name], value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PoolingClassifier("test_resnet", weights_file=tmp_path / "missing.pth")
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE"):  # pretrained without a file never hits the hub
        PoolingClassifier("test_resnet", pretrained=True)


def test_densenet121_shapes_small():
    net = PoolingClassifier("densenet121", num_classes=5, pool="pcam", in_chans=3).eval()
    with torch.no_grad():
        f = net.forward_features(torch.randn(1, 3, 64, 64))
        z, s = net.forward_head(f)
    assert f.shape == (1, 1024, 2, 2) and s.shape == (1, 5, 2, 2) and z.shape == (1, 5)


@pytest.mark.slow
def test_densenet121_shapes_at_512():  # dossier (g).7
    net = PoolingClassifier("densenet121", num_classes=5, pool="pcam", in_chans=3).eval()
    with torch.no_grad():
        f = net.forward_features(torch.randn(1, 3, 512, 512))
        pooled = net.heads.pool(f, net.heads.logit_map(f))
        z, s = net.forward_head(f)
    assert f.shape == (1, 1024, 16, 16) and s.shape == (1, 5, 16, 16)
    assert pooled.shape == (1, 5, 1024) and z.shape == (1, 5)
    heat = torch.nn.functional.interpolate(net.maps_to_heatmaps(s), size=(512, 512), mode="bilinear")
    assert heat.shape == (1, 5, 512, 512) and (heat > 0).all() and (heat < 1).all()
    assert (heat.flatten(2).amax(-1) >= torch.sigmoid(z) - 1e-3).all()
