"""Image logging, test-time plots and the W&B run summary (issue 15 section 3).

* an explicit ``CAMLogger`` in a config turns the CLI's fallback ``ImageLogger`` off (nothing logged twice);
* ``CAMLogger`` on a batch without boxes (DC-MT slices) logs instead of raising ``KeyError 'boxes'``;
* a fit + test with ``MedAttnLogger`` offline leaves the best epoch's validation metrics (``best/val/...``) and the
  test metrics in ``wandb/offline-run-*/files/wandb-summary.json`` and ``summary.json``, plus the ROC and
  confusion-matrix PNGs of the test set.
The per-method PNG contract is in ``tests/test_contract.py::test_image_logger_writes_an_overlay_png``.
"""

from __future__ import annotations

import json

import lightning.pytorch as pl
import numpy as np
import pytest
from PIL import Image

from callbacks.cam_logger import CAMLogger
from callbacks.image_logger import GT_COLOUR, ImageLogger, draw_boxes, mask_outline
from callbacks.run_info import RunSummary
from reliability_utils import build

QUIET = dict(accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
             num_sanity_val_steps=0, limit_train_batches=1, limit_val_batches=1)


def test_explicit_logger_turns_the_fallback_off(tmp_path):
    module, data = build("pcam", tmp_path / "data")
    fallback, explicit = ImageLogger(fallback=True), CAMLogger(num_images=2)
    trainer = pl.Trainer(**QUIET, max_epochs=1, logger=False, enable_checkpointing=False, default_root_dir=tmp_path,
                         callbacks=[explicit, fallback])
    trainer.fit(module, data)
    assert not fallback.active and explicit.active
    assert len(list((tmp_path / "cams" / "epoch_000").glob("*.png"))) == 2
    assert not (tmp_path / "images").exists()


@pytest.mark.parametrize("name", ["dcmt", "nonlocal_unet"])
def test_cam_logger_on_slices_without_boxes_and_on_volumes(name, tmp_path):
    """On 00a25c0 this raised KeyError: 'boxes' (DC-MT slice batches carry no boxes) and ValueError in
    F.interpolate (3D Non-local U-Net volumes)."""
    module, data = build(name, tmp_path / "data")
    trainer = pl.Trainer(**QUIET, max_epochs=1, logger=False, enable_checkpointing=False, default_root_dir=tmp_path,
                         callbacks=[CAMLogger(num_images=2)])
    trainer.fit(module, data)
    pngs = sorted((tmp_path / "cams" / "epoch_000").glob("*.png"))
    assert len(pngs) == min(2, data.val_dataloader().batch_size) and min(Image.open(pngs[0]).size) >= 256


def test_draw_helpers_scale_boxes_and_outline_masks():
    picture = np.asarray(draw_boxes(np.zeros((32, 32)), [(2, 2, 10, 10, 0)], [], ["a"], size=256))
    assert picture.shape[:2] == (256, 256)
    assert picture[16, 40].tolist() == list(GT_COLOUR)  # top edge of the box at y = 2 * 8, x = 5 * 8
    mask = np.zeros((5, 5))
    mask[1:4, 1:4] = 1
    assert mask_outline(mask).sum() == 8 and not mask_outline(mask)[2, 2]


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    import wandb

    wandb.finish()
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for var in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("MEDATTN_RUN_ID", "summary-test")
    monkeypatch.delenv("MEDATTN_RUN_DIR", raising=False)
    yield tmp_path
    wandb.finish()


@pytest.mark.slow
def test_wandb_summary_holds_best_epoch_and_test_metrics(offline_wandb):
    import wandb

    from callbacks.reliability import ResumableCheckpoint
    from experiments.logging import MedAttnLogger

    tmp_path = offline_wandb
    module, data = build("pcam", tmp_path / "data")
    logger = MedAttnLogger(project="medattn-test", name="summary", save_dir=str(tmp_path / "runs"), offline=True)
    trainer = pl.Trainer(**QUIET, max_epochs=3, logger=logger, default_root_dir=tmp_path, log_every_n_steps=1,
                         callbacks=[ResumableCheckpoint(monitor="val/loss", mode="min", filename="best"),
                                    ImageLogger(num_images=2, fallback=True), RunSummary()])
    trainer.fit(module, data)
    import pandas as pd

    metrics = pd.read_csv(logger.run_dir / "metrics.csv").dropna(subset=["val/loss"])
    best = metrics.loc[metrics["val/loss"].idxmin()]
    trainer.test(module, datamodule=data, ckpt_path="best")
    # the run object's summary is what an offline run syncs (wandb-core writes no files/wandb-summary.json offline)
    summary = dict(logger.experiment.summary)
    wandb.finish()
    assert list((logger.run_dir / "wandb").glob("offline-run-*/*.wandb"))
    assert summary["best/epoch"] == int(best["epoch"]) and summary["best/val/loss"] == pytest.approx(best["val/loss"])
    assert "best/val/auroc" in summary and "test/auroc" in summary
    assert json.loads((logger.run_dir / "summary.json").read_text())["best/epoch"] == int(best["epoch"])
    for name in ("test_roc.png", "test_confusion.png"):
        assert np.asarray(Image.open(logger.run_dir / name).convert("L")).std() > 5, name
