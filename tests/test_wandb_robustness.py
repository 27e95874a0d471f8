"""W&B must never cost a run: without network and credentials (and ``WANDB_MODE`` unset) ``MedAttnLogger`` logs
offline, and a wandb failure while logging is reported once and training goes on (metrics still reach the CSV)."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning.pytorch as pl
import pandas as pd
import pytest

from callbacks.cam_logger import CAMLogger
from callbacks.run_info import SplitSummaryLogger
from experiments.logging import MedAttnLogger, wandb_credentials_present
from reliability_utils import build


@pytest.fixture
def no_network_no_credentials(tmp_path, monkeypatch):
    """A process with no W&B credentials anywhere, no mode set and an unreachable server."""
    import wandb

    wandb.finish()  # a run left attached by an earlier test (e.g. a disabled one) would be reused by WandbLogger
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))  # does not exist
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # any attempt to reach a server fails at once
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MEDATTN_RUN_ID", "wandb-test")
    monkeypatch.delenv("MEDATTN_RUN_DIR", raising=False)
    yield tmp_path
    import wandb

    wandb.finish()  # do not leave a run attached to the test process


def _fit(tmp_path: Path, logger: MedAttnLogger) -> pl.Trainer:
    module, data = build("cam_baseline", tmp_path / "data")
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=2, limit_val_batches=1,
                         num_sanity_val_steps=0, log_every_n_steps=1, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, logger=logger,
                         callbacks=[CAMLogger(num_images=2), SplitSummaryLogger()], default_root_dir=tmp_path)
    trainer.fit(module, data)
    return trainer


@pytest.mark.slow
def test_no_credentials_no_network_trains_and_logs_offline(no_network_no_credentials):
    tmp_path = no_network_no_credentials
    assert not wandb_credentials_present()
    logger = MedAttnLogger(project="medattn-test", name="offline", save_dir=str(tmp_path / "runs"))
    trainer = _fit(tmp_path, logger)
    assert trainer.global_step == 2
    runs = list((logger.run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "expected exactly one offline W&B run directory"
    (record,) = runs[0].glob("run-*.wandb")
    assert record.stat().st_size > 0
    assert list((runs[0] / "files" / "media" / "images").rglob("*.png")), "CAM images were not logged offline"
    metrics = pd.read_csv(logger.run_dir / "metrics.csv")
    assert "train/loss_step" in metrics and "val/auroc" in metrics


@pytest.mark.slow
def test_wandb_failures_while_logging_do_not_stop_training(no_network_no_credentials, monkeypatch):
    import wandb.sdk.wandb_config as wandb_config
    import wandb.sdk.wandb_run as wandb_run

    def broken(*args, **kwargs):
        raise ConnectionError("wandb: simulated network failure")

    monkeypatch.setattr(wandb_run.Run, "log", broken)  # log_metrics, log_image and log_table all end here
    monkeypatch.setattr(wandb_config.Config, "update", broken)  # log_hyperparams
    tmp_path = no_network_no_credentials
    logger = MedAttnLogger(project="medattn-test", name="broken", save_dir=str(tmp_path / "runs"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger.log_hyperparams({"lr": 1e-3})
        trainer = _fit(tmp_path, logger)
    assert trainer.global_step == 2 and trainer.state.finished
    reported = [w for w in caught if "W&B logging failed" in str(w.message)]
    assert len(reported) == 1 and "simulated network failure" in str(reported[0].message)
    metrics = pd.read_csv(logger.run_dir / "metrics.csv")
    assert "val/auroc" in metrics and metrics["train/loss_step"].notna().sum() == 2
    assert (logger.run_dir / "split_summary.csv").is_file()
