"""Preemption: ``last.ckpt`` after every training epoch (and every N steps), exact resume in every shipped config.

* ``ResumableCheckpoint`` writes ``last.ckpt`` at the end of every training epoch whatever
  ``check_val_every_n_epoch`` (before: only in epochs with validation, and then during validation, before the
  epoch counted as finished), and optionally every N optimiser steps.
* A real subprocess killed with SIGKILL mid-epoch leaves a ``last.ckpt`` that is at most one epoch (or N steps) old.
* Through the CLI, each shipped synthetic config, shrunk only with flags, run straight vs stopped and resumed
  with ``--ckpt_path .../last.ckpt`` at the config's own validation schedule (a stop in an epoch without
  validation, and for configs that validate every v > 1 epochs a second stop at the validation epoch v): weights,
  optimiser, scheduler and callback state (EMA teacher, prototypes) of the final ``last.ckpt`` differ by exactly 0.
  Augmentation is keyed per sample (``datamodules/dataset.py``), so configs that ship ``num_workers: 1``
  (persistent workers: cam_baseline, pcam, oxnet, retinanet) are run with their workers.
* Mid-epoch: a step checkpoint resumes exactly too (the keyed samplers restart the epoch at the next batch).
"""

from __future__ import annotations

import inspect
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from reliability_utils import flat_tensors  # noqa: E402
from resume_kill_job import BATCHES, Tiny  # noqa: E402

from callbacks.checkpoint_io import load_checkpoint_file  # noqa: E402
from callbacks.reliability import AtomicCheckpointIO, ResumableCheckpoint  # noqa: E402


# ------------------------------------------------------------------------------------ last.ckpt every epoch
class LastCkptProbe(pl.Callback):
    """At the start of epoch e > 0, what ``last.ckpt`` holds: it must be the end of epoch e - 1."""

    def __init__(self, path: Path) -> None:
        self.path, self.seen = path, []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 0:
            return
        if not self.path.is_file():
            self.seen.append((trainer.current_epoch, None))
            return
        ckpt = load_checkpoint_file(self.path, map_location="cpu")
        self.seen.append((trainer.current_epoch, ckpt["global_step"]))


@pytest.mark.parametrize("val_every", [1, 3])
def test_last_ckpt_written_at_the_end_of_every_epoch(tmp_path, val_every):
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(torch.randn(BATCHES * 2, 4)), batch_size=2)
    probe = LastCkptProbe(tmp_path / "ck" / "last.ckpt")
    trainer = pl.Trainer(accelerator="cpu", max_epochs=5, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, check_val_every_n_epoch=val_every, num_sanity_val_steps=0,
                         plugins=[AtomicCheckpointIO()],
                         callbacks=[ResumableCheckpoint(dirpath=tmp_path / "ck", monitor="val/score", mode="max",
                                                        filename="best", save_last=True), probe])
    trainer.fit(Tiny(), loader, loader)
    assert probe.seen == [(e, e * BATCHES) for e in range(1, 5)]
    final = load_checkpoint_file(tmp_path / "ck" / "last.ckpt", map_location="cpu")
    assert final["global_step"] == 5 * BATCHES and final["epoch"] == 4
    assert (tmp_path / "ck" / "best.ckpt").is_file()  # top-k saving is unchanged


def test_last_every_n_train_steps_validates_its_argument():
    with pytest.raises(ValueError, match="last_every_n_train_steps=-1"):
        ResumableCheckpoint(last_every_n_train_steps=-1)


# ---------------------------------------------------------------------------------------------- kill -9
@pytest.mark.parametrize("every_steps", [0, 2])
def test_kill9_loses_at_most_one_epoch_or_n_steps(tmp_path, every_steps):
    """SIGKILL (no handler can run) in the middle of epoch 2 of a run that validates every 3 epochs."""
    progress = tmp_path / "progress.txt"
    job = subprocess.Popen([sys.executable, str(REPO / "tests" / "resume_kill_job.py"), str(tmp_path), "3",
                            str(every_steps)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = (2, BATCHES // 2 + 1)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            text = progress.read_text() if progress.is_file() else ""
            if text and tuple(map(int, text.split()[:2])) >= target:
                break
            if job.poll() is not None:
                pytest.fail(f"the job ended before it was killed: {job.stderr.read().decode()[-2000:]}")
            time.sleep(0.01)
        else:
            pytest.fail("the job never reached the kill point")
        job.send_signal(signal.SIGKILL)
    finally:
        job.kill()
        job.wait()
    assert job.returncode == -signal.SIGKILL
    epoch, batch, step_now = map(int, progress.read_text().split())
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.is_file(), f"killed in epoch {epoch}: no last.ckpt to resume from"
    saved = load_checkpoint_file(last, map_location="cpu")["global_step"]
    lost = step_now - saved
    limit = every_steps or BATCHES
    print(f"[kill -9] every_steps={every_steps}: killed at step {step_now} (epoch {epoch}, batch {batch}); "
          f"last.ckpt at step {saved}: {lost} step(s) lost")
    assert 0 <= lost <= limit


# ------------------------------------------------------------------------------ shipped configs, the CLI
def _cxr(n_images: int = 60, **batches: int) -> list[str]:
    flags = ["--data.init_args.image_size", "32", "--data.init_args.reader.init_args.n_images", str(n_images),
             "--data.init_args.reader.init_args.image_size", "64", "--data.init_args.eval_batch_size", "8"]
    from datamodules.cxr import CXRDataModule

    if "min_per_class" in inspect.signature(CXRDataModule).parameters:
        flags += ["--data.init_args.min_per_class", "0"]  # 60 tiny images cannot hold 10 of every class per split
    for name, value in batches.items():
        flags += [f"--data.init_args.{name}", str(value)]
    return flags


def _no_subject_counts() -> list[str]:
    from datamodules.slices import SliceStackDataModule

    if "min_per_class" in inspect.signature(SliceStackDataModule).parameters:
        return ["--data.init_args.min_per_class", "0"]  # 20 subjects hold 1-2 of a grade per split
    return []


def _roi(size: int) -> list[str]:
    """The sliding-window ROI follows the training patch; only an older config sets it itself."""
    shipped = yaml.safe_load((REPO / "experiments" / "nonlocal_unet" / "mni152.yaml").read_text())
    return ["--model.init_args.roi_size", str(size)] if "roi_size" in shipped["model"]["init_args"] else []


TEST_BACKBONE = ["--model.init_args.net.init_args.backbone", "test_resnet"]
# Only sizes shrink (image size, data size, batch sizes, backbone where the config's own is large); the schedule,
# num_workers, augmentation, callbacks and checkpointing are the shipped config's.
CXR_SYN = [*TEST_BACKBONE, *_cxr(labeled_batch_size=4)]
DCMT_SYN = ["--data.init_args.reader.init_args.n_subjects", "20", "--data.init_args.image_size", "32",
            "--data.init_args.labeled_batch_size", "2", "--data.init_args.eval_batch_size", "16", *_no_subject_counts()]
CONFIGS = {
    "cam_baseline/synthetic": CXR_SYN,
    "pcam/synthetic": CXR_SYN,
    "magsd/synthetic": CXR_SYN,
    "oxnet/synthetic": _cxr(80, box_batch_size=1, labeled_batch_size=1, unlabeled_batch_size=1),
    "retinanet/synthetic": _cxr(80, box_batch_size=2),
    "dcmt/synthetic": [*DCMT_SYN, "--data.init_args.unlabeled_batch_size", "4"],
    "dcmt/labeled_only": DCMT_SYN,  # an overlay: composed on its BASE below
    "magsd/reference": CXR_SYN,  # the reference recipe (its own augmentation and schedule), composed on its BASE
    # stage 2 reads the stage-1 feature file at the config's own features_file (written by _prepare below)
    "dcmt_subject/synthetic": ["--data.init_args.labeled_batch_size", "2", "--data.init_args.unlabeled_batch_size",
                               "2", "--data.init_args.eval_batch_size", "8"],
    "nonlocal_unet/synthetic": ["--data.init_args.reader.init_args.shape", "[24, 24, 24]",
                                "--data.init_args.patch_size", "16", "--data.init_args.batch_size", "2",
                                "--data.init_args.patches_per_epoch", "6"],
}
# Overlays that are runs of their own (another arm of a comparison), composed on the config they follow.
BASE = {"dcmt/labeled_only": "dcmt/synthetic", "magsd/reference": "magsd/synthetic"}
# Configs on the real samples in ../shared/data: config -> (sample folder, flags). Only sizes shrink;
# each keeps its shipped min_per_class (set for covid-cxr-mini), schedule, precision and workers.
COVID_CXR = ["--data.init_args.image_size", "32", "--data.init_args.labeled_batch_size", "4",
             "--data.init_args.eval_batch_size", "8", *TEST_BACKBONE]
REAL_CONFIGS = {
    "dcmt/covid_cxr": ("covid-cxr-mini", [*COVID_CXR, "--data.init_args.unlabeled_batch_size", "4",
                                          "--model.init_args.net.init_args.fa_channels", "16",
                                          "--model.init_args.net.init_args.head_channels", "16"]),
    "magsd/covid_cxr": ("covid-cxr-mini", COVID_CXR),
    "magsd/covid_4class": ("covid-cxr-mini", COVID_CXR),
    "nonlocal_unet/covid_lungs": ("covid-cxr-mini", ["--data.init_args.image_size", "32", "--data.init_args.batch_size",
                                                     "4", "--data.init_args.eval_batch_size", "4",
                                                     "--model.init_args.net.init_args.filters", "8"]),
    "nonlocal_unet/mni152": ("mni152-tissue", ["--data.init_args.patch_size", "16", "--data.init_args.batch_size", "2",
                                               "--data.init_args.patches_per_epoch", "6",
                                               "--model.init_args.net.init_args.filters", "8", *_roi(16)]),
}
# Every other shipped YAML, and why it is not in the resume matrix (test_every_shipped_config_is_covered keeps
# this list and the matrix equal to what experiments/ holds, so a new config cannot escape the resume test).
NOT_A_RUN = "a fragment composed with -c after an experiment config, or a W&B sweep grid: not a training run"
NO_IMAGES = "the shipped sample holds the label CSVs only, no images"
EXEMPT = {
    "dcmt/dcmt_h5": "needs knee slices in HDF5 (<subject>_<slice>.h5); no such data is shipped",
    "nonlocal_unet/iseg2017": "needs iSeg-2017 (T1/T2 Analyze volumes of 10 subjects); no such data is shipped",
    "pcam/nih": f"NIH ChestX-ray14: {NO_IMAGES}",
    "retinanet/nih": f"NIH ChestX-ray14: {NO_IMAGES}",
    "oxnet/nih": f"NIH ChestX-ray14: {NO_IMAGES}",
    "pcam/chexpert": f"CheXpert: {NO_IMAGES}",
    "pcam/avg": NOT_A_RUN,  # pooling overlays on pcam/*.yaml (same module, only net.pool differs)
    "pcam/lse": NOT_A_RUN,
    "magsd/resnet50": NOT_A_RUN,  # baseline overlay on magsd/*.yaml
    **{f"configs/{p.parent.name}/{p.stem}": NOT_A_RUN for p in (REPO / "experiments" / "configs").glob("*/*.yaml")},
    **{f"sweeps/{p.stem}": NOT_A_RUN for p in (REPO / "experiments" / "sweeps").glob("*.yaml")},
}


def test_every_shipped_config_is_covered():
    shipped = {str(p.relative_to(REPO / "experiments").with_suffix("")) for p in (REPO / "experiments").rglob("*.yaml")}
    matrix = set(CONFIGS) | set(REAL_CONFIGS)
    assert not matrix & set(EXEMPT), sorted(matrix & set(EXEMPT))
    assert not set(CONFIGS) & set(REAL_CONFIGS)
    missing = shipped - matrix - set(EXEMPT)
    assert not missing, f"shipped configs neither in the resume matrix nor exempt (with a reason): {sorted(missing)}"
    stale = (matrix | set(EXEMPT)) - shipped
    assert not stale, f"resume matrix or exemptions name configs that are not shipped: {sorted(stale)}"
    sweeps = {p.stem for p in (REPO / "experiments" / "sweeps").glob("*.yaml")}
    for name in sweeps:  # a sweep grid holds no trainer: it is no run of its own
        assert "trainer" not in (yaml.safe_load((REPO / "experiments" / "sweeps" / f"{name}.yaml").read_text()) or {})


def _prepare(config: str, workdir: Path) -> None:
    """What a config reads that an earlier stage writes: DC-MT stage 2 reads stage 1's slice features."""
    if config == "dcmt_subject/synthetic":
        from lightning_modules.tiny import write_tiny_features

        shipped = yaml.safe_load((REPO / "experiments" / f"{config}.yaml").read_text())
        stage1 = yaml.safe_load((REPO / "experiments" / "dcmt" / "synthetic.yaml").read_text())
        # features as wide as stage 1's head writes them; 30 subjects in 3 folds, label ratio 0.5
        write_tiny_features(workdir / shipped["data"]["init_args"]["features_file"], n_subjects=30,
                            dim=stage1["model"]["init_args"]["net"]["init_args"]["head_channels"])


def _flat(ckpt: dict) -> dict[str, torch.Tensor]:
    """Weights, optimiser, schedulers and callback states (not the RNG callback, the checkpoint paths or the
    wall-clock timer) as flat tensors."""
    out: dict[str, torch.Tensor] = {}
    flat_tensors(ckpt["state_dict"], "model", numbers=True, out=out)
    flat_tensors(ckpt["optimizer_states"], "optimizer", numbers=True, out=out)
    flat_tensors(ckpt.get("lr_schedulers", []), "scheduler", numbers=True, out=out)
    for key, value in ckpt["callbacks"].items():
        if not any(skip in key for skip in ("RngState", "Checkpoint", "Timer")):
            flat_tensors(value, f"callback/{key}", numbers=True, out=out)
    return out


def _max_diff(a: dict, b: dict) -> tuple[float, str | None]:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    worst, where = 0.0, None
    for key in a:
        if a[key].shape != b[key].shape:
            return float("inf"), key
        d = float((a[key].double() - b[key].double()).abs().max()) if a[key].numel() else 0.0
        if d > worst:
            worst, where = d, key
    return worst, where


def _val_every(config: str) -> int:
    config = BASE.get(config, config)  # the overlays do not change the schedule
    trainer = yaml.safe_load((REPO / "experiments" / f"{config}.yaml").read_text()).get("trainer") or {}
    return int(trainer.get("check_val_every_n_epoch") or 1)


@pytest.mark.slow
@pytest.mark.parametrize("config", [*sorted(CONFIGS), *(pytest.param(c, marks=pytest.mark.needs_shared_data)
                                                      for c in sorted(REAL_CONFIGS))])
def test_cli_resume_is_exact_in_shipped_config(config, tmp_path, monkeypatch, request):
    from experiments.cli import main

    monkeypatch.setenv("MEDATTN_CACHE", str(REPO / ".pytest_cache" / "medattn-synthetic"))
    monkeypatch.chdir(tmp_path)
    if config in REAL_CONFIGS:
        sample, flags = REAL_CONFIGS[config]
        data = request.getfixturevalue("shared_data")  # skips, naming the folder, when the data is absent
        if not (data / sample).is_dir():
            pytest.skip(f"{config}: the sample {data / sample} is not there")
        monkeypatch.setenv("MEDATTN_DATA", str(data))  # the config's own root, ${MEDATTN_DATA}/<sample>
    else:
        flags = CONFIGS[config]
    _prepare(config, tmp_path)
    configs = [c for c in (BASE.get(config), config) if c]  # an overlay follows the config it modifies
    base = [arg for c in configs for arg in ("-c", str(REPO / "experiments" / f"{c}.yaml"))]
    base += [*flags, "--seed_everything", "7",
            "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false",
            "--test_after_fit", "false"]  # the test split plays no part in resume (and sliding-window tests are slow)

    def run(run_id: str, epochs: int, ckpt: Path | None = None) -> Path:
        monkeypatch.setenv("MEDATTN_RUN_ID", run_id)
        monkeypatch.delenv("MEDATTN_RUN_DIR", raising=False)
        torch.manual_seed(1000 + epochs)  # a resumed process does not start with the first one's random state
        start = time.time_ns()
        main(["fit", *base, "--trainer.max_epochs", str(epochs), *(["--ckpt_path", str(ckpt)] if ckpt else [])])
        # a resumed run may continue in its checkpoint's run directory: the last*.ckpt this run wrote
        written = [p for p in (tmp_path / "runs").glob("*/*/checkpoints/last*.ckpt") if p.stat().st_mtime_ns >= start]
        assert written, f"{config}: a {epochs}-epoch run wrote no last.ckpt"
        return max(written, key=lambda p: p.stat().st_mtime_ns)

    val_every = _val_every(config)
    stops = [1, val_every] if val_every > 1 else [1]  # a stop without validation, and one at a validation epoch
    total = stops[-1] + 1
    straight = load_checkpoint_file(run("straight", total), map_location="cpu")
    ckpt = None
    for i, stop in enumerate(stops):
        ckpt = run(f"part{i}", stop, ckpt)
        assert load_checkpoint_file(ckpt, map_location="cpu")["epoch"] == stop - 1
    resumed = load_checkpoint_file(run("resumed", total, ckpt), map_location="cpu")
    diff, where = _max_diff(_flat(straight), _flat(resumed))
    print(f"[resume-cli] {config} (validation every {val_every}): stops {stops} -> {total} epochs: "
          f"max |diff| = {diff:.3g} at {where}")
    assert resumed["global_step"] == straight["global_step"]
    assert diff == 0.0, f"{config}: resumed run differs from the straight one by {diff} at {where}"
