"""Mean-teacher EMA update as a Lightning callback (Tarvainen & Valpola, NeurIPS 2017), shared by DC-MT and
OXnet.

Convention: the LightningModule owns both networks as submodules, ``pl_module.student`` (trained) and
``pl_module.teacher`` (a frozen copy made with :func:`make_teacher`). Because the teacher is a submodule it
is saved in and restored from every checkpoint with the rest of ``state_dict``, follows ``.to(device)``, and
``load_from_checkpoint`` rebuilds it. This callback only *updates* it:

    θ_T ← α_t θ_T + (1 − α_t) θ_S,     α_t = min(1 − 1/(t + 1), decay),

after every optimiser step, where ``t`` is the number of optimiser steps taken so far
(``trainer.global_step`` as seen in ``on_train_batch_end``, so the first update uses α = 0.5, as in
Tarvainen's code). The DC-MT reference passes the *epoch* index as ``t`` (dossier e.6), which keeps α
constant within an epoch and below 0.9804 for all 50 epochs; here ``t`` is the step, so α reaches
``decay`` after ``1/(1 − decay) − 1`` steps.

What is averaged: every floating-point parameter and buffer (BN running statistics included) with one
``torch._foreach_lerp_`` per group; non-float buffers (``num_batches_tracked``) are copied from the student,
since lerp is undefined for integers.

DDP: the update runs on every rank with no collective. DDP keeps the student's parameters bit-identical
on all ranks after each step (gradients are all-reduced before the step) and the teacher starts as a copy
of the student, so every rank computes the same teacher. Student BN buffers are broadcast from rank 0 by
DDP at each forward, so averaged buffers agree too. The teacher must have ``requires_grad=False``, or DDP
reports its parameters as unused; :meth:`EMATeacher.on_fit_start` checks this.

Updating from a *callback*'s ``on_train_batch_end`` (not the module's) matters: Lightning runs callbacks
before the module hook and moves ``ModelCheckpoint`` last, so a step-triggered checkpoint already holds
the updated teacher and a resumed run is not one update behind.

Example:
    >>> import torch, lightning.pytorch as pl
    >>> student = torch.nn.Linear(2, 2)
    >>> teacher = make_teacher(student)
    >>> ema_alpha(1, 0.99), ema_alpha(1000, 0.99)
    (0.5, 0.99)
    >>> ema_update_(teacher, student, 0.5)
    >>> trainer = pl.Trainer(callbacks=[EMATeacher(decay=0.99)])  # doctest: +SKIP
"""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import torch
from torch import nn

EVAL_MODELS = ("student", "teacher", "both")

__all__ = ["EMATeacher", "EVAL_MODELS", "ema_alpha", "ema_update_", "eval_model_names", "make_teacher"]


def ema_alpha(step: int, decay: float = 0.99) -> float:
    """EMA weight on the *teacher* after ``step`` optimiser steps: ``min(1 − 1/(step + 1), decay)``.

    ``ema_alpha(0) == 0`` (the teacher becomes the student), ``ema_alpha(1) == 0.5``, and it reaches
    ``decay`` at ``step = 1/(1 − decay) − 1`` (99 for 0.99).
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    return min(1.0 - 1.0 / (step + 1.0), decay)


def _check_same_structure(teacher: nn.Module, student: nn.Module) -> None:
    """Raise unless both modules have the same parameter and buffer names (once per fit, not per step)."""
    for kind in ("parameters", "buffers"):
        t_names = [n for n, _ in getattr(teacher, f"named_{kind}")()]
        s_names = [n for n, _ in getattr(student, f"named_{kind}")()]
        if t_names != s_names:
            diff = sorted(set(t_names) ^ set(s_names))[:5]
            raise ValueError(
                f"teacher and student {kind} differ ({len(t_names)} vs {len(s_names)}; e.g. {diff}). "
                "The teacher must be a copy of the student (use callbacks.ema_teacher.make_teacher)."
            )


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, alpha: float) -> None:
    """In place: ``teacher ← alpha · teacher + (1 − alpha) · student`` for float parameters and buffers,
    ``teacher ← student`` for non-float buffers.

    Tensors are paired by registration order (a deep copy has the same order); counts and shapes are checked
    on every call, names once per fit by :class:`EMATeacher` (the name walk costs more than the update).
    """
    t_all = [*teacher.parameters(), *teacher.buffers()]
    s_all = [*student.parameters(), *student.buffers()]
    if len(t_all) != len(s_all) or any(t.shape != s.shape for t, s in zip(t_all, s_all)):
        _check_same_structure(teacher, student)
        raise ValueError("teacher and student tensors differ in shape; the teacher must be a copy of the student")
    t_float = [t for t in t_all if t.is_floating_point()]
    s_float = [s for t, s in zip(t_all, s_all) if t.is_floating_point()]
    if t_float:
        # lerp(t, s, w) = t + w (s − t) = (1 − w) t + w s, so w = 1 − alpha.
        torch._foreach_lerp_(t_float, s_float, 1.0 - float(alpha))
    for t, s in zip(t_all, s_all):
        if not t.is_floating_point():
            t.copy_(s)


def make_teacher(student: nn.Module, train_mode: bool = False) -> nn.Module:
    """A frozen deep copy of ``student`` (``requires_grad_(False)``), ready to be the EMA teacher.

    It is returned in eval mode by default: its BN layers then use the EMA-averaged running statistics and
    its dropout is off, so its targets are deterministic and its buffers change only through the EMA. (The
    DC-MT reference runs the teacher in train mode, dossier e.6; pass ``train_mode=True`` for that.)
    Lightning never calls ``.train()`` on the whole module during ``fit`` (it captures and restores each
    submodule's mode around validation), but a module that wants the mode to survive an explicit
    ``module.train()`` should override ``train`` to re-apply it.
    """
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    teacher.train(train_mode)
    return teacher


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
        _check_same_structure(teacher, student)  # fail early on a structural mismatch

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
