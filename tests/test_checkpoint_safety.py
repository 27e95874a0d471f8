"""Checkpoints are data, never code, and a damaged checkpoint is refused naming the file (issue 18, item 2).

Every loader medattn uses - ``AtomicCheckpointIO.load_checkpoint`` (``trainer.fit(ckpt_path=...)``, ``medattn ...
--ckpt_path``) and OXnet's ``init_checkpoint`` (``load_stage1_weights``) - goes through
``callbacks.checkpoint_io.load_checkpoint_file``: ``torch.load(weights_only=True)`` with an explicit allow-list, after
the zip CRC-32 of every record has been verified.
"""

from __future__ import annotations

import random
import zipfile
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from reliability_utils import TRAINER_QUIET, build, method_callbacks, method_names


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: the marker file appears iff the pickle ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _tiny_retina():
    from networks.retina import RetinaNet

    return RetinaNet(num_classes=2, backbone="test_resnet", fpn_levels=(3, 4, 5), fpn_channels=16, head_depth=1)


def _load_with_checkpoint_io(path: Path):
    from callbacks.checkpoint_io import AtomicCheckpointIO

    return AtomicCheckpointIO().load_checkpoint(path)  # weights_only=None: what trainer.fit(ckpt_path=...) passes


def _load_as_oxnet_init_checkpoint(path: Path):
    from lightning_modules.oxnet import OXnetModule
    from networks.oxnet import OXnet

    return OXnetModule(OXnet(_tiny_retina()), init_checkpoint=str(path))


LOADERS = {"checkpoint_io": _load_with_checkpoint_io, "oxnet_init_checkpoint": _load_as_oxnet_init_checkpoint}


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_malicious_checkpoint_is_refused_without_running(loader, tmp_path):
    marker = tmp_path / "code_ran.txt"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in _tiny_retina().state_dict().items()},
                "hyper_parameters": {"payload": _Payload(marker)}}, path)
    with pytest.raises(Exception) as err:
        LOADERS[loader](path)
    assert not marker.exists(), f"{loader}: loading the checkpoint ran the code stored in it"
    message = str(err.value)
    assert str(path) in message and ".open" in message and "weights_only=True" in message, message


def _saved_checkpoint(tmp_path: Path) -> tuple[Path, torch.Tensor]:
    """A stage-1-like checkpoint written by medattn's writer, and its first tensor."""
    from callbacks.checkpoint_io import AtomicCheckpointIO

    state = {f"net.{k}": v for k, v in _tiny_retina().state_dict().items()}
    largest = max(state, key=lambda k: state[k].numel())
    state[largest] = torch.randn_like(state[largest])  # random, so its bytes occur once in the file
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": state, "epoch": 3}, path)
    return path, state[largest]


def _corrupt(kind: str, path: Path, tensor: torch.Tensor) -> None:
    data = bytearray(path.read_bytes())
    if kind == "empty":
        data = bytearray()
    elif kind == "random_bytes":
        data = bytearray(random.Random(0).randbytes(len(data)))
    elif kind == "truncated":
        data = data[: len(data) // 2]
    elif kind == "three_flipped_bytes":  # inside the tensor's storage: the file still unpickles without the check
        start = data.find(tensor.numpy().tobytes())
        assert start >= 0
        for offset in random.Random(0).sample(range(tensor.numel() * 4), 3):
            data[start + offset] ^= 0x5A
    path.write_bytes(bytes(data))


CORRUPTIONS = {"empty": "empty (0 bytes)", "random_bytes": "not a PyTorch checkpoint",
               "truncated": "truncated", "three_flipped_bytes": "CRC-32"}


@pytest.mark.parametrize("loader", sorted(LOADERS))
@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_damaged_checkpoint_is_refused_naming_the_file(kind, loader, tmp_path):
    path, tensor = _saved_checkpoint(tmp_path)
    _corrupt(kind, path, tensor)
    with pytest.raises(Exception) as err:
        LOADERS[loader](path)
    from callbacks.checkpoint_io import CheckpointError

    assert isinstance(err.value, CheckpointError), repr(err.value)
    assert str(path) in str(err.value) and CORRUPTIONS[kind] in str(err.value), str(err.value)
    assert "weights_only=False" not in str(err.value)  # torch's advice to unpickle code is not passed on


def test_intact_checkpoint_loads_identically(tmp_path):
    path, tensor = _saved_checkpoint(tmp_path)
    loaded = _load_with_checkpoint_io(path)
    assert loaded["epoch"] == 3 and any(torch.equal(v, tensor) for v in loaded["state_dict"].values())
    _load_as_oxnet_init_checkpoint(path)  # strict load into the same architecture


@pytest.mark.parametrize("writer", ["lightning_torch_checkpoint_io", "legacy_torch_save"])
def test_checkpoints_written_elsewhere_still_load(writer, tmp_path, recwarn):
    """A checkpoint written by plain Lightning (``TorchCheckpointIO``: zip with CRCs, via fsspec) or by the legacy
    non-zip ``torch.save`` format (no checksum at all) loads, with no error and no warning."""
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    checkpoint = {"state_dict": {"w": torch.arange(6.0)}, "epoch": 1}
    path = tmp_path / f"{writer}.ckpt"
    if writer == "lightning_torch_checkpoint_io":
        TorchCheckpointIO().save_checkpoint(checkpoint, path)
    else:
        torch.save(checkpoint, path, _use_new_zipfile_serialization=False)
        assert not zipfile.is_zipfile(path)
    loaded = _load_with_checkpoint_io(path)
    assert torch.equal(loaded["state_dict"]["w"], torch.arange(6.0)) and loaded["epoch"] == 1
    assert not [w for w in recwarn if "checkpoint" in str(w.message).lower()], [str(w.message) for w in recwarn]


def test_trainer_fit_refuses_a_flipped_checkpoint_naming_it(tmp_path):
    """``trainer.fit(ckpt_path=...)`` goes through the verified loader: 3 flipped bytes in a real checkpoint's
    weights stop the resume (on 00a25c0 it resumed with a weight of 5.8e18)."""
    from lightning.pytorch.demos.boring_classes import BoringModel

    from callbacks.checkpoint_io import AtomicCheckpointIO, CheckpointError

    def trainer(epochs: int) -> pl.Trainer:
        return pl.Trainer(**TRAINER_QUIET, max_epochs=epochs, limit_train_batches=1, limit_val_batches=0,
                          enable_checkpointing=False, default_root_dir=tmp_path, plugins=[AtomicCheckpointIO()])

    first = trainer(1)
    first.fit(BoringModel())
    path = tmp_path / "one.ckpt"
    first.save_checkpoint(path)
    weight = first.lightning_module.state_dict()["layer.weight"]
    _corrupt("three_flipped_bytes", path, weight)
    with pytest.raises(CheckpointError, match="CRC-32") as err:
        trainer(2).fit(BoringModel(), ckpt_path=str(path))
    assert str(path) in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize("name", method_names())
def test_every_method_checkpoint_loads_as_data(name, tmp_path):
    """The checkpoint of every registered method (written by a real ``fit`` with the runner's callbacks) loads with
    ``torch.load(weights_only=True)`` given only :func:`checkpoint_safe_globals`, and through ``AtomicCheckpointIO``
    with Lightning's default ``weights_only=None`` (no code-running fallback needed)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from callbacks.checkpoint_io import AtomicCheckpointIO, checkpoint_safe_globals
    from callbacks.reliability import reliability_callbacks

    module, data = build(name, tmp_path / "data")
    trainer = pl.Trainer(**TRAINER_QUIET, max_epochs=1, limit_train_batches=1, limit_val_batches=0,
                         num_sanity_val_steps=0, default_root_dir=tmp_path, plugins=[AtomicCheckpointIO()],
                         callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True),
                                    *reliability_callbacks(), *method_callbacks(module)])
    trainer.fit(module, data)
    path = tmp_path / "ckpt" / "last.ckpt"
    with torch.serialization.safe_globals(checkpoint_safe_globals()):
        raw = torch.load(path, map_location="cpu", weights_only=True)
    assert set(raw["state_dict"]) == set(module.state_dict())
    loaded = AtomicCheckpointIO().load_checkpoint(path)
    assert loaded["global_step"] == 1 and "RngStateCallback" in loaded["callbacks"]


def test_load_from_checkpoint_path_loads_the_default_optimizer_as_data(tmp_path):
    """``Module.load_from_checkpoint`` uses torch's own loader (``weights_only=True`` by default), not medattn's: the
    default optimiser factory saved in the hyperparameters must be allow-listed wherever it is defined."""
    import subprocess
    import sys

    from lightning_modules.base import default_optimizer

    path = tmp_path / "hp.ckpt"
    torch.save({"hyper_parameters": {"optimizer": default_optimizer}}, path)
    # a fresh interpreter that imports only the module file, as a user script calling load_from_checkpoint does
    code = ("import torch, lightning_modules.base as b; "
            f"hp = torch.load({str(path)!r}, weights_only=True)['hyper_parameters']; "
            "assert hp['optimizer'] is b.default_optimizer")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_explicit_weights_only_false_is_refused_without_running(tmp_path):
    """No code-running fallback: ``--weights_only false`` (Lightning passes it to the checkpoint IO) is refused before
    the file is unpickled, so a malicious checkpoint cannot run even when asked for."""
    from callbacks.checkpoint_io import AtomicCheckpointIO, CheckpointError

    marker, path = tmp_path / "code_ran.txt", tmp_path / "evil.ckpt"
    torch.save({"hyper_parameters": {"payload": _Payload(marker)}}, path)
    with pytest.raises(CheckpointError, match=r"evil\.ckpt: weights_only=False was asked for.*add_safe_globals"):
        AtomicCheckpointIO().load_checkpoint(path, weights_only=False)
    assert not marker.exists()
