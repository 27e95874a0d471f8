"""DC-MT metrics: per-slice mask localisation rates (TIoU/TIoR) and subject-level one-vs-rest scores.

Dossier ``../shared/research/method-dcmt.md`` §c. Both are torchmetrics ``Metric`` s whose states are sums
(or torchmetrics' own exact states), so they synchronise exactly under DDP.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassF1Score, MulticlassStatScores

from lightning_modules.metrics.auroc import DefinedMulticlassAUROC

TIOU_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
TIOR_THRESHOLDS = (0.1, 0.25, 0.5, 0.75, 0.9)

__all__ = ["MaskLocalizationRate", "SliceMetrics", "SubjectMetrics", "TIOU_THRESHOLDS", "TIOR_THRESHOLDS"]


class MaskLocalizationRate(Metric):
    """TIoU@t and TIoR@t **per slice**: the fraction of slices of class k whose binarised attention map P
    has IoU = |P∩C|/|P∪C| ≥ t (resp. IoR = |P∩C|/|P| ≥ t) with the target mask C.

    The reference computed one IoU over the whole validation batch and counted each class once per batch
    (dossier e.7); here every slice is one unit. Slices whose target mask is empty are skipped (nothing to
    localise); an empty prediction has IoU = IoR = 0. ``compute()`` returns ``tiou`` (K, T1) and ``tior``
    (K, T2) rates, NaN for a class without slices.
    """

    full_state_update = False

    def __init__(self, num_classes: int, tiou_thresholds: Sequence[float] = TIOU_THRESHOLDS,
                 tior_thresholds: Sequence[float] = TIOR_THRESHOLDS, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.register_buffer("tiou_t", torch.tensor(list(tiou_thresholds)), persistent=False)
        self.register_buffer("tior_t", torch.tensor(list(tior_thresholds)), persistent=False)
        self.add_state("iou_hits", torch.zeros(num_classes, len(tiou_thresholds)), dist_reduce_fx="sum")
        self.add_state("ior_hits", torch.zeros(num_classes, len(tior_thresholds)), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(num_classes), dist_reduce_fx="sum")

    def update(self, prediction: torch.Tensor, target: torch.Tensor, classes: torch.Tensor) -> None:
        """``prediction``, ``target``: bool (N, H, W) (or (N, 1, H, W)); ``classes``: long (N,)."""
        p, c = prediction.flatten(1).bool(), target.flatten(1).bool()
        keep = c.any(1)
        p, c, classes = p[keep], c[keep], classes[keep].long()
        inter = (p & c).sum(1).float()
        iou = inter / (p | c).sum(1).clamp_min(1).float()
        ior = inter / p.sum(1).clamp_min(1).float()
        self.iou_hits.index_add_(0, classes, (iou[:, None] >= self.tiou_t.to(iou)).float())
        self.ior_hits.index_add_(0, classes, (ior[:, None] >= self.tior_t.to(ior)).float())
        self.count.index_add_(0, classes, torch.ones_like(iou))

    def compute(self) -> dict[str, torch.Tensor]:
        n = self.count[:, None]
        nan = torch.full_like(n, float("nan"))
        return {"tiou": torch.where(n > 0, self.iou_hits / n.clamp_min(1), nan),
                "tior": torch.where(n > 0, self.ior_hits / n.clamp_min(1), nan)}


def _keys(values: dict[str, torch.Tensor], prefix: str, suffix: str) -> dict[str, torch.Tensor]:
    """``auroc/grade_0`` -> ``val/auroc_teacher/grade_0``: the suffix names the metric, not the class."""
    out = {}
    for key, value in values.items():
        name, sep, rest = key.partition("/")
        out[f"{prefix}{name}{suffix}{sep}{rest}"] = value
    return out


def _names(num_classes: int, class_names: Sequence[str] | None) -> list[str]:
    names = list(class_names) if class_names is not None else [f"class_{k}" for k in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    return names


def _nanmean(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return torch.nanmean(x) if dim is None else torch.nanmean(x, dim=dim)


def balanced_accuracy(stats: torch.Tensor) -> torch.Tensor:
    """Mean recall TP / (TP + FN) over the classes present in the targets, from ``MulticlassStatScores``
    (average=None) rows ``(tp, fp, tn, fn, support)``. A class that is only predicted, never a target, has no
    recall and is left out (sklearn's ``balanced_accuracy_score``, the reference): targets [0, 0, 1, 1],
    predictions [0, 2, 1, 1] give (1/2 + 2/2) / 2 = 0.75. NaN without any target."""
    tp, fn = stats[:, 0].float(), stats[:, 3].float()
    present = (tp + fn) > 0
    if not bool(present.any()):
        return torch.tensor(float("nan"), device=stats.device)
    return (tp[present] / (tp + fn)[present]).mean()


class SliceMetrics(nn.Module):
    """Slice-level metrics of one network in one stage: macro and per-class AUROC (the project policy: mean over
    classes with positives and negatives, ``auroc_classes`` of them; :mod:`lightning_modules.metrics.auroc`),
    balanced accuracy (:func:`balanced_accuracy`: classes absent from the targets are left out, as the reference),
    macro F1, and TIoU/TIoR at the dossier's thresholds (per class, class-mean per threshold, and the overall mean).
    ``suffix`` names the network when several are evaluated (``auroc_teacher/<class>``)."""

    def __init__(self, num_classes: int, tiou_thresholds: Sequence[float] = TIOU_THRESHOLDS,
                 tior_thresholds: Sequence[float] = TIOR_THRESHOLDS, *, class_names: Sequence[str] | None = None,
                 suffix: str = "") -> None:
        super().__init__()
        self.class_names = _names(num_classes, class_names)
        self.suffix = suffix
        self.classification = MetricCollection({
            "auroc": DefinedMulticlassAUROC(num_classes, self.class_names),
            "stats": MulticlassStatScores(num_classes, average=None),
            "f1": MulticlassF1Score(num_classes, average="macro"),
        })
        self.localization = MaskLocalizationRate(num_classes, tiou_thresholds, tior_thresholds)
        self.tiou_thresholds, self.tior_thresholds = list(tiou_thresholds), list(tior_thresholds)

    def compute(self) -> dict[str, torch.Tensor]:
        """Flat ``{f"{name}{suffix}[/<class>]": scalar}``."""
        class_names = self.class_names
        out: dict[str, torch.Tensor] = {}
        auroc = self.classification["auroc"].compute()
        out["auroc"], out["auroc_classes"] = auroc["auroc"], auroc["auroc_classes"]
        for name in class_names:
            out[f"auroc/{name}"] = auroc[f"auroc/{name}"]
        out["balanced_accuracy"] = balanced_accuracy(self.classification["stats"].compute())
        out["f1"] = self.classification["f1"].compute()
        loc = self.localization.compute()
        for key, thresholds in (("tiou", self.tiou_thresholds), ("tior", self.tior_thresholds)):
            rates = loc[key]
            for j, t in enumerate(thresholds):
                out[f"{key}@{t:g}"] = _nanmean(rates[:, j])
            out[f"m{key}"] = _nanmean(rates)
            for name, row in zip(class_names, rates):
                out[f"m{key}/{name}"] = _nanmean(row)
        return _keys(out, "", self.suffix)

    def reset(self) -> None:
        self.classification.reset()
        self.localization.reset()


class SubjectMetrics(nn.Module):
    """Subject-level one-vs-rest metrics (dossier c, ``valid.py``): AUROC, accuracy ((TP+TN)/N per class,
    the reference's subject "ACC"), sensitivity, specificity and F1, per class and macro (unweighted).

    A rate with an empty denominator is undefined (NaN), not 0, and left out of its macro mean: sensitivity of a
    class without positive subjects, specificity of a class without negatives, F1 of a class neither present nor
    predicted. AUROC follows the project policy (``auroc_classes`` = classes with positives and negatives).
    Keys read ``f"{prefix}{name}{suffix}[/<class>]"`` (``meanpool_auroc``, ``auroc_teacher/<class>``)."""

    def __init__(self, num_classes: int, *, class_names: Sequence[str] | None = None, prefix: str = "",
                 suffix: str = "") -> None:
        super().__init__()
        self.class_names = _names(num_classes, class_names)
        self.prefix, self.suffix = prefix, suffix
        self.auroc = DefinedMulticlassAUROC(num_classes, self.class_names)
        self.stats = MulticlassStatScores(num_classes, average=None)

    def update(self, probabilities: torch.Tensor, target: torch.Tensor) -> None:
        self.auroc.update(probabilities, target)
        self.stats.update(probabilities, target)

    def compute(self) -> dict[str, torch.Tensor]:
        class_names = self.class_names
        auroc = self.auroc.compute()
        tp, fp, tn, fn, _ = self.stats.compute().float().unbind(-1)

        def rate(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
            return torch.where(den > 0, num / den.clamp_min(1), torch.full_like(num, float("nan")))

        per_class = {
            "auroc": torch.stack([auroc[f"auroc/{name}"] for name in class_names]),
            "accuracy": rate(tp + tn, tp + fp + tn + fn),
            "sensitivity": rate(tp, tp + fn),
            "specificity": rate(tn, tn + fp),
            "f1": rate(2 * tp, 2 * tp + fp + fn),
        }
        out = {"auroc_classes": auroc["auroc_classes"]}
        for key, values in per_class.items():
            out[key] = auroc["auroc"] if key == "auroc" else _nanmean(values)
            for name, v in zip(class_names, values):
                out[f"{key}/{name}"] = v
        return _keys(out, self.prefix, self.suffix)

    def reset(self) -> None:
        self.auroc.reset()
        self.stats.reset()
