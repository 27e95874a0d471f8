"""``MedAttnLogger``: W&B (online with credentials, offline without) plus a CSV of the same metrics, both in
one per-run directory that also holds the resolved config and the checkpoints.

Run directory: ``<save_dir>/<group or project>/<name>-<run_id>/`` with ``config.yaml``, ``metrics.csv``,
``hparams.yaml``, ``checkpoints/`` and ``wandb/offline-run-*`` (or ``wandb/run-*`` online). ``run_id`` is
shared by every DDP rank: it comes from ``MEDATTN_RUN_ID``, ``TORCHELASTIC_RUN_ID`` (torchrun) or
``SLURM_JOB_ID``, or is made by rank 0 and inherited by the ranks Lightning launches.

Continuing a run (``medattn fit --ckpt_path ...``, SLURM requeue; see ``experiments/cli.py``): inside
:func:`continue_run` the logger reuses that run directory instead of making a new one: same run id, the same W&B run
(``resume="allow"``), and ``metrics.csv`` kept up to the checkpoint's step and appended to (rows logged after the
checkpoint belong to the lost part of the run and are logged again). :func:`experiment_runs` and
:func:`resumable_checkpoint` find the runs of one experiment and their newest resumable checkpoint.
"""

from __future__ import annotations

import contextlib
import csv
import netrc
import os
import secrets
import time
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.rank_zero import rank_zero_info

RUN_DIR_ENV = "MEDATTN_RUN_DIR"
_continuing: dict[str, Any] = {}  # set by continue_run()


def wandb_credentials_present() -> bool:
    """True when W&B can authenticate: ``WANDB_API_KEY`` or a netrc entry for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _run_id() -> str:
    for var in ("MEDATTN_RUN_ID", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"):
        value = os.environ.get(var)
        if value and value != "none":
            return value + (f"-{os.environ['SLURM_STEP_ID']}" if var == "SLURM_JOB_ID" and "SLURM_STEP_ID" in os.environ else "")
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def experiment_dir(save_dir: str | Path | None, group: str | None, name: str | None,
                   project: str | None = "medattn") -> tuple[Path, str]:
    """``(<save_dir>/<group or project>, name)``: the folder holding the runs ``<name>-<run id>`` of one experiment
    (``MedAttnLogger``'s defaults for missing values)."""
    project = project or "medattn"
    return Path(save_dir or "runs") / (group or project).replace("/", "-"), name or project


def default_run_dir(save_dir, group, name, project="medattn") -> Path:
    """The run directory a new ``MedAttnLogger`` would make now (the run id from the environment, see ``_run_id``)."""
    folder, name = experiment_dir(save_dir, group, name, project)
    return folder / f"{name}-{_run_id()}"


def resumable_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest (modification time) of ``checkpoints/last.ckpt``, ``checkpoints/on_exception.ckpt`` and Lightning's
    SLURM ``hpc_ckpt_*.ckpt`` of a run directory, or None."""
    run_dir = Path(run_dir)
    found = [run_dir / "checkpoints" / "last.ckpt", run_dir / "checkpoints" / "on_exception.ckpt",
             *run_dir.glob("hpc_ckpt_*.ckpt")]
    return max((p for p in found if p.is_file()), key=lambda p: p.stat().st_mtime, default=None)


def medattn_logger_args(trainer_section) -> dict | None:
    """``save_dir/group/name/project`` of the ``MedAttnLogger`` in a config's ``trainer`` section (a dict loaded from
    a ``config.yaml``, or the CLI's parsed namespace), or None without one."""
    logger = trainer_section.get("logger") if trainer_section is not None else None
    for item in logger if isinstance(logger, list) else [logger]:
        if hasattr(item, "get") and str(item.get("class_path", "")).endswith("MedAttnLogger"):
            args = item.get("init_args") or {}
            return {k: args.get(k) for k in ("save_dir", "group", "name", "project")}
    return None


def _logged_name(run_dir: Path) -> str | None:
    """The logger name in a run directory's ``config.yaml`` (``MedAttnLogger``'s default when unset)."""
    import yaml

    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    args = medattn_logger_args(config.get("trainer") or {})
    return None if args is None else args["name"] or args["project"] or "medattn"


def experiment_runs(save_dir, group, name, project="medattn") -> list[Path]:
    """The run directories of one experiment: ``<name>-*`` whose ``config.yaml`` names the same logger ``name`` (so
    ``pcam-synthetic`` does not match ``pcam-synthetic-avg-<id>``)."""
    folder, name = experiment_dir(save_dir, group, name, project)
    return sorted(p for p in folder.glob(f"{name}-*") if p.is_dir() and _logged_name(p) == name)


@contextlib.contextmanager
def continue_run(run_dir: str | Path, checkpoint: dict | None = None):
    """Inside the block, ``MedAttnLogger`` continues in ``run_dir`` (see the module docstring). ``checkpoint``: the
    checkpoint the run resumes from (``global_step``), or None for a restart from scratch in the same directory."""
    # the step Lightning logs with (optimiser steps; global_step counts each optimiser of a multi-optimiser module)
    loop = ((checkpoint or {}).get("loops") or {}).get("fit_loop", {}).get("epoch_loop.state_dict", {})
    step = None if checkpoint is None else int(loop.get("_batches_that_stepped", checkpoint.get("global_step", 0)))
    _continuing.update(run_dir=Path(run_dir), step=step)
    try:
        yield
    finally:
        _continuing.clear()


def make_run_dir(save_dir: str | Path, group: str, name: str) -> Path:
    """A fresh run directory, the one being continued (:func:`continue_run`), or the parent's one in a rank that
    Lightning launched (``LOCAL_RANK`` set)."""
    inherited = os.environ.get(RUN_DIR_ENV)
    if inherited and os.environ.get("LOCAL_RANK") not in (None, "0"):
        return Path(inherited)
    run_dir = _continuing.get("run_dir") or Path(save_dir) / group / f"{name}-{_run_id()}"
    os.environ[RUN_DIR_ENV] = str(run_dir)
    return run_dir


def logger_flags(save_dir: str | Path, group: str, name: str) -> list[str]:
    """``medattn`` flags that place a run in ``<save_dir>/<group>/<name>-<run id>/`` (see :func:`make_run_dir`);
    the scripts that launch series of runs (acceptance runs, the suite) use them to give each arm its own group."""
    return ["--trainer.logger.init_args.save_dir", str(save_dir), "--trainer.logger.init_args.group", group,
            "--trainer.logger.init_args.name", name]


def _metrics_before(path: Path, step: int | None) -> tuple[list[str], list[dict]] | None:
    """Header and rows of an existing ``metrics.csv`` logged up to the checkpoint's ``step`` (all rows dropped for a
    restart from scratch, ``step=None``); None when there is no such file."""
    if not path.is_file():
        return None
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        rows = list(reader)
        header = list(reader.fieldnames or [])
    if step is None:
        return header, []

    def logged_before(row: dict) -> bool:
        try:
            return int(float(row.get("step") or 0)) < step
        except ValueError:
            return True
    return header, [row for row in rows if logged_before(row)]


def _safe(method):
    """Logging must never kill a multi-day run: a W&B failure is reported once and skipped."""

    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as err:  # noqa: BLE001 - any logging backend error
            if not self._warned:
                warnings.warn(f"W&B logging failed ({type(err).__name__}: {err}); training continues and metrics "
                              f"still go to {self.run_dir / 'metrics.csv'}", stacklevel=2)
                self._warned = True
    wrapper.__name__ = method.__name__
    return wrapper


class MedAttnLogger(WandbLogger):
    """W&B logger with automatic offline mode, a CSV twin and a per-run directory.

    Args:
        project: W&B project.
        name: run name (also the run directory prefix), e.g. ``pcam-synthetic-seed0``.
        group: W&B group, so that seeds of one experiment compare together (e.g. ``pcam/synthetic``).
        tags: W&B tags (method, dataset, label budget ...).
        job_type: W&B job type (``fit``, ``test``).
        save_dir: root of all run directories.
        offline: ``None`` = offline exactly when no W&B credentials are present.
        kwargs: forwarded to :class:`lightning.pytorch.loggers.WandbLogger` / ``wandb.init``.
    """

    def __init__(self, project: str = "medattn", name: str | None = None, group: str | None = None,
                 tags: list[str] | None = None, job_type: str = "train", save_dir: str = "runs",
                 offline: bool | None = None, **kwargs: Any) -> None:
        name = name or project
        self.run_dir = make_run_dir(save_dir, (group or project).replace("/", "-"), name)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        disabled = os.environ.get("WANDB_MODE") == "disabled"
        if offline is None:
            offline = not disabled and not wandb_credentials_present()
        self._warned = False
        self.continued = bool(_continuing)
        kept = _metrics_before(self.run_dir / "metrics.csv", _continuing.get("step")) if self.continued else None
        self._csv = CSVLogger(save_dir=str(self.run_dir), name="", version="")
        if kept is not None:
            self._restore_metrics(*kept)
        if self.continued and kwargs.get("resume") is None:
            kwargs["resume"] = "allow"  # the same W&B run (its id is the run directory's name)
        if offline:
            # explicit, because wandb keeps process-wide settings: a process that earlier ran with
            # WANDB_MODE=disabled would otherwise make a disabled run instead of an offline one
            kwargs.setdefault("mode", "offline")
        super().__init__(name=name, save_dir=str(self.run_dir), project=project, group=group, tags=tags,
                         job_type=job_type, offline=offline, id=self.run_dir.name.replace(".", "-"), **kwargs)
        if offline:
            rank_zero_info(f"[medattn] W&B: no credentials found, logging offline. Run directory: {self.run_dir}\n"
                           f"[medattn] Upload later with: wandb sync {self.run_dir}/wandb/offline-run-*")

    @rank_zero_only
    def _restore_metrics(self, header: list[str], rows: list[dict]) -> None:
        # Lightning's CSV writer deletes an existing metrics.csv when it opens the directory: write the kept rows
        # back and tell it the header, so that its next save appends (or rewrites with a wider header)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
            writer = self._csv.experiment
        writer.metrics_keys = sorted(header)
        if rows:
            with open(writer.metrics_file_path, "w", newline="") as file:
                table = csv.DictWriter(file, fieldnames=writer.metrics_keys)
                table.writeheader()
                table.writerows(rows)

    # Lightning builds checkpoint and config paths from save_dir/name/version: keep everything in run_dir.
    @property
    def name(self) -> str:
        return ""

    @property
    def version(self) -> str:
        return ""

    @property
    def log_dir(self) -> str:
        return str(self.run_dir)

    @rank_zero_only
    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        # log_image/log_table also arrive here with media objects: only scalars go to the CSV
        scalars = {k: v for k, v in metrics.items()
                   if isinstance(v, (int, float)) or (hasattr(v, "numel") and v.numel() == 1)}
        if scalars:
            self._csv.log_metrics(scalars, step)
        self._safe_wandb_metrics(metrics, step)

    @_safe
    def _safe_wandb_metrics(self, metrics: dict, step: int | None) -> None:
        super().log_metrics(metrics, step)

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        self._csv.log_hyperparams(params)
        self._safe_wandb_hparams(params)

    @_safe
    def _safe_wandb_hparams(self, params: Any) -> None:
        super().log_hyperparams(params)

    @_safe
    def log_image(self, key: str, images: list, step: int | None = None, **kwargs: Any) -> None:
        super().log_image(key, images, step=step, **kwargs)

    @_safe
    def log_table(self, *args: Any, **kwargs: Any) -> None:
        super().log_table(*args, **kwargs)

    @rank_zero_only
    def save(self) -> None:
        self._csv.save()
        super().save()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self._csv.finalize(status)
        try:
            super().finalize(status)
        except Exception as err:  # noqa: BLE001
            warnings.warn(f"W&B finalize failed: {err}", stacklevel=2)
