"""Global pooling zoo for weakly supervised classifiers: AVG, MAX, LSE, EXP, LINEAR, PCAM, AVG_MAX.

Every pool is a parameter-free ``nn.Module`` with one calling convention::

    pooled = pool(features, logit_map=None)

* ``features``: (B, C, *spatial), 2D or 3D.
* ``logit_map``: ``None``, or (B, K, *spatial) class logit maps (CAMs), one per class/task.
* ``pooled``: (B, C·e) when ``logit_map`` is ``None``; (B, K, C·e) when a logit map is given, i.e. one
  pooled feature vector per class. Pools that ignore the logit map return a broadcast view then, so a
  classifier head can treat every pool alike. ``e = pool.expand`` is 2 for AVG_MAX, 1 otherwise.

Pools that *need* a logit map (``needs_logit_map = True``: PCAM, normalised attention) raise when it is
missing. Which names exist: :data:`POOLS`; build one with :func:`create_pool`.

References:
    W. Ye, J. Yao, H. Xue, Y. Li. "Weakly Supervised Lesion Localization With Probabilistic-CAM Pooling",
    arXiv:2005.14480 (PCAM). X. Wang et al., "ChestX-ray8", CVPR 2017 (LSE with the mean inside the log).
    JF Healthcare's CheXpert code (``jfhealthcare/Chexpert``) for EXP and LINEAR (linear-softmax) pooling.

Example:
    >>> import torch
    >>> x, s = torch.rand(2, 8, 5, 6), torch.randn(2, 3, 5, 6)
    >>> create_pool("pcam")(x, s).shape, create_pool("lse", gamma=0.5)(x).shape
    (torch.Size([2, 3, 8]), torch.Size([2, 8]))
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "GlobalPool", "AvgPool", "MaxPool", "LSEPool", "ExpPool", "LinearSoftmaxPool", "PCAMPool",
    "NormalizedAttentionPool", "ConcatPool", "POOLS", "create_pool", "pcam_weights",
]


def _check(features: torch.Tensor, logit_map: torch.Tensor | None) -> None:
    if features.dim() < 3:
        raise ValueError(f"features must be (B, C, *spatial); got shape {tuple(features.shape)}")
    if logit_map is not None:
        if logit_map.dim() != features.dim() or logit_map.shape[0] != features.shape[0] \
                or logit_map.shape[2:] != features.shape[2:]:
            raise ValueError(
                f"logit_map must be (B, K, *spatial) matching features {tuple(features.shape)} in batch and "
                f"spatial size; got {tuple(logit_map.shape)}"
            )


class GlobalPool(nn.Module):
    """Base class. Subclasses implement :meth:`pool` (features (B, C, L) -> (B, C·e))."""

    needs_logit_map: bool = False
    expand: int = 1

    def pool(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, features: torch.Tensor, logit_map: torch.Tensor | None = None) -> torch.Tensor:
        _check(features, logit_map)
        pooled = self.pool(features.flatten(2))
        if logit_map is None:
            return pooled
        # One (identical) pooled vector per class: a view, no copy.
        return pooled.unsqueeze(1).expand(-1, logit_map.shape[1], -1)

    def extra_repr(self) -> str:
        return ""


class AvgPool(GlobalPool):
    """f_c = mean_i x_{c,i}. With a shared 1×1 classifier this is classic CAM/GAP."""

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(-1)


class MaxPool(GlobalPool):
    """f_c = max_i x_{c,i}."""

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax(-1)


class LSEPool(GlobalPool):
    """Log-sum-exp pooling with the **mean inside the log** (Wang et al. 2017; Chexpert code; DC-MT r = 6):

        f_c = (1/γ) · log( (1/L) Σ_i exp(γ x_{c,i}) ) = (logsumexp(γ x_c) − log L) / γ.

    Choice (dossier e.12): the 1/L inside the log, so LSE(const) = const and mean ≤ LSE ≤ max; the
    "sum" variant would add (1/γ)·log L. Computed with ``torch.logsumexp`` (max-shifted, no overflow for
    any γ). Limits are exact: ``gamma=0`` returns AVG and ``gamma=inf`` returns MAX. For small finite γ
    the formula loses precision in float32 (cancellation in logsumexp − log L, amplified by 1/γ); below
    ``gamma < 1e-3`` it is evaluated in float64.

    Args:
        gamma: sharpness γ ≥ 0 (reference default 0.5; DC-MT uses 6).
    """

    def __init__(self, gamma: float = 0.5) -> None:
        super().__init__()
        if not gamma >= 0:
            raise ValueError(f"LSE gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.gamma == 0.0:
            return x.mean(-1)
        if math.isinf(self.gamma):
            return x.amax(-1)
        xx = x.double() if (self.gamma < 1e-3 or x.dtype == torch.float64) else x.float()
        out = (torch.logsumexp(self.gamma * xx, dim=-1) - math.log(x.shape[-1])) / self.gamma
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}"


class ExpPool(GlobalPool):
    """Exponential pooling: each channel's softmax-weighted mean of itself, f_c = Σ_i x_{c,i} softmax(x_c)_i.

    Choice: the reference adds 1e-7 to the (max-shifted, hence ≥ 1) denominator; we use the exact softmax.
    The difference is below 1e-7 relative.
    """

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return (x * torch.softmax(x.float(), dim=-1).to(x.dtype)).sum(-1)


class LinearSoftmaxPool(GlobalPool):
    """Linear-softmax pooling ("LINEAR" in the Chexpert code): f_c = Σ_i x_{c,i}² / (Σ_i x_{c,i} + eps).

    Meaningful only for non-negative features (the timm/torchvision backbones end with a ReLU, so the
    features are ≥ 0). For such inputs mean ≤ f ≤ max, and an all-zero channel pools to 0 (the ``eps``).
    This is *not* PCAM's old name: PCAM was called ``PROB`` in the reference history (dossier e.13).
    """

    def __init__(self, eps: float = 1e-7) -> None:
        super().__init__()
        self.eps = eps

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return (x * x).sum(-1) / (x.sum(-1) + self.eps)


def pcam_weights(logit_map: torch.Tensor) -> torch.Tensor:
    """PCAM's normalised spatial weights ω_i = σ(s_i) / Σ_j σ(s_j), over all spatial dims.

    Computed as ``softmax(logsigmoid(s))``, which is the same quantity but cannot underflow to 0/0 when
    every logit is very negative (σ(−200) is 0 in float32). Returned in float32 (or float64 for float64
    input) with the input's shape.
    """
    s = logit_map.flatten(2)
    s = s if s.dtype == torch.float64 else s.float()
    return torch.softmax(F.logsigmoid(s), dim=-1).view_as(logit_map)


class PCAMPool(GlobalPool):
    """Probabilistic-CAM pooling (Ye et al., arXiv:2005.14480).

    For class k with CAM logits s_{k,i} = w_kᵀ x_i + b_k: p_i = σ(s_i), ω_i = p_i / Σ_j p_j,
    f_k = Σ_i ω_i x_i. The same weight applies to every channel. No parameters, no temperature, no ε;
    gradients flow through ω (nothing is detached), as in the reference. With the same 1×1 classifier
    applied to f_k (see :class:`networks.cam_heads.CAMHeads`) the image logit is the ω-weighted mean of the
    CAM logits. Choice (dossier e.11): one output per head; ``K`` classes are handled as K heads.

    ``logit_map``: (B, K, *spatial) -> output (B, K, C).
    """

    needs_logit_map = True

    def forward(self, features: torch.Tensor, logit_map: torch.Tensor | None = None) -> torch.Tensor:
        if logit_map is None:
            raise ValueError("PCAM pooling needs the class logit map: pool(features, logit_map)")
        _check(features, logit_map)
        w = pcam_weights(logit_map).flatten(2)  # (B, K, L)
        x = features.flatten(2)  # (B, C, L)
        return torch.einsum("bkl,bcl->bkc", w.to(x.dtype), x)


class NormalizedAttentionPool(GlobalPool):
    """Attention-weighted mean with weights a_i / Σ_j a_j (``mode="sum"``) or softmax(a) (``mode="softmax"``).

    This is the OXnet global pooling (Luo et al., "OXnet", MICCAI 2021): R_c = A_c / Σ A_c with a positive
    attention map A_c, then f_c = Σ_i R_{c,i} x_i. The map is passed as ``logit_map`` (B, K, *spatial);
    with ``mode="sum"`` it must be ≥ 0, and ``eps`` (default 0, as in the reference) guards an all-zero
    map. ``mode="sigmoid"`` is PCAM.
    """

    needs_logit_map = True

    def __init__(self, mode: str = "sum", eps: float = 0.0) -> None:
        super().__init__()
        if mode not in ("sum", "softmax", "sigmoid"):
            raise ValueError(f"mode must be 'sum', 'softmax' or 'sigmoid'; got {mode!r}")
        self.mode, self.eps = mode, eps

    def forward(self, features: torch.Tensor, logit_map: torch.Tensor | None = None) -> torch.Tensor:
        if logit_map is None:
            raise ValueError("NormalizedAttentionPool needs an attention map: pool(features, attention)")
        _check(features, logit_map)
        a = logit_map.flatten(2).float()
        if self.mode == "sum":
            w = a / (a.sum(-1, keepdim=True) + self.eps)
        elif self.mode == "softmax":
            w = torch.softmax(a, dim=-1)
        else:
            w = torch.softmax(F.logsigmoid(a), dim=-1)
        x = features.flatten(2)
        return torch.einsum("bkl,bcl->bkc", w.to(x.dtype), x)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, eps={self.eps}"


class ConcatPool(GlobalPool):
    """Concatenation of logit-free pools along channels (AVG_MAX = [AVG, MAX], e = 2).

    It has no CAM decomposition: the image logit is not a weighted mean of any logit map (dossier e.3).
    """

    def __init__(self, pools: list[GlobalPool]) -> None:
        super().__init__()
        if any(p.needs_logit_map for p in pools):
            raise ValueError("ConcatPool combines logit-free pools only")
        self.pools = nn.ModuleList(pools)
        self.expand = sum(p.expand for p in pools)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p.pool(x) for p in self.pools], dim=-1)


POOLS: dict[str, type] = {
    "avg": AvgPool,
    "max": MaxPool,
    "lse": LSEPool,
    "exp": ExpPool,
    "linear": LinearSoftmaxPool,
    "pcam": PCAMPool,
    "attention": NormalizedAttentionPool,
}


def create_pool(name: str, **kwargs) -> GlobalPool:
    """Build a pool by (case-insensitive) name: avg, max, lse, exp, linear, pcam, attention, avg_max,
    avg_max_lse. ``kwargs`` go to the constructor (``gamma`` for lse; ``mode``/``eps`` for attention;
    ``gamma`` for the LSE part of avg_max_lse)."""
    key = name.lower()
    if key == "avg_max":
        return ConcatPool([AvgPool(), MaxPool()])
    if key == "avg_max_lse":
        return ConcatPool([AvgPool(), MaxPool(), LSEPool(**kwargs)])
    if key not in POOLS:
        raise ValueError(f"unknown pool {name!r}; choose one of {sorted([*POOLS, 'avg_max', 'avg_max_lse'])}")
    return POOLS[key](**kwargs)
