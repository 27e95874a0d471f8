"""Per-class one-vs-rest sensitivity and specificity, keyed by class name (MAG-SD's binary COVID-19 report)."""

from __future__ import annotations

from typing import Sequence

import torch
from torchmetrics.classification import MulticlassStatScores

__all__ = ["OneVsRestRates"]


class OneVsRestRates(MulticlassStatScores):
    """``MulticlassStatScores`` (exact, synchronised under DDP) whose ``compute()`` gives, per class,
    ``sensitivity/<class>`` = TP/(TP+FN) and ``specificity/<class>`` = TN/(TN+FP): NaN when the class has no
    positive (resp. no negative) in the evaluated set, never 0."""

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None, **kwargs) -> None:
        super().__init__(num_classes, average=None, **kwargs)
        self.class_names = list(class_names) if class_names is not None else [str(k) for k in range(num_classes)]
        if len(self.class_names) != num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {num_classes} classes")

    def compute(self) -> dict[str, torch.Tensor]:  # type: ignore[override]
        tp, fp, tn, fn, _ = super().compute().float().unbind(-1)
        nan = torch.full_like(tp, float("nan"))
        sensitivity = torch.where(tp + fn > 0, tp / (tp + fn).clamp_min(1), nan)
        specificity = torch.where(tn + fp > 0, tn / (tn + fp).clamp_min(1), nan)
        out = {}
        for k, name in enumerate(self.class_names):
            out[f"sensitivity/{name}"], out[f"specificity/{name}"] = sensitivity[k], specificity[k]
        return out
