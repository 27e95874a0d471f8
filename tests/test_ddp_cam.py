"""CAM logging and the CAM baseline under 2-process CPU DDP (gloo, ddp_spawn inside pytest)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest

from callbacks.cam_logger import CAMLogger
from ddp_utils import DestroyProcessGroup
from datamodules.cxr import CXRDataModule
from datamodules.synthetic import SyntheticCXR
from lightning_modules.cam_baseline import CAMClassifierModule
from networks.cam_classifier import CAMNet


@pytest.mark.slow
def test_cam_images_are_gathered_and_logged_once(tmp_path):
    reader = SyntheticCXR(cache_dir=tmp_path / "cache", n_images=60, image_size=64, seed=0)
    reader.prepare()
    data = CXRDataModule(reader, image_size=32, labeled_batch_size=4, eval_batch_size=4, seed=0, min_per_class=0)
    module = CAMClassifierModule(CAMNet("test_resnet", num_classes=4))
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1, limit_train_batches=2,
                         limit_val_batches=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         default_root_dir=tmp_path, callbacks=[CAMLogger(num_images=6), DestroyProcessGroup()], num_sanity_val_steps=0)
    trainer.fit(module, data)
    pngs = sorted((tmp_path / "cams" / "epoch_000").glob("*.png"))
    # 3 images per rank gathered from 2 ranks, written by rank 0 only: exactly 6 files
    assert len(pngs) == 6
    assert "val/auroc" in trainer.callback_metrics
