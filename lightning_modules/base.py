"""What every medattn LightningModule shares: optimiser wiring, ``channels_last``, the NaN guard and the
``attention_maps`` contract that callbacks (CAM logging, localisation metrics) rely on."""

from __future__ import annotations

from typing import Mapping

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable


def default_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)


# Saved with the hyperparameters of every module that keeps the default optimiser. Allow-listed process-wide, so
# that ``Module.load_from_checkpoint(path)`` (torch's default ``weights_only=True``) loads medattn checkpoints as
# data like ``callbacks.checkpoint_io.load_checkpoint_file`` does; the allow-list only lets the unpickler look the
# function up by name, and calling it builds an optimiser.
torch.serialization.add_safe_globals([default_optimizer])


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or Inf. The message names the term and the global step."""


class MedAttnModule(pl.LightningModule):
    """Base class. Subclasses receive their network(s) by injection and implement the steps.

    Args:
        optimizer: a callable ``params -> Optimizer`` (LightningCLI fills it from an ``optimizer:`` block).
        scheduler: optional callable ``optimizer -> LRScheduler``, stepped every epoch.
        channels_last: convert the model and the image batches to ``channels_last`` (about 2x with bf16
            on conv nets; see the table in docs/performance.md).

    Contract used by callbacks:
        ``attention_maps(image) -> (B, K, h, w)`` float in [0, 1], one map per class, at any resolution
        (callers resize). ``class_names`` lists the K classes.
    """

    class_names: list[str]

    def __init__(
        self,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.channels_last = channels_last

    # ----------------------------------------------------------------------------------------- setup
    def setup(self, stage: str) -> None:
        if self.channels_last:
            self.to(memory_format=torch.channels_last)

    def prepare_image(self, image: torch.Tensor) -> torch.Tensor:
        """Put an image batch into the memory format the model runs in."""
        if self.channels_last and image.dim() == 4:
            return image.contiguous(memory_format=torch.channels_last)
        return image

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "epoch"}}

    # ------------------------------------------------------------------------------------- contract
    def attention_maps(self, image: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------- guard
    def check_finite(self, terms: Mapping[str, torch.Tensor]) -> None:
        """Raise :class:`NonFiniteLossError` naming the first non-finite loss term.

        Checked once per step on the already-computed scalars (one fused ``isfinite`` and one host sync).
        """
        names = list(terms)
        values = torch.stack([terms[n].detach().float().reshape(()) for n in names])
        finite = torch.isfinite(values)
        if not bool(finite.all()):
            bad = names[int((~finite).nonzero()[0])]
            raise NonFiniteLossError(
                f"loss term '{bad}' is {terms[bad].item()} at global step {self.global_step} "
                f"(epoch {self.current_epoch}). Training stopped; the last good checkpoint is kept. "
                "Lower the learning rate, try precision=32, or check the batch for corrupt inputs."
            )

    def log(self, name: str, value, *args, batch_size: int | float | None = None, **kwargs) -> None:
        # Lightning 2.6 averages the per-rank sample counts of a ``sync_dist`` epoch mean in an *integer* tensor
        # under gloo (``_sync_ddp``: ``result.copy_(result / world_size)``, 7 / 2 -> 3), so an epoch mean over ranks
        # with different sample counts (the unpadded evaluation sampler) came out 7/6 too large. A float batch size
        # makes the count a float tensor and the mean exact (tests/test_ddp_parity.py).
        if batch_size is not None and kwargs.get("sync_dist"):
            batch_size = float(batch_size)
        super().log(name, value, *args, batch_size=batch_size, **kwargs)

    def log_losses(self, stage: str, terms: Mapping[str, torch.Tensor], batch_size: int) -> None:
        """Log every term as ``stage/loss_<name>`` and the total as ``stage/loss``."""
        on_step = stage == "train"
        for name, value in terms.items():
            key = f"{stage}/loss" if name == "total" else f"{stage}/loss_{name}"
            self.log(key, value.detach(), on_step=on_step, on_epoch=True, batch_size=batch_size,
                     prog_bar=name == "total", sync_dist=not on_step)
