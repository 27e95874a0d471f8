"""AUROC with the project's single macro-averaging policy, for multilabel (with label masks) and multiclass data.

**Policy (every method uses it):** a class's AUROC is *defined* when the evaluated set holds at least one
positive and at least one negative for that class (multilabel: among its known entries, ``label_mask``;
multiclass: one-vs-rest among the labelled images). The macro AUROC is the unweighted mean over the defined
classes only; ``auroc_classes`` says how many entered it. An undefined class is reported as NaN (modules leave
it out of the logs), never as 0 (torchmetrics' choice, which pulls the mean down) and never weighted by support.
With no defined class the macro AUROC is NaN. The same rule is applied inside every bootstrap resample
(:mod:`lightning_modules.metrics.bootstrap`).
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torchmetrics.classification import MulticlassAUROC, MultilabelAUROC
from torchmetrics.utilities.data import dim_zero_cat

__all__ = ["MaskedMultilabelAUROC", "DefinedMulticlassAUROC", "defined_classes", "macro_over_defined"]


def defined_classes(target: torch.Tensor, ignore_index: int = -1) -> torch.Tensor:
    """(K,) bool from (N, K) 0/1 targets (``ignore_index`` = unknown): the class has a positive and a negative."""
    valid = target != ignore_index
    return ((target == 1) & valid).any(0) & ((target == 0) & valid).any(0)


def macro_over_defined(per_class: torch.Tensor, defined: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(macro, count)``: mean of ``per_class`` over ``defined`` (NaN if none) and how many classes entered it."""
    count = defined.sum()
    macro = per_class[defined].float().mean() if bool(count > 0) else torch.tensor(float("nan"), device=per_class.device)
    return macro, count.float()


def _policy_output(per_class: torch.Tensor, defined: torch.Tensor, class_names: Sequence[str],
                   key: str) -> dict[str, torch.Tensor]:
    per_class = torch.where(defined, per_class.float(), torch.full_like(per_class.float(), float("nan")))
    macro, count = macro_over_defined(per_class, defined)
    out = {f"{key}/{n}": per_class[k] for k, n in enumerate(class_names)}
    out["auroc"], out["auroc_classes"] = macro, count
    return out


def _no_samples(state) -> bool:
    """A torchmetrics list state with nothing in it. Under DDP the synced state is one concatenated tensor, whose
    truth value is ambiguous, so test its size rather than ``not state``."""
    return state.numel() == 0 if torch.is_tensor(state) else len(state) == 0


class _NamedAUROC:
    def _names(self, num: int, class_names: Sequence[str] | None) -> list[str]:
        names = list(class_names) if class_names is not None else [str(k) for k in range(num)]
        if len(names) != num:
            raise ValueError(f"{len(names)} class names for {num} classes")
        return names


class MaskedMultilabelAUROC(_NamedAUROC, MultilabelAUROC):
    """``MultilabelAUROC`` (exact, synchronised under DDP) that takes a ``label_mask`` and returns a dict.

    ``update(preds (B, K) logits or probabilities, target (B, K), label_mask (B, K) bool or None)``: masked
    entries are ignored. ``compute()`` gives ``{"auroc": macro, "auroc_classes": n, "<key>/<class>": ...}``
    under the module policy (undefined classes NaN, left out of the mean). ``per_class_key`` names the
    per-class entries (``"auroc"`` by default).
    """

    def __init__(self, num_labels: int, class_names: Sequence[str] | None = None, per_class_key: str = "auroc",
                 **kwargs) -> None:
        kwargs.setdefault("ignore_index", -1)
        super().__init__(num_labels=num_labels, average="none", **kwargs)
        self.class_names = self._names(num_labels, class_names)
        self.per_class_key = per_class_key

    def update(self, preds: torch.Tensor, target: torch.Tensor, label_mask: torch.Tensor | None = None) -> None:  # type: ignore[override]
        target = target.long()
        if label_mask is not None:
            target = target.masked_fill(~label_mask.bool(), self.ignore_index)
        super().update(preds.detach().float(), target)

    def compute(self) -> dict[str, torch.Tensor]:  # type: ignore[override]
        if _no_samples(self.target):
            return {"auroc": torch.tensor(float("nan")), "auroc_classes": torch.tensor(0.0)}
        defined = defined_classes(dim_zero_cat(self.target), self.ignore_index)
        if not bool(defined.any()):
            per_class = torch.full((self.num_labels,), float("nan"))
        else:
            with warnings.catch_warnings():  # undefined classes are handled by the policy
                warnings.filterwarnings("ignore", message=".*samples in targets.*")
                per_class = super().compute()
        return _policy_output(per_class, defined.to(per_class.device), self.class_names, self.per_class_key)


class DefinedMulticlassAUROC(_NamedAUROC, MulticlassAUROC):
    """One-vs-rest ``MulticlassAUROC`` (exact, synchronised under DDP) under the module policy.

    ``update(probabilities (B, K), target (B,) class index, -1 = unknown)``. ``compute()`` gives
    ``{"auroc": macro, "auroc_classes": n, "<per_class_key>/<class>": ...}``; a class that is absent from the
    targets (no positive) or is every target (no negative) is NaN and left out of the mean.
    """

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None, per_class_key: str = "auroc",
                 **kwargs) -> None:
        kwargs.setdefault("ignore_index", -1)
        super().__init__(num_classes=num_classes, average=None, **kwargs)
        self.class_names = self._names(num_classes, class_names)
        self.per_class_key = per_class_key

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:  # type: ignore[override]
        super().update(preds.detach().float(), target.long())

    def compute(self) -> dict[str, torch.Tensor]:  # type: ignore[override]
        if _no_samples(self.target):
            return {"auroc": torch.tensor(float("nan")), "auroc_classes": torch.tensor(0.0)}
        target = dim_zero_cat(self.target)
        target = target[target != self.ignore_index]
        one_hot = torch.nn.functional.one_hot(target.long(), self.num_classes)
        defined = defined_classes(one_hot)
        if not bool(defined.any()):
            per_class = torch.full((self.num_classes,), float("nan"))
        else:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*samples in targets.*")
                per_class = super().compute()
        return _policy_output(per_class, defined.to(per_class.device), self.class_names, self.per_class_key)
