"""Momentum update of class prototypes (OXnet's global prototype alignment), correct under DDP.

    P_c ← β P_c + (1 − β) F̃_c,     F̃_c = Σ_b y_{b,c} p_{b,c} F_{b,c} / Σ_b y_{b,c} p_{b,c},     β = 0.7

(L. Luo et al., OXnet, MICCAI 2021; dossier ``method-oxnet.md`` a.9), where y is the image label, p = σ(s) the
detached image-level probability and F the category feature.

Where the state lives: the prototypes are **persistent buffers of the LightningModule**, ``prototypes`` (K, D) and
``prototype_updates`` (K,) (how many updates each class received; 0 = never set). They are therefore saved in, and
restored from, every checkpoint's ``state_dict`` with no callback state, follow ``.to(device)``, and come back with
``load_from_checkpoint``. The callback itself is stateless (only β), so it pickles for ``ddp_spawn``.

What the module provides: during ``training_step`` it stores ``pl_module.prototype_stats = (sums, weights)``, the
*local* Σ_b y p F (K, D) and Σ_b y p (K,), detached. After the step this callback:

1. all-reduces (sums, weights) over ranks in one collective, so F̃ is the global-batch mean and every rank applies
   the identical update (a 2-process run equals a 1-process run on the same global batch);
2. updates under ``torch.no_grad`` (the reference kept the autograd graph of every past update alive):
   * a class seen for the first time is **copied** (β = 0, as in the reference at step 0 / for a zero prototype);
   * a class **absent** from the global batch keeps its prototype (the reference computed F̃ = 0 for it and so
     shrank it by 0.7 every step, which drags rare classes' prototypes to the origin).

Timing: the loss at step t uses the prototypes after step t − 1; the reference updated them inside the forward,
before the loss, so its intra loss compares a batch mean with a prototype that already contains 30 % of it. Updating
after the step keeps autograd, DDP and checkpoints simple; the first step has no prototypes and hence no GPA loss.

Example:
    >>> import torch
    >>> protos, updates = torch.zeros(2, 3), torch.zeros(2)
    >>> momentum_update_(protos, updates, torch.ones(2, 3), torch.tensor([1.0, 0.0]), beta=0.7)
    >>> protos.tolist(), updates.tolist()  # class 0 copied, class 1 absent (unchanged)
    ([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]], [1.0, 0.0])
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import Tensor

__all__ = ["PrototypeMomentum", "momentum_update_"]


@torch.no_grad()
def momentum_update_(prototypes: Tensor, updates: Tensor, sums: Tensor, weights: Tensor, beta: float = 0.7) -> None:
    """In place: for every class with weight > 0, ``P ← sums / weights`` if never set, else ``β P + (1 − β) sums /
    weights``; other classes unchanged. ``updates`` counts the updates per class."""
    present = weights > 0
    tiny = torch.finfo(prototypes.dtype).tiny
    target = sums.to(prototypes.dtype) / weights.to(prototypes.dtype).clamp(min=tiny)[:, None]
    blended = torch.where((updates > 0)[:, None], beta * prototypes + (1.0 - beta) * target, target)
    prototypes.copy_(torch.where(present[:, None], blended, prototypes))
    updates.add_(present.to(updates.dtype))


class PrototypeMomentum(pl.Callback):
    """Update ``pl_module.prototypes`` from ``pl_module.prototype_stats`` after every training batch.

    Args:
        beta: momentum on the old prototype (0.7 in OXnet).
        log_every_n_steps: log ``train/prototypes_set`` (classes with a prototype) this often; 0 disables.
    """

    def __init__(self, beta: float = 0.7, log_every_n_steps: int = 50) -> None:
        super().__init__()
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.beta = float(beta)
        self.log_every_n_steps = log_every_n_steps

    @property
    def state_key(self) -> str:
        return self._generate_state_key(beta=self.beta)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        buffers = dict(pl_module.named_buffers())
        missing = [name for name in ("prototypes", "prototype_updates") if name not in buffers]
        if missing:
            raise AttributeError(
                f"PrototypeMomentum needs persistent buffers {missing} on {type(pl_module).__name__} (register "
                "`prototypes` (K, D) and `prototype_updates` (K,) in __init__) and `prototype_stats` set in "
                "training_step."
            )

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        stats = getattr(pl_module, "prototype_stats", None)
        if stats is None:
            return
        sums, weights = stats
        packed = torch.cat([sums.detach().float(), weights.detach().float()[:, None]], dim=1)
        packed = trainer.strategy.reduce(packed, reduce_op="sum")  # identity on one process
        momentum_update_(pl_module.prototypes, pl_module.prototype_updates, packed[:, :-1], packed[:, -1], self.beta)
        pl_module.prototype_stats = None
        if self.log_every_n_steps and trainer.global_step % self.log_every_n_steps == 0:
            pl_module.log("train/prototypes_set", (pl_module.prototype_updates > 0).sum().float(), on_step=True,
                          on_epoch=False, batch_size=1)
