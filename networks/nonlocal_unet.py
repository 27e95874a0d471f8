"""Non-local U-Net: a 2-level residual U-Net with global aggregation at the bottom and in the first up-sampling.

Z. Wang, N. Zou, D. Shen, S. Ji, "Non-local U-Nets for Biomedical Image Segmentation", AAAI 2020
(arXiv:1812.04103); topology as in the authors' TensorFlow code (``divelab/Non-local-U-Nets``).

Layout (F = ``filters``; S = input size; every block is pre-activation: BN + act come before the convs)::

    x (C_in, S) -> conv3 (F) -> (a) input block (F, S)                       = skip1
      -> (b) down block (2F, S/2)                                             = skip2
      -> (b) down block (4F, S/4) -> (c) bottom block: x + GA_same(BNAct(x)), 2 heads
      -> (d) up block: GA_up(BNAct(x)), 1 head, + deconv3(BNAct(x)) -> + skip2 -> residual block (2F, S/2)
      -> deconv3 (F, S) -> + skip1 -> residual block (F, S)
      -> BN + act -> dropout -> conv1 (with bias) -> logits (num_classes, S)

Skips are element-wise sums. Residual blocks: ``h = act(BN(x)); y = conv3(act(BN(conv3(h)))) + shortcut``,
with a 1x1 projection of ``h`` as shortcut in (a) and (b) (stride 2 in (b)) and the identity in the decoder's
regular blocks. Convs have no bias except inside GA and in the output conv.

With ``spatial_dims=3, in_channels=2, filters=32, num_classes=4`` this has exactly **1,760,452** trainable
parameters, the reference count (2D analogue: 653,380). ``global_aggregation=False`` is the plain baseline:
the bottom block becomes the identity and the first up-sampling keeps only its transposed-conv path
(the authors' README recipe for their 3D U-Net baseline), i.e. 1,452,228 parameters (-66,304 bottom BN+GA,
-241,920 GA_up) in the reference configuration.

Choices where the reference is not followed (documented, not counted in the parameter total):
  * initialisation: PyTorch defaults (Kaiming-uniform), not TF's truncated normal with std 1.0;
  * ``bn_momentum=0.1`` (PyTorch default). The reference's TF momentum 0.997 is PyTorch 0.003, which needs
    thousands of steps before eval-mode statistics are usable; pass ``bn_momentum=0.003`` to match it;
  * stride-2 convs pad symmetrically (TF "same" pads more at the end): same sizes, half-voxel offset;
  * ``attn_drop`` (reference 0.5 on the attention weights) is applied to the weights through SDPA's
    ``dropout_p``; see ``networks.global_aggregation`` for its cost. Default 0.5 as in the reference.

Example:
    >>> import torch
    >>> net = NonLocalUNet(3, in_channels=2, num_classes=4)
    >>> sum(p.numel() for p in net.parameters())
    1760452
    >>> net.eval()(torch.randn(1, 2, 16, 16, 16)).shape
    torch.Size([1, 4, 16, 16, 16])
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import nn

from networks.global_aggregation import GlobalAggregation, _conv, _conv_transpose

__all__ = ["NonLocalUNet", "ResidualBlock", "BNAct"]


class BNAct(nn.Sequential):
    """Pre-activation: BatchNorm then the activation (ReLU6 by default, as in the reference code)."""

    def __init__(self, spatial_dims: int, channels: int, norm_layer: Callable, act_layer: Callable) -> None:
        super().__init__(norm_layer(spatial_dims, channels), act_layer())


def batch_norm(spatial_dims: int, channels: int, momentum: float = 0.1, eps: float = 1e-5) -> nn.Module:
    return (nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d)(channels, eps=eps, momentum=momentum)


class ResidualBlock(nn.Module):
    """Pre-activation residual block: blocks (a) and (b) of the paper's Fig. 2, and the decoder's plain block.

    ``shortcut``: ``"identity"`` (needs in == out and stride 1) or ``"projection"`` (1x1 conv of the
    pre-activated input, stride ``stride``).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        shortcut: str = "identity",
        norm_layer: Callable = batch_norm,
        act_layer: Callable = nn.ReLU6,
    ) -> None:
        super().__init__()
        conv = _conv(spatial_dims)
        if shortcut == "identity" and (in_channels != out_channels or stride != 1):
            raise ValueError("an identity shortcut needs in_channels == out_channels and stride 1")
        if shortcut not in ("identity", "projection"):
            raise ValueError(f"shortcut must be 'identity' or 'projection', got {shortcut!r}")
        self.pre = BNAct(spatial_dims, in_channels, norm_layer, act_layer)
        self.conv1 = conv(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.mid = BNAct(spatial_dims, out_channels, norm_layer, act_layer)
        self.conv2 = conv(out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut = (
            conv(in_channels, out_channels, 1, stride=stride, bias=False) if shortcut == "projection" else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pre(x)
        skip = x if self.shortcut is None else self.shortcut(h)
        return self.conv2(self.mid(self.conv1(h))) + skip


class BottomBlock(nn.Module):
    """Block (c): ``x + GA_same(BNAct(x))`` with ``num_heads`` heads."""

    def __init__(self, spatial_dims, channels, num_heads, attn_drop, norm_layer, act_layer) -> None:
        super().__init__()
        self.pre = BNAct(spatial_dims, channels, norm_layer, act_layer)
        self.ga = GlobalAggregation(spatial_dims, channels, channels, num_heads=num_heads, attn_drop=attn_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ga(self.pre(x))


class UpBlock(nn.Module):
    """Block (d): ``GA_up(BNAct(x)) + deconv3(BNAct(x))``; without GA only the transposed-conv path remains."""

    def __init__(self, spatial_dims, in_channels, out_channels, num_heads, attn_drop, norm_layer, act_layer,
                 global_aggregation: bool = True) -> None:
        super().__init__()
        self.pre = BNAct(spatial_dims, in_channels, norm_layer, act_layer)
        self.deconv = _conv_transpose(spatial_dims)(
            in_channels, out_channels, 3, stride=2, padding=1, output_padding=1, bias=False
        )
        self.ga = (
            GlobalAggregation(spatial_dims, in_channels, out_channels, num_heads=num_heads,
                              query_transform="up", attn_drop=attn_drop)
            if global_aggregation else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pre(x)
        y = self.deconv(h)
        return y if self.ga is None else y + self.ga(h)


class NonLocalUNet(nn.Module):
    """Non-local U-Net (2 down-samplings, widths F/2F/4F, GA bottom and GA up-sampling).

    Args:
        spatial_dims: 2 or 3.
        in_channels: input modalities (iSeg: T1 and T2 -> 2).
        num_classes: output classes including background.
        filters: F, the width of the first level (reference 32).
        bottom_heads: heads of the bottom GA block (reference 2).
        up_heads: heads of the up-sampling GA block (reference 1).
        global_aggregation: False gives the plain baseline (no GA anywhere; see the module docstring).
        attn_drop: dropout on the attention weights of both GA blocks (reference 0.5).
        drop: dropout before the output conv (reference 0.5).
        act_layer: activation constructor (reference ``nn.ReLU6``).
        norm_layer: ``norm_layer(spatial_dims, channels)``; default BatchNorm with ``bn_momentum``.
        bn_momentum: PyTorch BN momentum (reference TF 0.997 == PyTorch 0.003).

    Input sizes must be divisible by 4 (two stride-2 levels). ``forward_features`` returns the last decoder
    features (B, F, *S) and ``forward_head`` maps them to logits (B, num_classes, *S).
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 2,
        num_classes: int = 4,
        filters: int = 32,
        bottom_heads: int = 2,
        up_heads: int = 1,
        global_aggregation: bool = True,
        attn_drop: float = 0.5,
        drop: float = 0.5,
        act_layer: Callable[[], nn.Module] = nn.ReLU6,
        norm_layer: Callable[[int, int], nn.Module] | None = None,
        bn_momentum: float = 0.1,
    ) -> None:
        super().__init__()
        conv, f = _conv(spatial_dims), filters
        norm = norm_layer if norm_layer is not None else partial(batch_norm, momentum=bn_momentum)
        kw = dict(norm_layer=norm, act_layer=act_layer)
        self.spatial_dims, self.in_channels, self.num_classes = spatial_dims, in_channels, num_classes
        self.global_aggregation = global_aggregation

        self.stem = conv(in_channels, f, 3, padding=1, bias=False)
        self.input_block = ResidualBlock(spatial_dims, f, f, shortcut="projection", **kw)
        self.down1 = ResidualBlock(spatial_dims, f, 2 * f, stride=2, shortcut="projection", **kw)
        self.down2 = ResidualBlock(spatial_dims, 2 * f, 4 * f, stride=2, shortcut="projection", **kw)
        self.bottom = (BottomBlock(spatial_dims, 4 * f, bottom_heads, attn_drop, **kw)
                       if global_aggregation else nn.Identity())
        self.up1 = UpBlock(spatial_dims, 4 * f, 2 * f, up_heads, attn_drop, global_aggregation=global_aggregation, **kw)
        self.dec1 = ResidualBlock(spatial_dims, 2 * f, 2 * f, **kw)
        self.up2 = _conv_transpose(spatial_dims)(2 * f, f, 3, stride=2, padding=1, output_padding=1, bias=False)
        self.dec2 = ResidualBlock(spatial_dims, f, f, **kw)
        self.head_act = BNAct(spatial_dims, f, norm, act_layer)
        self.head_drop = nn.Dropout(drop)
        self.head = conv(f, num_classes, 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(f"expected (B, C, *S) with {self.spatial_dims} spatial dims, got {tuple(x.shape)}")
        if any(s % 4 for s in x.shape[2:]):
            raise ValueError(f"spatial sizes must be divisible by 4 (two down-samplings), got {tuple(x.shape[2:])}")
        skip1 = self.input_block(self.stem(x))
        skip2 = self.down1(skip1)
        y = self.bottom(self.down2(skip2))
        y = self.dec1(self.up1(y) + skip2)
        return self.dec2(self.up2(y) + skip1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(self.head_act(features)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
