"""Run one ``medattn`` experiment in-process (fit, then test on the final weights) and return its numbers.

Shared by :mod:`experiments.magsd.crossval` and :mod:`experiments.magsd.acceptance`; alone,
``python -m experiments.magsd.runner -c <config> [overrides]`` prints the numbers of one run as JSON. The
arguments are exactly those of ``medattn fit`` (``-c file.yaml``, ``--data.init_args.fold 2`` ...), so every
run is also reproducible from the command line, and each run logs to its own run directory like any other
``medattn`` run.

Test uses the weights at the end of training (not the best validation checkpoint): the validation splits
here are small, and selecting on them would add noise and an optimistic bias.

Every arm is scored by the same code: :func:`prediction_metrics` recomputes accuracy and macro precision, recall,
specificity and F1 from the run's ``test_predictions.csv`` (written by every classification module). A metric
the module did not log (the ResNet-50 baseline logs only AUROC and accuracy) is filled in from it; one it did log
must agree with it, or the run stops with an error naming both values.
"""

from __future__ import annotations

import math
import os
import time
from typing import Sequence

import numpy as np
import pandas as pd


def run_experiment(args: Sequence[str]) -> dict:
    """``medattn fit <args>`` then ``test``; returns split sizes, fit time, steps and every ``test/*`` metric."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from experiments.cli import MedAttnCLI

    cli = MedAttnCLI(args=list(args), run=False)
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    fit_seconds = time.perf_counter() - start
    tested_at = time.time()
    metrics = trainer.test(model, datamodule=data, verbose=False)[0]
    out = {f"n_{name}": int(len(index)) for name, index in getattr(data, "splits", {}).items()}
    out.update(fit_seconds=round(fit_seconds, 1), epochs=int(trainer.current_epoch), steps=int(trainer.global_step),
               run_dir=str(getattr(trainer, "log_dir", "")))
    out.update({key: float(value) for key, value in metrics.items()})
    predictions = os.path.join(trainer.log_dir or trainer.default_root_dir, "test_predictions.csv")
    if os.path.exists(predictions) and os.path.getmtime(predictions) >= tested_at - 1:  # this run's, not a stale one
        for key, value in prediction_metrics(pd.read_csv(predictions)).items():
            if key in out and not math.isclose(out[key], value, rel_tol=1e-5, abs_tol=1e-5):
                raise RuntimeError(f"{key}: the module logged {out[key]:.6f} but {predictions} gives {value:.6f}")
            out.setdefault(key, value)
    return out


def prediction_metrics(frame: pd.DataFrame) -> dict[str, float]:
    """``test/{accuracy, precision, recall, specificity, f1}`` (micro accuracy, macro rest, torchmetrics, as
    ``lightning_modules.magsd.classification_metrics``) of a single-label ``test_predictions.csv``
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


def summary_table(rows: list[dict], key: str, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per run plus ``mean`` and ``std`` rows (NaN-aware) over the numeric columns."""
    frame = pd.DataFrame(rows)
    if columns is not None:
        frame = frame[[key] + [c for c in columns if c in frame.columns]]
    numeric = frame.drop(columns=[key]).apply(pd.to_numeric, errors="coerce")
    stats = pd.DataFrame([numeric.mean(skipna=True), numeric.std(skipna=True, ddof=1)])
    stats.insert(0, key, ["mean", "std"])
    return pd.concat([frame.astype({key: str}), stats], ignore_index=True)


def to_markdown(frame: pd.DataFrame, digits: int = 3) -> str:
    """A GitHub markdown table (no ``tabulate`` dependency)."""

    def cell(value) -> str:
        if isinstance(value, (float, np.floating)):
            if math.isnan(value):
                return "nan"
            return f"{value:.{digits}f}".rstrip("0").rstrip(".")  # 23.000 -> 23, 0.280 -> 0.28
        return str(value)

    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


if __name__ == "__main__":  # python -m experiments.magsd.runner -c experiments/magsd/covid_cxr.yaml [overrides]
    import json
    import sys

    print(json.dumps(run_experiment(sys.argv[1:]), indent=2))
