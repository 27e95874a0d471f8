"""Multilabel AUROC with label masks (CheXpert U-Ignore, unlabeled entries) and honest macro averaging."""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torchmetrics.classification import MultilabelAUROC
from torchmetrics.utilities.data import dim_zero_cat

__all__ = ["MaskedMultilabelAUROC"]


class MaskedMultilabelAUROC(MultilabelAUROC):
    """``MultilabelAUROC`` (exact, synchronised under DDP) that takes a ``label_mask`` and returns a dict.

    ``update(preds (B, K) logits or probabilities, target (B, K), label_mask (B, K) bool or None)``: masked
    entries are ignored (set to ``ignore_index``). ``compute()`` gives ``{"auroc": macro, "auroc/<class>":
    ...}``. Choice: a class whose evaluated entries lack positives or negatives has no AUROC; it is
    omitted and left out of the macro mean (torchmetrics alone would score it 0 and pull the mean down).
    """

    def __init__(self, num_labels: int, class_names: Sequence[str] | None = None, **kwargs) -> None:
        kwargs.setdefault("ignore_index", -1)
        super().__init__(num_labels=num_labels, average="none", **kwargs)
        self.class_names = list(class_names) if class_names is not None else [str(k) for k in range(num_labels)]
        if len(self.class_names) != num_labels:
            raise ValueError(f"{len(self.class_names)} class names for {num_labels} labels")

    def update(self, preds: torch.Tensor, target: torch.Tensor, label_mask: torch.Tensor | None = None) -> None:  # type: ignore[override]
        target = target.long()
        if label_mask is not None:
            target = target.masked_fill(~label_mask.bool(), self.ignore_index)
        super().update(preds.detach().float(), target)

    def compute(self) -> dict[str, torch.Tensor]:  # type: ignore[override]
        target = dim_zero_cat(self.target)
        valid = target != self.ignore_index
        defined = ((target == 1) & valid).any(0) & ((target == 0) & valid).any(0)
        nan = torch.tensor(float("nan"), device=target.device)
        if not bool(defined.any()):
            return {"auroc": nan}
        with warnings.catch_warnings():  # classes without positives are handled above
            warnings.filterwarnings("ignore", message=".*samples in targets.*")
            per_class = super().compute()
        out = {f"auroc/{n}": per_class[k] for k, n in enumerate(self.class_names) if defined[k]}
        out["auroc"] = per_class[defined].mean()
        return out
