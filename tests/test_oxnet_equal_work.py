"""OXnet vs RetinaNet at equal work: the acceptance's epoch budget means the same box-stream passes in both arms."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from experiments.oxnet import acceptance

ROOT = Path(__file__).resolve().parents[1]


def _data_args(path: str) -> dict:
    return yaml.safe_load((ROOT / path).read_text())["data"]["init_args"]


def test_both_arms_count_epochs_on_the_same_box_stream():
    """An epoch is one pass over the box stream in both configs, with the same box images per step, so equal
    epochs are equal box-stream work (changing either config's epoch_stream or box batch breaks the claim)."""
    retina, oxnet = _data_args(acceptance.RETINANET), _data_args(acceptance.OXNET)
    assert retina["epoch_stream"] == oxnet["epoch_stream"] == "box"
    assert retina["box_batch_size"] == oxnet["box_batch_size"]
    keys = ("box_fraction", "seed", "image_size", "test_fraction", "val_fraction")
    assert {k: retina.get(k) for k in keys} == {k: oxnet.get(k) for k in keys}  # the same box images and split


def test_epoch_budget_reaches_every_stage(capsys):
    acceptance.main(["--seeds", "3", "--stage1-epochs", "5", "--stage2-epochs", "9", "--dry-run", "--out", "/tmp/unused"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[acceptance] seed 3")]
    argv = {line.split()[3].rstrip(":"): shlex.split(line.split(": ", 1)[1]) for line in lines}
    assert set(argv) == {"stage1", "retinanet", "oxnet"}
    epochs = {arm: a[a.index("--trainer.max_epochs") + 1] for arm, a in argv.items()}
    assert epochs == {"stage1": "5", "retinanet": "9", "oxnet": "9"}
    assert all(a[a.index("--trainer.max_time") + 1] == "null" for a in argv.values())
