"""RetinaNet assembled from MONAI detection parts on a timm ``features_only`` backbone, laid out as in OXnet.

T.-Y. Lin, P. Goyal, R. Girshick, K. He, P. Dollár, "Focal Loss for Dense Object Detection", ICCV 2017
(arXiv:1708.02002). Defaults follow the OXnet reference (L. Luo et al., MICCAI 2021, arXiv:2104.03218; dossier
``method-oxnet.md`` a.2–a.6): FPN levels P2–P7, anchor sizes 16–512 (``anchor_size_factor · 2**level``), ratios
{0.5, 1, 2} (ratio = height/width), scales {2^0, 2^(1/3), 2^(2/3)}, box coder std (0.1, 0.1, 0.2, 0.2), focal loss
α 0.25 γ 2, smooth-L1 β 1/9, IoU ≥ 0.5 positive, < 0.4 negative, in between ignored, no forced matching.

What comes from where: the pyramid is MONAI ``FeaturePyramidNetwork`` + ``LastLevelP6P7`` (P6 from C5, P7 from
ReLU(P6), as in the reference; :class:`LastLevelP6` for a pyramid ending at P6: no level is built but unused); the
heads are MONAI ``RetinaNetClassificationHead`` / ``RetinaNetRegressionHead`` (GroupNorm trunks); anchors are
MONAI ``AnchorGenerator`` (subclassed, unrounded); encoding is MONAI ``BoxCoder``; IoU, clipping and NMS are
``monai.data.box_utils``. This file owns the forward (backbone -> FPN -> heads) so that the per-level
classification maps stay available to OXnet's attention branch (MONAI's ``RetinaNetDetector`` returns only losses
in training).

Coordinate convention (decided here, and only here)
    Every box in this project is ``xyxy`` in pixels with **x = column, y = row** (``datamodules/batch.py``).
    MONAI orders box coordinates by *array axis* (for an (H, W) image, axis 0 = row comes first). The anchor
    generator therefore runs with ``indexing="xy"``, which makes MONAI swap axes 0 and 1 so anchors come out as
    (x = column, y = row), and :func:`clip_boxes` hands MONAI the image size as (W, H). The other MONAI parts used
    (``BoxCoder``, ``box_iou``, ``non_max_suppression``) treat both axes alike, so nothing else converts.

Departures from the reference, each deliberate:
    * Anchor shapes are exact (MONAI rounds cell anchors to whole pixels, e.g. 22 x 12 instead of 22.63 x 11.31).
    * Focal loss in the logit form (MONAI ``sigmoid_focal_loss``) instead of clamping p to [1e-4, 1 - 1e-4]: same
      values inside the clamp range, and saturated anchors keep a gradient.
    * An image whose box annotation is complete but empty (a normal image) contributes a negative-only focal loss
      (``empty_image_loss="negative"``, normaliser 1); the reference gives it 0 (yhenon/pytorch-retinanet#196).
      ``"zero"`` restores the reference.
    * Heads use MONAI's GroupNorm trunks; the output convs are zero-initialised as in the reference (so every
      anchor starts at probability ``prior_probability`` and decodes to itself).

Example:
    >>> net = RetinaNet(num_classes=3, backbone="test_resnet", fpn_channels=16, head_depth=1)
    >>> out = net(torch.zeros(1, 1, 64, 64))
    >>> out["cls_logits"].shape, net.anchors((64, 64), out["cls_maps"]).shape
    (torch.Size([1, 3078, 3]), torch.Size([3078, 4]))
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from monai.apps.detection.networks.retinanet_network import RetinaNetClassificationHead, RetinaNetRegressionHead
from monai.apps.detection.utils.anchor_utils import AnchorGenerator
from monai.apps.detection.utils.box_coder import BoxCoder
from monai.data.box_utils import box_iou, clip_boxes_to_image, non_max_suppression
from monai.losses.focal_loss import sigmoid_focal_loss
from monai.networks.blocks.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7
from torch import Tensor, nn

from networks.backbones import create_backbone

__all__ = [
    "RetinaNet", "DetectionSettings", "ExactAnchorGenerator", "LastLevelP6", "BELOW_LOW_THRESHOLD", "BETWEEN_THRESHOLDS", "clip_boxes", "match_anchors",
    "encode_targets", "focal_loss", "smooth_l1", "detection_losses", "local_attention_map",
]

# Matcher codes, as in MONAI/torchvision: negative anchor, ignored anchor; >= 0 is the matched box index.
BELOW_LOW_THRESHOLD = -1
BETWEEN_THRESHOLDS = -2


@dataclass(frozen=True)
class DetectionSettings:
    """RetinaNet's loss and inference settings, held by the network (as torchvision's ``RetinaNet`` holds its
    ``fg_iou_thresh``, ``score_thresh``, ...) so that the stage-1 module and OXnet (student, teacher, pseudo-box
    matching) use the same values. Defaults: the OXnet reference (dossier a.6, a.12). Config: ``net.init_args.
    detection.<name>``. ``focal_alpha``/``focal_gamma``: focal loss (α weighs positives); ``smooth_l1_beta``: box
    regression; IoU ≥ ``fg_iou`` positive, < ``bg_iou`` negative, in between ignored; ``empty_image_loss``:
    ``"negative"`` or ``"zero"`` (module docstring); ``score_thresh``, ``nms_thresh`` (class-agnostic),
    ``topk_per_level``, ``max_detections`` (COCO maxDets): inference."""

    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    smooth_l1_beta: float = 1.0 / 9.0
    fg_iou: float = 0.5
    bg_iou: float = 0.4
    empty_image_loss: str = "negative"
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    topk_per_level: int = 1000
    max_detections: int = 100

    def __post_init__(self) -> None:
        if self.empty_image_loss not in ("negative", "zero"):
            raise ValueError(f"empty_image_loss must be 'negative' or 'zero', got {self.empty_image_loss!r}")
        if not 0.0 <= self.bg_iou <= self.fg_iou <= 1.0:
            raise ValueError(f"need 0 <= bg_iou <= fg_iou <= 1, got bg_iou={self.bg_iou}, fg_iou={self.fg_iou}")
        if min(self.topk_per_level, self.max_detections) < 1:
            raise ValueError(f"topk_per_level and max_detections must be >= 1, got {self.topk_per_level}, "
                             f"{self.max_detections}")



class ExactAnchorGenerator(AnchorGenerator):
    """MONAI ``AnchorGenerator`` (2D) whose cell anchors are not rounded to whole pixels. For base size S·k and ratio r = h/w the cell anchor is w = S·k/√r, h = S·k·√r, ordered ratio-major,
    scale-minor (dossier a.4). MONAI's version rounds the half-sizes, which changes small P2 anchors by up to 6 %.
    """

    def generate_anchors(self, scales, aspect_ratios, dtype=torch.float32, device=None) -> Tensor:
        if self.spatial_dims != 2:
            raise NotImplementedError("ExactAnchorGenerator is 2D only")
        scales_t = torch.as_tensor(scales, dtype=dtype, device=device)
        ratios_t = torch.as_tensor(aspect_ratios, dtype=dtype, device=device)
        ws = (scales_t[None, :] / ratios_t.sqrt()[:, None]).reshape(-1)
        hs = (scales_t[None, :] * ratios_t.sqrt()[:, None]).reshape(-1)
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2.0


def clip_boxes(boxes: Tensor, image_hw: Sequence[int]) -> Tensor:
    """Clip ``xyxy`` (x = column) boxes to an image of size (H, W). MONAI wants the size in box-axis order, (W, H)."""
    clipped, _ = clip_boxes_to_image(boxes, (int(image_hw[1]), int(image_hw[0])), remove_empty=False)
    return clipped


def _min_size(boxes: Tensor, min_size: float = 1.0) -> Tensor:
    """Widen boxes narrower/shorter than ``min_size`` about their centre (the reference clamps GT w, h >= 1)."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = ((boxes[:, 2:] - boxes[:, :2]).clamp(min=min_size)) / 2
    return torch.cat([centre - half, centre + half], dim=1)


def match_anchors(anchors: Tensor, boxes: Tensor, fg_iou: float = DetectionSettings.fg_iou,
                  bg_iou: float = DetectionSettings.bg_iou) -> Tensor:
    """Index of the matched box per anchor: IoU_max >= ``fg_iou`` -> argmax box; < ``bg_iou`` ->
    :data:`BELOW_LOW_THRESHOLD`; in between -> :data:`BETWEEN_THRESHOLDS`. No forced low-quality matches."""
    if boxes.numel() == 0:
        return torch.full((anchors.shape[0],), BELOW_LOW_THRESHOLD, dtype=torch.long, device=anchors.device)
    best, index = box_iou(boxes.float(), anchors.float()).max(dim=0)
    index = torch.where(best < fg_iou, BETWEEN_THRESHOLDS, index)
    return torch.where(best < bg_iou, BELOW_LOW_THRESHOLD, index)


def encode_targets(box_coder: BoxCoder, boxes: Tensor, anchors: Tensor) -> Tensor:
    """Regression targets (normalised deltas) of ``boxes`` relative to ``anchors`` (row-aligned)."""
    return box_coder.encode_single(_min_size(boxes.float()), anchors.float())


def focal_loss(logits: Tensor, targets: Tensor, alpha: float = DetectionSettings.focal_alpha,
               gamma: float = DetectionSettings.focal_gamma) -> Tensor:
    """Element-wise sigmoid focal loss −α_t (1 − p_t)^γ log p_t (targets in {0, 1}; α weighs positives)."""
    return sigmoid_focal_loss(logits.float(), targets.float(), gamma=gamma, alpha=alpha)


def smooth_l1(pred: Tensor, target: Tensor, beta: float = DetectionSettings.smooth_l1_beta) -> Tensor:
    """Element-wise smooth-L1: 0.5 x²/β if |x| < β else |x| − β/2 (β = 1/9 in the reference)."""
    return F.smooth_l1_loss(pred.float(), target.float(), beta=beta, reduction="none")


def detection_losses(
    cls_logits: Tensor,
    box_deltas: Tensor,
    anchors: Tensor,
    boxes: Sequence[Tensor],
    labels: Sequence[Tensor],
    box_coder: BoxCoder,
    settings: DetectionSettings = DetectionSettings(),
) -> tuple[Tensor, Tensor]:
    """Supervised RetinaNet losses, one value per image (so callers choose the images and the mean).

    Args:
        cls_logits: (B, N, K) anchor logits. box_deltas: (B, N, 4). anchors: (N, 4) ``xyxy``.
        boxes, labels: per image (M_i, 4) ``xyxy`` boxes and (M_i,) class indices (complete annotation).
        settings: focal α/γ, smooth-L1 β, the matching IoUs and ``empty_image_loss`` (:class:`DetectionSettings`).
    Returns:
        (classification, regression), each (B,): focal loss summed over non-ignored anchors and classes / max(1,
        N_pos); smooth-L1 summed over positive anchors' 4 deltas / (4 · max(1, N_pos)).
    """
    b, n, k = cls_logits.shape
    targets = torch.zeros(b, n, k, device=cls_logits.device)
    valid = torch.ones(b, n, dtype=torch.bool, device=cls_logits.device)
    num_pos, box_terms = [], []
    for i in range(b):
        gt, gt_labels = boxes[i].to(anchors.device), labels[i].to(anchors.device)
        matched = match_anchors(anchors, gt, settings.fg_iou, settings.bg_iou)
        pos = matched >= 0
        anchor_idx = pos.nonzero().squeeze(1)
        targets[i, anchor_idx, gt_labels[matched[anchor_idx]]] = 1.0
        valid[i] = matched != BETWEEN_THRESHOLDS
        if gt.numel() == 0 and settings.empty_image_loss == "zero":
            valid[i] = False
        num_pos.append(anchor_idx.numel())
        target_deltas = encode_targets(box_coder, gt[matched[anchor_idx]], anchors[anchor_idx])
        box_terms.append(smooth_l1(box_deltas[i, anchor_idx], target_deltas, settings.smooth_l1_beta).sum())
    norm = torch.tensor(num_pos, device=cls_logits.device, dtype=torch.float32).clamp(min=1.0)
    cls = focal_loss(cls_logits, targets, settings.focal_alpha, settings.focal_gamma)
    cls = (cls * valid.unsqueeze(-1)).sum(dim=(1, 2)) / norm
    reg = torch.stack(box_terms) / (4.0 * norm)
    return cls, reg


def local_attention_map(cls_maps: Sequence[Tensor], num_classes: int, size: Sequence[int]) -> Tensor:
    """OXnet's local attention A (dossier a.7 steps 1–3): per (image, class), the anchor-max probability map of
    the pyramid level with the highest peak (ties -> the finest level), bilinearly resized to ``size``.

    Args:
        cls_maps: per level (B, A·K, H_l, W_l) classification logits (MONAI head layout, channel = a·K + k).
    Returns:
        (B, K, *size) probabilities in (0, 1). Gradients flow into the selected level only.
    """
    probs = []
    for logits in cls_maps:
        b, ak, h, w = logits.shape
        probs.append(torch.sigmoid(logits.float()).view(b, ak // num_classes, num_classes, h, w).amax(dim=1))
    # The level is chosen on the *unresized* peaks (resizing can lower a one-pixel peak); argmax returns the
    # first maximum, so ties go to the finest level as in the reference.
    level = torch.stack([p.detach().amax(dim=(-2, -1)) for p in probs]).argmax(dim=0)  # (B, K)
    resized = torch.stack([F.interpolate(p, size=tuple(size), mode="bilinear", align_corners=True) for p in probs])
    index = level[None, :, :, None, None].expand(1, *resized.shape[1:])
    return resized.gather(0, index).squeeze(0)


class LastLevelP6(LastLevelP6P7):
    """MONAI ``LastLevelP6P7`` without P7, for pyramids that end at P6: P6 = 3x3 stride-2 conv of C5.

    Built as ``LastLevelP6P7`` and then stripped of ``p7`` so that, under the same seed, P6 and every module
    created after it get the same initial weights as before P7 was dropped (the P7 conv's initialisation still
    draws its random numbers); the state-dict keys of P6 are unchanged (``fpn.extra_blocks.p6.*``)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int) -> None:
        super().__init__(spatial_dims, in_channels, out_channels)
        del self.p7

    def forward(self, results: list[Tensor], x: list[Tensor], names: list[str]) -> tuple[list[Tensor], list[str]]:
        results.append(self.p6(results[-1] if self.use_P5 else x[-1]))
        names.append("p6")
        return results, names


def _flatten(maps: Sequence[Tensor], width: int) -> Tensor:
    """Per-level (B, A·width, H, W) -> (B, Σ H·W·A, width), anchor order level -> y -> x -> anchor."""
    flat = []
    for m in maps:
        b, _, h, w = m.shape
        flat.append(m.view(b, -1, width, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, width))
    return torch.cat(flat, dim=1)


class RetinaNet(nn.Module):
    """RetinaNet: timm backbone -> MONAI FPN (levels ``fpn_levels``) -> MONAI classification/regression heads.

    Args:
        num_classes: K foreground classes (sigmoid, no background class).
        backbone: timm model name; it must expose reductions 2^l at ``features_only`` index l − 1 (ResNets,
            DenseNets, ... do). ``pretrained``/``weights_file``: see :func:`networks.backbones.create_backbone`.
        in_chans: image channels (1 for X-rays).
        fpn_levels: contiguous pyramid levels, min in 2..5, max in 5..7. Default P2–P7 (reference). P2 carries
            most of the head cost (stride 4); drop it for speed when objects are large.
        fpn_channels: FPN and head width (256 in the reference; a multiple of 8 for the heads' GroupNorm).
        head_depth: 3x3 conv + GroupNorm + ReLU blocks per head (4 in the reference).
        anchor_size_factor: base anchor size at level l is ``anchor_size_factor * 2**l`` (4 -> 16..512).
        anchor_ratios: height/width ratios. anchor_scales: multipliers of the base size.
        box_weights: BoxCoder weights, 1/std = (10, 10, 5, 5).
        prior_probability: initial foreground probability of every anchor.
        detection: the :class:`DetectionSettings` of :meth:`detection_losses` and :meth:`postprocess`.

    ``forward(x)`` returns a dict: ``features`` (backbone maps C_min..C5), ``cls_maps`` / ``box_maps`` (per level,
    MONAI layout (B, A·K, H_l, W_l) / (B, A·4, H_l, W_l)), and the flattened ``cls_logits`` (B, N, K) and
    ``box_deltas`` (B, N, 4) in the anchor order of :meth:`anchors`.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet50",
        in_chans: int = 1,
        pretrained: bool = False,
        weights_file: str | None = None,
        fpn_levels: Sequence[int] = (2, 3, 4, 5, 6, 7),
        fpn_channels: int = 256,
        head_depth: int = 4,
        anchor_size_factor: float = 4.0,
        anchor_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        anchor_scales: Sequence[float] = (1.0, 2 ** (1 / 3), 2 ** (2 / 3)),
        box_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
        prior_probability: float = 0.01,
        detection: DetectionSettings = DetectionSettings(),
    ) -> None:
        super().__init__()
        levels = [int(level) for level in fpn_levels]
        if levels != list(range(levels[0], levels[-1] + 1)) or not (2 <= levels[0] <= 5 <= levels[-1] <= 7):
            raise ValueError(f"fpn_levels must be contiguous, starting in 2..5 and ending in 5..7; got {fpn_levels}")
        if not 1 <= head_depth <= 4:
            raise ValueError(f"head_depth must be in 1..4, got {head_depth}")
        self.num_classes = num_classes
        self.detection = detection
        self.levels = tuple(levels)
        self.strides = tuple(2**level for level in levels)
        backbone_levels = list(range(levels[0], 6))
        self.backbone = create_backbone(backbone, pretrained=pretrained, weights_file=weights_file, in_chans=in_chans,
                                        features_only=True, out_indices=[level - 1 for level in backbone_levels])
        reductions = self.backbone.feature_info.reduction()
        if list(reductions) != [2**level for level in backbone_levels]:
            raise ValueError(f"backbone {backbone!r} gives reductions {reductions} at out_indices "
                             f"{[level - 1 for level in backbone_levels]}, expected {[2**l for l in backbone_levels]}")
        self.feature_channels = tuple(self.backbone.feature_info.channels())
        # Only the pyramid levels the heads use get parameters: an unused P7 conv gets no gradient, which plain
        # DDP refuses at step 2 ("parameters that were not used in producing the loss").
        extra = {5: None, 6: LastLevelP6, 7: LastLevelP6P7}[levels[-1]]
        extra = extra(2, self.feature_channels[-1], fpn_channels) if extra is not None else None
        self.fpn = FeaturePyramidNetwork(2, list(self.feature_channels), fpn_channels, extra_blocks=extra)

        self.anchor_generator = ExactAnchorGenerator(
            sizes=[[anchor_size_factor * 2**level * s for s in anchor_scales] for level in levels],
            aspect_ratios=[list(anchor_ratios)] * len(levels),
            indexing="xy",  # (x = column, y = row): see the module docstring
        )
        self.num_anchors = len(anchor_ratios) * len(anchor_scales)
        self.box_coder = BoxCoder(weights=tuple(box_weights))
        self.cls_head = RetinaNetClassificationHead(fpn_channels, self.num_anchors, num_classes, 2, prior_probability)
        self.box_head = RetinaNetRegressionHead(fpn_channels, self.num_anchors, 2)
        for head, out in ((self.cls_head, self.cls_head.cls_logits), (self.box_head, self.box_head.bbox_reg)):
            head.conv = head.conv[: 3 * head_depth]
            nn.init.zeros_(out.weight)  # reference init: every anchor starts at the prior and decodes to itself
        self._anchor_cache: dict[tuple, Tensor] = {}

    # ------------------------------------------------------------------------------------------ forward
    def forward_features(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Backbone maps (C_min..C5) and pyramid maps (P_min..P_max)."""
        feats = self.backbone(x)
        pyramid = list(self.fpn(OrderedDict((f"c{i}", f) for i, f in enumerate(feats))).values())
        return feats, pyramid[: len(self.levels)]

    def forward(self, x: Tensor) -> dict:
        feats, pyramid = self.forward_features(x)
        # The MONAI heads' own forward checks every level for NaN/Inf (a host sync per level) and raises a bare
        # ValueError; calling their layers directly lets a non-finite value reach the loss, where the module's
        # check_finite names the loss term and the step.
        cls_maps = [self.cls_head.cls_logits(self.cls_head.conv(p)) for p in pyramid]
        box_maps = [self.box_head.bbox_reg(self.box_head.conv(p)) for p in pyramid]
        return {"features": feats, "cls_maps": cls_maps, "box_maps": box_maps,
                "cls_logits": _flatten(cls_maps, self.num_classes), "box_deltas": _flatten(box_maps, 4)}

    def attention_maps(self, x: Tensor) -> Tensor:
        """(B, K, h, w) in [0, 1] at stride 32: OXnet's level-selected anchor-max probability map."""
        out = self(x)
        return local_attention_map(out["cls_maps"], self.num_classes, out["features"][-1].shape[-2:])

    # ------------------------------------------------------------------------------------------ anchors
    def anchors(self, image_hw: Sequence[int], cls_maps: Sequence[Tensor]) -> Tensor:
        """(N, 4) float32 ``xyxy`` anchors for an (H, W) input, centres at ((x + 0.5)·s, (y + 0.5)·s), stride s = 2^l
        whatever the input size (MONAI derives strides from H // H_l, which is wrong for sizes not divisible by 2^7)."""
        grids = [tuple(m.shape[-2:]) for m in cls_maps]
        device = cls_maps[0].device
        key = (tuple(image_hw), tuple(grids), str(device))
        if key not in self._anchor_cache:
            self.anchor_generator.set_cell_anchors(torch.float32, device)
            strides = [[torch.tensor(s, device=device), torch.tensor(s, device=device)] for s in self.strides]
            self._anchor_cache[key] = torch.cat(self.anchor_generator.grid_anchors([list(g) for g in grids], strides))
        return self._anchor_cache[key]

    def decode(self, box_deltas: Tensor, anchors: Tensor, image_hw: Sequence[int]) -> Tensor:
        """(..., N, 4) deltas -> clipped ``xyxy`` boxes (float32)."""
        shape = box_deltas.shape
        flat = box_deltas.reshape(-1, 4).float()
        ref = anchors.expand(*shape[:-2], *anchors.shape).reshape(-1, 4)
        return clip_boxes(self.box_coder.decode_single(flat, ref), image_hw).reshape(shape)

    # ----------------------------------------------------------------------------------- loss, postprocess
    def detection_losses(self, cls_logits: Tensor, box_deltas: Tensor, anchors: Tensor, boxes: Sequence[Tensor],
                         labels: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """:func:`detection_losses` (per image) with this network's box coder and :attr:`detection` settings."""
        return detection_losses(cls_logits, box_deltas, anchors, boxes, labels, self.box_coder, self.detection)

    @torch.no_grad()
    def postprocess(self, out: dict, image_hw: Sequence[int]) -> list[dict]:
        """Detections per image (dossier a.12; :attr:`detection` settings): score = max over classes > ``score_thresh``,
        the top ``topk_per_level`` per level, decode + clip, class-agnostic MONAI NMS at ``nms_thresh``, at most
        ``max_detections``. Returns dicts with ``boxes`` (M, 4), ``scores`` (M,), ``labels`` (M,)."""
        settings = self.detection
        anchors = self.anchors(image_hw, out["cls_maps"])
        sizes = [m.shape[-2] * m.shape[-1] * self.num_anchors for m in out["cls_maps"]]
        results = []
        for logits, deltas in zip(out["cls_logits"], out["box_deltas"]):
            scores, labels = torch.sigmoid(logits.float()).max(dim=1)
            keep = []
            for idx in torch.arange(scores.numel(), device=scores.device).split(sizes):
                level_scores = scores[idx]
                top = level_scores.topk(min(settings.topk_per_level, idx.numel())).indices
                top = top[level_scores[top] > settings.score_thresh]
                keep.append(idx[top])
            keep = torch.cat(keep)
            boxes = self.decode(deltas[keep], anchors[keep], image_hw)
            picked = non_max_suppression(boxes, scores[keep], settings.nms_thresh,
                                         max_proposals=settings.max_detections)
            picked = torch.as_tensor(picked, dtype=torch.long, device=boxes.device)
            results.append({"boxes": boxes[picked], "scores": scores[keep][picked], "labels": labels[keep][picked]})
        return results


if __name__ == "__main__":  # pragma: no cover
    import doctest

    doctest.testmod()
