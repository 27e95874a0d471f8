"""One 2-process CPU DDP job (gloo) that trains every requested method in turn, for ``tests/test_ddp_parity.py``.

Starting the processes is the expensive part of a DDP test (each imports torch, Lightning, timm and MONAI: about
7-15 s per ``ddp_spawn`` fit on 2 cores), so one pair of processes, started with ``torch.multiprocessing.spawn``,
runs all methods: each rank sets the variables of an externally launched job (``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``MASTER_*``), joins one gloo process group, and runs ``Trainer(devices=2, strategy=DDPStrategy())``
per method, which Lightning then runs in the existing processes and process group. Per method and rank it writes
``<out>/<name>/rank<r>.pt`` (flat model + optimiser state), ``metrics<r>.json`` (the validation metrics) and
``done<r>``, or ``error<r>.txt`` with the traceback; for ``RESUME_METHODS`` also
``resume/{full,resumed}/rank<r>.pt`` (an uninterrupted 2-epoch DDP run and a DDP run resumed from its epoch-1
checkpoint). A method that kills a process (a native gloo abort) ends the job; :func:`run_job` then records it as
crashed and starts a new job for the methods after it.
"""

from __future__ import annotations

import json
import os
import socket
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
TIMEOUT = timedelta(seconds=180)  # a rank left alone in a collective fails instead of hanging for 30 minutes
TRAIN_BATCHES = 2


def parity_build(name: str, data_root: Path, world: int):
    """Tiny module and DataModule (augmentation off) with per-rank batch sizes for ``world`` processes: halved for
    2 processes when every size is even, else doubled for 1 process (same global batch either way)."""
    from reliability_utils import batch_size_fields, build, disable_augmentation, scale_batch_sizes

    module, data = build(name, Path(data_root) / name)
    disable_augmentation(data)
    sizes = batch_size_fields(data)
    halvable = all(v % 2 == 0 for v in sizes.values() if v > 0)
    if world == 2 and halvable:
        scale_batch_sizes(data, 0.5)
    elif world == 1 and not halvable:
        scale_batch_sizes(data, 2)
    return module, data


def parity_trainer(root: Path, devices: int, callbacks, strategy="auto"):
    import lightning.pytorch as pl

    return pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      devices=devices, strategy=strategy, max_epochs=1, limit_train_batches=TRAIN_BATCHES,
                      num_sanity_val_steps=0, enable_checkpointing=False, default_root_dir=root,
                      callbacks=list(callbacks))


def cam_capable(name: str, data_root: Path) -> bool:
    """2D attention maps and CXR-style evaluation batches (image, attention mask, labels, boxes)."""
    from lightning_modules.base import MedAttnModule

    module, data = parity_build(name, data_root, world=1)
    if type(module).attention_maps is MedAttnModule.attention_maps:
        return False
    data.prepare_data()
    data.setup("validate")
    batch = next(iter(data.val_dataloader()))
    return {"image", "attention_mask", "labels", "boxes", "box_labels"} <= set(batch) and batch["image"].dim() == 4


def _run_method(name: str, out: Path, data_root: Path, rank: int, cams: bool) -> None:
    from lightning.pytorch.strategies import DDPStrategy

    from callbacks.cam_logger import CAMLogger
    from reliability_utils import FreezeBatchNorm, RankStateDump, method_callbacks

    folder = out / name
    module, data = parity_build(name, data_root, world=WORLD)
    callbacks = [RankStateDump(folder), FreezeBatchNorm(), *method_callbacks(module)]
    if cams:
        callbacks.append(CAMLogger(num_images=4))
    trainer = parity_trainer(folder, WORLD, callbacks, strategy=DDPStrategy(timeout=TIMEOUT))
    trainer.fit(module, data)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    (folder / f"metrics{rank}.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
    (folder / f"done{rank}").touch()


RESUME_METHODS = ("cam_baseline", "dcmt", "oxnet")  # augmentation per rank, an EMA teacher, all-reduced prototypes


def _run_resume(name: str, out: Path, data_root: Path, rank: int) -> None:
    """Under DDP, with augmentation on: 2 epochs, versus 1 epoch + resume from its checkpoint in a scrambled process
    state. Validation is off (it has nothing to do with resuming, and it keeps OXnet's mAP sync out of the way)."""
    import random

    import lightning.pytorch as pl
    import numpy as np
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import DDPStrategy

    from callbacks.reliability import AtomicCheckpointIO, RngStateCallback
    from reliability_utils import RankStateDump, build, method_callbacks

    folder = out / name / "resume"

    def trainer(tag: str, checkpoints: bool) -> pl.Trainer:
        callbacks = [RankStateDump(folder / tag), RngStateCallback()]
        if checkpoints:
            callbacks.append(ModelCheckpoint(dirpath=folder / "ckpt", filename="{epoch}", save_top_k=-1))
        return pl.Trainer(accelerator="cpu", devices=WORLD, strategy=DDPStrategy(timeout=TIMEOUT), max_epochs=2,
                          limit_train_batches=TRAIN_BATCHES, limit_val_batches=0, logger=False,
                          enable_progress_bar=False, enable_model_summary=False, default_root_dir=folder,
                          plugins=[AtomicCheckpointIO()], callbacks=callbacks + method_callbacks(module))

    module, data = build(name, Path(data_root) / name)
    trainer("full", True).fit(module, data)
    module, data = build(name, Path(data_root) / name)
    torch.manual_seed(1000 + rank)
    np.random.seed(2000 + rank)
    random.seed(3000 + rank)
    trainer("resumed", False).fit(module, data, ckpt_path=str(folder / "ckpt" / "epoch=0.ckpt"))
    (folder / f"done{rank}").touch()


def _worker(rank: int, port: int, names: list[str], cams: dict[str, bool], out: str, data_root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), NODE_RANK="0", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=TIMEOUT)
    out_path = Path(out)
    for name in names:
        (out_path / name).mkdir(parents=True, exist_ok=True)
        try:
            if name in RESUME_METHODS:  # first: the parity run below may end the job (a native gloo abort)
                _run_resume(name, out_path, Path(data_root), rank)
        except Exception:  # noqa: BLE001 - recorded for the test
            (out_path / name / f"resume_error{rank}.txt").write_text(traceback.format_exc())
        dist.barrier()
        try:
            _run_method(name, out_path, Path(data_root), rank, cams[name])
        except Exception:  # noqa: BLE001 - recorded for the test, then the next method
            (out_path / name / f"error{rank}.txt").write_text(traceback.format_exc())
        dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(names: list[str], out: Path, data_root: Path) -> None:
    """Train ``names`` under 2-process DDP, restarting after a method that kills a process."""
    cams = {name: cam_capable(name, data_root) for name in names}
    remaining = list(names)
    while remaining:
        try:
            mp.spawn(_worker, args=(_free_port(), remaining, cams, str(out), str(data_root)), nprocs=WORLD, join=True)
        except Exception as err:  # noqa: BLE001 - a process died; find the method it died in
            crashed = next(n for n in remaining if not all(
                (out / n / f"done{r}").exists() or (out / n / f"error{r}.txt").exists() for r in range(WORLD)))
            (out / crashed).mkdir(parents=True, exist_ok=True)
            (out / crashed / "crashed.txt").write_text(f"{type(err).__name__}: {err}")
            remaining = remaining[remaining.index(crashed) + 1:]
        else:
            remaining = []
