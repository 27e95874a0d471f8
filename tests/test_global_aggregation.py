"""Global aggregation block: oracle checks of method-nonlocal.md (g) 1, 3, 4, 6 and SDPA == explicit."""

from __future__ import annotations

import math

import pytest
import torch

from networks.global_aggregation import GlobalAggregation, explicit_attention


def _block(spatial_dims=3, cin=8, cout=8, heads=2, query="same", attention="sdpa", drop=0.0, seed=0):
    torch.manual_seed(seed)
    return GlobalAggregation(spatial_dims, cin, cout, num_heads=heads, query_transform=query,
                             attn_drop=drop, attention=attention).eval()


def _loop_oracle(ga: GlobalAggregation, x: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(c_k)) V computed one (batch item, head) at a time from the conv outputs."""
    q, k, v = ga.query(x), ga.key(x), ga.value(x)
    n, ck, cv = ga.num_heads, ga.key_channels // ga.num_heads, ga.value_channels // ga.num_heads
    outs = []
    for b in range(x.shape[0]):
        heads = []
        for h in range(n):
            qh = q[b, h * ck:(h + 1) * ck].reshape(ck, -1).T  # (L_Q, c_k)
            kh = k[b, h * ck:(h + 1) * ck].reshape(ck, -1).T  # (L, c_k)
            vh = v[b, h * cv:(h + 1) * cv].reshape(cv, -1).T  # (L, c_v)
            a = torch.softmax(qh @ kh.T / math.sqrt(ck), dim=-1)
            heads.append((a @ vh).T)  # (c_v, L_Q)
        outs.append(torch.cat(heads, 0).reshape(ga.value_channels, *q.shape[2:]))
    return ga.proj(torch.stack(outs))


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("query", ["same", "down", "up"])
def test_sdpa_equals_explicit_and_loop_oracle(spatial_dims, query):
    sdpa = _block(spatial_dims, cin=8, cout=8, heads=2, query=query)
    expl = _block(spatial_dims, cin=8, cout=8, heads=2, query=query, attention="explicit")
    expl.load_state_dict(sdpa.state_dict())
    size = (6,) * spatial_dims
    x = torch.randn(2, 8, *size, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, y2 = sdpa(x), expl(x2)
    torch.testing.assert_close(y, y2, atol=1e-5, rtol=0)
    torch.testing.assert_close(y, _loop_oracle(sdpa, x), atol=1e-5, rtol=0)
    (y ** 2).mean().backward()
    (y2 ** 2).mean().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=0)
    for (name, p), p2 in zip(sdpa.named_parameters(), expl.parameters()):
        torch.testing.assert_close(p.grad, p2.grad, atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
@pytest.mark.parametrize("query", ["same", "down", "up"])
def test_batch_item_0_ignores_item_1(attention, query):
    ga = _block(3, heads=2, query=query, attention=attention)
    x = torch.randn(3, 8, 4, 4, 4)
    x_changed = x.clone()
    x_changed[1] = 10 * torch.randn_like(x[1])
    with torch.no_grad():
        y, y_changed = ga(x), ga(x_changed)
    assert torch.equal(y[0], y_changed[0]) and torch.equal(y[2], y_changed[2])
    assert not torch.allclose(y[1], y_changed[1])


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_up_doubles_down_halves(spatial_dims):
    for size, down in ((4, 2), (6, 3), (5, 3)):
        x = torch.randn(2, 8, *(size,) * spatial_dims)
        assert _block(spatial_dims, cout=6, query="up")(x).shape == (2, 6, *(2 * size,) * spatial_dims)
        assert _block(spatial_dims, cout=6, query="down")(x).shape == (2, 6, *(down,) * spatial_dims)
        assert _block(spatial_dims, cout=6, query="same")(x).shape == (2, 6, *(size,) * spatial_dims)
    # anisotropic sizes double/halve per axis
    x = torch.randn(1, 8, *([4, 6, 8][:spatial_dims]))
    assert _block(spatial_dims, query="up")(x).shape[2:] == tuple([8, 12, 16][:spatial_dims])
    assert _block(spatial_dims, query="down")(x).shape[2:] == tuple([2, 3, 4][:spatial_dims])


@pytest.mark.parametrize("heads", [2, 4])
def test_heads_split_channels_exactly(heads):
    """An N-head block equals N single-head attentions on the channel slices, concatenated before proj."""
    ga = _block(2, cin=8, cout=8, heads=heads, query="up")
    x = torch.randn(2, 8, 4, 4)
    q, k, v = ga.query(x), ga.key(x), ga.value(x)
    c = 8 // heads
    parts = []
    for h in range(heads):
        single = GlobalAggregation(2, 8, 8, key_channels=c, value_channels=c, num_heads=1, query_transform="up").eval()
        qs, ks, vs = (t[:, h * c:(h + 1) * c] for t in (q, k, v))
        flat = lambda t: t.flatten(2).transpose(1, 2)  # noqa: E731
        o = explicit_attention(flat(qs), flat(ks), flat(vs))
        parts.append(o.transpose(1, 2).reshape(2, c, 8, 8))
        assert single.key_channels == c
    expected = ga.proj(torch.cat(parts, dim=1))
    with torch.no_grad():
        torch.testing.assert_close(ga(x), expected, atol=1e-5, rtol=0)
    # a head count that does not divide the channels is refused
    with pytest.raises(ValueError, match="must divide"):
        GlobalAggregation(2, 8, 6, num_heads=4)


def test_constant_input_gives_projection_of_values():
    ga = _block(3, cin=4, cout=3, heads=1, query="same")
    x = torch.randn(1, 4, 1, 1, 1).expand(1, 4, 3, 3, 3).contiguous()
    with torch.no_grad():
        y = ga(x)
        expected = ga.proj(ga.value(x[..., :1, :1, :1]))
    assert torch.allclose(y, expected.expand_as(y), atol=1e-6)


def test_equal_logits_give_uniform_weights_and_scale():
    L, d = 5, 4
    q = torch.zeros(1, 1, L, d)
    q[..., 0] = 1.0
    k = q.clone()
    v = torch.randn(1, 1, L, 3)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, v.mean(dim=2, keepdim=True).expand_as(out))
    torch.testing.assert_close(explicit_attention(q, k, v), out)
    # the logit of q.k = 2 is 2/sqrt(c_k): with c_k = 4 one key scoring 2 vs others 0 gets e^1/(e^1 + L-1)
    k2 = torch.zeros(1, 1, L, d)
    k2[0, 0, 0, 0] = 2.0
    w = explicit_attention(q[..., :1, :], k2, torch.eye(L).view(1, 1, L, L))
    torch.testing.assert_close(w[0, 0, 0, 0], torch.tensor(math.e / (math.e + L - 1)))


def test_attention_dropout_only_in_training():
    ga = _block(2, heads=1, query="same", drop=0.5)
    x = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        y_eval = ga(x)
        ga.train()
        torch.manual_seed(1)
        y_train = ga(x)
        ga.eval()
        assert torch.equal(ga(x), y_eval)
    assert not torch.allclose(y_train, y_eval)
    no_drop = _block(2, heads=1, query="same", drop=0.0).train()
    with torch.no_grad():
        torch.testing.assert_close(no_drop(x), no_drop.eval()(x))
