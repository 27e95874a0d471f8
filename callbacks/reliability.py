"""Everything that keeps a multi-day run recoverable, in one place (``medattn`` adds all of it to every run).

=========================  ================================================================================
piece                      what it guarantees
=========================  ================================================================================
``RngStateCallback``       resume at an epoch boundary is bitwise exact (every rank's RNG in the checkpoint)
``CrashCheckpoint``        a crash, Ctrl-C or SIGTERM during training leaves ``checkpoints/on_exception.ckpt``
                           to resume from, never one with NaN weights, never one of a failed restore; a fresh
                           run never resumes from it unless asked (it is not an ``OnExceptionCheckpoint``)
``ResumableCheckpoint``    ``ModelCheckpoint`` whose ``last.ckpt`` is rewritten every epoch (use it in configs:
                           Lightning 2.6 refreshes ``last.ckpt`` only when the monitored metric improved)
``NonFiniteGuard``         no checkpoint with NaN/Inf weights is ever written; a NaN loss stops the run naming
                           the term and the step (``MedAttnModule.check_finite``)
``OutOfMemoryHint``        an out-of-memory error says which settings reduce memory
``AtomicCheckpointIO``     a killed checkpoint write leaves the previous checkpoint intact
=========================  ================================================================================

Example (what ``experiments/cli.py`` does)::

    trainer = pl.Trainer(callbacks=[ModelCheckpoint(save_last=True), *reliability_callbacks()],
                         plugins=[AtomicCheckpointIO()])
"""

from __future__ import annotations

import lightning.pytorch as pl

from callbacks.checkpoint_io import AtomicCheckpointIO, atomic_torch_save
from callbacks.faults import (CrashCheckpoint, NonFiniteGuard, OutOfMemoryHint, ResumableCheckpoint, first_non_finite,
                              is_out_of_memory)
from callbacks.rng_state import RngStateCallback

__all__ = ["AtomicCheckpointIO", "CrashCheckpoint", "NonFiniteGuard", "OutOfMemoryHint", "ResumableCheckpoint",
           "RngStateCallback",
           "atomic_torch_save", "first_non_finite", "is_out_of_memory", "reliability_callbacks"]


def reliability_callbacks() -> list[pl.Callback]:
    """Fresh instances of the reliability callbacks (the atomic writer is a plugin: ``AtomicCheckpointIO()``)."""
    return [RngStateCallback(), NonFiniteGuard(), CrashCheckpoint(), OutOfMemoryHint()]
