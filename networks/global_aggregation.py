"""Global aggregation (GA) block of the Non-local U-Nets, for 2D and 3D feature maps.

Z. Wang, N. Zou, D. Shen, S. Ji, "Non-local U-Nets for Biomedical Image Segmentation", AAAI 2020
(arXiv:1812.04103). The block is multi-head dot-product attention in which every output position looks at
every input position of the *same* image:

1. query  Q = T(X)  with C_K channels, where the query transform T is a 1x1 conv (``"same"``), a 3x3 conv
   with stride 2 (``"down"``, output ceil(S/2)) or a 3x3 transposed conv with stride 2 (``"up"``, output 2S);
2. keys K and values V = 1x1 convs of X (C_K and C_V channels), at the *input* resolution;
3. N heads split the channels (c_k = C_K/N, c_v = C_V/N); per (batch item, head)
   O_h = softmax(Q_h K_h^T / sqrt(c_k)) V_h;
4. heads are concatenated and a 1x1 conv gives C_O output channels.

There is no residual connection, normalisation or positional encoding inside the block: the enclosing
residual block supplies the shortcut (``networks.nonlocal_unet``).

Attention runs through ``torch.nn.functional.scaled_dot_product_attention`` on *contiguous*
(B, N, L, c) tensors, so each (batch, head) pair is a separate attention problem (the widely copied
PyTorch port flattens batch x space x heads into one token axis and lets images attend to each other; that
bug is not reproduced here) and, on CPU, the flash kernel runs in O(L) memory instead of materialising the
L_Q x L matrix. ``explicit_attention`` is the matmul-softmax reference used by the tests and the benchmark.

Attention dropout (the reference hard-codes p = 0.5 on the attention weights). Choice made here: ``attn_drop``
is applied to the attention *weights*, exactly as in the reference, by passing ``dropout_p`` to SDPA during
training. PyTorch's flash kernel has no dropout, so such a training step runs the math kernel, which
materialises L_Q x L per (batch, head); the dropout mask itself is the expensive part (explicit matmul-softmax
plus ``F.dropout`` costs the same). Measured with ``experiments/benchmarks/ga_block.py`` (1 thread, B = 2,
C = 32): a block step with dropout takes 2.3-2.8x the explicit step without it and 7-8x the flash step, with
about 12x the flash path's memory at L = 4096. In the whole network (bf16) it makes a 3D 32^3 x 5 step 1.6x
slower and a 2D 128^2 x 8 step 3.2x slower, so the 2D lung config sets ``attn_drop=0``. Evaluation never
drops, so inference always takes the flash path. SDPA's flash kernel also needs c_k == c_v; other shapes fall
back to the math kernel (still per (batch, head), still correct).

Example:
    >>> import torch
    >>> ga = GlobalAggregation(3, 16, 8, num_heads=2, query_transform="up")
    >>> ga(torch.randn(2, 16, 4, 4, 4)).shape
    torch.Size([2, 8, 8, 8, 8])
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GlobalAggregation", "explicit_attention", "QUERY_TRANSFORMS"]

QUERY_TRANSFORMS = ("same", "down", "up")


def _conv(spatial_dims: int) -> type[nn.Module]:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    return nn.Conv2d if spatial_dims == 2 else nn.Conv3d


def _conv_transpose(spatial_dims: int) -> type[nn.Module]:
    _conv(spatial_dims)
    return nn.ConvTranspose2d if spatial_dims == 2 else nn.ConvTranspose3d


def explicit_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0, training: bool = False
) -> torch.Tensor:
    """Reference attention ``softmax(q k^T / sqrt(d)) v`` with two matmuls (materialises L_Q x L).

    Args:
        q: (..., L_Q, d); k: (..., L, d); v: (..., L, d_v). Leading dims are independent problems.
        dropout_p: dropout on the attention weights (only when ``training``).
    """
    attn = torch.softmax((q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-1, -2), dim=-1)
    if dropout_p > 0.0 and training:
        attn = F.dropout(attn, p=dropout_p, training=True)
    return attn @ v


class GlobalAggregation(nn.Module):
    """Multi-head global aggregation block (Non-local U-Nets, Sec. "Global Aggregation Block").

    Args:
        spatial_dims: 2 or 3.
        in_channels: C of the input.
        out_channels: C_O of the output (the final 1x1 conv).
        key_channels: C_K (queries and keys); defaults to ``out_channels`` as in the reference network.
        value_channels: C_V; defaults to ``out_channels``.
        num_heads: N; must divide ``key_channels`` and ``value_channels``.
        query_transform: ``"same"`` (output size = input size), ``"down"`` (ceil(S/2)) or ``"up"`` (2S).
        attn_drop: dropout probability on the attention weights during training (reference: 0.5). See the
            module docstring for its cost.
        attention: ``"sdpa"`` (default) or ``"explicit"`` (matmul-softmax; for tests and benchmarks).

    Every conv has a bias, as in the reference implementation. Output shape: (B, C_O, *S_Q).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        key_channels: int | None = None,
        value_channels: int | None = None,
        num_heads: int = 1,
        query_transform: Literal["same", "down", "up"] = "same",
        attn_drop: float = 0.0,
        attention: Literal["sdpa", "explicit"] = "sdpa",
    ) -> None:
        super().__init__()
        key_channels = out_channels if key_channels is None else key_channels
        value_channels = out_channels if value_channels is None else value_channels
        if num_heads < 1 or key_channels % num_heads or value_channels % num_heads:
            raise ValueError(
                f"num_heads={num_heads} must divide key_channels={key_channels} and value_channels={value_channels}"
            )
        if query_transform not in QUERY_TRANSFORMS:
            raise ValueError(f"query_transform must be one of {QUERY_TRANSFORMS}, got {query_transform!r}")
        if attention not in ("sdpa", "explicit"):
            raise ValueError(f"attention must be 'sdpa' or 'explicit', got {attention!r}")
        if not 0.0 <= attn_drop < 1.0:
            raise ValueError(f"attn_drop must be in [0, 1), got {attn_drop}")
        conv = _conv(spatial_dims)
        self.spatial_dims = spatial_dims
        self.num_heads = num_heads
        self.key_channels = key_channels
        self.value_channels = value_channels
        self.query_transform = query_transform
        self.attn_drop = attn_drop
        self.attention = attention
        if query_transform == "same":
            self.query = conv(in_channels, key_channels, kernel_size=1)
        elif query_transform == "down":
            self.query = conv(in_channels, key_channels, kernel_size=3, stride=2, padding=1)
        else:  # output_padding=1 makes the output exactly 2S, like TF's "same" transposed conv
            self.query = _conv_transpose(spatial_dims)(
                in_channels, key_channels, kernel_size=3, stride=2, padding=1, output_padding=1
            )
        self.key = conv(in_channels, key_channels, kernel_size=1)
        self.value = conv(in_channels, value_channels, kernel_size=1)
        self.proj = conv(value_channels, out_channels, kernel_size=1)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) -> contiguous (B, N, L, C/N). Contiguity is what lets SDPA pick the flash kernel."""
        b, c = x.shape[:2]
        return x.reshape(b, self.num_heads, c // self.num_heads, -1).transpose(-1, -2).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(f"expected a {self.spatial_dims + 2}D input (B, C, *S), got shape {tuple(x.shape)}")
        q = self.query(x)
        out_size = q.shape[2:]
        q, k, v = self._heads(q), self._heads(self.key(x)), self._heads(self.value(x))
        p = self.attn_drop if self.training else 0.0
        if self.attention == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        else:
            o = explicit_attention(q, k, v, dropout_p=p, training=self.training)
        b = o.shape[0]
        o = o.transpose(-1, -2).reshape(b, self.value_channels, *out_size)  # concat heads along channels
        return self.proj(o)

    def extra_repr(self) -> str:
        return (f"spatial_dims={self.spatial_dims}, heads={self.num_heads}, query={self.query_transform!r}, "
                f"attn_drop={self.attn_drop}, attention={self.attention!r}")
