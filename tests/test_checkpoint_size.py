"""``best.ckpt`` holds the weights only and ``last.ckpt`` the full training state (issue 15 section 4: a 1-epoch
ResNet-18 PCAM run left two full 134 MB copies, 257 MB; now 45 MB + 134 MB). Resume exactness from ``last.ckpt``
stays guarded by tests/test_resume.py and tests/test_run_identity.py."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from callbacks.checkpoint_io import load_checkpoint_file
from callbacks.reliability import ResumableCheckpoint
from reliability_utils import build


def test_best_is_weights_only_and_last_is_full(tmp_path):
    module, data = build("pcam", tmp_path / "data")
    checkpoint = ResumableCheckpoint(dirpath=tmp_path / "ck", monitor="val/loss", mode="min", save_last=True,
                                     filename="best")
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=2, limit_val_batches=1,
                         num_sanity_val_steps=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[checkpoint], default_root_dir=tmp_path)
    trainer.fit(module, data)
    best = load_checkpoint_file(tmp_path / "ck" / "best.ckpt", map_location="cpu")
    last = load_checkpoint_file(tmp_path / "ck" / "last.ckpt", map_location="cpu")
    assert "optimizer_states" not in best and "callbacks" not in best
    assert last["optimizer_states"] and last["callbacks"]
    assert best["state_dict"].keys() == last["state_dict"].keys()
    assert all(torch.equal(best["state_dict"][k], last["state_dict"][k]) for k in best["state_dict"])
    assert (tmp_path / "ck" / "best.ckpt").stat().st_size < 0.7 * (tmp_path / "ck" / "last.ckpt").stat().st_size
    # a weights-only best.ckpt still serves test
    assert trainer.test(module, datamodule=data, ckpt_path=str(tmp_path / "ck" / "best.ckpt"))
