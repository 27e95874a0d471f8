"""``SplitSummaryLogger``: the DataModule's split summary (images, patients, boxed images and positives per
split and supervision stream) as a W&B table and as ``split_summary.csv`` in the run directory."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import WandbLogger


class SplitSummaryLogger(pl.Callback):
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        summary = getattr(trainer.datamodule, "summary", None) if trainer.datamodule is not None else None
        log_dir = trainer.log_dir  # a collective under DDP (it broadcasts): call it on every rank
        if summary is None or not trainer.is_global_zero:
            return
        if log_dir:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            summary.to_csv(Path(log_dir) / "split_summary.csv", index=False)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table("data/split_summary", dataframe=summary)
