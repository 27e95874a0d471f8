"""Per-class CAM heads with a selectable global pool, and a timm-backbone classifier built on them.

:class:`CAMHeads` holds one 1×1 "conv" classifier per class/task (w_k, b_k). The *same* weights make the
class logit map (the CAM, s_{k,i} = w_kᵀ x_i + b_k) and the image logit from the pooled feature
(z_k = w_kᵀ f_k + b_k). With no BN and no dropout on f_k, and a pool whose weights ω_{k,i} sum to 1
(AVG, PCAM, normalised attention), this is the **shared-classifier identity**

    z_k = Σ_i ω_{k,i} s_{k,i},

so the image logit is a convex combination of the CAM logits (min s ≤ z ≤ max s, σ(z) ≤ max σ(s)).

:class:`PoolingClassifier` is the PCAM-paper network: a timm backbone (``forward_features``), optional
attention layer, :class:`CAMHeads`, and ``attention_maps()``.

Reference: Ye et al., "Weakly Supervised Lesion Localization With Probabilistic-CAM Pooling",
arXiv:2005.14480; the ``jfhealthcare/Chexpert`` code (``model/classifier.py``).

Example:
    >>> import torch
    >>> net = PoolingClassifier("test_resnet", num_classes=3, pool="pcam", in_chans=1)
    >>> net(torch.randn(2, 1, 64, 64)).shape, net.attention_maps(torch.randn(2, 1, 64, 64)).shape
    (torch.Size([2, 3]), torch.Size([2, 3, 2, 2]))
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from networks.backbones import create_backbone
from networks.pooling import GlobalPool, PCAMPool, create_pool

__all__ = ["CAMHeads", "PoolingClassifier", "minmax_normalize"]


def minmax_normalize(maps: torch.Tensor, eps: float = 1e-12, *, zero_range_only: bool = False) -> torch.Tensor:
    """Per-(image, class) min-max normalisation of (B, K, *spatial) maps to [0, 1], in float32.

    The one min-max of CAMs in ``networks`` (CAM baseline, PCAM's CAM-style heatmaps, DC-MT's refinement).
    ``(M - min) / max(max - min, eps)`` over the spatial positions of each map, so a constant map gives 0 and
    a near-constant one is not blown up to the full range. ``zero_range_only=True`` replaces only an exactly
    zero range by ``eps`` (the DC-MT reference rule, method-dcmt a.5), so every non-constant map spans [0, 1].

    Example:
        >>> minmax_normalize(torch.tensor([[[[1.0, 3.0], [2.0, 3.0]]]])).flatten().tolist()
        [0.0, 1.0, 0.5, 1.0]
    """
    flat = maps.flatten(2).float()
    lo = flat.amin(-1, keepdim=True)
    span = flat.amax(-1, keepdim=True) - lo
    span = torch.where(span == 0, torch.full_like(span, eps), span) if zero_range_only else span.clamp_min(eps)
    return ((flat - lo) / span).view(maps.shape)


class CAMHeads(nn.Module):
    """K per-class 1×1 classifiers sharing weights between the CAM and the pooled image logit.

    The K heads are stored as one (K, C·e) weight and one (K,) bias: row k *is* task k's 1×1 conv
    (mathematically identical to K separate ``Conv2d(C·e, 1, 1)``, computed in one call).

    Args:
        in_channels: C, channels of the feature map.
        num_classes: K, one head per class/task (one output each; dossier e.11).
        pool: a :class:`networks.pooling.GlobalPool` or a name for :func:`networks.pooling.create_pool`.
        fc_bn: BatchNorm on each head's pooled feature, as the reference's ``fc_bn``. It **breaks** the
            shared-classifier identity (the logit sees normalised features, the CAM raw ones; dossier e.3),
            so it is off by default.
        drop_rate: dropout on the pooled features in training (``fc_drop``; 0 keeps the identity exact).
        init_std: weights ~ N(0, init_std²), bias 0 (the reference's init).

    ``forward(x) -> (logits (B, K), logit_map (B, K, *spatial))``. For concatenating pools (AVG_MAX, e = 2)
    the logit map is the pseudo-CAM Σ_e w_{k,e}ᵀ x_i + b_k (each position seen as its own avg and max
    feature); it is a heatmap, not a decomposition of the logit.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        pool: GlobalPool | str = "pcam",
        fc_bn: bool = False,
        drop_rate: float = 0.0,
        init_std: float = 0.01,
    ) -> None:
        super().__init__()
        self.pool = create_pool(pool) if isinstance(pool, str) else pool
        self.in_channels, self.num_classes = in_channels, num_classes
        width = in_channels * self.pool.expand
        self.weight = nn.Parameter(torch.randn(num_classes, width) * init_std)
        self.bias = nn.Parameter(torch.zeros(num_classes))
        # One BatchNorm1d over the K·C' flattened features = an independent BN per head and channel.
        self.bn = nn.BatchNorm1d(num_classes * width) if fc_bn else None
        self.drop_rate = drop_rate

    def logit_map(self, x: torch.Tensor) -> torch.Tensor:
        """CAM logits s = W x + b at every position: (B, C, *spatial) -> (B, K, *spatial)."""
        w = self.weight
        if self.pool.expand > 1:
            w = w.view(self.num_classes, self.pool.expand, self.in_channels).sum(1)
        conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[x.dim()]
        return conv(x, w.view(*w.shape, *([1] * (x.dim() - 2))).to(x.dtype), self.bias.to(x.dtype))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.logit_map(x)
        f = self.pool(x, s)  # (B, K, C·e)
        if self.bn is not None:
            f = self.bn(f.reshape(f.shape[0], -1)).view(f.shape[0], self.num_classes, -1)
        if self.drop_rate > 0:
            f = F.dropout(f, self.drop_rate, self.training)
        logits = (f * self.weight.to(f.dtype)).sum(-1) + self.bias.to(f.dtype)
        return logits, s


class PoolingClassifier(nn.Module):
    """timm backbone + (optional attention layer) + per-task :class:`CAMHeads` with a selectable pool.

    Choices where the reference is wrong or silent (dossier section e):
      * backbone by name: ``densenet121`` as the reference repo, ``resnet34`` as the paper; any timm name.
        ``backbone_kwargs`` go to ``timm.create_model`` (e.g. ``output_stride=16`` for finer CAMs on a
        ResNet). A ready ``nn.Module`` with ``forward_features`` and ``num_features`` is accepted too.
      * ``attn_layer`` (e.g. an SE or position-attention block class, built as ``attn_layer(C)``) is applied
        **once** to the features before the heads, not K times in series inside the task loop (e.2). There is
        no string registry of attention modules, so an unknown name cannot silently become ``None`` (e.4).
      * logit maps are always (B, K, h, w), never squeezed, also for a batch of one (e.10).
      * heatmaps: ``heatmap="auto"`` gives σ(logit map) for PCAM (an absolute probability, no
        renormalisation) and per-map min-max normalised CAMs for the other pools; "sigmoid"/"minmax"
        force one.

    Args:
        backbone: timm model name or module.
        num_classes: number of tasks/classes K (one binary head each).
        pool: pool name (``avg``, ``max``, ``lse``, ``exp``, ``linear``, ``pcam``, ``avg_max``) or module.
        pool_kwargs: constructor arguments of the pool (``gamma`` for LSE).
        in_chans: image channels (1 for grey CXRs; timm adapts pretrained stems).
        pretrained, weights_file: ImageNet weights from a local file (``pretrained_cfg_overlay=dict(file=...)``),
            never the hub by default; see :func:`networks.backbones.create_backbone`.
        fc_bn, drop_rate: see :class:`CAMHeads` (both break the identity; off by default).
    """

    def __init__(
        self,
        backbone: str | nn.Module = "densenet121",
        num_classes: int = 5,
        pool: str | GlobalPool = "pcam",
        pool_kwargs: dict | None = None,
        in_chans: int = 1,
        pretrained: bool = False,
        weights_file: str | Path | None = None,
        backbone_kwargs: dict | None = None,
        attn_layer: Callable[[int], nn.Module] | None = None,
        fc_bn: bool = False,
        drop_rate: float = 0.0,
        heatmap: str = "auto",
    ) -> None:
        super().__init__()
        if isinstance(backbone, str):
            backbone = create_backbone(backbone, pretrained=pretrained, weights_file=weights_file, in_chans=in_chans,
                                       num_classes=0, global_pool="", **(backbone_kwargs or {}))
        self.backbone = backbone
        self.num_features = int(backbone.num_features)
        self.attn = attn_layer(self.num_features) if attn_layer is not None else nn.Identity()
        pool = create_pool(pool, **(pool_kwargs or {})) if isinstance(pool, str) else pool
        self.heads = CAMHeads(self.num_features, num_classes, pool, fc_bn=fc_bn, drop_rate=drop_rate)
        if heatmap not in ("auto", "sigmoid", "minmax"):
            raise ValueError(f"heatmap must be 'auto', 'sigmoid' or 'minmax'; got {heatmap!r}")
        self.heatmap = ("sigmoid" if isinstance(pool, PCAMPool) else "minmax") if heatmap == "auto" else heatmap
        self.num_classes = num_classes

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(self.backbone.forward_features(x))

    def forward_head(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, K), logit_map (B, K, h, w))."""
        return self.heads(features)

    def forward_with_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_head(self.forward_features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_maps(x)[0]

    def maps_to_heatmaps(self, logit_map: torch.Tensor) -> torch.Tensor:
        """Logit maps -> heatmaps in [0, 1] (σ or min-max, see ``heatmap``), float32."""
        if self.heatmap == "sigmoid":
            return torch.sigmoid(logit_map.float())
        return minmax_normalize(logit_map)

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K, h, w) heatmaps in [0, 1] at feature resolution (callers resize)."""
        return self.maps_to_heatmaps(self.forward_with_maps(x)[1])
