"""MAG-SD network: a timm CNN, multiscale attention maps and bilinear attention pooling (BAP).

J. Li, Y. Wang, S. Wang, J. Wang, J. Liu, Q. Jin, L. Sun, "Multiscale Attention Guided Network for COVID-19
Diagnosis Using Chest X-Ray Images", IEEE JBHI 25(5), 2021 (arXiv:2012.02278). BAP follows WS-DAN
(T. Hu et al., arXiv:1901.09891).

Pipeline, for a ResNet-50 at 224 px::

    f1 = layer2 (512×28×28), f2 = layer3 (1024×14×14), f3 = layer4 (2048×7×7)
    A  = Σ_j avgpool_to_7×7( ReLU(BN(Conv1×1_{C_j→M}(f_j))) )        (M = 32 maps, A ≥ 0)
    PF = flatten_m( mean_hw(A_m ⊙ f3) )                                  (B, M·C)
    PF = normalize_L2( sign(PF)·sqrt(|PF| + 1e-12) )
    P  = W · (100·PF)                                                    (no bias)

Soft-distance regularisation (paper Eq. 6-7, reference ``train.py``): the three attention-guided shots p_i are
pulled towards the raw shot's detached softmax q, ``L_sd = Σ_i mean_{b,k} |q − softmax(p_i)|``, where q is replaced
by a smoothed one-hot target when the raw shot is wrong or less than 0.7 sure (:func:`soft_distance_target`,
:func:`soft_distance`; dossier ``method-magsd.md`` a, g.3-g.4).

``num_scales`` picks how many of f1, f2, f3 feed the attention: 3 as in the paper (default), 2 as in the
reference code's default (f2 + f3), 1 as in WS-DAN (f3 only).

The backbone is created with ``in_chans`` (1 for X-rays) by :func:`networks.backbones.create_backbone`.
Pretrained weights come from a local file (``weights_file``, through timm's ``pretrained_cfg_overlay``; the
hub is not used offline). timm then adapts the RGB ``conv1`` to one channel by summing its kernels over the
input channels, instead of discarding it as the reference code does.

Example:
    >>> net = MAGSDNet(num_classes=4, backbone="test_resnet", num_maps=8)
    >>> net(torch.randn(2, 1, 64, 64)).shape
    torch.Size([2, 4])
    >>> net.attention_maps(torch.randn(2, 1, 64, 64)).shape
    torch.Size([2, 1, 2, 2])
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from networks.backbones import create_backbone

__all__ = ["MultiScaleAttention", "bilinear_attention_pool", "BilinearAttentionPool", "MAGSDNet",
           "soft_distance_target", "soft_distance"]


class MultiScaleAttention(nn.Module):
    """Per scale a 1×1 conv (no bias) + norm + activation to ``num_maps`` maps, each average-pooled to the size
    of the last (coarsest) feature map, then summed.

    Args:
        in_channels: channels of each feature map, finest first.
        num_maps: M, the number of attention maps.
        norm_layer, act_layer: swappable blocks (BN with ``eps=norm_eps`` and ReLU by default).
        norm_eps: BN epsilon; 1e-3 as in the reference code.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_maps: int = 32,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
        act_layer: type[nn.Module] = nn.ReLU,
        norm_eps: float = 1e-3,
    ) -> None:
        super().__init__()
        self.num_maps = num_maps
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, num_maps, 1, bias=False), norm_layer(num_maps, eps=norm_eps), act_layer())
            for c in in_channels
        )

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        if len(features) != len(self.heads):
            raise ValueError(f"expected {len(self.heads)} feature maps, got {len(features)}")
        size = tuple(features[-1].shape[-2:])
        out = None
        for feature, head in zip(features, self.heads):
            a = head(feature)
            if tuple(a.shape[-2:]) != size:
                # Equals AvgPool(k×k) when the sizes divide (2× and 4× for layer3/layer2), and stays defined
                # for odd input sizes.
                a = F.adaptive_avg_pool2d(a, size)
            out = a if out is None else out + a
        return out


def bilinear_attention_pool(features: Tensor, attention: Tensor, eps: float = 1e-12) -> Tensor:
    """BAP: ``(B, C, H, W), (B, M, h, w) -> (B, M·C)`` with unit L2 norm per row.

    ``PF[b, m, c] = mean_hw(A[b, m] · F[b, c])``, then signed square root and L2 normalisation over all M·C
    entries. ``attention`` is resized bilinearly to ``(H, W)`` if needed. Runs in float32 even under autocast:
    the square root of tiny values and the normalisation are not safe in bf16.
    """
    if attention.shape[-2:] != features.shape[-2:]:
        attention = F.interpolate(attention, size=features.shape[-2:], mode="bilinear", align_corners=False)
    with torch.autocast(device_type=features.device.type, enabled=False):
        features, attention = features.float(), attention.float()
        pooled = torch.einsum("bmhw,bchw->bmc", attention, features) / (features.shape[-2] * features.shape[-1])
        pooled = pooled.flatten(1)
        pooled = torch.sign(pooled) * torch.sqrt(pooled.abs() + eps)
        return F.normalize(pooled, dim=1, eps=eps)


class BilinearAttentionPool(nn.Module):
    """Module form of :func:`bilinear_attention_pool`."""

    def __init__(self, eps: float = 1e-12) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, features: Tensor, attention: Tensor) -> Tensor:
        return bilinear_attention_pool(features, attention, self.eps)


class MAGSDNet(nn.Module):
    """MAG-SD classifier (see the module docstring).

    Args:
        num_classes: K.
        backbone: timm model name (``"resnet50"``; tests use ``"test_resnet"``). Must support ``features_only``.
        in_chans: input channels (1 for X-rays).
        num_scales: 1, 2 or 3 feature levels feeding the attention (default 3, the paper's).
        num_maps: M attention maps (32).
        pretrained, weights_file: ImageNet weights for the backbone, from a local ``.pth``/``.safetensors`` file
            (see :func:`networks.backbones.create_backbone`); neither = random init.
        out_indices: timm feature indices of (f1, f2, f3); ``(2, 3, 4)`` = layer2..layer4 for ResNets.
        logit_scale: the fixed ×100 before the classifier.
        norm_layer, act_layer: blocks of the attention heads.
    """

    def __init__(
        self,
        num_classes: int = 4,
        backbone: str = "resnet50",
        in_chans: int = 1,
        num_scales: int = 3,
        num_maps: int = 32,
        pretrained: bool = False,
        weights_file: str | None = None,
        out_indices: Sequence[int] = (2, 3, 4),
        logit_scale: float = 100.0,
        norm_layer: type[nn.Module] = nn.BatchNorm2d,
        act_layer: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        if num_scales not in (1, 2, 3) or num_scales > len(out_indices):
            raise ValueError(f"num_scales must be 1, 2 or 3 (at most len(out_indices)), got {num_scales}")
        self.backbone = create_backbone(
            backbone, pretrained=pretrained, weights_file=weights_file, in_chans=in_chans,
            features_only=True, out_indices=tuple(out_indices)[-num_scales:],
        )
        channels = self.backbone.feature_info.channels()
        self.num_classes, self.num_scales, self.num_maps = num_classes, num_scales, num_maps
        self.num_features = channels[-1]
        self.logit_scale = logit_scale
        self.attention = MultiScaleAttention(channels, num_maps, norm_layer, act_layer)
        self.pool = BilinearAttentionPool()
        self.classifier = nn.Linear(num_maps * self.num_features, num_classes, bias=False)

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x -> (f3 (B, C, h, w), A (B, M, h, w))``."""
        features = self.backbone(x)
        return features[-1], self.attention(features)

    def forward_head(self, features: Tensor, attention: Tensor, pre_logits: bool = False) -> Tensor:
        pooled = self.pool(features, attention)
        return pooled if pre_logits else self.classifier(self.logit_scale * pooled)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(*self.forward_features(x))

    def part_logits(self, features: Tensor, attention: Tensor) -> Tensor:
        """Contribution of each attention map to each logit, ``(B, K, M)``; sums over M to the logits."""
        pooled = self.pool(features, attention).view(features.shape[0], self.num_maps, self.num_features)
        weight = self.classifier.weight.float().view(self.num_classes, self.num_maps, self.num_features)
        return self.logit_scale * torch.einsum("bmc,kmc->bkm", pooled, weight)

    @torch.no_grad()
    def attention_maps(self, x: Tensor, per_class: bool = False) -> Tensor:
        """Attention in [0, 1] at the resolution of f3.

        ``per_class=False``: the mean of the M maps, ``(B, 1, h, w)``, divided by its per-image max (the map
        the paper uses for localisation). ``per_class=True``: ``(B, K, h, w)``, for class k the maps weighted
        by their positive contribution to logit k (:meth:`part_logits`), each divided by its per-image max.
        An all-zero map stays zero.
        """
        features, attention = self.forward_features(x)
        attention = attention.float()
        if per_class:
            weights = self.part_logits(features, attention).clamp_min(0)
            maps = torch.einsum("bkm,bmhw->bkhw", weights, attention)
        else:
            maps = attention.mean(dim=1, keepdim=True)
        peak = maps.flatten(2).amax(dim=2)[..., None, None]
        return maps / peak.clamp_min(1e-12)


# ------------------------------------------------------------------------------ soft-distance loss
def soft_distance_target(
    logits: Tensor, target: Tensor, confidence: float = 0.7, smoothing: float = 0.01, normalized: bool = False
) -> Tensor:
    """The detached target the augmented shots are pulled towards, ``(B, K)``.

    ``q = softmax(logits)`` where the raw shot is right and at least ``confidence`` sure; elsewhere a smoothed
    one-hot ``t_y = 1 − K·ε, t_k = ε`` (sums to ``1 − ε``, as in the reference), or with ``normalized=True``
    ``t_y = 1 − (K − 1)·ε`` (sums to 1).

    Example (dossier g.3: the raw shot says class 0, the label is 2, K = 4, ε = 0.01):
        >>> soft_distance_target(torch.tensor([[5.0, 0.0, 0.0, 0.0]]), torch.tensor([2]))
        tensor([[0.0100, 0.0100, 0.9600, 0.0100]])
    """
    q = torch.softmax(logits.detach().float(), dim=1)
    num_classes = q.shape[1]
    peak, predicted = q.max(dim=1)
    replace = (predicted != target) | (peak < confidence)
    on_value = 1.0 - (num_classes - 1 if normalized else num_classes) * smoothing
    smooth = torch.full_like(q, smoothing).scatter_(1, target[:, None], on_value)
    return torch.where(replace[:, None], smooth, q)


def soft_distance(target_probs: Tensor, logits: Tensor) -> Tensor:
    """``mean_{b,k} |t − softmax(p)|`` (``nn.L1Loss`` with mean reduction, as in the reference).

    Example (dossier g.4: |0.96−0.5| + |0.01−0.2| + |0.02−0.2| + |0.01−0.1| = 0.92, over 4 entries):
        >>> q = torch.tensor([[0.96, 0.01, 0.02, 0.01]])
        >>> round(float(soft_distance(q, torch.log(torch.tensor([[0.5, 0.2, 0.2, 0.1]])))), 6)
        0.23
    """
    return (target_probs - torch.softmax(logits.float(), dim=1)).abs().mean()
