"""Fault handling for long runs: a checkpoint on a crash or Ctrl-C, a ``last.ckpt`` that really is the last epoch,
never a NaN checkpoint, and an out-of-memory hint.

* :class:`ResumableCheckpoint` is ``ModelCheckpoint`` with ``last.ckpt`` rewritten at the end of every training epoch
  (and optionally every N steps), never during validation, so resuming from it is exact (Lightning 2.6 rewrites it
  only next to a top-k save, and with ``check_val_every_n_epoch > 1`` only during validation).
* :class:`CrashCheckpoint` (a plain callback, not Lightning's ``OnExceptionCheckpoint``, see its docstring) writes
  ``on_exception.ckpt`` next to the ``ModelCheckpoint`` files when ``fit`` stops on an exception or a
  ``KeyboardInterrupt`` (resume with ``--ckpt_path .../on_exception.ckpt``), **except** after a non-finite loss
  (:class:`NonFiniteLossError`, a ``FloatingPointError``, raised by ``MedAttnModule.check_finite``) or when any weight is NaN/Inf:
  then it writes nothing and names the last good checkpoint instead. It writes without collectives or barriers
  (an exception may have stopped one rank only), rank 0 to ``on_exception.ckpt`` and rank r > 0, if it is the
  one that failed, to ``on_exception-rank<r>.ckpt``.
* :class:`NonFiniteGuard` refuses to write any checkpoint whose weights are not finite (it raises
  ``NonFiniteLossError`` from ``on_save_checkpoint``, before the file is opened, so the previous checkpoint
  stays), optionally checks the training-step loss of modules that do not call ``MedAttnModule.check_finite``, and when
  another error is raised while the weights are NaN (a sampler or a library check in ``forward`` that runs
  before the loss), appends the first non-finite weight, the step and the last good checkpoint to its message.
* :class:`OutOfMemoryHint` appends to a CUDA/CPU out-of-memory error the knobs that reduce memory: the
  DataModule's batch sizes (read from it), ``trainer.accumulate_grad_batches`` to keep the global batch,
  ``trainer.precision=bf16-mixed`` and ``model.init_args.channels_last``. The original exception is re-raised
  (same type) with the hint in its message.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn

__all__ = ["CrashCheckpoint", "NonFiniteGuard", "NonFiniteLossError", "OutOfMemoryHint", "ResumableCheckpoint",
           "first_non_finite", "is_out_of_memory"]


class NonFiniteLossError(FloatingPointError):
    """A loss term or a weight became NaN or Inf. The message names the term (or weight) and the global step.

    It lives beside the fault handling that reacts to it (``CrashCheckpoint`` writes nothing after it); the modules
    raise it from ``MedAttnModule.check_finite`` (``lightning_modules.base`` re-exports it)."""


def first_non_finite(state: dict[str, Any]) -> str | None:
    """Name of the first floating-point tensor of a ``state_dict`` with a NaN or Inf, or None."""
    for name, value in state.items():
        if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return name
    return None


def _last_good(trainer: pl.Trainer) -> str:
    ckpt = trainer.checkpoint_callback
    path = (getattr(ckpt, "last_model_path", "") or getattr(ckpt, "best_model_path", "")) if ckpt else ""
    return f"the last good checkpoint is {path}" if path else "no checkpoint had been written yet"


class ResumableCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` is always the state at the end of the newest training epoch.

    Lightning writes ``last.ckpt`` only next to a top-k save (2.6: "only save last checkpoint if a checkpoint was
    actually saved in this step"), and with ``check_val_every_n_epoch > 1`` it saves during validation, before the
    epoch counts as finished; a run resumed from such a file replays the end of that epoch and is not exact, and an
    epoch without validation writes nothing, so a ``kill -9`` loses every epoch since the last validation. Here:

    * ``last.ckpt`` (with ``save_last: true``) is written in ``on_train_epoch_end`` of **every** training
      epoch, after that epoch's validation and after the module's own ``on_train_epoch_end``, whatever
      ``check_val_every_n_epoch``, ``every_n_epochs`` or the monitored metric do. It is never written from
      validation. Resuming from it is exact (``RngStateCallback`` restores the random streams).
    * ``last_every_n_train_steps=N`` (default 0: off) also rewrites ``last.ckpt`` after every N-th optimiser step
      inside an epoch, for epochs long enough that losing one matters (a preempted run then loses at most N
      steps). The medattn training samplers restart such an epoch at the next batch, so this resume is exact too.
    * top-k / ``best`` checkpoints follow ``ModelCheckpoint``'s rules unchanged (``monitor``, ``save_top_k``,
      ``every_n_epochs``, ...), and a ``last.ckpt`` write never suppresses a top-k save at the same step.
    * ``best_weights_only=True`` (default): top-k files hold the weights only (module ``state_dict``, hyper-parameters,
      epoch/step, loop counters; no optimiser, scheduler or callback states), for ``medattn test``/``predict`` and
      initialising another stage; only ``last.ckpt`` carries the full training state that resume needs. A
      ResNet-18/AdamW best.ckpt is a third of a full one. (Not ``save_last="link"``: Lightning links ``last.ckpt`` to
      the newest *top-k* file, a stale epoch whenever the newest epoch was not the best, which breaks exact resume.)

    Example (experiment YAML)::

        - class_path: callbacks.reliability.ResumableCheckpoint
          init_args: {monitor: val/auroc, mode: max, save_last: true, filename: best, last_every_n_train_steps: 0}
    """

    def __init__(self, *args: Any, save_last: bool | str | None = None, last_every_n_train_steps: int = 0,
                 best_weights_only: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, save_last=save_last, **kwargs)
        self.best_weights_only = bool(best_weights_only)
        if last_every_n_train_steps < 0:
            raise ValueError(f"ResumableCheckpoint(last_every_n_train_steps={last_every_n_train_steps}): expected an "
                             "integer >= 0 (0 = only at the end of every epoch)")
        self.last_every_n_train_steps = int(last_every_n_train_steps)
        self._writing_last = False

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict) -> None:
        # Lightning's own calls (next to a top-k save, possibly during validation) are ignored: see _write_last
        if self._writing_last:
            super()._save_last_checkpoint(trainer, monitor_candidates)

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        if self._writing_last or not self.best_weights_only or self.save_weights_only:
            super()._save_checkpoint(trainer, filepath)
            return
        self.save_weights_only = True  # a top-k file: weights only (see the class docstring)
        try:
            super()._save_checkpoint(trainer, filepath)
        finally:
            self.save_weights_only = False

    def _write_last(self, trainer: pl.Trainer) -> None:
        if (not self.save_last or trainer.fast_dev_run or trainer.state.fn != TrainerFn.FITTING
                or trainer.sanity_checking):
            return
        # writing last.ckpt must not count as "saved at this step", which would make ModelCheckpoint skip a top-k
        # save due at the same step
        saved_step = self._last_global_step_saved
        self._writing_last = True
        try:
            super()._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        finally:
            self._writing_last = False
            self._last_global_step_saved = saved_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        n = self.last_every_n_train_steps
        # the epoch's last batch is covered by the end-of-epoch write that follows
        if n and trainer.global_step % n == 0 and batch_idx + 1 < trainer.num_training_batches:
            self._write_last(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        self._write_last(trainer)


class CrashCheckpoint(pl.Callback):
    """Write a resumable checkpoint when training stops on an exception, unless the state is not finite.

    A plain callback, deliberately not Lightning's ``OnExceptionCheckpoint``: with one of those attached, Lightning
    2.6 turns every ``fit(ckpt_path=None)`` into ``ckpt_path="last"``, so a fresh run silently resumed from any
    ``last.ckpt`` or ``on_exception.ckpt`` it could find (also a leftover of another experiment). Here a run resumes
    only from the checkpoint it is given.

    * Written only once training has begun (``on_train_start``, i.e. after a checkpoint was restored and the sanity
      check ran): a failure while loading a checkpoint or setting up leaves nothing that could be mistaken for
      progress. Never in ``fast_dev_run`` or outside ``fit``.
    * A ``fit`` that finishes (``on_fit_end``) removes its own ``on_exception.ckpt`` and the crash checkpoint it
      resumed from (a file named ``<filename>*.ckpt``; never ``last.ckpt`` or a named checkpoint).

    Args:
        dirpath: folder of the checkpoint; default: the ``ModelCheckpoint``'s folder (``<run dir>/checkpoints``).
            Without a ``ModelCheckpoint`` and without ``dirpath`` nothing is written (debug runs stay clean).
        filename: file name without extension.
    """

    FILE_EXTENSION = ".ckpt"

    def __init__(self, dirpath: str | Path | None = None, filename: str = "on_exception") -> None:
        super().__init__()
        if not filename:
            raise ValueError("CrashCheckpoint(filename=''): the file name cannot be empty")
        self.dirpath = dirpath
        self.filename = filename
        self.last_path: str | None = None
        self._training = False
        self._resumed_from: str | None = None

    def _resolve_dir(self, trainer: pl.Trainer) -> str | None:
        if self.dirpath is not None:
            return str(self.dirpath)
        ckpt = trainer.checkpoint_callback
        return str(ckpt.dirpath) if ckpt is not None and getattr(ckpt, "dirpath", None) else None

    def _rank_path(self, trainer: pl.Trainer) -> str | None:
        folder = self._resolve_dir(trainer)
        if folder is None:
            return None
        suffix = "" if trainer.global_rank == 0 else f"-rank{trainer.global_rank}"
        return str(Path(folder) / f"{self.filename}{suffix}{self.FILE_EXTENSION}")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._training = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._training = True
        self._resumed_from = str(trainer.ckpt_path) if trainer.ckpt_path else None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.last_path = None
        if trainer.state.fn != TrainerFn.FITTING or not self._training or trainer.fast_dev_run:
            return  # nothing to resume after validate/test/predict, a failed restore or a debug run
        if isinstance(exception, FloatingPointError):
            warnings.warn(f"no exception checkpoint after a non-finite loss; {_last_good(trainer)}", stacklevel=2)
            return
        bad = first_non_finite(pl_module.state_dict())
        if bad is not None:
            warnings.warn(f"no exception checkpoint: weight '{bad}' is not finite; {_last_good(trainer)}", stacklevel=2)
            return
        path = self._rank_path(trainer)
        if path is None:
            return
        # Not trainer.save_checkpoint: it ends with a barrier, and the other ranks may never reach it.
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, path)
        self.last_path = path
        print(f"[medattn] {type(exception).__name__} at global step {trainer.global_step}: resumable checkpoint "
              f"written to {path} (resume with --ckpt_path {path}, or --ckpt_path last)")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the run finished: an exception checkpoint of an earlier attempt (here, or the one resumed from) is stale
        stale = [self._rank_path(trainer)]
        if trainer.is_global_zero and self._resumed_from and Path(self._resumed_from).name.startswith(self.filename):
            stale.append(self._resumed_from)
        for path in stale:
            if path is not None and Path(path).is_file():
                Path(path).unlink()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(filename=self.filename)


class NonFiniteGuard(pl.Callback):
    """Never write a checkpoint with NaN/Inf weights; stop on a non-finite training loss.

    Args:
        check_loss: also check ``outputs["loss"]`` after each training step, for modules that do not call
            ``MedAttnModule.check_finite`` themselves (every registered method does, which
            ``tests/test_faults.py`` checks). Off by default: it costs a second host sync per step.
    """

    def __init__(self, check_loss: bool = False) -> None:
        super().__init__()
        self.check_loss = check_loss
        self._step = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self._step = trainer.global_step  # the step the loss belongs to (the optimiser step has run by batch end)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if not self.check_loss:
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if torch.is_tensor(loss) and not bool(torch.isfinite(loss.detach()).all()):
            raise NonFiniteLossError(f"loss term 'loss' is {loss.detach().float().item()} at global step "
                                    f"{self._step} (epoch {trainer.current_epoch}). Training stopped; "
                                    f"{_last_good(trainer)}.")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Another error raised by NaN weights (e.g. a sampler or a library check in ``forward`` that runs before the
        loss guard): add what actually happened to its message."""
        if isinstance(exception, (FloatingPointError, KeyboardInterrupt)) or getattr(exception, "_medattn_nan", False):
            return
        bad = first_non_finite(pl_module.state_dict())
        if bad is None:
            return
        message = str(exception.args[0]) if exception.args else ""
        exception.args = (f"{message}\n\nmedattn: weight '{bad}' is not finite at global step {trainer.global_step} "
                          f"(epoch {trainer.current_epoch}): training diverged before this error. "
                          f"{_last_good(trainer).capitalize()}.", *exception.args[1:])
        exception._medattn_nan = True  # type: ignore[attr-defined]

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        bad = first_non_finite(checkpoint.get("state_dict", {}))
        if bad is not None:
            raise NonFiniteLossError(f"refusing to write a checkpoint at global step {trainer.global_step}: weight "
                                    f"'{bad}' is not finite. Training stopped; {_last_good(trainer)}.")


_OOM_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory", "failed to allocate")


def is_out_of_memory(exception: BaseException) -> bool:
    if isinstance(exception, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exception, RuntimeError) and any(m in str(exception).lower() for m in _OOM_MESSAGES)


def _batch_knobs(trainer: pl.Trainer) -> list[str]:
    datamodule = trainer.datamodule
    if datamodule is None:
        return []
    values = dict(getattr(datamodule, "hparams", {}) or {})
    values.update({k: v for k, v in vars(datamodule).items() if not k.startswith("_")})
    return [f"data.init_args.{k}={v}" for k, v in sorted(values.items())
            if k.endswith("batch_size") and isinstance(v, int) and v > 0]


class OutOfMemoryHint(pl.Callback):
    """Re-raise out-of-memory errors with the settings that reduce memory (see the module docstring)."""

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not is_out_of_memory(exception) or getattr(exception, "_medattn_hint", False):
            return
        knobs = _batch_knobs(trainer)
        accumulate = trainer.accumulate_grad_batches
        lines = [
            f"medattn: out of memory at global step {trainer.global_step} (stage {trainer.state.stage}, "
            f"precision {trainer.precision}, batch sizes are per rank). To reduce memory:",
            "  * a smaller batch: " + (", ".join(knobs) if knobs else "the DataModule's *batch_size arguments")
            + f", with --trainer.accumulate_grad_batches (now {accumulate}) raised by the same factor to keep the "
            "global batch;",
            "  * --trainer.precision bf16-mixed (about half the activation memory, and faster on recent GPUs);",
            "  * --model.init_args.channels_last true (conv nets; less memory traffic with bf16);",
            "  * a smaller data.init_args.image_size / patch_size, or a smaller backbone.",
        ]
        hint = "\n".join(lines)
        message = str(exception.args[0]) if exception.args else ""
        exception.args = (f"{message}\n\n{hint}", *exception.args[1:])
        exception._medattn_hint = True  # type: ignore[attr-defined]
