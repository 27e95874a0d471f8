"""``AtomicCheckpointIO``: a checkpoint file is either the old one or the complete new one, never half of each.

Lightning's ``TorchCheckpointIO`` serialises into memory and writes through an fsspec transaction whose temporary
file lives in the system temp folder; moving it onto the checkpoint folder is a *copy* when the two are on
different file systems (``/tmp`` vs a cluster's scratch), so a job killed during that copy leaves a truncated
``last.ckpt``. Here the temporary file is created next to the target, flushed and fsynced, then renamed over it
with ``os.replace`` (atomic on POSIX and Windows within one file system) and the folder is fsynced, so the rename
itself survives a power loss. A failed or killed write leaves the previous checkpoint untouched; the temporary
file is removed on an exception, and stale ones left by a killed process (``.<name>.tmp-<pid>`` whose process is
gone) are removed by the next write of the same file. Remote paths (``s3://`` ...) use Lightning's own writer.

Loading (:func:`load_checkpoint_file`, used by ``AtomicCheckpointIO.load_checkpoint`` - hence by
``trainer.fit/validate/test(ckpt_path=...)`` and ``medattn ... --ckpt_path`` - and by OXnet's ``init_checkpoint``):

* Checkpoints are data, never code: ``torch.load(weights_only=True)``, whose unpickler builds tensors, containers
  and primitives only. The few other objects medattn checkpoints hold (:func:`checkpoint_safe_globals`: the default
  optimiser factory saved in the hyperparameters, ``pathlib`` paths) are allow-listed explicitly, for the load
  only (a ``torch.serialization.safe_globals`` context, nothing process-wide). Anything else - a pickle whose
  ``__reduce__`` would call ``os.system`` - is refused before it runs, with an error naming the file and the
  global. There is no code-running fallback: an explicit ``weights_only=False`` is refused (allow-list a harmless
  global with ``torch.serialization.add_safe_globals`` instead).
* Integrity: ``torch.save`` writes a zip archive that stores a CRC-32 of every record (the pickled structure and
  each tensor storage), in every checkpoint - ours and plain Lightning/PyTorch ones alike. Those checksums are
  verified before unpickling (``zipfile.testzip``; ~0.05 s per 100 MB), so a flipped byte anywhere in the content,
  a truncated file, an empty file or a file that is not a checkpoint raises :class:`CheckpointError` naming the
  file and what is wrong, instead of loading silently wrong weights or a bare ``EOFError``. CRC-32 is not a
  defence against tampering (a forger recomputes it); ``weights_only`` is.

Example::

    trainer = pl.Trainer(plugins=[AtomicCheckpointIO()], callbacks=[ModelCheckpoint(save_last=True)])
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

__all__ = ["AtomicCheckpointIO", "CheckpointError", "atomic_torch_save", "checkpoint_safe_globals",
           "load_checkpoint_file", "verify_checkpoint"]


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be loaded as what it claims to be (empty, corrupt, not a checkpoint, or
    holding code); the message names the file."""


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


def checkpoint_safe_globals() -> list:
    """The non-tensor Python objects that medattn checkpoints may hold, allow-listed for ``weights_only`` loading:
    ``pathlib`` paths (data-file hyperparameters). The default optimiser factory, saved with a module's
    hyperparameters, is allow-listed process-wide where it is defined (``lightning_modules/base.py``), so callbacks
    import nothing from the Lightning modules. Each is harmless to look up or call. Extend with
    ``torch.serialization.add_safe_globals``."""
    import pathlib

    return [pathlib.Path, pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePath,
            pathlib.PurePosixPath, pathlib.PureWindowsPath]


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is a non-empty zip-format checkpoint whose every record matches
    the CRC-32 that ``torch.save`` stored for it. A legacy (pre-zip) ``torch.save`` file carries no checksum and is
    left to the unpickler."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): it was never written completely (a full disk "
                              "or a copy that failed). Use another checkpoint, e.g. the previous epoch's.")
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as err:
        raise CheckpointError(f"checkpoint {path} ({size} bytes) is corrupt: its zip structure cannot be read "
                              f"({type(err).__name__}: {err})") from err
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} ({size} bytes) is corrupt: record {bad!r} does not match the "
                              "CRC-32 checksum stored when it was saved (the file changed on disk or in transfer). "
                              "Use another copy or checkpoint.")


def _unpickling_error(path: Path, err: Exception) -> CheckpointError:
    """torch's weights-only refusal, reworded: which global was refused, and no advice to unpickle code."""
    found = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(err))))
    if not found:  # not a refused object but bytes that are no pickle at all (e.g. "Unsupported operand 149")
        detail = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(err))
        return CheckpointError(f"checkpoint {path} ({path.stat().st_size} bytes) is not a PyTorch checkpoint (neither "
                               "a zip archive nor a legacy torch.save pickle" + (f": {detail[1]})" if detail else ")"))
    return CheckpointError(
        f"checkpoint {path}: refused to load the Python object(s) {', '.join(found)}, which are not plain data. "
        "medattn loads checkpoints with torch.load(weights_only=True), so a checkpoint cannot run code. If you wrote "
        "this file yourself and the object is harmless, allow-list it with torch.serialization.add_safe_globals"
        "([...]) before loading.")


def load_checkpoint_file(path: str | os.PathLike, map_location: Any = None) -> Any:
    """``torch.load`` a local checkpoint as data (``weights_only``, :func:`checkpoint_safe_globals` allowed) after
    :func:`verify_checkpoint`. Every failure is a :class:`CheckpointError` (or ``FileNotFoundError``) naming the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    verify_checkpoint(path)
    try:
        with torch.serialization.safe_globals(checkpoint_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise _unpickling_error(path, err) from err
    except (EOFError, RuntimeError, ValueError, KeyError, IndexError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"checkpoint {path} ({path.stat().st_size} bytes) cannot be read: it is truncated, "
                              f"corrupt or not a PyTorch checkpoint ({type(err).__name__}: {err})") from err


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic and whose loads are data-only and verified (see the
    module docstring).

    Loading: ``weights_only=None`` (what ``trainer.fit(ckpt_path=...)`` and ``medattn fit --ckpt_path`` pass) means
    ``True``: the checkpoints of every registered method load as data once :func:`checkpoint_safe_globals` is
    allowed, so nothing needs the unpickler that runs code. An explicit ``weights_only=False`` (``--weights_only
    false``) is refused: a checkpoint never runs code here.
    """

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        map_location = map_location if map_location is not None else (lambda storage, loc: storage)
        if weights_only is False:
            raise CheckpointError(f"checkpoint {path}: weights_only=False was asked for, but medattn loads checkpoints "
                                  "as data only (unpickling code could run anything stored in the file). If the file "
                                  "holds a harmless object that is refused, allow-list it with "
                                  "torch.serialization.add_safe_globals([...]) before loading.")
        if "://" in str(path) and not str(path).startswith("file://"):  # remote: Lightning's reader, still data-only
            with torch.serialization.safe_globals(checkpoint_safe_globals()):
                return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return load_checkpoint_file(str(path).removeprefix("file://"), map_location)

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path) and not str(path).startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        atomic_torch_save(checkpoint, str(path).removeprefix("file://"))
