"""Mean-teacher EMA update as a Lightning callback (Tarvainen & Valpola, NeurIPS 2017), shared by DC-MT and
OXnet. The maths (α schedule, the in-place update, making the frozen copy) is in :mod:`networks.ema`; this
callback decides *when* it runs.

Convention: the LightningModule owns both networks as submodules, ``pl_module.student`` (trained) and
``pl_module.teacher`` (a frozen copy made with :func:`networks.ema.make_teacher`). Because the teacher is a
submodule it is saved in and restored from every checkpoint with the rest of ``state_dict``, follows
``.to(device)``, and ``load_from_checkpoint`` rebuilds it. This callback only *updates* it:

    θ_T ← α_t θ_T + (1 − α_t) θ_S,     α_t = min(1 − 1/(t + 1), decay),

after every optimiser step, where ``t`` is the number of optimiser steps taken so far
(``trainer.global_step`` as seen in ``on_train_batch_end``, so the first update uses α = 0.5, as in
Tarvainen's code; the DC-MT reference's epoch index is discussed in :mod:`networks.ema`).

DDP: the update runs on every rank with no collective. DDP keeps the student's parameters bit-identical
on all ranks after each step (gradients are all-reduced before the step) and the teacher starts as a copy
of the student, so every rank computes the same teacher. Student BN buffers are broadcast from rank 0 by
DDP at each forward, so averaged buffers agree too. The teacher must have ``requires_grad=False``, or DDP
reports its parameters as unused; :meth:`EMATeacher.on_fit_start` checks this.

Updating from a *callback*'s ``on_train_batch_end`` (not the module's) matters: Lightning runs callbacks
before the module hook and moves ``ModelCheckpoint`` last, so a step-triggered checkpoint already holds
the updated teacher and a resumed run is not one update behind.

Example:
    >>> import lightning.pytorch as pl
    >>> trainer = pl.Trainer(callbacks=[EMATeacher(decay=0.99)])  # doctest: +SKIP
"""

from __future__ import annotations

import lightning.pytorch as pl
from torch import nn

from networks.ema import check_same_structure, ema_alpha, ema_update_  # the maths; this callback schedules it

EVAL_MODELS = ("student", "teacher", "both")

__all__ = ["EMATeacher", "EVAL_MODELS", "eval_model_names"]


def eval_model_names(eval_model: str) -> tuple[str, ...]:
    """``"student" → ("student",)``, ``"teacher" → ("teacher",)``, ``"both" → ("student", "teacher")``.

    Modules with a mean teacher take an ``eval_model`` argument and evaluate these networks in
    validation and test; with ``"both"`` the second one's log keys get a ``_teacher`` suffix.
    """
    if eval_model not in EVAL_MODELS:
        raise ValueError(f"eval_model must be one of {EVAL_MODELS}, got {eval_model!r}")
    return ("student", "teacher") if eval_model == "both" else (eval_model,)


class EMATeacher(pl.Callback):
    """Update ``pl_module.teacher`` as the EMA of ``pl_module.student`` after every optimiser step.

    Args:
        decay: the α cap (0.99 in DC-MT).
        student_attr, teacher_attr: attribute names of the two networks on the LightningModule.
        log_alpha: log the α of the update as ``train/ema_alpha`` (at step 1 and every
            ``trainer.log_every_n_steps`` steps).

    The callback holds no state of its own (α is a function of ``global_step``, which the checkpoint
    restores), so it is safe to pickle for ``ddp_spawn`` and needs no ``state_dict``. With gradient
    accumulation it updates only on batches that stepped the optimiser.
    """

    def __init__(self, decay: float = 0.99, student_attr: str = "student", teacher_attr: str = "teacher",
                 log_alpha: bool = True) -> None:
        super().__init__()
        ema_alpha(0, decay)  # validates decay
        self.decay = float(decay)
        self.student_attr = student_attr
        self.teacher_attr = teacher_attr
        self.log_alpha = log_alpha
        self._last_step: int | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(decay=self.decay, student=self.student_attr, teacher=self.teacher_attr)

    def _pair(self, pl_module: pl.LightningModule) -> tuple[nn.Module, nn.Module]:
        for attr in (self.student_attr, self.teacher_attr):
            if not isinstance(getattr(pl_module, attr, None), nn.Module):
                raise AttributeError(
                    f"EMATeacher needs `{type(pl_module).__name__}.{attr}` to be an nn.Module; build the teacher "
                    "in __init__ with `self.teacher = make_teacher(self.student)`."
                )
        return getattr(pl_module, self.teacher_attr), getattr(pl_module, self.student_attr)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        teacher, student = self._pair(pl_module)
        trainable = [n for n, p in teacher.named_parameters() if p.requires_grad]
        if trainable:
            raise ValueError(
                f"teacher parameters {trainable[:3]} require grad; the EMA teacher must be frozen "
                "(teacher.requires_grad_(False)), otherwise the optimiser may update it and DDP reports "
                "unused parameters."
            )
        check_same_structure(teacher, student)  # fail early on a structural mismatch

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Steps already taken (non-zero on resume): only steps after this one trigger updates.
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self._last_step is not None and step <= self._last_step:
            return  # no optimiser step on this batch (gradient accumulation, or a skipped step)
        self._last_step = step
        teacher, student = self._pair(pl_module)
        alpha = ema_alpha(step, self.decay)
        ema_update_(teacher, student, alpha)
        if self.log_alpha and (step % max(1, trainer.log_every_n_steps) == 0 or step == 1):
            # a Lightning log call costs about 1 ms: log with the logger's cadence, not every step
            pl_module.log("train/ema_alpha", alpha, on_step=True, on_epoch=False, batch_size=1)
