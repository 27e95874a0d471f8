"""Evaluating a checkpoint on other data may change where the data is and how it is split, but a change of
preprocessing (image size, normalisation, ...) changes what the network sees: ``medattn test`` says so aloud."""

from __future__ import annotations

import pytest

from experiments.checkpoint_args import preprocessing_changes
from experiments.cli import MedAttnCLI
from tests.test_run_identity import RUNS, TINY, _copy_run, one_epoch, workdir  # noqa: F401  (fixtures)


def test_only_preprocessing_differences_are_reported():
    here = {"class_path": "datamodules.cxr.CXRDataModule",
            "init_args": {"image_size": 512, "split": "all", "eval_batch_size": 8, "val_fraction": 0.1, "seed": 3,
                          "normalize": "imagenet", "reader": {"class_path": "R", "init_args": {"root": "/other"}}}}
    # the checkpoint's datamodule hyper-parameters: _class_path plus the init args
    saved = {"_class_path": "datamodules.cxr.CXRDataModule", "image_size": 256, "split": "patients",
             "eval_batch_size": 64, "val_fraction": 0.2, "seed": 0, "normalize": "half",
             "reader": {"class_path": "R", "init_args": {"root": "/train"}}}
    assert preprocessing_changes(here, saved) == [
        "--data.init_args.image_size: 512 here, 256 in the checkpoint",
        "--data.init_args.normalize: 'imagenet' here, 'half' in the checkpoint"]
    assert preprocessing_changes({**here, "init_args": {**here["init_args"], "image_size": 256,
                                                        "normalize": "half"}}, saved) == []


def test_medattn_test_warns_when_the_image_size_differs_from_training(workdir, one_epoch):  # noqa: F811
    best = _copy_run(one_epoch) / "checkpoints" / "best.ckpt"
    assert best.is_file()
    with pytest.warns(UserWarning, match=r"prepares the data differently from training[\s\S]*image_size: 48 here, 32"):
        MedAttnCLI(args=["test", *TINY, "--ckpt_path", str(best), "--data.init_args.image_size", "48"])
