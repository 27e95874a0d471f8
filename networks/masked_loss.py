"""Classification losses over the known labels only, shared by the CAM baseline and both DC-MT stages.

Multilabel: binary cross-entropy over the entries whose ``label_mask`` is True, so CheXpert U-Ignore entries and
unlabeled images contribute nothing. Multiclass: cross-entropy over the images with a known one-hot label. Both
are exactly 0, with a gradient path, on a batch without a known label (a batch of the unlabeled stream).

Example (two entries known, BCE of logit 0 is ln 2 whatever the label; the masked entry does not count)::

    >>> import torch
    >>> masked_bce(torch.zeros(1, 3), torch.tensor([[1.0, 0.0, 1.0]]), torch.tensor([[True, True, False]]))
    tensor(0.6931)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["masked_bce", "masked_ce"]


def masked_bce(logits: torch.Tensor, labels: torch.Tensor, label_mask: torch.Tensor,
               pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean BCE over known entries; exactly 0 (with a gradient path) when nothing is known."""
    losses = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), pos_weight=pos_weight, reduction="none")
    mask = label_mask.float()
    return (losses * mask).sum() / mask.sum().clamp_min(1.0)


def masked_ce(logits: torch.Tensor, labels: torch.Tensor, label_mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over images with a known one-hot label; 0 when none is known."""
    known = label_mask.any(dim=1)
    if not bool(known.any()):
        return logits.float().sum() * 0.0
    return F.cross_entropy(logits[known].float(), labels[known].argmax(dim=1))
