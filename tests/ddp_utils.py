"""Clean process-group shutdown for tests that run Lightning's ``ddp_spawn`` on CPU (gloo).

Why: Lightning destroys the default process group at exit only for NCCL (``atexit`` in
``lightning.fabric.utilities.distributed._init_dist_connection``), never for gloo, and a ``ddp_spawn`` worker returns
with it still alive. The worker then exits with gloo's C++ threads (and their pending work objects) still running
while the interpreter is finalised; when one of them is still joinable at that moment, ``std::thread``'s destructor
calls ``std::terminate``: ``terminate called without an active exception`` and SIGABRT, depending on thread timing
(pytorch/pytorch#190489; the mechanism is described in pytorch/pytorch#179291). :class:`DestroyProcessGroup`
ends every worker with a barrier (no rank tears down while a peer still talks to it) and
``destroy_process_group()`` while the interpreter is fully alive, as ``tests/ddp_job.py`` does for its own workers.
Kept in an importable module (not a ``test_*`` closure) because ``ddp_spawn`` pickles the callbacks.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch.distributed as dist


class DestroyProcessGroup(pl.Callback):
    """Last callback hook of a ``fit``/``test`` (``teardown``): barrier, then destroy the default process group."""

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
