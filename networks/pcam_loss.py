"""PCAM's training loss: per-task binary cross-entropy with a per-batch positive weight and a label mask.

W. Ye, J. Yao, H. Xue, Y. Li, "Weakly Supervised Lesion Localization With Probabilistic-CAM Pooling",
arXiv:2005.14480; reference code ``jfhealthcare/Chexpert`` (read, not copied; dossier
``../shared/research/method-pcam.md`` b, e.7, g.6). The network is :class:`networks.cam_heads.PoolingClassifier`
with ``pool="pcam"`` (:class:`networks.pooling.PCAMPool`); :class:`lightning_modules.pcam.PCAMModule` trains it
with this loss.

For task k, over the N_k batch entries whose label is known (``label_mask``; CheXpert U-Ignore and unlabeled
images never count), with P_k of them positive::

    pos_weight_k = (N_k − P_k) / P_k                                   (batch_weight=True)
    L_k = (1/N_k) Σ_i m_ik · BCEWithLogits(z_ik, y_ik; pos_weight_k)
    L   = Σ_k L_k   (task_reduction="sum", the reference)   or   (1/K) Σ_k L_k   ("mean")

A task with no positive in the batch contributes exactly 0 and no gradient (``no_positive="zero"``, the reference)
or plain BCE (``"unweighted"``); a task whose known entries are all positive gets pos_weight 0, so also 0.
``batch_weight=False`` uses the static ``pos_weight`` list (default 1).

Example (dossier g.6: one positive in four, logits 0 → pos_weight 3, L = (3 ln 2 + 3 ln 2)/4 = 1.5 ln 2):
    >>> import torch
    >>> total, per_task = pcam_bce(torch.zeros(4, 1), torch.tensor([[1.0], [0.0], [0.0], [0.0]]))
    >>> round(float(total), 6), per_task.shape
    (1.039721, torch.Size([1]))
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["pcam_bce"]


def pcam_bce(
    logits: torch.Tensor,
    labels: torch.Tensor,
    label_mask: torch.Tensor | None = None,
    batch_weight: bool = True,
    pos_weight: torch.Tensor | Sequence[float] | None = None,
    no_positive: str = "zero",
    task_reduction: str = "sum",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-task (masked) BCE with an optional per-batch positive weight (module docstring). Returns (total,
    per-task (K,), detached).

    Args:
        logits, labels: (B, K); labels in {0, 1}.
        label_mask: (B, K) bool, True where the label is known; None = all known.
        batch_weight: weight positives by (N_k − P_k) / P_k counted in this batch.
        pos_weight: static per-task weights when ``batch_weight=False`` (default 1).
        no_positive: ``"zero"`` or ``"unweighted"``, for a task without a positive in the batch.
        task_reduction: ``"sum"`` or ``"mean"`` over tasks.

    Oracle (dossier g.6): targets [1, 0, 0, 0], logits 0 → pos_weight 3, loss 1.5·ln 2 = 1.039721.
    """
    if no_positive not in ("zero", "unweighted"):
        raise ValueError(f"no_positive must be 'zero' or 'unweighted', got {no_positive!r}")
    if task_reduction not in ("sum", "mean"):
        raise ValueError(f"task_reduction must be 'sum' or 'mean', got {task_reduction!r}")
    logits, labels = logits.float(), labels.float()
    valid = torch.ones_like(labels) if label_mask is None else label_mask.float()
    n = valid.sum(0)
    positives = (labels * valid).sum(0)
    active = n > 0
    if batch_weight:
        pw = (n - positives) / positives.clamp_min(1)
        has_positive = positives > 0
        if no_positive == "zero":
            active = active & has_positive
        else:
            pw = torch.where(has_positive, pw, torch.ones_like(pw))
    elif pos_weight is not None:
        pw = torch.as_tensor(pos_weight, dtype=logits.dtype, device=logits.device).expand(labels.shape[1])
    else:
        pw = None
    raw = F.binary_cross_entropy_with_logits(logits, labels, pos_weight=pw, reduction="none")
    per_task = (raw * valid).sum(0) / n.clamp_min(1) * active  # inactive tasks: exactly 0, zero gradient
    total = per_task.sum() if task_reduction == "sum" else per_task.mean()
    return total, per_task.detach()
