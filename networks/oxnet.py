"""OXnet: omni-supervised thoracic disease detection (boxes + image labels + unlabeled images).

L. Luo, H. Chen, Y. Zhou, H. Lin, P.-A. Heng, "OXnet: Deep Omni-supervised Thoracic Disease Detection from Chest
X-rays", MICCAI 2021 (arXiv:2104.03218). Maths and defaults from the dossier ``method-oxnet.md`` (a.7–a.10).

Pieces (all plain functions of tensors except :class:`OXnet`, so each is testable alone):

* :class:`OXnet`: a :class:`~networks.retina.RetinaNet` plus the **global attention head**, a 1x1 conv on ReLU(C5),
  no bias, zero-initialised (the reference's guard against exploding gradients), giving X (B, K, h5, w5).
* **Dual attention alignment** (DAA): local attention A_c (:func:`~networks.retina.local_attention_map`),
  R_c = A_c / Σ A_c, image logit s_c = Σ X_c ⊙ R_c (an R-weighted average of X; not detached, so the image label
  also trains the detection head), :func:`daa_loss` = BCE(s, y).
* **Category features** F_{b,c} = Σ_hw ReLU(C5)_b ⊙ R_{b,c} as a (B, K, D) tensor. The reference builds (B, D, K)
  and then *views* it as (B, K, D), which scrambles channels and classes; here the layout is (B, K, D) from the
  einsum itself, so no reshape can scramble it.
* **Global prototype alignment** (GPA): :func:`gpa_losses` (intra = MSE to the own prototype, inter = squared
  hinge ((δ − D)/δ)² max(δ − D, 0)² against the other prototypes, δ = 1). The prototypes themselves are updated by
  ``callbacks.prototype_momentum.PrototypeMomentum`` outside autograd.
* **Distillation**: :func:`pseudo_boxes` from the EMA teacher, :func:`soft_focal_loss` (α(q) = α₀ + (α₁ − α₀) q,
  per image) and the regression consistency, both in :func:`distillation_losses`.

Reference bugs that change results, and what is done here instead:
    * F_c scrambled by ``view`` -> built as (B, K, D) directly (above).
    * Pseudo-boxes gathered with post-NMS positions from the pre-NMS list -> :func:`pseudo_boxes` composes the NMS
      keep-index with the score mask, so box, score and class stay the same detection.
    * The soft-focal weight α(q) computed from the whole teacher batch and broadcast, mixing images -> computed
      element-wise from the image's own teacher probabilities.
    * Absent-class prototypes decaying (P ← 0.7 P) -> handled in the callback: absent classes keep their prototype.

Example:
    >>> from networks.retina import RetinaNet
    >>> net = OXnet(RetinaNet(num_classes=2, backbone="test_resnet", fpn_channels=16, head_depth=1))
    >>> out = net(torch.zeros(2, 1, 64, 64))
    >>> out["global_logits"].shape, out["category_features"].shape
    (torch.Size([2, 2]), torch.Size([2, 2, 96]))
    >>> round(float(out["attention"].detach().sum((-2, -1))[0, 0]), 4)  # R sums to 1 per image and class
    1.0
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from monai.data.box_utils import non_max_suppression
from torch import Tensor, nn

from networks.retina import (BETWEEN_THRESHOLDS, DetectionSettings, RetinaNet, encode_targets, local_attention_map,
                             match_anchors, smooth_l1)

__all__ = [
    "OXnet", "Distillation", "daa_loss", "class_feature_sums", "gpa_losses", "soft_focal_loss", "pseudo_boxes",
    "distillation_losses",
]


@dataclass(frozen=True)
class Distillation:
    """How the EMA teacher's pseudo-boxes are made and distilled (dossier a.10); the reference's values.

    Attributes:
        pseudo_score_thresh: teacher confidence for a pseudo-box on an image-labelled (or box) image;
            unlabeled_score_thresh: the same on an unlabeled image. pseudo_nms_thresh: their class-agnostic NMS IoU.
        sfl_alpha0, sfl_alpha1, sfl_gamma: the soft focal loss, α(q) = α₀ + (α₁ − α₀) q (:func:`soft_focal_loss`).
        distill_box_stream: box-stream images are distilled too (``False``: the reference, label and unlabeled
            streams only). Matching the pseudo-boxes to anchors uses the detector's own IoU thresholds and β
            (:class:`~networks.retina.DetectionSettings`).
    """

    pseudo_score_thresh: float = 0.5
    unlabeled_score_thresh: float = 0.5
    pseudo_nms_thresh: float = 0.5
    sfl_alpha0: float = 0.05
    sfl_alpha1: float = 0.95
    sfl_gamma: float = 2.0
    distill_box_stream: bool = True


class OXnet(nn.Module):
    """RetinaNet with OXnet's global attention head and dual-attention outputs.

    Args:
        retina: the detector (stage 1 weights are loaded into it; the global head is always fresh).

    ``forward(x)`` returns the RetinaNet dict plus ``global_map`` X (B, K, h5, w5), ``local_attention`` A
    (B, K, h5, w5) in (0, 1), ``attention`` R (sums to 1 per image and class), ``global_logits`` s (B, K) and
    ``category_features`` F (B, K, D) with D = C5 channels. :meth:`forward_detection` runs the detector alone
    (what the teacher needs).
    """

    def __init__(self, retina: RetinaNet) -> None:
        super().__init__()
        self.retina = retina
        self.num_classes = retina.num_classes
        self.feature_dim = retina.feature_channels[-1]
        self.global_head = nn.Conv2d(self.feature_dim, self.num_classes, kernel_size=1, bias=False)
        nn.init.zeros_(self.global_head.weight)  # s = 0 at init, so the DAA loss starts at ln 2 for any input

    def forward_detection(self, x: Tensor) -> dict:
        return self.retina(x)

    def forward(self, x: Tensor) -> dict:
        out = self.retina(x)
        c5 = F.relu(out["features"][-1])
        global_map = self.global_head(c5).float()
        local = local_attention_map(out["cls_maps"], self.num_classes, c5.shape[-2:])
        attention = local / local.sum(dim=(-2, -1), keepdim=True)  # > 0 everywhere: sigmoid probabilities
        out.update(
            global_map=global_map,
            local_attention=local,
            attention=attention,
            global_logits=(global_map * attention).sum(dim=(-2, -1)),
            category_features=torch.einsum("bdhw,bkhw->bkd", c5.float(), attention),
        )
        return out

    def attention_maps(self, x: Tensor) -> Tensor:
        """(B, K, h5, w5) in [0, 1]: the local attention A (level-selected anchor-max probabilities)."""
        return self.retina.attention_maps(x)


def daa_loss(global_logits: Tensor, labels: Tensor, label_mask: Tensor) -> Tensor:
    """Image-level BCE-with-logits over the known labels: Σ mask · BCE / (n_images_with_labels · K).

    With every label known this is the reference's mean over B x K; normalising by the number of *labelled
    images* (fixed per stream and rank) keeps the loss a per-image mean, so DDP gradient averaging equals a
    single process on the global batch. 0 when no image carries a label.
    """
    mask = label_mask.float()
    bce = F.binary_cross_entropy_with_logits(global_logits.float(), labels.float(), reduction="none")
    n_images = (mask.sum(dim=1) > 0).sum().clamp(min=1)
    return (bce * mask).sum() / (n_images * global_logits.shape[1])


def class_feature_sums(features: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Σ_b w_{b,c} F_{b,c} (K, D) and Σ_b w_{b,c} (K,), for batch means (w = y) or the prototype update (w = y·p)."""
    weights = weights.to(features.dtype)
    return torch.einsum("bk,bkd->kd", weights, features), weights.sum(dim=0)


def gpa_losses(class_mean: Tensor, present: Tensor, prototypes: Tensor, initialized: Tensor,
               margin: float = 1.0) -> tuple[Tensor, Tensor]:
    """Global prototype alignment (dossier a.9), with d(u, v) = mean over dims of (u − v)².

    Args:
        class_mean: (K, D) batch-mean category features F̄_c. present: (K,) classes carried by some image.
        prototypes: (K, D), used detached. initialized: (K,) prototypes that have been set.
    Returns:
        intra = mean over S = {present ∧ initialized} of d(F̄_c, P_c);
        inter = mean over T = {(c, c′): c present, c′ ≠ c initialized} of ((δ − D)/δ)² · max(δ − D, 0)²,
        D = √d(F̄_c, P_c′). Empty sets give 0.
    """
    prototypes = prototypes.detach().to(class_mean.dtype)
    own = (class_mean - prototypes).pow(2).mean(dim=-1)
    s = (present & initialized).to(class_mean.dtype)
    intra = (own * s).sum() / s.sum().clamp(min=1)
    dist = (class_mean[:, None, :] - prototypes[None, :, :]).pow(2).mean(dim=-1)
    d = (dist + 1e-12).sqrt()  # the epsilon keeps the gradient finite at D = 0 (where the hinge is flat anyway)
    gap = margin - d
    hinge = (gap / margin).pow(2) * gap.clamp(min=0).pow(2)
    k = class_mean.shape[0]
    t = (present[:, None] & initialized[None, :] & ~torch.eye(k, dtype=torch.bool, device=d.device)).to(d.dtype)
    inter = (hinge * t).sum() / t.sum().clamp(min=1)
    return intra, inter


def soft_focal_loss(student_logits: Tensor, teacher_probs: Tensor, alpha0: float = Distillation.sfl_alpha0,
                    alpha1: float = Distillation.sfl_alpha1, gamma: float = Distillation.sfl_gamma,
                    clamp: float = 1e-4) -> Tensor:
    """Element-wise soft focal loss α(q) |q − p|^γ BCE(p, q), α(q) = α₀ + (α₁ − α₀) q, with the teacher's q clamped
    to [clamp, 1 − clamp]. α comes from the same element's q (the reference broadcast a whole-batch α)."""
    q = teacher_probs.detach().float().clamp(clamp, 1.0 - clamp)
    logits = student_logits.float()
    alpha = alpha0 + (alpha1 - alpha0) * q
    bce = F.binary_cross_entropy_with_logits(logits, q, reduction="none")
    return alpha * (q - torch.sigmoid(logits)).abs().pow(gamma) * bce


@torch.no_grad()
def pseudo_boxes(teacher_probs: Tensor, teacher_deltas: Tensor, anchors: Tensor,
                 decode: Callable[[Tensor, Tensor], Tensor], score_thresh: float = Distillation.pseudo_score_thresh,
                 nms_thresh: float = Distillation.pseudo_nms_thresh, allowed_classes: Tensor | None = None,
                 max_candidates: int = 1000) -> dict:
    """The teacher's pseudo-boxes for one image (dossier a.10): class-agnostic NMS, score > ``score_thresh``,
    class = argmax, optionally only classes in ``allowed_classes`` (K,) bool (the image's labels).

    Candidates are filtered by ``score_thresh`` *before* NMS: greedy NMS decides a box's fate from higher-scored
    boxes only, so the survivors above the threshold are exactly those of the reference's "score > 0.01, NMS,
    then score > 0.5", without running NMS over thousands of low-score anchors. Boxes, scores and labels are
    indexed with the same composed index (the reference mixed post-NMS positions with the pre-NMS box list).
    At most ``max_candidates`` (the highest-scoring) enter NMS, which bounds MONAI's greedy NMS loop when an
    untrained teacher fires everywhere; the reference had no cap.
    """
    scores, labels = teacher_probs.float().max(dim=1)
    candidates = (scores > score_thresh).nonzero().squeeze(1)
    if candidates.numel() > max_candidates:
        candidates = candidates[scores[candidates].topk(max_candidates).indices]
    boxes = decode(teacher_deltas[candidates], anchors[candidates])
    keep = torch.as_tensor(non_max_suppression(boxes, scores[candidates], nms_thresh), dtype=torch.long,
                           device=boxes.device)
    boxes, scores, labels = boxes[keep], scores[candidates][keep], labels[candidates][keep]
    if allowed_classes is not None:
        ok = allowed_classes.to(labels.device)[labels]
        boxes, scores, labels = boxes[ok], scores[ok], labels[ok]
    return {"boxes": boxes, "scores": scores, "labels": labels}


def distillation_losses(student_logits: Tensor, student_deltas: Tensor, teacher_probs: Tensor, anchors: Tensor,
                        boxes: Tensor, box_coder, distillation: Distillation = Distillation(),
                        detection: DetectionSettings = DetectionSettings()) -> tuple[Tensor, Tensor]:
    """Soft focal loss (``distillation``'s α₀, α₁, γ) and regression consistency for one image against its
    pseudo-boxes, matched to the anchors with the detector's IoU thresholds and smooth-L1 β (``detection``).

    Anchors with IoU in [bg_iou, fg_iou) to the pseudo-boxes are ignored; every other anchor gets the soft target
    q (all classes). SFL is summed and divided by max(1, N_pos); the regression consistency is smooth-L1 between
    the student's deltas and the pseudo-boxes' encoding on positive anchors, / (4 · max(1, N_pos)). No pseudo-box:
    both are 0 (reference), returned connected to the graph so DDP sees every parameter used.
    """
    zero = student_logits.sum() * 0.0 + student_deltas.sum() * 0.0
    if boxes.numel() == 0:
        return zero, zero
    matched = match_anchors(anchors, boxes, detection.fg_iou, detection.bg_iou)
    valid = (matched != BETWEEN_THRESHOLDS).unsqueeze(1)
    pos = (matched >= 0).nonzero().squeeze(1)
    norm = max(1, pos.numel())
    d = distillation
    sfl = (soft_focal_loss(student_logits, teacher_probs, d.sfl_alpha0, d.sfl_alpha1, d.sfl_gamma) * valid).sum() / norm
    targets = encode_targets(box_coder, boxes[matched[pos]], anchors[pos])
    reg = smooth_l1(student_deltas[pos], targets, detection.smooth_l1_beta).sum() / (4.0 * norm)
    return sfl + zero, reg + zero

