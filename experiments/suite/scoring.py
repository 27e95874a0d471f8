"""One scorer for every single-label arm: the classification metrics recomputed from a run's ``test_predictions.csv``.

A metric the module did not log (the ResNet-50 baseline logs only AUROC and accuracy) is filled in from the file;
one it did log must agree with it, or the run stops with an error naming both values."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd


def prediction_metrics(frame: pd.DataFrame) -> dict[str, float]:
    """``test/{accuracy, precision, recall, specificity, f1}`` (micro accuracy, macro rest, torchmetrics, as
    ``lightning_modules.magsd.magsd_metrics``) of a single-label ``test_predictions.csv``
    (``label/<class>`` one-hot, ``score/<class>``); images without a label are left out. ``{}`` if multilabel."""
    import torch
    from torchmetrics.functional.classification import (multiclass_accuracy, multiclass_f1_score,
                                                        multiclass_precision, multiclass_recall,
                                                        multiclass_specificity)

    labels = frame.filter(like="label/").to_numpy(dtype=float)
    scores = torch.as_tensor(frame.filter(like="score/").to_numpy(dtype=float))
    known = (labels >= 0).all(axis=1)  # a multiclass image without a label is a row of -1 (IGNORE)
    if labels.shape[1] < 2 or not known.any() or (labels[known].sum(axis=1) != 1).any():
        return {}  # multilabel (or no labelled image): these single-label metrics do not apply
    target, preds, k = torch.as_tensor(labels[known].argmax(axis=1)), scores[known].argmax(dim=1), labels.shape[1]
    macro = {"precision": multiclass_precision, "recall": multiclass_recall, "specificity": multiclass_specificity,
             "f1": multiclass_f1_score}
    out = {"test/accuracy": multiclass_accuracy(preds, target, k, average="micro")}
    out.update({f"test/{name}": fn(preds, target, k, average="macro") for name, fn in macro.items()})
    return {key: float(value) for key, value in out.items()}


def scored_predictions(path: Path, logged: dict[str, float], since: float) -> dict[str, float]:
    """The metrics of ``path`` the module did not log; ``{}`` when the file is absent or older than ``since`` (a
    stale file of an earlier run). Raises when a logged value disagrees with the file."""
    if not path.is_file() or path.stat().st_mtime < since - 1:
        return {}
    missing = {}
    for key, value in prediction_metrics(pd.read_csv(path)).items():
        if key in logged and not math.isclose(logged[key], value, rel_tol=1e-5, abs_tol=1e-5):
            raise RuntimeError(f"{key}: the module logged {logged[key]:.6f} but {path} gives {value:.6f}")
        if key not in logged:
            missing[key] = value
    return missing
