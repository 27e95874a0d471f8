"""Faults: a crash or Ctrl-C keeps a resumable checkpoint; a NaN stops the run naming the loss term and the step and
never replaces a good checkpoint; checkpoint writes are atomic (also under SIGKILL); out-of-memory errors carry a
hint."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.checkpoint_io import load_checkpoint_file
from callbacks.reliability import (AtomicCheckpointIO, CrashCheckpoint, NonFiniteGuard, OutOfMemoryHint,
                                   RngStateCallback, atomic_torch_save, first_non_finite)
from lightning_modules.base import NonFiniteLossError
from reliability_utils import TRAINER_QUIET, PoisonWeights, build, method_callbacks, methods_for

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("faults_data")


def _trainer(root: Path, callbacks, max_epochs: int = 2, **kwargs) -> pl.Trainer:
    defaults = dict(devices=1, max_epochs=max_epochs, limit_train_batches=3, limit_val_batches=1,
                    num_sanity_val_steps=0, default_root_dir=root, plugins=[AtomicCheckpointIO()])
    return pl.Trainer(**TRAINER_QUIET, **{**defaults, **kwargs},
                      callbacks=[ModelCheckpoint(dirpath=root / "ckpt", save_last=True, every_n_train_steps=1),
                                 RngStateCallback(), NonFiniteGuard(), CrashCheckpoint(), OutOfMemoryHint(),
                                 *callbacks])


class RaiseAt(pl.Callback):
    def __init__(self, epoch: int, batch: int, exception: BaseException) -> None:
        self.epoch, self.batch, self.exception = epoch, batch, exception

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            raise self.exception


class AllocateHuge(pl.Callback):
    """A real CPU allocation failure inside a training step ("DefaultCPUAllocator: can't allocate memory")."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        torch.empty(1 << 60, dtype=torch.uint8)


class PoisonAfterStep(pl.Callback):
    """NaN weights *after* an optimiser step whose loss was finite (an overflow in the update)."""

    def __init__(self, at_batch: int) -> None:
        self.at_batch = at_batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.at_batch:
            with torch.no_grad():
                next(p for p in pl_module.parameters() if p.requires_grad).fill_(float("inf"))


# ------------------------------------------------------------------------------------------ crash / Ctrl-C
@pytest.mark.parametrize("kind", ["crash", "ctrl-c"])
def test_exception_checkpoint_is_resumable(kind, data_root, tmp_path):
    module, data = build("cam_baseline", data_root / "cam")
    exception = RuntimeError("simulated node failure") if kind == "crash" else KeyboardInterrupt()
    trainer = _trainer(tmp_path, [RaiseAt(epoch=1, batch=1, exception=exception)])
    handler = signal.getsignal(signal.SIGINT)  # Lightning ignores SIGINT after a KeyboardInterrupt
    try:
        with pytest.raises(SystemExit if kind == "ctrl-c" else RuntimeError):
            trainer.fit(module, data)
    finally:
        signal.signal(signal.SIGINT, handler)
    path = tmp_path / "ckpt" / "on_exception.ckpt"
    assert path.is_file()
    saved = load_checkpoint_file(path, map_location="cpu")
    assert saved["global_step"] == 4  # 3 steps of epoch 0 + 1 of epoch 1
    module, data = build("cam_baseline", data_root / "cam")
    resumed = _trainer(tmp_path, [])
    resumed.fit(module, data, ckpt_path=str(path))
    assert resumed.global_step == 6 and resumed.current_epoch == 2
    assert not path.exists()  # a run that finishes removes the stale exception checkpoint


# -------------------------------------------------------------------------------------------------- NaN
@pytest.mark.parametrize("name", methods_for("nan_guard"))
def test_nan_stops_naming_term_and_step_and_keeps_last_good_checkpoint(name, data_root, tmp_path):
    module, data = build(name, data_root / name)
    trainer = _trainer(tmp_path, [PoisonWeights(at_step=1), *method_callbacks(module)], max_epochs=2)
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit(module, data)
    message = str(info.value)
    print(f"[nan] {name}: {message.splitlines()[0]}")
    assert re.search(r"loss term '\w+' is (nan|inf|-inf) at global step 1 \(epoch \d\)", message), message
    last = load_checkpoint_file(tmp_path / "ckpt" / "last.ckpt", map_location="cpu")
    assert last["global_step"] == 1 and first_non_finite(last["state_dict"]) is None
    assert not (tmp_path / "ckpt" / "on_exception.ckpt").exists()
    assert not list((tmp_path / "ckpt").glob("*step=2*"))


def test_nan_weights_are_never_checkpointed(data_root, tmp_path):
    """Even when the loss is still finite (weights became Inf in the update), no checkpoint with them is written."""
    module, data = build("cam_baseline", data_root / "cam")
    trainer = _trainer(tmp_path, [PoisonAfterStep(at_batch=1)], max_epochs=1)
    with pytest.raises(NonFiniteLossError, match=r"refusing to write a checkpoint at global step 2: weight '.+' is not "
                                                 r"finite.*last good checkpoint is .*last.ckpt"):
        trainer.fit(module, data)
    last = load_checkpoint_file(tmp_path / "ckpt" / "last.ckpt", map_location="cpu")
    assert last["global_step"] == 1 and first_non_finite(last["state_dict"]) is None
    assert not (tmp_path / "ckpt" / "on_exception.ckpt").exists()


# ----------------------------------------------------------------------------------------------- atomic
def test_failed_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"global_step": 1, "w": torch.ones(1000)}, path)
    before = path.read_bytes()

    def half_write(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_write)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # the temporary file is gone


@pytest.mark.slow  # the child process imports Lightning (about 10 s on a busy 2-core machine)
def test_killed_write_leaves_previous_checkpoint(tmp_path):
    """A process SIGKILLed half-way through writing: the old file is intact; the stale temporary file is removed by
    the next write."""
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"global_step": 1, "w": torch.ones(1000)}, path)
    before = path.read_bytes()
    script = textwrap.dedent(f"""
        import os, signal, torch
        from callbacks.checkpoint_io import AtomicCheckpointIO
        real_save = torch.save
        def save_then_die(obj, f, *args, **kwargs):
            f.write(b"half a checkpoint"); f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = save_then_die
        AtomicCheckpointIO().save_checkpoint({{"global_step": 2}}, {str(path)!r})
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    stale = list(tmp_path.glob(".last.ckpt.tmp-*"))
    assert len(stale) == 1 and path.read_bytes() == before
    atomic_torch_save({"global_step": 3}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 3
    assert not list(tmp_path.glob(".last.ckpt.tmp-*"))


# ------------------------------------------------------------------------------------------------ memory
@pytest.mark.parametrize("source", ["cuda-message", "cpu-allocator"])
def test_out_of_memory_gives_a_hint(source, data_root, tmp_path):
    module, data = build("cam_baseline", data_root / "cam")
    callback = (RaiseAt(0, 0, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"))
                if source == "cuda-message" else AllocateHuge())
    trainer = _trainer(tmp_path, [callback], max_epochs=1)
    with pytest.raises((torch.OutOfMemoryError, RuntimeError)) as info:
        trainer.fit(module, data)
    message = str(info.value)
    original = "CUDA out of memory" if source == "cuda-message" else "DefaultCPUAllocator: can't allocate memory"
    assert original in message  # the original error stays first
    for knob in ("data.init_args.labeled_batch_size=4", "accumulate_grad_batches", "bf16-mixed", "channels_last"):
        assert knob in message, message


def test_unrelated_errors_get_no_hint(data_root, tmp_path):
    module, data = build("cam_baseline", data_root / "cam")
    trainer = _trainer(tmp_path, [RaiseAt(0, 0, ValueError("bad value"))], max_epochs=1)
    with pytest.raises(ValueError) as info:
        trainer.fit(module, data)
    assert str(info.value) == "bad value"


def test_error_caused_by_nan_weights_says_so(data_root, tmp_path):
    """When NaN weights make some other code fail before the loss guard (a sampler, a library check), the error's
    message gets the first non-finite weight, the step and the last good checkpoint."""
    module, data = build("cam_baseline", data_root / "cam")
    trainer = _trainer(tmp_path, [PoisonWeights(at_step=1), RaiseAt(0, 1, ValueError("invalid distribution"))],
                       max_epochs=1)
    with pytest.raises(ValueError, match=r"(?s)invalid distribution.*weight 'net\..+' is not finite at global step 1 "
                                         r"\(epoch 0\).*last good checkpoint is .*last.ckpt"):
        trainer.fit(module, data)
    assert not (tmp_path / "ckpt" / "on_exception.ckpt").exists()


class WorseEveryEpoch(pl.Callback):
    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        pl_module.log("val/fake_score", 1.0 - trainer.current_epoch)  # best at epoch 0, worse afterwards


@pytest.mark.parametrize("resumable", [False, True])
def test_last_checkpoint_is_the_last_epoch(resumable, data_root, tmp_path):
    """Lightning 2.6's ModelCheckpoint(monitor=..., save_last=True) leaves last.ckpt at the best epoch;
    ResumableCheckpoint rewrites it every epoch, so resuming a preempted job never goes back in time."""
    from callbacks.reliability import ResumableCheckpoint

    module, data = build("cam_baseline", data_root / "cam")
    kind = ResumableCheckpoint if resumable else ModelCheckpoint
    checkpoint = kind(dirpath=tmp_path / "best", monitor="val/fake_score", mode="max", save_last=True, filename="best")
    trainer = pl.Trainer(**TRAINER_QUIET, devices=1, max_epochs=3, limit_train_batches=1, limit_val_batches=1,
                         num_sanity_val_steps=0, callbacks=[WorseEveryEpoch(), checkpoint], default_root_dir=tmp_path)
    trainer.fit(module, data)
    last = load_checkpoint_file(tmp_path / "best" / "last.ckpt", map_location="cpu")
    best = load_checkpoint_file(tmp_path / "best" / "best.ckpt", map_location="cpu")
    assert best["epoch"] == 0
    assert last["epoch"] == (2 if resumable else 0)


class _NoGuardModule:
    """A training step that returns a NaN loss without calling check_finite."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step == 1 else loss

    def check_finite(self, terms) -> None:
        return None


def test_guard_checks_the_loss_of_modules_without_check_finite(data_root, tmp_path):
    module, data = build("cam_baseline", data_root / "cam")
    module.__class__ = type("Unguarded", (_NoGuardModule, type(module)), {})
    trainer = _trainer(tmp_path, [NonFiniteGuard(check_loss=True)], max_epochs=1)
    with pytest.raises(NonFiniteLossError, match=r"loss term 'loss' is nan at global step 1 \(epoch 0\)"):
        trainer.fit(module, data)
    last = load_checkpoint_file(tmp_path / "ckpt" / "last.ckpt", map_location="cpu")
    assert first_non_finite(last["state_dict"]) is None
