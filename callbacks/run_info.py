"""``SplitSummaryLogger``: the DataModule's split summary (images, patients, boxed images and positives per
split and supervision stream) as a W&B table and as ``split_summary.csv`` in the run directory.
``RunSummary``: best-epoch validation and test metrics in the W&B run summary and ``summary.json``."""

from __future__ import annotations

import json
import warnings
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


class RunSummary(pl.Callback):
    """The W&B run summary (and ``<run dir>/summary.json``) holds the **best epoch's** validation metrics as
    ``best/<key>`` (e.g. ``best/val/auroc``) with ``best/epoch`` and ``best/step``, and the test metrics
    (``test/...``), so that the W&B runs table sorts runs by them (W&B's default summary is the *last* value).

    "Best" follows the first checkpoint callback with a ``monitor`` (its ``mode``); without one nothing is recorded
    under ``best/``. The record is part of the checkpoint (``state_dict``), so a resumed run keeps it. Added to
    every ``medattn`` run by the CLI."""

    def __init__(self) -> None:
        self.best: dict[str, float] = {}

    def state_dict(self) -> dict:
        return {"best": dict(self.best)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best = dict(state_dict.get("best", {}))

    @staticmethod
    def _scalars(trainer: pl.Trainer, prefix: str) -> dict[str, float]:
        return {k: float(v) for k, v in trainer.callback_metrics.items()
                if k.startswith(prefix) and (not hasattr(v, "numel") or v.numel() == 1)}

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        ckpt = next((c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None)), None)
        if ckpt is None or ckpt.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[ckpt.monitor])
        previous = self.best.get(f"best/{ckpt.monitor}")
        if value != value:  # NaN never becomes the best (as ModelCheckpoint)
            return
        if previous is None or (value > previous if ckpt.mode == "max" else value < previous):
            self.best = {f"best/{k}": v for k, v in self._scalars(trainer, "val/").items()}
            self.best.update({"best/epoch": trainer.current_epoch, "best/step": trainer.global_step})
            self._write(trainer, self.best)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, {**self.best, **self._scalars(trainer, "test/")})

    @staticmethod
    def _write(trainer: pl.Trainer, values: dict) -> None:
        log_dir = trainer.log_dir  # a collective under DDP: every rank resolves it
        if not trainer.is_global_zero or not values or trainer.fast_dev_run:
            return
        if log_dir:
            path = Path(log_dir) / "summary.json"
            old = json.loads(path.read_text()) if path.is_file() else {}
            path.write_text(json.dumps({**old, **values}, indent=1, sort_keys=True))
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                try:
                    logger.experiment.summary.update(values)
                except Exception as err:  # noqa: BLE001 - a summary must never kill a run
                    warnings.warn(f"W&B summary update failed ({type(err).__name__}: {err}); the values are in "
                                  f"{log_dir}/summary.json", stacklevel=2)
