"""OXnet vs RetinaNet at equal work (suite preset ``oxnet``): stage 1 -> both stage-2 arms from its checkpoint with
the same stage-2 settings, and an epoch budget that means the same box-stream passes in both arms."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from experiments import suite as S

ROOT = Path(__file__).resolve().parents[1]


def _data_args(path: str) -> dict:
    return yaml.safe_load((ROOT / path).read_text())["data"]["init_args"]


def test_both_arms_count_epochs_on_the_same_box_stream():
    """An epoch is one pass over the box stream in both configs, with the same box images per step, so equal
    epochs are equal box-stream work (changing either config's epoch_stream or box batch breaks the claim)."""
    retina = _data_args(S.ARMS["retinanet"].config.format(dataset="synthetic"))
    oxnet = _data_args(S.ARMS["oxnet"].config.format(dataset="synthetic"))
    assert S.ARMS["retinanet_stage1"].config == S.ARMS["retinanet"].config
    assert retina["epoch_stream"] == oxnet["epoch_stream"] == "box"
    assert retina["box_batch_size"] == oxnet["box_batch_size"]
    keys = ("box_fraction", "seed", "image_size", "test_fraction", "val_fraction")
    assert {k: retina.get(k) for k in keys} == {k: oxnet.get(k) for k in keys}  # the same box images and split


def _commands(printed: str) -> dict[str, list[str]]:
    return {line.split(": python ", 1)[0].split()[-1]: shlex.split(line.split(": python ", 1)[1])
            for line in printed.splitlines() if line.startswith("[suite] ") and ": python " in line}


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_epoch_budget_reaches_every_stage_and_both_arms_start_from_stage_1(tmp_path, capsys):
    assert S.main(["--preset", "oxnet", "--seeds", "3", "--stage1-epochs", "5", "--epochs", "9", "--dry-run",
                   "--tag", "T", "--out", str(tmp_path)]) == 0
    argv = _commands(capsys.readouterr().out)
    assert list(argv) == ["retinanet_stage1-l1-s3", "retinanet-l1-s3", "oxnet-l1-s3"]
    epochs = {arm: _flag(a, "--trainer.max_epochs") for arm, a in argv.items()}
    assert epochs == {"retinanet_stage1-l1-s3": "5", "retinanet-l1-s3": "9", "oxnet-l1-s3": "9"}
    assert all(_flag(a, "--trainer.max_time") == "null" for a in argv.values())
    stage1 = argv["retinanet_stage1-l1-s3"]
    assert "--model.init_args.init_checkpoint" not in stage1 and "--model.init_args.freeze_bn" not in stage1
    best = tmp_path / "oxnet-retinanet_stage1-l1" / "retinanet_stage1-l1-s3-T" / "checkpoints" / "best.ckpt"
    for arm in ("retinanet-l1-s3", "oxnet-l1-s3"):  # the same stage-1 checkpoint and the same fresh optimiser
        assert _flag(argv[arm], "--model.init_args.init_checkpoint") == str(best)
        assert _flag(argv[arm], "--model.init_args.optimizer.init_args.lr") == "3e-4"
        assert _flag(argv[arm], "--model.init_args.freeze_bn") == "true"


def test_stage1_epochs_need_an_epoch_budget(tmp_path):
    import pytest

    with pytest.raises(SystemExit):
        S.main(["--preset", "oxnet", "--stage1-epochs", "5", "--minutes", "10", "--dry-run", "--out", str(tmp_path)])
