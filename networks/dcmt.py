"""DC-MT slice network: dilated SE-ResNeXt50 backbone, foreground-attention (FA) module, dropout head,
LSE pooling and class activation maps refined into soft attention masks.

J. Huo, X. Ouyang, L. Si et al., "Automatic Grading Assessments for Knee MRI Cartilage Defects via
Self-ensembling Semi-supervised Learning with Dual-Consistency", Medical Image Analysis 80:102508 (2022),
arXiv:2108.02476. Equations follow ``../shared/research/method-dcmt.md`` §a.2–a.5.

Pieces (each usable on its own):

* :class:`FABlock` / :class:`FAModule`: context attention pooling → channel gate → position attention,
  added back with a learnable scalar γ initialised to 0 (the block starts as the identity).
* :class:`DCMTNet`: ``Z = Dropout2d(ReLU(BN(conv3×3([x ; FA(x)]))))``, ``f = LSE_r(Z)`` (r = 6, mean inside
  the log, :class:`networks.pooling.LSEPool`), ``logits = W f + b``. ``f`` is the 512-d slice feature that
  stage 2 aggregates.
* :func:`class_activation_maps`: ``M_k = ReLU(Σ_d W_kd Z_d)`` with the classifier weights **detached** and no
  bias, so attention losses train ``Z`` and everything upstream, never the classifier.
* :func:`refine_cams`: bilinear upsampling (``align_corners=True``), per-map min–max normalisation (a zero
  range becomes 1e-5) and the soft threshold ``A = σ(ω (M̂ − σ₀))`` with ω = 100, σ₀ = 0.4.

Losses and consistency ramps (pure functions; dossier §a.6–a.8, §a.10, oracle values §g), used by both stages
(``MeanTeacherModule`` and ``SubjectAggregationModule`` in ``lightning_modules/``). With C the attention target (mask), A the refined CAM, S/T student/teacher::

    L_1 = 1·CE_L + 0.5·nMSE(C, A)_L + 0.001·Bound(C, A)_L + ω_cls(e)·MSE(softmax S, softmax T)_B
          + ω_att(e)·nMSE(A_S, A_T)_U                                         (stage 1, slices)
    L_2 = CE_L + ω(e)·MSE(softmax S, softmax T)_B                             (stage 2, subjects)

* :func:`normalized_mse` nMSE(a, b) = Σ (a − b)² / Σ (a + b); :func:`bound_loss` the attention mass outside the
  target; :func:`softmax_mse` the mean squared difference of class probabilities.
* :func:`sigmoid_rampup` exp(−5 (1 − t/T)²), :func:`offset_sigmoid_rampup` (the reference's "att" ramp, which
  caps below 1), :func:`consistency_weights` (ω_cls, ω_att) of stage 1 and :func:`subject_consistency_weight`
  ω of stage 2, all 0 before the switch epoch.

Choices where the paper is silent or timm differs:

* Output stride 16 comes from timm's ``output_stride=16``, which *dilates* layer4 (DeepLab style); the
  reference sets layer4's stride to 1 without dilation. Shapes are identical (2048×16×16 at 256²).
* Inputs are single-channel by default (``in_chans=1``; timm sums the RGB filters of pretrained weights);
  the reference replicates the grey slice to 3 channels, which is equivalent for the first conv.
* The backbone is any timm model name, so tests run ``test_resnet`` with small FA/head widths.

Example:
    >>> import torch
    >>> c = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    >>> float(normalized_mse(c, c)), float(bound_loss(c, 1 - c, batch_size=1))  # identical maps; disjoint maps
    (0.0, 1.0)
    >>> consistency_weights(19), [round(w, 6) for w in consistency_weights(20)]  # the epoch-20 switch
    ((0.0, 0.0), [1.432524, 0.006738])
    >>> net = DCMTNet("test_resnet", num_classes=3, fa_channels=16, head_channels=16)
    >>> out = net.forward_all(torch.randn(2, 1, 64, 64))
    >>> out.logits.shape, out.features.shape, net.attention_maps(torch.randn(2, 1, 64, 64)).shape
    (torch.Size([2, 3]), torch.Size([2, 16]), torch.Size([2, 3, 64, 64]))
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from networks.backbones import create_backbone
from networks.cam_heads import minmax_normalize
from networks.pooling import LSEPool

__all__ = ["FABlock", "FAModule", "DCMTNet", "DCMTOutput", "class_activation_maps", "refine_cams",
           "normalize_cams", "select_class", "normalized_mse", "bound_loss", "softmax_mse", "sigmoid_rampup",
           "offset_sigmoid_rampup", "consistency_weights", "subject_consistency_weight"]


def _conv_bn(cin: int, cout: int, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout))


class FABlock(nn.Module):
    """Foreground-attention block (dossier a.3, step 2) on u ∈ R^{B×C×H×W}:

    a = softmax_HW(conv1×1_{C→1}(u)); g = Σ_HW u·a; c = σ(W₂ ReLU(W₁ g)); v = conv1×1_{C→C}(u) ⊙ c;
    m = conv1×1_{C→1}(v); m' = m ⊙ σ(BN(conv3×3_{1→1}(m))); output u + γ m' (γ = 0 at init).
    """

    def __init__(self, channels: int = 512, reduction: int = 8) -> None:
        super().__init__()
        self.context = nn.Conv2d(channels, 1, 1)
        self.gate = nn.Sequential(nn.Linear(channels, channels // reduction, bias=False), nn.ReLU(inplace=True),
                                  nn.Linear(channels // reduction, channels, bias=False), nn.Sigmoid())
        self.value = nn.Conv2d(channels, channels, 1)
        self.position = nn.Conv2d(channels, 1, 1)
        self.position_gate = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1, bias=False), nn.BatchNorm2d(1), nn.Sigmoid())
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(self.context(u).flatten(2).float(), dim=-1).to(u.dtype)  # (B, 1, HW)
        g = torch.einsum("bcl,bol->bc", u.flatten(2), weights)  # attention pooling
        v = self.value(u) * self.gate(g)[:, :, None, None]
        m = self.position(v)
        m = m * self.position_gate(m)
        return u + self.gamma * m  # (B, 1, H, W) broadcast over channels


class FAModule(nn.Module):
    """conv3×3+BN (C_in → C, no ReLU) → :class:`FABlock` → conv3×3+BN (C → C, no ReLU) (dossier a.3)."""

    def __init__(self, in_channels: int, channels: int = 512, reduction: int = 8) -> None:
        super().__init__()
        self.conva = _conv_bn(in_channels, channels)
        self.block = FABlock(channels, reduction)
        self.convb = _conv_bn(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convb(self.block(self.conva(x)))


class DCMTOutput(NamedTuple):
    logits: torch.Tensor  # (B, K)
    features: torch.Tensor  # (B, D) LSE-pooled, the slice feature exported to stage 2
    feature_map: torch.Tensor  # (B, D, h, w) Z, after dropout in training


def class_activation_maps(feature_map: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``ReLU(Σ_d W_kd Z_d)``: (B, D, h, w), (K, D) -> (B, K, h, w). ``weight`` is detached here, and no bias."""
    return F.relu(F.conv2d(feature_map, weight.detach().to(feature_map.dtype)[:, :, None, None]))


def normalize_cams(cams: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-sample, per-map min–max to [0, 1] in float32; a zero range is replaced by ``eps`` (so a constant
    map → 0), as the reference (:func:`networks.cam_heads.minmax_normalize` with ``zero_range_only=True``)."""
    return minmax_normalize(cams, eps, zero_range_only=True)


def refine_cams(cams: torch.Tensor, size: Sequence[int] | None = None, omega: float = 100.0,
                sigma: float = 0.4) -> torch.Tensor:
    """``A = σ(ω (M̂ − σ₀))`` with ``M̂`` the min–max-normalised CAM upsampled to ``size`` (dossier a.5).

    Computed in float32 whatever the input dtype (bf16 would quantise M̂ near the 0.4 level set, where all
    the gradient is). Invariant to ``M → aM + b`` (a > 0). ``A ≥ 0.999`` ⇔ ``M̂ ≥ σ₀ + ln(999)/ω``.
    """
    cams = cams.float()
    if size is not None and tuple(cams.shape[-2:]) != tuple(size):
        cams = F.interpolate(cams, size=tuple(size), mode="bilinear", align_corners=True)
    return torch.sigmoid(omega * (normalize_cams(cams) - sigma))


def select_class(maps: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, K, h, w), (B,) long -> (B, 1, h, w): each sample's map of its class ``index[b]``."""
    return maps.gather(1, index.view(-1, 1, 1, 1).expand(-1, 1, *maps.shape[2:]))


class DCMTNet(nn.Module):
    """DC-MT's AttentionNet (dossier a.2–a.5) with a swappable timm backbone.

    Args:
        backbone: timm model name (``seresnext50_32x4d`` in the paper; ``test_resnet`` in tests).
        num_classes: K (3 cartilage grades).
        in_chans: input channels.
        pretrained, weights_file: ImageNet weights (see :func:`networks.backbones.create_backbone`).
        output_stride: backbone output stride (16 in the paper).
        fa_channels: FA width (512); ``use_fa=False`` drops the FA module (the head then sees the backbone only).
        head_channels: width D of Z and of the pooled feature (512).
        dropout: Dropout2d probability inside the head (0.1).
        lse_r: LSE sharpness r (6).
        cam_omega, cam_sigma: refinement ω (100) and σ₀ (0.4).
    """

    def __init__(self, backbone: str = "seresnext50_32x4d", num_classes: int = 3, in_chans: int = 1,
                 pretrained: bool = False, weights_file: str | None = None, output_stride: int = 16,
                 fa_channels: int = 512, head_channels: int = 512, dropout: float = 0.1, lse_r: float = 6.0,
                 cam_omega: float = 100.0, cam_sigma: float = 0.4, use_fa: bool = True) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.cam_omega, self.cam_sigma = cam_omega, cam_sigma
        self.backbone = create_backbone(backbone, pretrained=pretrained, weights_file=weights_file,
                                        in_chans=in_chans, features_only=True, out_indices=(-1,),
                                        output_stride=output_stride)
        channels = self.backbone.feature_info.channels()[-1]
        self.fa = FAModule(channels, fa_channels) if use_fa else None
        head_in = channels + (fa_channels if use_fa else 0)
        self.head = nn.Sequential(_conv_bn(head_in, head_channels), nn.ReLU(inplace=True), nn.Dropout2d(dropout))
        self.pool = LSEPool(gamma=lse_r)
        self.classifier = nn.Linear(head_channels, num_classes)
        self.num_features = head_channels

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Z: (B, D, h, w) with h = H / output_stride."""
        feats = self.backbone(x)[-1]
        if self.fa is not None:
            feats = torch.cat([feats, self.fa(feats)], dim=1)
        return self.head(feats)

    def forward_all(self, x: torch.Tensor) -> DCMTOutput:
        z = self.forward_features(x)
        f = self.pool(z)
        return DCMTOutput(self.classifier(f), f, z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_all(x).logits

    def cams(self, feature_map: torch.Tensor) -> torch.Tensor:
        """Raw CAMs (B, K, h, w) from Z with the detached classifier weights."""
        return class_activation_maps(feature_map, self.classifier.weight)

    def refine(self, cams: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        return refine_cams(cams, size, self.cam_omega, self.cam_sigma)

    def attention_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Refined CAMs of every class at the input size, (B, K, H, W) in [0, 1]."""
        return self.refine(self.cams(self.forward_features(x)), x.shape[-2:])


# ------------------------------------------------------------------------------------------ losses
def normalized_mse(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Σ (a − b)² / max(Σ (a + b), eps) over everything given (dossier a.6/a.7); 0 for empty inputs."""
    a, b = a.float(), b.float()
    return ((a - b) ** 2).sum() / (a + b).sum().clamp_min(eps)


def bound_loss(target: torch.Tensor, attention: torch.Tensor, batch_size: int, eps: float = 1e-5) -> torch.Tensor:
    """(1/batch_size) Σ_i [1 − Σ min(C_i, A_i) / max(Σ A_i, eps)]: attention mass outside the target.

    0 when A ≤ C pointwise, 1 per sample when they are disjoint. The sum runs over the samples given (the
    labeled ones) but divides by ``batch_size`` (the whole batch, as the reference)."""
    c, a = target.float().flatten(1), attention.float().flatten(1)
    inside = torch.minimum(c, a).sum(1) / a.sum(1).clamp_min(eps)
    return (1.0 - inside).sum() / max(batch_size, 1)


def softmax_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Σ_i ‖softmax(s_i) − softmax(t_i)‖² / (K·B), i.e. the mean squared difference of probabilities."""
    return F.mse_loss(student_logits.float().softmax(-1), teacher_logits.float().softmax(-1))


# ------------------------------------------------------------------------------- consistency ramps
def sigmoid_rampup(t: float, length: float) -> float:
    """exp(−5 (1 − clip(t, 0, T)/T)²), the mean-teacher ramp; 1 when ``length`` is 0."""
    if length <= 0:
        return 1.0
    phase = 1.0 - min(max(t, 0.0), length) / length
    return math.exp(-5.0 * phase * phase)


def offset_sigmoid_rampup(t: float, start: float, length: float) -> float:
    """The reference's "att" ramp: exp(−5 (1 − (clip(t, start, T) − start)/T)²).

    0-phase at ``start`` and capped at ``T``: for start 20, T 40 it rises from 0.006738 to 0.286505 (never
    1); for T 100 it caps at 0.818731 (dossier a.8, a.10)."""
    if length <= 0:
        return 1.0
    phase = 1.0 - (min(max(t, start), length) - start) / length
    return math.exp(-5.0 * phase * phase)


def consistency_weights(t: float, consistency_cls: float = 5.0, consistency_att: float = 1.0, start: float = 20,
                        cls_rampup: float = 40, att_rampup: float = 40, att_ramp: str = "reference") -> tuple[float, float]:
    """(ω_cls, ω_att) at time ``t`` (1-based epoch, or step): both 0 before ``start``; then
    ω_cls = c·sigmoid_rampup(t, cls_rampup) and ω_att = a·offset_sigmoid_rampup(t, start, att_rampup)
    (``att_ramp="reference"``) or a·sigmoid_rampup(t − start, att_rampup) (``"shifted"``)."""
    if t < start:
        return 0.0, 0.0
    w_cls = consistency_cls * sigmoid_rampup(t, cls_rampup)
    if att_ramp == "reference":
        w_att = consistency_att * offset_sigmoid_rampup(t, start, att_rampup)
    elif att_ramp == "shifted":
        w_att = consistency_att * sigmoid_rampup(t - start, att_rampup)
    else:
        raise ValueError(f"att_ramp must be 'reference' or 'shifted', got {att_ramp!r}")
    return w_cls, w_att


def subject_consistency_weight(t: float, consistency: float = 1.0, start: float = 20, rampup: float = 100,
                               ramp: str = "reference") -> float:
    """ω(t): 0 before ``start``; then ``consistency`` × the reference ramp (``offset_sigmoid_rampup``) or,
    with ``ramp="shifted"``, ``sigmoid_rampup(t − start, rampup)`` which reaches the maximum."""
    if t < start:
        return 0.0
    if ramp == "reference":
        return consistency * offset_sigmoid_rampup(t, start, rampup)
    if ramp == "shifted":
        return consistency * sigmoid_rampup(t - start, rampup)
    raise ValueError(f"ramp must be 'reference' or 'shifted', got {ramp!r}")
