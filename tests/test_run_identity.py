"""Run identity: a fresh run never resumes from a leftover file; ``--ckpt_path`` resumes exactly the run it names (or
the newest run of the experiment for ``last``) in that run's directory, with its best score, refusing model/data
arguments that differ from the checkpoint's; SIGTERM exits non-zero; a SLURM requeue continues its run.

Everything runs through ``experiments.cli`` with the shipped ``cam_baseline/synthetic.yaml`` made tiny (a 3-batch
epoch of 32-px images, W&B disabled), in a temporary working directory."""

from __future__ import annotations

import inspect
import os
import shutil
import signal
from pathlib import Path

import lightning.pytorch as pl
import pandas as pd
import pytest
import torch

from datamodules.cxr import CXRDataModule
from experiments.cli import MedAttnCLI, main

CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "cam_baseline" / "synthetic.yaml"
TINY = ["-c", str(CONFIG), "--model.init_args.net.init_args.backbone", "test_resnet",
        "--data.init_args.image_size", "32", "--data.init_args.reader.init_args.n_images", "60",
        "--data.init_args.reader.init_args.image_size", "64", "--data.init_args.labeled_batch_size", "4",
        "--data.init_args.eval_batch_size", "8", "--data.init_args.num_workers", "0",
        "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
if "min_per_class" in inspect.signature(CXRDataModule).parameters:  # 60 tiny images: class counts are not the point
    TINY += ["--data.init_args.min_per_class", "0"]
RUNS = Path("runs") / "cam_baseline-synthetic"
SCHEDULE = {0: 0.9, 1: 0.5, 2: 0.7}  # ScoreSchedule: best at epoch 0; epoch 2 is better than 1 but worse than 0


class ScoreSchedule(pl.Callback):
    """Logs ``val/fake`` = SCHEDULE[epoch], so which epoch is best is known in advance."""

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        pl_module.log("val/fake", SCHEDULE[trainer.current_epoch])


class SigtermAt(pl.Callback):
    """The scheduler preempts the job: SIGTERM to this process at the second batch of epoch 1."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if (trainer.current_epoch, batch_idx) == (1, 1):
            os.kill(os.getpid(), signal.SIGTERM)


def _clean_env(monkeypatch, root: Path) -> None:
    monkeypatch.chdir(root)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("MEDATTN_CACHE", str(root / "cache"))
    for var in ("MEDATTN_RUN_ID", "MEDATTN_RUN_DIR", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_STEP_ID",
                "SLURM_RESTART_COUNT", "SLURM_NTASKS", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory) -> Path:
    """A working directory holding one finished 1-epoch run ``runs/.../cam_baseline-synthetic-a`` (and the data
    cache); tests copy it instead of training it again."""
    root = tmp_path_factory.mktemp("one_epoch")
    with pytest.MonkeyPatch.context() as monkeypatch:
        _clean_env(monkeypatch, root)
        _cli("--trainer.max_epochs", "1", "--test_after_fit", "false", run_id="a")
    return root


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    _clean_env(monkeypatch, tmp_path)
    return tmp_path


def _copy_run(source: Path, run_id: str = "a") -> Path:
    """The 1-epoch run of ``one_epoch`` as run ``run_id`` of this working directory (with the data cache)."""
    if not Path("cache").exists():
        shutil.copytree(source / "cache", "cache")
    target = RUNS / f"cam_baseline-synthetic-{run_id}"
    shutil.copytree(source / RUNS / "cam_baseline-synthetic-a", target)
    return target


def _cli(*extra: str, run_id: str | None = None) -> MedAttnCLI:
    if run_id is not None:
        os.environ["MEDATTN_RUN_ID"] = run_id
    os.environ.pop("MEDATTN_RUN_DIR", None)
    try:
        return MedAttnCLI(args=["fit", *TINY, *extra])
    finally:
        os.environ.pop("MEDATTN_RUN_ID", None)


def _runs() -> list[Path]:
    return sorted(p for p in RUNS.glob("*") if p.is_dir())


def _refused(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as stop:
        main(["fit", *TINY, *args])
    assert stop.value.code == 2
    return capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ 1. no leftovers
def test_fast_dev_run_leaves_nothing_and_a_leftover_never_resumes(workdir, one_epoch):
    """Issue 19.1: ``fast_dev_run`` wrote ./checkpoints/last.ckpt and ./cams, and the next run restored that file."""
    first = _cli("--trainer.fast_dev_run", "true")
    assert first.trainer.ckpt_path is None
    assert sorted(p.name for p in workdir.iterdir()) == ["cache", "runs"]  # no ./checkpoints, ./cams, ./config.yaml
    assert not list(Path("runs").rglob("*.ckpt"))  # fast_dev_run writes no checkpoint at all
    # a leftover of an earlier run in the working directory, where Lightning would look for "last"
    real = _copy_run(one_epoch, "donor") / "checkpoints" / "last.ckpt"
    for leftover in ("checkpoints/last.ckpt", "on_exception.ckpt"):
        Path(leftover).parent.mkdir(exist_ok=True)
        shutil.copy(real, leftover)
    again = _cli("--trainer.fast_dev_run", "true", "--test_after_fit", "false")
    fresh = _cli("--trainer.max_epochs", "1", "--test_after_fit", "false")
    assert again.trainer.ckpt_path is None and fresh.trainer.ckpt_path is None
    assert fresh.trainer.global_step == 3  # trained from scratch: one epoch of 3 batches, not resumed at step 3


def test_failure_while_loading_writes_no_crash_checkpoint(workdir, one_epoch):
    """A checkpoint that fails to load (here: a weight missing) leaves no on_exception.ckpt of the half-built state."""
    last = _copy_run(one_epoch) / "checkpoints" / "last.ckpt"
    broken = torch.load(last, map_location="cpu", weights_only=True)
    broken["state_dict"].pop(next(iter(broken["state_dict"])))
    torch.save(broken, last)
    with pytest.raises(RuntimeError, match="state_dict"):
        main(["fit", *TINY, "--ckpt_path", str(last), "--trainer.max_epochs", "2"])
    assert not list(Path("runs").rglob("on_exception*.ckpt"))


# --------------------------------------------------------------------------------- 2. --ckpt_path last, same dir
def test_ckpt_path_last_continues_the_newest_run_in_its_directory(workdir, one_epoch, capsys):
    message = _refused(capsys, "--ckpt_path", "last")
    assert "no run of experiment 'cam_baseline-synthetic' has a resumable checkpoint" in message
    assert str(RUNS / "cam_baseline-synthetic-*") in message

    _copy_run(one_epoch, "old")
    os.utime(RUNS / "cam_baseline-synthetic-old" / "checkpoints" / "last.ckpt", (1, 1))  # the older one
    _copy_run(one_epoch, "new")
    before = pd.read_csv(RUNS / "cam_baseline-synthetic-new" / "metrics.csv")
    resumed = _cli("--ckpt_path", "last", "--trainer.max_epochs", "2", "--test_after_fit", "false",
                   run_id="unused")
    run = RUNS / "cam_baseline-synthetic-new"
    assert [p.name for p in _runs()] == ["cam_baseline-synthetic-new", "cam_baseline-synthetic-old"]
    assert Path(resumed.trainer.logger.run_dir) == run and resumed.trainer.logger._wandb_init["resume"] == "allow"
    assert resumed.trainer.global_step == 6  # 3 steps before, 3 after
    after = pd.read_csv(run / "metrics.csv")
    assert sorted(after["epoch"].dropna().unique()) == [0, 1]  # appended, not clobbered
    epoch0 = after[after["epoch"] == 0].drop(columns=[c for c in after if c not in before]).reset_index(drop=True)
    pd.testing.assert_frame_equal(epoch0, before[before["epoch"] == 0].reset_index(drop=True)[epoch0.columns],
                                  check_dtype=False)
    assert (run / "config.yaml").is_file() and (run / "config.attempt1.yaml").is_file()


# ------------------------------------------------------------------------------- 3. flags together with ckpt_path
def test_changed_model_or_data_arguments_are_refused_trainer_flags_allowed(workdir, one_epoch, capsys):
    last = str(_copy_run(one_epoch) / "checkpoints" / "last.ckpt")
    message = _refused(capsys, "--ckpt_path", last, "--model.init_args.optimizer.init_args.lr", "0.5")
    assert "--model.init_args.optimizer.init_args.lr: 0.5 here, 0.002 in the checkpoint" in message
    message = _refused(capsys, "--ckpt_path", last, "--data.init_args.seed", "3")
    assert "--data.init_args.seed: 3 here, 0 in the checkpoint" in message
    assert not (RUNS / "cam_baseline-synthetic-a" / "config.attempt1.yaml").exists()  # nothing was started
    resumed = _cli("--ckpt_path", last, "--trainer.max_epochs", "2", "--test_after_fit", "false")
    assert resumed.trainer.global_step == 6 and resumed.trainer.max_epochs == 2
    saved = (RUNS / "cam_baseline-synthetic-a" / "config.yaml").read_text()
    assert "lr: 0.002" in saved and "max_epochs: 2" in saved


# ------------------------------------------------------------------------------------ 4. the best score survives
def test_best_score_survives_a_resume(workdir):
    callbacks = ['--trainer.callbacks=[{"class_path": "callbacks.reliability.ResumableCheckpoint", "init_args": '
                 '{"monitor": "val/fake", "mode": "max", "save_last": true, "filename": "best"}}, '
                 '{"class_path": "test_run_identity.ScoreSchedule"}]']
    first = _cli(*callbacks, "--trainer.max_epochs", "2", "--test_after_fit", "false", run_id="a")
    assert float(first.trainer.checkpoint_callback.best_model_score) == pytest.approx(0.9)
    last = RUNS / "cam_baseline-synthetic-a" / "checkpoints" / "last.ckpt"
    resumed = _cli(*callbacks, "--ckpt_path", str(last), "--trainer.max_epochs", "3")
    checkpoint = resumed.trainer.checkpoint_callback
    assert resumed.trainer.current_epoch == 3
    assert float(checkpoint.best_model_score) == pytest.approx(0.9)  # epoch 2 scored 0.7: not the best
    assert Path(checkpoint.best_model_path) == RUNS / "cam_baseline-synthetic-a" / "checkpoints" / "best.ckpt"
    assert torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)["epoch"] == 0
    assert resumed.trainer.ckpt_path == checkpoint.best_model_path  # the after-fit test used the true best


# -------------------------------------------------------------------------------------- 5. SIGTERM, stale crash
def test_sigterm_exits_nonzero_and_a_finished_resume_removes_the_crash_checkpoint(workdir):
    handler = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as stop:
            main(["fit", *TINY, "--trainer.max_epochs", "2", "--trainer.callbacks+=test_run_identity.SigtermAt"])
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert stop.value.code == 143
    (run,) = _runs()
    crash = run / "checkpoints" / "on_exception.ckpt"
    # epoch 0 (3 steps) + the two batches started before Lightning acted on the signal
    assert torch.load(crash, map_location="cpu", weights_only=True)["global_step"] == 5
    resumed = _cli("--ckpt_path", "last", "--trainer.max_epochs", "2", "--test_after_fit", "false")
    assert resumed.trainer.ckpt_path == str(crash)  # newer than last.ckpt (epoch 0)
    assert resumed.trainer.global_step == 6 and not crash.exists()


# ------------------------------------------------------------------------------------------- 6. SLURM requeue
def test_slurm_requeue_continues_the_run(workdir, one_epoch, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    _copy_run(one_epoch, "4242")  # what the first attempt of job 4242 left
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    requeued = _cli("--trainer.max_epochs", "2", "--test_after_fit", "false")
    run = RUNS / "cam_baseline-synthetic-4242"
    assert _runs() == [run] and Path(requeued.trainer.logger.run_dir) == run
    assert Path(requeued.trainer.ckpt_path) == run / "checkpoints" / "last.ckpt"
    assert requeued.trainer.global_step == 6
    assert sorted(pd.read_csv(run / "metrics.csv")["epoch"].dropna().unique()) == [0, 1]
