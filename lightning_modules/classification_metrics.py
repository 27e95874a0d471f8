"""Per-stage classification metrics of the image classifiers: the metric collection, its targets (unknown
labels become ``IGNORE``), the scores it is fed, and the rows of ``test_predictions.csv``.

AUROC follows the project policy (:mod:`lightning_modules.metrics.auroc`): the macro mean over classes
with both positives and negatives in the evaluated set; ``<stage>/auroc_classes`` says how many entered it.

The masked losses that go with these targets are maths: :mod:`networks.masked_loss`.
"""

from __future__ import annotations

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from lightning_modules.metrics.auroc import DefinedMulticlassAUROC, MaskedMultilabelAUROC

IGNORE = -1


def classification_metrics(task: str, num_classes: int, class_names: list[str] | None = None) -> MetricCollection:
    """``auroc`` (policy macro), ``auroc_classes``, ``auroc_per_class/<class>`` (NaN if undefined), and accuracy
    for multiclass. ``IGNORE`` targets (unknown labels) are left out."""
    if task == "multilabel":
        return MetricCollection({"auroc": MaskedMultilabelAUROC(num_classes, class_names, per_class_key="auroc_per_class",
                                                                ignore_index=IGNORE)})
    return MetricCollection({
        "auroc": DefinedMulticlassAUROC(num_classes, class_names, per_class_key="auroc_per_class", ignore_index=IGNORE),
        "accuracy": MulticlassAccuracy(num_classes=num_classes, average="micro", ignore_index=IGNORE),
    })


def metric_targets(task: str, labels: torch.Tensor, label_mask: torch.Tensor) -> torch.Tensor:
    """Targets for :func:`classification_metrics`: unknown entries become ``IGNORE``."""
    if task == "multilabel":
        return torch.where(label_mask, labels.long(), torch.full_like(labels, IGNORE, dtype=torch.long))
    known = label_mask.any(dim=1)
    return torch.where(known, labels.argmax(dim=1), torch.full_like(known, IGNORE, dtype=torch.long))


def prediction_targets(task: str, labels: torch.Tensor, label_mask: torch.Tensor) -> torch.Tensor:
    """(B, K) per-class 0/1 targets, ``IGNORE`` where unknown (multiclass: one-vs-rest one-hot, a whole row
    ``IGNORE`` for an image without a label), for :class:`lightning_modules.metrics.bootstrap.TestPredictions`."""
    if task == "multilabel":
        return metric_targets(task, labels, label_mask)
    known = label_mask.any(dim=1, keepdim=True)
    return torch.where(known, labels.long(), torch.full_like(labels, IGNORE, dtype=torch.long))


def record_test_predictions(recorder, batch: dict, scores: torch.Tensor, targets: torch.Tensor) -> None:
    """Feed ``recorder`` (a ``TestPredictions``) with a batch; the patient id is the resampling unit of the
    bootstrap (``patient_id``, else ``subject_id``, else the image id when a dataset has no patient notion)."""
    ids = [str(i) for i in (batch.get("image_id") or batch["subject_id"])]  # subject batches: one row per subject
    patients = batch.get("patient_id") or batch.get("subject_id") or ids
    recorder.update(ids, patients, scores, targets)


def metric_scores(task: str, logits: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(logits.float()) if task == "multilabel" else torch.softmax(logits.float(), dim=1)
