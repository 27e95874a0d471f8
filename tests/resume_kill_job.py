"""Subprocess of ``test_resume_configs.py::test_kill9_loses_at_most_one_epoch``: a tiny fit that writes
``last.ckpt`` through ``ResumableCheckpoint`` and announces each epoch/step, so the test can SIGKILL it mid-epoch.

Usage: python resume_kill_job.py <run dir> <check_val_every_n_epoch> <last_every_n_train_steps>
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from callbacks.reliability import AtomicCheckpointIO, ResumableCheckpoint  # noqa: E402

BATCHES = 6


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/score", -self.layer(batch[0]).pow(2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Announce(pl.Callback):
    """Write the (epoch, batch) about to run to a file and sleep a little, so the parent can kill at a known point."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.path.write_text(f"{trainer.current_epoch} {batch_idx} {trainer.global_step}")
        time.sleep(0.05)


def main(root: Path, val_every: int, every_steps: int) -> None:
    pl.seed_everything(0, verbose=False)
    data = TensorDataset(torch.randn(BATCHES * 2, 4))
    loader = DataLoader(data, batch_size=2)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=100, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, check_val_every_n_epoch=val_every, num_sanity_val_steps=0,
                         plugins=[AtomicCheckpointIO()], default_root_dir=root,
                         callbacks=[ResumableCheckpoint(dirpath=root / "checkpoints", monitor="val/score", mode="max",
                                                        filename="best", save_last=True,
                                                        **({"last_every_n_train_steps": every_steps} if every_steps
                                                           else {})),
                                    Announce(root / "progress.txt")])
    trainer.fit(Tiny(), loader, loader)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
