"""Test-time plots, called by ``ImageLogger.on_test_end`` (every run has one: the CLI adds it).

* Classification (a ``test_predictions.csv`` in the run directory, written by the module's ``TestPredictions``):
  ``test_roc.png`` (one-vs-rest ROC per class with its AUROC) and ``test_confusion.png``. Multi-class tasks (every
  row has exactly one positive label) get one K x K confusion matrix of argmax predictions; multi-label tasks one
  2 x 2 matrix per class at probability 0.5. Labels < 0 (uncertain/ignored) are left out per class. W&B receives
  its native ``roc_curve`` and ``confusion_matrix`` plots for multi-class tasks and the PNGs for both.
* Segmentation (``test/dice_<class>`` in the trainer's metrics): ``test_dice_per_class.csv`` and a W&B table.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pandas as pd
from lightning.pytorch.loggers import WandbLogger


def _wandb(trainer: pl.Trainer) -> list[WandbLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


def log_test_plots(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    run_dir = trainer.log_dir or trainer.default_root_dir  # a collective under DDP: every rank resolves it
    if not trainer.is_global_zero or not run_dir:
        return
    run_dir = Path(run_dir)
    names = list(getattr(pl_module, "class_names", None) or [])
    dice = {k.split("test/dice_", 1)[1]: float(v) for k, v in trainer.callback_metrics.items()
            if k.startswith("test/dice_") and getattr(v, "numel", lambda: 1)() == 1}
    if dice:
        table = pd.DataFrame({"class": list(dice), "dice": list(dice.values())})
        table.to_csv(run_dir / "test_dice_per_class.csv", index=False)
        for logger in _wandb(trainer):
            logger.log_table("test/dice_per_class", dataframe=table)
    predictions = run_dir / "test_predictions.csv"
    if predictions.is_file():
        classification_plots(pd.read_csv(predictions), run_dir, trainer)


def classification_plots(frame: pd.DataFrame, run_dir: Path, trainer: pl.Trainer | None = None) -> list[Path]:
    """Write ``test_roc.png`` and ``test_confusion.png`` from a ``test_predictions.csv`` frame; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from torchmetrics.functional.classification import (binary_auroc, binary_confusion_matrix, binary_roc,
                                                        multiclass_confusion_matrix)

    def t(a):
        return torch.as_tensor(np.asarray(a))

    names = [c.split("/", 1)[1] for c in frame.columns if c.startswith("label/")]
    labels = frame[[f"label/{n}" for n in names]].to_numpy(float)
    scores = frame[[f"score/{n}" for n in names]].to_numpy(float)
    known = (labels >= 0).all(1)
    multiclass = bool(known.any()) and bool((labels[known].sum(1) == 1).all()) and len(names) > 1
    fig, ax = plt.subplots(figsize=(5, 5))
    for k, name in enumerate(names):
        rows = labels[:, k] >= 0
        y = labels[rows, k] > 0.5
        if y.all() or not y.any():
            continue  # ROC undefined for this class in the test set
        fpr, tpr, _ = binary_roc(t(scores[rows, k]).float(), t(y).long())
        auroc = float(binary_auroc(t(scores[rows, k]).float(), t(y).long()))
        ax.plot(fpr.numpy(), tpr.numpy(), label=f"{name} (AUROC {auroc:.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="test ROC (one-vs-rest)")
    ax.legend(fontsize=7, loc="lower right")
    roc_path = run_dir / "test_roc.png"
    fig.savefig(roc_path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    if multiclass:
        truth, pred = labels[known].argmax(1), scores[known].argmax(1)
        matrix = multiclass_confusion_matrix(t(pred), t(truth), num_classes=len(names)).numpy()
        fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 1.2 * len(names) + 1.5))
        panels = [(ax, matrix, names)]
    else:
        fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names), 2.8), squeeze=False)
        panels = []
        for k, name in enumerate(names):
            rows = labels[:, k] >= 0
            m = binary_confusion_matrix(t(scores[rows, k]).float(), t(labels[rows, k] > 0.5).long()).numpy()
            panels.append((axes[0, k], m, ["neg", "pos"]))
            axes[0, k].set_title(name, fontsize=8)
    for axis, m, ticks in panels:
        axis.imshow(m, cmap="Blues")
        for (i, j), v in np.ndenumerate(m):
            axis.text(j, i, str(v), ha="center", va="center", color="red")
        axis.set_xticks(range(len(ticks)), ticks, fontsize=7)
        axis.set_yticks(range(len(ticks)), ticks, fontsize=7)
        axis.set_xlabel("predicted")
        axis.set_ylabel("true")
    confusion_path = run_dir / "test_confusion.png"
    fig.savefig(confusion_path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    for logger in _wandb(trainer) if trainer is not None else []:
        logger.log_image("test/plots", [str(roc_path), str(confusion_path)], caption=["ROC", "confusion matrix"])
        if multiclass:
            _native(logger, labels[known].argmax(1), scores[known], names)
    return [roc_path, confusion_path]


def _native(logger: WandbLogger, truth: np.ndarray, scores: np.ndarray, names: list[str]) -> None:
    """W&B's own interactive ROC and confusion-matrix charts (multi-class tasks)."""
    try:
        import wandb

        logger.experiment.log({"test/roc": wandb.plot.roc_curve(truth, scores, labels=names),
                               "test/confusion_matrix": wandb.plot.confusion_matrix(
                                   y_true=truth.tolist(), preds=scores.argmax(1).tolist(), class_names=names)})
    except Exception as err:  # noqa: BLE001 - a plot must never kill the end of a test run
        import warnings

        warnings.warn(f"W&B native test plots failed ({type(err).__name__}: {err}); the PNGs are in the run "
                      "directory", stacklevel=2)
