"""``RngStateCallback``: every rank's random state in the checkpoint, so a resumed run continues bit for bit.

Lightning checkpoints hold weights, optimiser, schedulers, loops and callback states, but **no random state**
(``../shared/research/ecosystem.md`` §1(d)): a run resumed at an epoch boundary then draws different dropout
masks, augmentations and data-loader seeds from the uninterrupted run and ends about 1e-6 away from it. This
callback stores, per rank:

* the global generators: torch CPU, CUDA (every visible device, when CUDA is initialised), NumPy, ``random``;
* the *data-pipeline* generators of the training loader when it runs in the main process (``num_workers=0``):
  every ``numpy.random.RandomState``/``Generator``, ``torch.Generator`` and ``random.Random`` reachable from the
  loader's dataset and sampler, e.g. the MONAI transforms' ``R`` of ``CXRTransform``. Those live in the dataset
  object, not in the global state, and a resumed run rebuilds the dataset with fresh seeds.

With ``num_workers > 0``, workers are seeded by PyTorch from the main process' torch generator each time the
loader's iterator is created, so restoring the global state reproduces them when they are re-created every epoch.
The medattn training loaders go further: their samplers hand each sample a key ``(index, epoch, position)`` and
the datasets seed the sample's augmentation from it (``datamodules/dataset.py``), so nothing random lives in a
worker's history and resume is exact with any ``num_workers``, persistent or not. For a training loader with
persistent workers whose dataset does not declare this (no ``seed_base`` attribute on the dataset), the callback
still warns on resume that the workers' random state is out of reach.

Under DDP the states are gathered to every rank with ``all_gather_object`` when a checkpoint is written (every
rank writes the same callback state, rank 0 stores it) and on resume each rank takes back its own. A checkpoint
written from an exception handler (``trainer.interrupted``) must not run collectives, since the other ranks may
not be there: it stores this rank's state only, and other ranks then start from their current state (with a
warning).

When: the states are captured at save time and restored in ``on_train_start`` of the resumed run, after which
the training iterator is re-created (Lightning made the first one before any hook, from the unrestored state):

* checkpoint at the end of epoch k (``ResumableCheckpoint``'s ``last.ckpt``): the iterator of epoch k + 1 is
  created after ``set_epoch`` from the restored state, where the uninterrupted run creates it, so the first
  resumed epoch draws its loader seed exactly where the uninterrupted run does;
* checkpoint after batch b of epoch k (``last_every_n_train_steps``, or any step checkpoint): samplers with a
  ``skip_batches`` method (the medattn training samplers) start epoch k's iterator at batch b, and the global torch
  state is put back after ``iter`` (the uninterrupted run drew that loader seed at the start of the epoch, before
  the checkpoint). A plain ``DataLoader`` has no such method: Lightning then replays the epoch from its first
  batch (correct step count, not bitwise; see ``tests/test_resume.py``);
* checkpoint written during validation after the epoch's last batch (Lightning's ``ModelCheckpoint`` with
  ``check_val_every_n_epoch > 1``, e.g. a ``best.ckpt``): no batch of that epoch is left, so the iterator is not
  re-created (re-creating it drew one loader seed too many and shifted every later random draw).

The sanity check runs inside Lightning's ``isolate_rng``. Callbacks must not draw random numbers in
``on_train_start``/``on_train_epoch_start``.

Example::

    trainer = pl.Trainer(callbacks=[RngStateCallback(), ModelCheckpoint(save_last=True)])
    trainer.fit(module, datamodule, ckpt_path="last.ckpt")   # continues the same random streams
"""

from __future__ import annotations

import random
import types
import warnings
from typing import Any, Iterable

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

__all__ = ["RngStateCallback", "capture_global_rng", "restore_global_rng", "find_generators"]

_GENERATOR_TYPES = (np.random.RandomState, np.random.Generator, torch.Generator, random.Random)
_LEAVES = (str, bytes, int, float, bool, complex, type(None), torch.Tensor, np.ndarray, type, types.ModuleType,
           types.FunctionType, types.BuiltinFunctionType, types.MethodType, torch.nn.Module)
_SKIP_MODULES = ("pandas", "numpy", "builtins", "torch.nn", "torch.distributed", "lightning", "matplotlib", "PIL")


# ------------------------------------------------------------------------------------- serialisation
# Checkpoints are loaded with torch.load(weights_only=True) by default, which refuses NumPy arrays: NumPy
# states are stored with their key array as an int64 tensor.
def _np_legacy_to_ckpt(state: tuple) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return (name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached))


def _np_legacy_from_ckpt(state: tuple) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached)


def capture_global_rng() -> dict[str, Any]:
    """torch (CPU and, when initialised, CUDA), NumPy and ``random`` states of this process."""
    state = {"torch": torch.get_rng_state(), "numpy": _np_legacy_to_ckpt(np.random.get_state()),
             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_global_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(_np_legacy_from_ckpt(state["numpy"]))
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            warnings.warn(f"checkpoint holds CUDA RNG states of {len(cuda)} devices, this process sees "
                          f"{torch.cuda.device_count()}: CUDA random streams not restored", stacklevel=2)


def find_generators(root: Any, max_depth: int = 8) -> list:
    """Every random generator reachable from ``root`` through attributes, lists, tuples and dicts, in a
    deterministic order (attribute order), each object once. Tensors, arrays, DataFrames, modules and
    functions are not entered."""
    found, seen = [], set()

    def visit(obj: Any, depth: int) -> None:
        if depth > max_depth or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, _GENERATOR_TYPES):
            found.append(obj)
            return
        if isinstance(obj, _LEAVES):
            return
        if isinstance(obj, dict):
            items: Iterable = obj.values()
        elif isinstance(obj, (list, tuple)):
            if len(obj) > 1000 and isinstance(obj[0], _LEAVES):  # a list of paths or ids: nothing inside
                return
            items = obj
        else:
            if (type(obj).__module__ or "").startswith(_SKIP_MODULES) or not hasattr(obj, "__dict__"):
                return
            items = list(vars(obj).values())
        for item in items:
            visit(item, depth + 1)

    visit(root, 0)
    return found


def _generator_state(gen) -> tuple[str, Any]:
    if isinstance(gen, np.random.RandomState):
        return "RandomState", _np_legacy_to_ckpt(gen.get_state())
    if isinstance(gen, np.random.Generator):
        return "Generator", gen.bit_generator.state
    if isinstance(gen, torch.Generator):
        return "torch.Generator", gen.get_state()
    return "random.Random", gen.getstate()


def _set_generator_state(gen, kind: str, state: Any) -> None:
    if kind == "RandomState":
        gen.set_state(_np_legacy_from_ckpt(state))
    elif kind == "Generator":
        gen.bit_generator.state = state
    elif kind == "torch.Generator":
        gen.set_state(state)
    else:
        gen.setstate(state)


def _train_loaders(trainer: pl.Trainer) -> list[DataLoader]:
    loaders = trainer.train_dataloader
    if loaders is None:
        return []
    if isinstance(loaders, DataLoader):
        return [loaders]
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    return [x for x in loaders if isinstance(x, DataLoader)] if isinstance(loaders, (list, tuple)) else []


def _data_roots(loader: DataLoader) -> list:
    return [loader.dataset, loader.sampler, loader.batch_sampler, loader.generator]


# ------------------------------------------------------------------------------------------ callback
class RngStateCallback(pl.Callback):
    """Save every rank's global and data-pipeline random state in checkpoints; restore it on resume.

    Args:
        data_pipeline: also save the generators held by the training dataset/sampler (``num_workers=0``).
        warn_persistent_workers: warn on resume when the training loader keeps persistent workers, whose random
            state cannot be checkpointed (resume is then correct but not bitwise exact).
    """

    def __init__(self, data_pipeline: bool = True, warn_persistent_workers: bool = True) -> None:
        super().__init__()
        self.data_pipeline = data_pipeline
        self.warn_persistent_workers = warn_persistent_workers
        self._trainer: pl.Trainer | None = None
        self._pending: dict | None = None

    # the trainer is not picklable with the callback (ddp_spawn); it is re-attached in setup
    def __getstate__(self) -> dict:
        return {**self.__dict__, "_trainer": None}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    # ------------------------------------------------------------------------------------ capture
    def _local_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"global": capture_global_rng(), "data": None}
        trainer = self._trainer
        if self.data_pipeline and trainer is not None:
            data = []
            for loader in _train_loaders(trainer):
                if loader.num_workers == 0:
                    data.append([_generator_state(g) for g in find_generators(_data_roots(loader))])
                else:
                    data.append(None)
            state["data"] = data
        return state

    def state_dict(self) -> dict[str, Any]:
        trainer = self._trainer
        local = self._local_state()
        world = trainer.world_size if trainer is not None else 1
        rank = trainer.global_rank if trainer is not None else 0
        if world > 1 and dist.is_available() and dist.is_initialized() and not trainer.interrupted:
            ranks: list = [None] * world
            dist.all_gather_object(ranks, local)
        else:
            ranks = [local if r == rank else None for r in range(world)]
        return {"world_size": world, "ranks": ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    # ------------------------------------------------------------------------------------ restore
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending is None:
            return
        saved, self._pending = self._pending, None
        if self.warn_persistent_workers and any(loader.num_workers > 0 and loader.persistent_workers
                                                and not hasattr(loader.dataset, "seed_base")
                                                for loader in _train_loaders(trainer)):
            warnings.warn("resuming with a training DataLoader that uses persistent_workers=True and a dataset "
                          "whose augmentation is not keyed per sample (no `seed_base`, see datamodules/dataset.py): "
                          "its workers' random state is not in checkpoints, so this run is correct but not bitwise "
                          "identical to an uninterrupted one (use persistent_workers=False or num_workers=0 for exact "
                          "resume)", stacklevel=2)
        if self._restore(trainer, saved):
            _restart_train_iterator(trainer)

    def _restore(self, trainer: pl.Trainer, saved: dict[str, Any]) -> bool:
        if saved.get("world_size") != trainer.world_size:
            warnings.warn(f"the checkpoint's random states come from {saved.get('world_size')} rank(s), this run has "
                          f"{trainer.world_size}: random streams are not restored (the resume is still valid)",
                          stacklevel=2)
            return False
        mine = saved["ranks"][trainer.global_rank]
        if mine is None:
            warnings.warn(f"the checkpoint has no random state for rank {trainer.global_rank} (it was written while "
                          "handling an exception): this rank continues from its current random state", stacklevel=2)
            return False
        restore_global_rng(mine["global"])
        if not self.data_pipeline or not mine.get("data"):
            return True
        for loader, states in zip(_train_loaders(trainer), mine["data"]):
            if states is None or loader.num_workers > 0:
                continue
            generators = find_generators(_data_roots(loader))
            if [kind for kind, _ in states] != [_generator_state(g)[0] for g in generators]:
                warnings.warn(f"the training data pipeline holds {len(generators)} random generators, the checkpoint "
                              f"{len(states)}: augmentation streams not restored", stacklevel=2)
                continue
            for gen, (kind, state) in zip(generators, states):
                _set_generator_state(gen, kind, state)
        return True


def _restart_train_iterator(trainer: pl.Trainer) -> None:
    """Re-create the training iterator after the random state was restored (see the module docstring).

    Lightning creates the first iterator of a run in ``FitLoop.setup_data``, before any hook, and that draws the
    loader's base seed from the torch generator (and, with workers, starts them and their prefetching). Loaders
    with their own ``state_dict`` (stateful, mid-epoch position) are left alone: a second ``iter`` would drop their
    position. Uses Lightning internals (``fit_loop._combined_loader``, ``_data_fetcher``, the progress trackers;
    checked with Lightning 2.6).
    """
    from lightning.fabric.utilities.data import _set_sampler_epoch

    fit_loop = trainer.fit_loop
    combined = getattr(fit_loop, "_combined_loader", None)
    fetcher = getattr(fit_loop, "_data_fetcher", None)
    if combined is None or fetcher is None:
        return
    if any(hasattr(dl, "state_dict") and hasattr(dl, "load_state_dict") for dl in combined.flattened):
        return
    mid_epoch = fit_loop.restarting  # the checkpoint's epoch had not finished
    done = fit_loop.epoch_loop.batch_progress.current.processed if mid_epoch else 0
    if mid_epoch and done >= trainer.num_training_batches:
        return  # written during the epoch-end validation: the next epoch's iterator comes from Lightning
    for dl in combined.flattened:
        _set_sampler_epoch(dl, fit_loop.epoch_progress.current.processed)
        if done:
            for sampler in (getattr(dl, "sampler", None), getattr(getattr(dl, "batch_sampler", None), "sampler", None)):
                if hasattr(sampler, "skip_batches"):
                    sampler.skip_batches(done)
                    break
    torch_state = torch.get_rng_state() if mid_epoch else None
    iter(fetcher)
    if torch_state is not None:
        torch.set_rng_state(torch_state)  # the uninterrupted run drew this loader seed before the checkpoint
