"""Helpers shared by the reliability tests (contract, DDP parity, resume, faults).

Kept in an importable module (not a ``test_*`` file, not a closure) because ``ddp_spawn`` pickles the callbacks
and the child processes import them by module name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

import lightning_modules
from lightning_modules.registry import METHODS

TRAINER_QUIET = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)


def method_names() -> list[str]:
    return sorted(METHODS)


# Contract violations found by these tests and reported to the method owners. Each is an ``xfail(strict=True)``: the
# test still runs, and once the method is fixed it XPASSes, which fails the suite until the entry is removed.
KNOWN_VIOLATIONS: dict[tuple[str, str], str] = {
}


def methods_for(check: str) -> list:
    """``method_names()`` as pytest params, known violations of ``check`` marked ``xfail(strict=True)``."""
    import pytest

    return [pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=KNOWN_VIOLATIONS[(check, name)]))
            if (check, name) in KNOWN_VIOLATIONS else name for name in method_names()]


def build(name: str, data_dir: Path, seed: int = 0) -> tuple[pl.LightningModule, pl.LightningDataModule]:
    """The method's tiny (module, datamodule), built after ``seed_everything(seed)`` as the CLI does."""
    pl.seed_everything(seed, verbose=False)
    return METHODS[name].tiny(Path(data_dir))


def method_callbacks(module: pl.LightningModule) -> list[pl.Callback]:
    """The callbacks a method needs to train as intended, when its module does not add them itself
    (``configure_callbacks``): ``EMATeacher`` for a mean teacher, ``PrototypeMomentum`` for prototype buffers."""
    from callbacks.ema_teacher import EMATeacher
    from callbacks.prototype_momentum import PrototypeMomentum

    own = module.configure_callbacks() or []
    own = own if isinstance(own, (list, tuple)) else [own]
    extra: list[pl.Callback] = []
    if teacher_of(module) is not None and not any(isinstance(c, EMATeacher) for c in own):
        extra.append(EMATeacher())
    if "prototypes" in dict(module.named_buffers()) and not any(isinstance(c, PrototypeMomentum) for c in own):
        extra.append(PrototypeMomentum())
    return extra


def flat_state(module: nn.Module, trainer: pl.Trainer | None = None) -> dict[str, torch.Tensor]:
    """Model (student, teacher, prototypes: every parameter and buffer), optimiser and scheduler state as one flat
    ``name -> tensor`` dict."""
    out = {f"model/{k}": v.detach().cpu().clone() for k, v in module.state_dict().items()}
    if trainer is not None:
        for i, optimizer in enumerate(trainer.optimizers):
            state = optimizer.state_dict()
            for pid, slots in state["state"].items():
                for key, value in slots.items():
                    out[f"optimizer{i}/{pid}/{key}"] = torch.as_tensor(value).detach().cpu().clone()
            for g, group in enumerate(state["param_groups"]):
                out[f"optimizer{i}/group{g}/lr"] = torch.tensor(float(group["lr"]))
        for i, config in enumerate(trainer.lr_scheduler_configs):
            for key, value in config.scheduler.state_dict().items():
                if isinstance(value, (int, float)) or torch.is_tensor(value):
                    out[f"scheduler{i}/{key}"] = torch.as_tensor(value)
    return out


def flat_tensors(obj: Any, prefix: str = "", numbers: bool = False,
                 out: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor in nested dicts, lists and tuples as ``path -> tensor`` (detached, on the CPU), the path
    ``prefix/key/index/...``; with ``numbers`` also int and float values (not bools) as 0-d tensors. Adds to
    ``out`` when given; returns it."""
    out = {} if out is None else out
    if torch.is_tensor(obj):
        out[prefix] = obj.detach().cpu()
    elif isinstance(obj, dict):
        for key, value in obj.items():
            flat_tensors(value, f"{prefix}/{key}", numbers, out)
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            flat_tensors(value, f"{prefix}/{i}", numbers, out)
    elif numbers and isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix] = torch.tensor(float(obj))
    return out


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    """Largest |a − b| over common keys (and the key); the key sets must match."""
    assert set(a) == set(b), f"different keys: {sorted(set(a) ^ set(b))[:5]}"
    worst, where = 0.0, ""
    for key in a:
        x, y = a[key], b[key]
        assert x.shape == y.shape, f"{key}: shape {tuple(x.shape)} vs {tuple(y.shape)}"
        if x.numel() == 0:
            continue
        if x.dtype == torch.bool:
            x, y = x.int(), y.int()
        d = float((x.double() - y.double()).abs().max())
        if d != d:  # NaN in one of them
            d = float("inf") if not torch.equal(x.isnan(), y.isnan()) else 0.0
        if d > worst or not where:
            worst, where = d, key
    return worst, where


def teacher_of(module: nn.Module) -> nn.Module | None:
    teacher = getattr(module, "teacher", None)
    return teacher if isinstance(teacher, nn.Module) else None


# ---------------------------------------------------------------------------------------- callbacks
class RankStateDump(pl.Callback):
    """At the end of ``fit``, every rank writes its flat state (model, optimiser) to ``<folder>/rank<r>.pt``."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = str(folder)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        os.makedirs(self.folder, exist_ok=True)
        torch.save(flat_state(pl_module, trainer), os.path.join(self.folder, f"rank{trainer.global_rank}.pt"))


class FreezeBatchNorm(pl.Callback):
    """BatchNorm in eval mode during training (running statistics fixed). BN batch statistics are per rank by
    design under DDP without SyncBatchNorm (which gloo/CPU does not support), so the world-size parity runs freeze
    them to compare what the method itself does across ranks."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        for m in pl_module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


class GradProbe(pl.Callback):
    """Records, at the first optimiser step, which parameters have a gradient (``None`` = missing)."""

    def __init__(self) -> None:
        self.missing: list[str] | None = None
        self.non_finite: list[str] = []
        self.frozen_with_grad: list[str] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.missing is not None:
            return
        self.missing = [n for n, p in pl_module.named_parameters() if p.requires_grad and p.grad is None]
        self.non_finite = [n for n, p in pl_module.named_parameters()
                           if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
        self.frozen_with_grad = [n for n, p in pl_module.named_parameters()
                                 if not p.requires_grad and p.grad is not None]


class PoisonWeights(pl.Callback):
    """Before the training batch of global step ``at_step``, fill every trainable weight with NaN (a diverged run)."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at_step:
            with torch.no_grad():
                for p in pl_module.parameters():
                    if p.requires_grad and p.is_floating_point():
                        p.fill_(float("nan"))


def batch_size_fields(datamodule: Any) -> dict[str, int]:
    """The per-rank *training* batch sizes of a DataModule (``*batch_size`` except ``eval_batch_size``), read from
    its hparams or attributes."""
    hparams = dict(getattr(datamodule, "hparams", {}) or {})
    fields = {k: v for k, v in hparams.items() if k.endswith("batch_size") and k != "eval_batch_size"}
    if not fields:
        fields = {k: v for k, v in vars(datamodule).items()
                  if k.endswith("batch_size") and k != "eval_batch_size" and isinstance(v, int)}
    return fields


def scale_batch_sizes(datamodule: Any, factor: float) -> dict[str, int]:
    """Multiply the per-rank training batch sizes in place (hparams and attributes); returns the new sizes."""
    new = {k: int(v * factor) for k, v in batch_size_fields(datamodule).items()}
    hparams = getattr(datamodule, "hparams", None)
    for key, value in new.items():
        if hparams is not None and key in hparams:
            hparams[key] = value
        if key in vars(datamodule):
            setattr(datamodule, key, value)
    return new


def disable_augmentation(datamodule: Any) -> bool:
    """Turn training augmentation off where the DataModule has an ``augment`` switch; True if it had one."""
    hparams = getattr(datamodule, "hparams", None)
    done = False
    if hparams is not None and "augment" in hparams:
        hparams["augment"] = False
        done = True
    if "augment" in vars(datamodule):
        datamodule.augment = False
        done = True
    return done


__all__ = ["KNOWN_VIOLATIONS", "TRAINER_QUIET", "FreezeBatchNorm", "GradProbe", "PoisonWeights", "RankStateDump",
           "batch_size_fields", "build", "disable_augmentation", "flat_state", "lightning_modules", "max_abs_diff",
           "method_callbacks", "method_names", "methods_for", "scale_batch_sizes", "teacher_of"]
