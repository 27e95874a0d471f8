"""Mean-teacher EMA maths (A. Tarvainen, H. Valpola, "Mean teachers are better role models", NeurIPS 2017),
shared by DC-MT (both stages) and OXnet: the teacher is a frozen copy of the student whose weights follow

    θ_T ← α_t θ_T + (1 − α_t) θ_S,     α_t = min(1 − 1/(t + 1), decay),

after every optimiser step, where ``t`` is the number of optimiser steps taken so far (so the first update uses
α = 0.5, as in Tarvainen's code). The DC-MT reference passes the *epoch* index as ``t`` (dossier
``method-dcmt.md`` e.6), which keeps α constant within an epoch and below 0.9804 for all 50 epochs; with ``t`` the
step, α reaches ``decay`` after ``1/(1 − decay) − 1`` steps.

What is averaged: every floating-point parameter and buffer (BN running statistics included) with one
``torch._foreach_lerp_`` per group; non-float buffers (``num_batches_tracked``) are copied from the student, since
lerp is undefined for integers.

These are pure tensor functions. *When* they run (after each optimiser step, skipped under gradient accumulation,
resumed at the right step) is :class:`callbacks.ema_teacher.EMATeacher`'s job.

Example:
    >>> import torch
    >>> student = torch.nn.Linear(2, 2)
    >>> teacher = make_teacher(student)
    >>> ema_alpha(1, 0.99), ema_alpha(1000, 0.99)
    (0.5, 0.99)
    >>> with torch.no_grad():
    ...     _ = student.weight.add_(1.0)
    >>> before = teacher.weight.clone()
    >>> ema_update_(teacher, student, 0.5)  # the teacher moves halfway to the student
    >>> torch.allclose(teacher.weight, before + 0.5), teacher.weight.requires_grad
    (True, False)
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["check_same_structure", "ema_alpha", "ema_update_", "make_teacher"]


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


def check_same_structure(teacher: nn.Module, student: nn.Module) -> None:
    """Raise unless both modules have the same parameter and buffer names (once per fit, not per step)."""
    for kind in ("parameters", "buffers"):
        t_names = [n for n, _ in getattr(teacher, f"named_{kind}")()]
        s_names = [n for n, _ in getattr(student, f"named_{kind}")()]
        if t_names != s_names:
            diff = sorted(set(t_names) ^ set(s_names))[:5]
            raise ValueError(
                f"teacher and student {kind} differ ({len(t_names)} vs {len(s_names)}; e.g. {diff}). "
                "The teacher must be a copy of the student (use networks.ema.make_teacher)."
            )


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, alpha: float) -> None:
    """In place: ``teacher ← alpha · teacher + (1 − alpha) · student`` for float parameters and buffers,
    ``teacher ← student`` for non-float buffers.

    Tensors are paired by registration order (a deep copy has the same order); counts and shapes are checked
    on every call, names once per fit by :class:`callbacks.ema_teacher.EMATeacher` (the name walk costs more than
    the update).
    """
    t_all = [*teacher.parameters(), *teacher.buffers()]
    s_all = [*student.parameters(), *student.buffers()]
    if len(t_all) != len(s_all) or any(t.shape != s.shape for t, s in zip(t_all, s_all)):
        check_same_structure(teacher, student)
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
