"""External testing (issue 14 s6): a trained model evaluated on every image of another dataset.

* ``CXRDataModule(split="all")`` (``--data.init_args.split all``): every image is the test split, exactly once,
  also when the evaluation sampler shards it over DDP ranks; no train/val split, no min_per_class error (the classes
  below it are named in the summary note); ``fit``/``validate`` refused naming the option.
* ``Module.load_from_checkpoint(path)`` with no arguments restores every registered method built by the CLI (the
  network's config is kept in the hyper-parameters), with identical outputs; a module built in Python gets an error
  naming the missing argument.
* End to end (the README's example): a model trained on covid-cxr-mini with ``medattn fit``, tested with ``medattn
  test ... --ckpt_path best.ckpt`` on a second folder in the same layout: every image of it evaluated once, the data
  named in the summary, a class absent from it reported as undefined by the AUROC policy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from datamodules.cxr import CXRDataModule
from datamodules.manifest import DataError
from datamodules.readers.covid import COVIDChestXray
from reliability_utils import flat_tensors

REPO = Path(__file__).resolve().parents[1]
SYNTHETIC_CACHE = REPO / ".pytest_cache" / "medattn-synthetic"  # shared with test_resume_configs


def write_covid_folder(root: Path, findings: list[str], patients: list[str] | None = None) -> Path:
    """A tiny folder in the covid-chestxray-dataset layout (``metadata.csv`` + ``images/``): one random 40x48 PNG
    per finding, PA view, X-ray; patient ``patients[i]`` (default: one patient per image)."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i, finding in enumerate(findings):
        name = f"img{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (40, 48), dtype=np.uint8), "L").save(root / "images" / name)
        rows.append({"patientid": (patients or [str(100 + i) for i in range(len(findings))])[i], "finding": finding,
                     "view": "PA", "modality": "X-ray", "folder": "images", "filename": name})
    pd.DataFrame(rows).to_csv(root / "metadata.csv", index=False)
    return root


def _datamodule(root: Path, **kwargs) -> CXRDataModule:
    reader = COVIDChestXray(root, finding_map="covid_binary", mask_dir=None, boxes_csv=None)
    return CXRDataModule(reader, image_size=16, eval_batch_size=3, **kwargs)


# ------------------------------------------------------------------------------------------- split="all"
def test_split_all_evaluates_every_image_once_on_every_rank_count(tmp_path):
    """Seven images of five patients, two of one patient: the test split is all seven, train and val are empty, and
    the evaluation loader yields each image id exactly once, for 1, 2 and 3 DDP ranks (the ranks' shards are
    disjoint and cover the folder). The config's fractions are ignored and named in the summary."""
    findings = ["COVID-19", "COVID-19", "Streptococcus", "COVID-19", "ARDS", "COVID-19", "COVID-19"]
    root = write_covid_folder(tmp_path / "ext", findings, patients=["1", "1", "2", "3", "4", "5", "5"])
    dm = _datamodule(root, split="all", val_fraction=0.15, test_fraction=0.25, min_per_class=0)
    dm.setup("test")
    assert len(dm.splits["test"]) == 7 and len(dm.splits["train"]) == 0 and len(dm.splits["val"]) == 0
    test_row = dm.summary.set_index("split").loc["test"]
    assert test_row["images"] == 7 and test_row["patients"] == 5
    assert "every image (split=all)" in test_row["note"] and "test_fraction=0.25" in test_row["note"]
    expected = sorted(f"img{i:03d}.png" for i in range(7))
    for world in (1, 2, 3):
        seen = []
        for rank in range(world):
            dm.trainer = SimpleNamespace(world_size=world, global_rank=rank, is_global_zero=rank == 0)
            seen += [image_id for batch in dm.test_dataloader() for image_id in batch["image_id"]]
        assert sorted(seen) == expected, f"{world} ranks: {sorted(seen)}"
    dm.trainer = None
    assert "every image (split=all), 7 images of 5 patients" in dm.describe_split("test")


def test_split_all_refuses_fit_and_validate_naming_the_option(tmp_path):
    dm = _datamodule(write_covid_folder(tmp_path / "ext", ["COVID-19", "ARDS"]), split="all")
    for stage in ("fit", "validate"):
        with pytest.raises(DataError, match=r"split='all' \(--data.init_args.split all\)"):
            dm.setup(stage)
    with pytest.raises(DataError, match="split='all'"):
        dm.train_dataloader()
    with pytest.raises(ValueError, match=r"split must be one of \('patients', 'all'\).*'everything'"):
        _datamodule(tmp_path / "ext", split="everything")


def test_split_all_keeps_a_class_below_min_per_class_and_names_it(tmp_path):
    """An external set is what it is: 3 COVID-19 and 0 other images with min_per_class=10 (the default) still
    builds; the summary note and a warning name each class below the minimum with its count."""
    dm = _datamodule(write_covid_folder(tmp_path / "ext", ["COVID-19"] * 3), split="all")
    with pytest.warns(UserWarning, match="fewer than min_per_class=10: COVID-19 3, Other 0"):
        dm.setup("test")
    assert len(dm.splits["test"]) == 3
    # the default split still refuses the same data (its remedy, other fractions or seeds, exists there)
    with pytest.raises(DataError, match="fewer than min_per_class=10"):
        _datamodule(tmp_path / "ext", test_fraction=0.34, val_fraction=0.0).setup("test")


# ------------------------------------------------------------------------------- load_from_checkpoint
# method -> (its synthetic config, flags that only shrink it): what `medattn fit -c <config>` builds
SHRINK_CXR = ["--data.init_args.image_size", "32", "--data.init_args.reader.init_args.n_images", "60",
              "--data.init_args.reader.init_args.image_size", "64", "--data.init_args.eval_batch_size", "4",
              "--data.init_args.min_per_class", "0"]
TEST_BACKBONE = ["--model.init_args.net.init_args.backbone", "test_resnet"]
CONFIGS = {
    "cam_baseline": ("cam_baseline/synthetic", [*TEST_BACKBONE, *SHRINK_CXR]),
    "pcam": ("pcam/synthetic", [*TEST_BACKBONE, *SHRINK_CXR]),
    "magsd": ("magsd/synthetic", [*TEST_BACKBONE, *SHRINK_CXR]),
    "oxnet": ("oxnet/synthetic", SHRINK_CXR),
    "retinanet": ("retinanet/synthetic", SHRINK_CXR),
    "dcmt": ("dcmt/synthetic", ["--data.init_args.reader.init_args.n_subjects", "20", "--data.init_args.image_size",
                                "32", "--data.init_args.eval_batch_size", "4", "--data.init_args.min_per_class", "0"]),
    "dcmt_subject": ("dcmt_subject/synthetic", ["--data.init_args.eval_batch_size", "4"]),
    "nonlocal_unet": ("nonlocal_unet/synthetic", ["--data.init_args.reader.init_args.shape", "[24, 24, 24]",
                                                  "--data.init_args.patch_size", "16"]),
}


def test_every_registered_method_is_covered():
    from lightning_modules.registry import list_methods

    assert sorted(CONFIGS) == list_methods()


def _outputs(module, batch) -> dict[str, torch.Tensor]:
    """Every tensor in ``predict_step``'s output (nested lists and dicts too: detections), by its path."""
    module.eval()
    with torch.no_grad():
        torch.manual_seed(0)
        out = module.predict_step(batch, 0)
    return flat_tensors(out)


@pytest.mark.parametrize("name", [n if n == "pcam" else pytest.param(n, marks=pytest.mark.slow) for n in sorted(CONFIGS)])
def test_load_from_checkpoint_restores_a_cli_built_method_with_no_arguments(name, tmp_path, monkeypatch):
    """The module ``medattn`` builds from the method's shipped config, saved by a Trainer, comes back from
    ``<Class>.load_from_checkpoint(path)`` and from ``MedAttnModule.load_from_checkpoint(path)`` with no arguments:
    same class, identical weights (network included) and identical ``predict_step`` outputs on a test batch."""
    import lightning.pytorch as pl

    from experiments.cli import MedAttnCLI
    from lightning_modules.base import MedAttnModule
    from lightning_modules.registry import METHODS

    config, flags = CONFIGS[name]
    monkeypatch.setenv("MEDATTN_CACHE", str(SYNTHETIC_CACHE))
    monkeypatch.chdir(tmp_path)
    if name == "dcmt_subject":
        from test_resume_configs import _prepare

        _prepare("dcmt_subject/synthetic", tmp_path)  # stage 2 reads stage 1's slice features
    cli = MedAttnCLI(args=["-c", str(REPO / "experiments" / f"{config}.yaml"), *flags,
                           "--trainer.logger", "false", "--trainer.callbacks", "[]"], run=False)
    model, data = cli.model, cli.datamodule
    assert isinstance(model, METHODS[name].module_class)
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu")
    trainer.strategy.connect(model)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path, weights_only=True)  # as best.ckpt may be
    data.prepare_data()
    data.setup("predict")
    batch = next(iter(data.predict_dataloader()))
    expected = _outputs(model, batch)
    assert expected
    for cls in (type(model), MedAttnModule):
        restored = cls.load_from_checkpoint(path)
        assert type(restored) is type(model)
        state, original = restored.state_dict(), model.state_dict()
        assert state.keys() == original.keys() and all(torch.equal(state[k], original[k]) for k in state)
        got = _outputs(restored, batch)
        assert got.keys() == expected.keys()
        for key in expected:
            assert torch.equal(got[key], expected[key]), f"{name}: {key} differs after load_from_checkpoint"


def test_python_built_module_names_the_argument_a_checkpoint_lacks(tmp_path):
    """A module built in Python has its network as an object, which no checkpoint stores: the error names the
    argument and the call that works (before: jsonargparse's or Python's bare "missing argument 'net'")."""
    import lightning.pytorch as pl

    from callbacks.checkpoint_io import CheckpointError
    from lightning_modules.registry import METHODS

    module, _ = METHODS["cam_baseline"].tiny(tmp_path)
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu")
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "py.ckpt")
    cls = type(module)
    with pytest.raises(CheckpointError, match=r"py\.ckpt: CAMClassifierModule.load_from_checkpoint needs net.*net=\.\.\."):
        cls.load_from_checkpoint(tmp_path / "py.ckpt")
    restored = cls.load_from_checkpoint(tmp_path / "py.ckpt", net=type(module.net)("test_resnet", num_classes=module.net.num_classes))
    assert all(torch.equal(a, b) for a, b in zip(restored.state_dict().values(), module.state_dict().values()))


# ------------------------------------------------------------------------------------------ end to end
COVID = [str(REPO / "experiments" / "magsd" / "covid_cxr.yaml"), str(REPO / "experiments" / "magsd" / "resnet50.yaml")]
MODEL_FLAGS = TEST_BACKBONE  # test must name the model as fit did (a differing model argument is refused)
DATA_FLAGS = ["--data.init_args.image_size", "32", "--data.init_args.eval_batch_size", "8",
              "--trainer.precision", "32-true", "--trainer.enable_progress_bar", "false"]


def _copy_subset(sample: Path, root: Path, keep) -> list[str]:
    """``root`` in the layout of ``sample`` (metadata.csv, images/, masks*/, boxes.csv) holding the rows for which
    ``keep(row)`` is true; images and masks are symlinks. Returns the image file names."""
    meta = pd.read_csv(sample / "metadata.csv", dtype=str, keep_default_na=False)
    rows = meta[[bool(keep(r)) for r in meta.itertuples(index=False)]]
    for folder in ("images", "masks", "masks_lungvae"):
        (root / folder).mkdir(parents=True)
        for name in rows["filename"]:
            source = sample / folder / (name if folder == "images" else f"{Path(name).stem}.png")
            if source.is_file():
                os.symlink(source, root / folder / source.name)
    rows.to_csv(root / "metadata.csv", index=False)
    boxes = pd.read_csv(sample / "boxes.csv", dtype=str, keep_default_na=False)
    boxes[boxes["filename"].isin(set(rows["filename"]))].to_csv(root / "boxes.csv", index=False)
    return sorted(rows["filename"])


def _medattn(*args: str) -> None:
    from experiments.cli import main

    main(list(args))


@pytest.mark.slow
@pytest.mark.needs_shared_data
def test_medattn_test_on_another_folder_evaluates_every_image(tmp_path, monkeypatch, shared_data, capsys):
    """The README example: ``medattn fit`` on covid-cxr-mini, then ``medattn test`` of its best.ckpt on a second
    folder in the same layout, given as a data overlay with ``split: all``: every image of the folder is evaluated
    once (test_predictions.csv), and the printed table and summary.json name the folder and split=all. A folder
    without COVID-19 images is tested too: no min_per_class error, and the AUROC policy reports no defined class
    (binary task: neither class has both outcomes) instead of a number. ``fit`` with split=all is refused."""
    sample = shared_data / "covid-cxr-mini"
    if not sample.is_dir():
        pytest.skip(f"{sample} is not there")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("MEDATTN_DATA", str(shared_data))
    monkeypatch.delenv("MEDATTN_RUN_DIR", raising=False)
    monkeypatch.setenv("MEDATTN_RUN_ID", "train")
    _medattn("fit", *[a for c in COVID for a in ("-c", c)], *MODEL_FLAGS, *DATA_FLAGS, "--trainer.max_epochs", "1",
             "--trainer.limit_train_batches", "2", "--test_after_fit", "false")
    runs = tmp_path / "runs" / "magsd-covid_cxr"
    best = runs / "resnet50-train" / "checkpoints" / "best.ckpt"
    assert best.is_file()

    # a second folder of the same format: every fourth image of the sample, its masks and boxes
    external = tmp_path / "external"
    names = _copy_subset(sample, external, lambda row, i=iter(range(10**6)): next(i) % 4 == 0)
    overlay = tmp_path / "external.yaml"
    overlay.write_text(f"data:\n  init_args:\n    reader:\n      init_args:\n        root: {external}\n    split: all\n")
    monkeypatch.setenv("MEDATTN_RUN_ID", "external")
    capsys.readouterr()
    _medattn("test", *[a for c in COVID for a in ("-c", c)], *MODEL_FLAGS, *DATA_FLAGS, "-c", str(overlay),
             "--ckpt_path", str(best))
    printed = capsys.readouterr().out
    run = runs / "resnet50-external"
    predictions = pd.read_csv(run / "test_predictions.csv", dtype={"image_id": str})
    assert len(predictions) == len(names) == 30 and sorted(predictions["image_id"]) == names
    described = f"COVIDChestXray {external.resolve()}, test split: every image (split=all), {len(names)} images"
    assert f"Test data: {described}" in printed
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_data"].startswith(described) and summary["test/auroc_classes"] == 2

    # a folder holding no COVID-19 image (flags instead of an overlay)
    others = tmp_path / "others"
    n_others = len(_copy_subset(sample, others, lambda row: not row.finding.startswith("COVID-19")))
    monkeypatch.setenv("MEDATTN_RUN_ID", "others")
    _medattn("test", *[a for c in COVID for a in ("-c", c)], *MODEL_FLAGS, *DATA_FLAGS, "--ckpt_path", str(best),
             "--data.init_args.reader.init_args.root", str(others), "--data.init_args.split", "all")
    summary = json.loads((runs / "resnet50-others" / "summary.json").read_text())
    assert len(pd.read_csv(runs / "resnet50-others" / "test_predictions.csv")) == n_others > 0
    # no class has both outcomes: none enters the macro AUROC, which is undefined (NaN, or left out of the logs)
    assert summary["test/auroc_classes"] == 0 and np.isnan(summary.get("test/auroc", float("nan")))
    assert not [key for key in summary if key.startswith("test/auroc_per_class")]

    # fit on split=all is an error naming the option (one line, exit status 2)
    monkeypatch.setenv("MEDATTN_RUN_ID", "fit_all")
    with pytest.raises(SystemExit) as stop:
        _medattn("fit", *[a for c in COVID for a in ("-c", c)], *MODEL_FLAGS, *DATA_FLAGS, "--data.init_args.split",
                 "all", "--trainer.max_epochs", "1")
    assert stop.value.code == 2 and "--data.init_args.split all" in capsys.readouterr().err
