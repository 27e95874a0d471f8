"""What every medattn LightningModule shares: optimiser wiring, ``channels_last``, the NaN guard and the
``attention_maps`` contract that callbacks (CAM logging, localisation metrics) rely on."""

from __future__ import annotations

import inspect
import os
from typing import Any, Mapping

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from lightning.pytorch.utilities.model_helpers import _restricted_classmethod

from callbacks.checkpoint_io import CheckpointError, load_checkpoint_file
from callbacks.ema_teacher import EMATeacher
from callbacks.faults import NonFiniteLossError  # noqa: F401  (re-exported: the modules raise it from check_finite)
from callbacks.method_callbacks import module_callbacks


def default_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)


# Saved with the hyperparameters of every module that keeps the default optimiser. Allow-listed process-wide, so
# that ``Module.load_from_checkpoint(path)`` (torch's default ``weights_only=True``) loads medattn checkpoints as
# data like ``callbacks.checkpoint_io.load_checkpoint_file`` does; the allow-list only lets the unpickler look the
# function up by name, and calling it builds an optimiser.
torch.serialization.add_safe_globals([default_optimizer])


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
    #: Constructor arguments left out of the hyper-parameters when the module is built in Python: the injected
    #: network (the checkpoint holds its weights); some methods also leave out the optimiser and scheduler
    #: callables (a lambda does not pickle). Under ``medattn`` every argument is kept (:meth:`save_hyperparameters`).
    not_hyperparameters: tuple[str, ...] = ("net",)

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
        # Saved here, once for every method: from this frame Lightning collects the arguments of the whole __init__
        # chain (this class's and each subclass's), so a method's constructor does not call it. A base argument
        # that a method fixes (takes neither by name nor through **kwargs) is not one of its hyper-parameters.
        accepted = inspect.signature(type(self)).parameters
        forwarded = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
        own = ("optimizer", "scheduler", "channels_last")
        fixed = [] if forwarded else [name for name in own if name not in accepted]
        self.save_hyperparameters(ignore=[*self.not_hyperparameters, *fixed], frame=inspect.currentframe())

    # ------------------------------------------------------------------------------- checkpoints
    def save_hyperparameters(self, *args: Any, ignore: Any = None, frame: Any = None, logger: bool = True) -> None:
        """Lightning's, except under ``medattn``/LightningCLI: there the module is built from a config, and the
        arguments a module ignores because in Python they are objects (the injected network, the optimiser and
        scheduler callables) are that config's plain data (``{"class_path": ..., "init_args": {...}}``). They are
        kept, so that ``Module.load_from_checkpoint(path)`` rebuilds the whole module, network included, with no
        arguments (Lightning's ``instantiate_module`` builds it from the checkpoint's hyper-parameters)."""
        if _given_hyperparameters.get() is not None:
            ignore = None
        # the caller's frame: Lightning reads the __init__ arguments from it when no config was given
        frame = frame if frame is not None else inspect.currentframe().f_back
        super().save_hyperparameters(*args, ignore=ignore, frame=frame, logger=logger)

    @_restricted_classmethod  # as Lightning's: never called on an instance (its result would be dropped)
    def load_from_checkpoint(cls, checkpoint_path: Any, map_location: Any = None, hparams_file: Any = None,
                             strict: bool | None = None, **kwargs: Any):
        """Lightning's ``load_from_checkpoint`` after medattn's checks: a local file is read as data only with its
        CRC-32 checksums verified (``callbacks.checkpoint_io.load_checkpoint_file``: a corrupt, truncated or
        code-holding file is a :class:`CheckpointError` naming it), and a constructor argument that neither the
        checkpoint nor ``kwargs`` provide is named with what to do, instead of jsonargparse's "arguments are
        required: module.net". Checkpoints written by ``medattn fit`` hold every argument (network included,
        see :meth:`save_hyperparameters`), so ``Module.load_from_checkpoint(path)`` needs none; a module built in
        Python had its network injected as an object, which a checkpoint does not store: pass it
        (``load_from_checkpoint(path, net=...)``). Called on ``MedAttnModule`` itself, it restores the method
        class that the checkpoint names (any registered method)."""
        if isinstance(checkpoint_path, (str, os.PathLike)) and "://" not in str(checkpoint_path) and hparams_file is None:
            hparams = load_checkpoint_file(checkpoint_path, map_location="cpu").get("hyper_parameters") or {}
            target = _checkpoint_class(cls, hparams)
            if target is not cls:  # MedAttnModule.load_from_checkpoint(path): the method the checkpoint names
                return target.load_from_checkpoint(checkpoint_path, map_location=map_location, strict=strict, **kwargs)
            missing = _missing_arguments(cls, hparams, kwargs)
            if missing:
                raise CheckpointError(
                    f"checkpoint {checkpoint_path}: {cls.__name__}.load_from_checkpoint needs {', '.join(missing)}, "
                    "which the checkpoint does not hold (it was saved from a module built in Python, where the "
                    "network is an object, or by an older medattn, which did not keep the network's config). "
                    f"Pass {'them' if len(missing) > 1 else 'it'}: {cls.__name__}.load_from_checkpoint(path, "
                    + ", ".join(f"{m}=..." for m in missing) + ")")
        return super().load_from_checkpoint(checkpoint_path, map_location=map_location, hparams_file=hparams_file,
                                            strict=strict, **kwargs)

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

    attention_maps.not_implemented = True  # callbacks (no import of this package) tell "no maps" by this flag

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


class EvaluationHooks:
    """Lightning's validation and test hooks for a :class:`MedAttnModule` whose two evaluation stages differ only
    by the stage name: ``_evaluate(batch, stage)`` per batch and ``_log_metrics(stage)`` at the epoch end, with
    ``stage`` ``"val"`` or ``"test"`` (list it before ``MedAttnModule`` in the bases)."""

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")


class EMATeacherHooks:
    """For a mean-teacher :class:`MedAttnModule` (``student`` and ``teacher`` nets, hyper-parameters ``ema_decay``
    and ``teacher_train_mode``; list it before ``MedAttnModule`` in the bases): the module adds its
    :class:`~callbacks.ema_teacher.EMATeacher` itself, so any Trainer runs the method
    (:mod:`callbacks.method_callbacks`), and the teacher follows ``train()`` only with ``teacher_train_mode``
    (otherwise it stays in eval mode: EMA'd BN statistics, no dropout)."""

    def configure_callbacks(self):
        return module_callbacks(self, {"ema_decay": lambda: EMATeacher(decay=self.hparams.ema_decay)})

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.train(mode and self.hparams.teacher_train_mode)
        return self


def _checkpoint_class(cls: type, hparams: Mapping[str, Any]) -> type:
    """The class a checkpoint's ``_class_path`` names when it is a subclass of ``cls`` defined in an imported module
    or in ``lightning_modules`` (never an arbitrary module named by a file), else ``cls``."""
    import importlib
    import sys

    path = hparams.get("_class_path")
    if not isinstance(path, str) or "." not in path:
        return cls
    module, _, name = path.rpartition(".")
    if module not in sys.modules and not module.startswith("lightning_modules."):
        return cls
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return cls
    return found if isinstance(found, type) and issubclass(found, cls) else cls


def _missing_arguments(cls: type, hparams: Mapping[str, Any], given: Mapping[str, Any]) -> list[str]:
    """Required ``__init__`` arguments of ``cls`` that neither the hyper-parameters nor ``given`` hold."""
    parameters = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in parameters if p.name != "self" and p.default is inspect.Parameter.empty
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in hparams and p.name not in given]
