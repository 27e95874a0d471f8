"""The cache of the synthetic datasets (:mod:`datamodules.synthetic`, :mod:`datamodules.synthetic_slices`,
:mod:`datamodules.synthetic_volumes`): one folder per parameter hash, written atomically.

:func:`write_atomically` writes the files into a fresh temporary folder next to ``root``, writes its ``DONE``
marker (JSON with the generator name, the hash and the parameters) last, and moves the folder into place with
``os.replace``. A reader therefore never sees a half-written dataset, and when several processes (DDP ranks)
generate at once the first move wins and the others discard their copies. A ``root`` holding an older synthetic
dataset (other version or parameters) is replaced; a non-empty ``root`` without a ``DONE`` marker is not a
synthetic dataset and raises :class:`~datamodules.manifest.DataError` rather than being deleted, also when it
appears while the data is being generated.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

from datamodules.manifest import DataError

__all__ = ["default_cache_root", "is_complete", "write_atomically"]


def default_cache_root() -> Path:
    """``$MEDATTN_CACHE`` if set, else ``~/.cache/medattn``."""
    return Path(os.environ.get("MEDATTN_CACHE") or Path.home() / ".cache" / "medattn").expanduser()


def is_complete(root: str | Path, digest: str) -> bool:
    """Whether ``root`` holds a finished dataset whose ``DONE`` marker has this parameter hash."""
    try:
        return json.loads((Path(root) / "DONE").read_text())["hash"] == digest
    except (OSError, ValueError, KeyError, TypeError):
        return False


def write_atomically(root: str | Path, digest: str, params: dict, write_tree: Callable[[Path], None],
                     generator: str) -> Path:
    """Run ``write_tree(folder)`` into a temporary folder and move it to ``root`` (see the module doc), unless
    ``root`` already holds the dataset of ``digest``. ``generator`` (e.g. ``"synthetic-cxr"``) names the dataset
    in the ``DONE`` marker and in errors."""
    root = Path(root).expanduser().absolute()
    if is_complete(root, digest):
        return root
    if root.exists() and any(root.iterdir()) and not (root / "DONE").exists():
        raise DataError(f"{root}: exists, is not empty and has no DONE marker, so it is not a {generator} "
                        "dataset; refusing to overwrite it. Choose an empty or new directory.")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        write_tree(tmp)
        record = {"generator": f"medattn.{generator}", "hash": digest, "params": params}
        (tmp / "DONE").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        _move_into_place(tmp, root, digest, generator)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _move_into_place(tmp: Path, root: Path, digest: str, generator: str) -> None:
    for _ in range(3):
        try:
            os.replace(tmp, root)  # atomic; fails if root is a non-empty directory
            return
        except OSError:
            if is_complete(root, digest):
                return  # another process won the race with the same data
            if not (root / "DONE").exists() and any(root.iterdir()):
                raise DataError(f"{root}: appeared while generating and is not a {generator} dataset")
            # An outdated (or empty) dataset: move it aside atomically, then retry.
            stale = root.parent / f".{root.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                os.replace(root, stale)
            except OSError:
                continue
            shutil.rmtree(stale, ignore_errors=True)
    raise DataError(f"{root}: could not move the generated {generator} dataset into place")
