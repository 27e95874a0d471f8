"""The Non-local U-Net's wiring, checked against the dossier's topology (method-nonlocal.md a.2-a.3) by
hand-built oracles and by perturbing each path: a bypassed GA block, a dropped residual or decoder skip, a
projection shortcut taken from the wrong tensor, or dropout moved before BN in the output block all keep the
parameter count (issue 14, section 7), so only behaviour can tell them apart."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from networks.nonlocal_unet import NonLocalUNet, ResidualBlock


def _randomize_norms(net: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial eval-mode BN (random running stats and affine), so BN+ReLU6 is far from the identity and a
    tensor taken before the pre-activation differs from one taken after it."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.3)
    return net


@pytest.fixture(params=[2, 3], ids=["2d", "3d"])
def net(request):
    torch.manual_seed(0)
    dims = request.param
    return _randomize_norms(NonLocalUNet(dims, in_channels=2, num_classes=3, filters=4, attn_drop=0.5, drop=0.5)).eval()


def _x(net, batch=2, size=8):
    return torch.randn(batch, net.in_channels, *(size,) * net.spatial_dims, generator=torch.Generator().manual_seed(1))


def _residual_oracle(block: ResidualBlock, x: torch.Tensor) -> torch.Tensor:
    """Pre-activation residual block: h = act(BN(x)); conv2(act(BN(conv1(h)))) + (x, or proj(h))."""
    h = block.pre[1](block.pre[0](x))
    main = block.conv2(block.mid[1](block.mid[0](block.conv1(h))))
    return main + (x if block.shortcut is None else block.shortcut(h))


@torch.no_grad()
def test_every_block_and_the_whole_forward_match_the_topology(net):
    x = _x(net)
    a = net.stem(x)
    skip1 = net.input_block(a)
    torch.testing.assert_close(skip1, _residual_oracle(net.input_block, a))
    skip2 = net.down1(skip1)
    torch.testing.assert_close(skip2, _residual_oracle(net.down1, skip1))
    d2 = net.down2(skip2)
    torch.testing.assert_close(d2, _residual_oracle(net.down2, skip2))
    # (c) bottom: x + GA_same(BNAct(x))
    bottom = net.bottom(d2)
    torch.testing.assert_close(bottom, d2 + net.bottom.ga(net.bottom.pre(d2)))
    # (d) up: GA_up(BNAct(x)) + deconv(BNAct(x)), both from the same pre-activated tensor
    up = net.up1(bottom)
    h = net.up1.pre(bottom)
    torch.testing.assert_close(up, net.up1.deconv(h) + net.up1.ga(h))
    dec1_in = up + skip2  # decoder skips are sums
    dec1 = net.dec1(dec1_in)
    torch.testing.assert_close(dec1, _residual_oracle(net.dec1, dec1_in))
    dec2_in = net.up2(dec1) + skip1
    features = net.dec2(dec2_in)
    torch.testing.assert_close(features, _residual_oracle(net.dec2, dec2_in))
    torch.testing.assert_close(net.forward_features(x), features)
    torch.testing.assert_close(net(x), net.head(net.head_act(features)))  # eval: dropout is the identity
    # the shortcuts are where the dossier puts them: projections in (a) and (b), identities in the decoder
    assert [b.shortcut is not None for b in (net.input_block, net.down1, net.down2, net.dec1, net.dec2)] == \
        [True, True, True, False, False]


def _changes_output(net: nn.Module, module: nn.Module, x: torch.Tensor) -> bool:
    """Does adding noise to ``module``'s output change the network's output? (False when it never runs.)"""
    with torch.no_grad():
        ref = net(x)

    def hook(_m, _inp, out):
        return out + torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out)

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return not torch.allclose(net(x), ref, atol=1e-6, rtol=0)
    finally:
        handle.remove()


@pytest.mark.parametrize("path", ["bottom.ga", "up1.ga", "up1.deconv", "input_block", "down1", "input_block.shortcut",
                                  "down1.shortcut", "down2.shortcut", "up2", "dec1", "dec2"])
def test_the_output_depends_on_every_path(net, path):
    assert _changes_output(net, net.get_submodule(path), _x(net)), f"{path} does not reach the output"


@torch.no_grad()
def test_each_decoder_skip_carries_its_encoder_level(net):
    """Perturb an encoder level only where it feeds the decoder skip (its deeper path keeps the clean tensor):
    the output must move, so the skip is summed in."""
    x = _x(net)
    ref = net(x)
    for name, level in (("skip1", net.input_block), ("skip2", net.down1)):
        deeper = net.down1 if level is net.input_block else net.down2
        clean = {}
        h1 = level.register_forward_hook(lambda m, i, o: clean.__setitem__("o", o) or o + 1.0)
        h2 = deeper.register_forward_pre_hook(lambda m, i: (clean["o"],))
        try:
            assert not torch.allclose(net(x), ref, atol=1e-6, rtol=0), f"{name} is not summed into the decoder"
        finally:
            h1.remove(), h2.remove()


def test_output_block_is_bn_act_then_dropout_then_conv(net):
    """Training mode, the same dropout draw replayed: conv(dropout(act(BN(f)))). Dropout before BN would
    zero BN's input instead, which changes the batch statistics and the logits."""
    net.train()
    f = torch.randn(4, 4, *(8,) * net.spatial_dims, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(7)
    actual = net.forward_head(f)
    torch.manual_seed(7)
    expected = net.head(net.head_drop(net.head_act(f)))
    torch.testing.assert_close(actual, expected)
    torch.manual_seed(7)
    assert not torch.allclose(net.head(net.head_act(net.head_drop(f))), expected)  # the oracle can tell the orders
