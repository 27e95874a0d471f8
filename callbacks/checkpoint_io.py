"""``AtomicCheckpointIO``: a checkpoint file is either the old one or the complete new one, never half of each.

Lightning's ``TorchCheckpointIO`` serialises into memory and writes through an fsspec transaction whose temporary
file lives in the system temp folder; moving it onto the checkpoint folder is a *copy* when the two are on
different file systems (``/tmp`` vs a cluster's scratch), so a job killed during that copy leaves a truncated
``last.ckpt``. Here the temporary file is created next to the target, flushed and fsynced, then renamed over it
with ``os.replace`` (atomic on POSIX and Windows within one file system) and the folder is fsynced, so the rename
itself survives a power loss. A failed or killed write leaves the previous checkpoint untouched; the temporary
file is removed on an exception, and stale ones left by a killed process (``.<name>.tmp-<pid>`` whose process is
gone) are removed by the next write of the same file. Remote paths (``s3://`` ...) use Lightning's own writer.

Example::

    trainer = pl.Trainer(plugins=[AtomicCheckpointIO()], callbacks=[ModelCheckpoint(save_last=True)])
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

__all__ = ["AtomicCheckpointIO", "atomic_torch_save"]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _remove_stale_temporaries(path: Path) -> None:
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` through a temporary file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic (see the module docstring).

    Loading: ``weights_only=None`` (what ``trainer.fit(ckpt_path=...)`` and ``medattn fit --ckpt_path`` pass) means
    ``False`` here. Checkpoints of medattn runs hold hyperparameters such as the optimiser factory, which torch's
    default ``weights_only=True`` loader refuses ("Unsupported global: ...default_optimizer"), so a plain resume
    would fail. This trusts checkpoint files as torch < 2.6 did; pass ``--weights_only true`` for a file you did not
    write.
    """

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        kwargs = {} if map_location is None else {"map_location": map_location}
        return super().load_checkpoint(path, weights_only=False if weights_only is None else weights_only, **kwargs)

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path) and not str(path).startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        atomic_torch_save(checkpoint, str(path).removeprefix("file://"))
