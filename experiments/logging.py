"""``MedAttnLogger``: W&B (online with credentials, offline without) plus a CSV of the same metrics, both in
one per-run directory that also holds the resolved config and the checkpoints.

Run directory: ``<save_dir>/<group or project>/<name>-<run_id>/`` with ``config.yaml``, ``metrics.csv``,
``hparams.yaml``, ``checkpoints/`` and ``wandb/offline-run-*`` (or ``wandb/run-*`` online). ``run_id`` is
shared by every DDP rank: it comes from ``MEDATTN_RUN_ID``, ``TORCHELASTIC_RUN_ID`` (torchrun) or
``SLURM_JOB_ID``, or is made by rank 0 and inherited by the ranks Lightning launches.
"""

from __future__ import annotations

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


def make_run_dir(save_dir: str | Path, group: str, name: str) -> Path:
    """A fresh run directory, or the parent's one in a rank that Lightning launched (``LOCAL_RANK`` set)."""
    inherited = os.environ.get(RUN_DIR_ENV)
    if inherited and os.environ.get("LOCAL_RANK") not in (None, "0"):
        return Path(inherited)
    run_dir = Path(save_dir) / group / f"{name}-{_run_id()}"
    os.environ[RUN_DIR_ENV] = str(run_dir)
    return run_dir


def logger_flags(save_dir: str | Path, group: str, name: str) -> list[str]:
    """``medattn`` flags that place a run in ``<save_dir>/<group>/<name>-<run id>/`` (see :func:`make_run_dir`);
    the scripts that launch series of runs (acceptance runs, the suite) use them to give each arm its own group."""
    return ["--trainer.logger.init_args.save_dir", str(save_dir), "--trainer.logger.init_args.group", group,
            "--trainer.logger.init_args.name", name]


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
        self._csv = CSVLogger(save_dir=str(self.run_dir), name="", version="")
        if offline:
            # explicit, because wandb keeps process-wide settings: a process that earlier ran with
            # WANDB_MODE=disabled would otherwise make a disabled run instead of an offline one
            kwargs.setdefault("mode", "offline")
        super().__init__(name=name, save_dir=str(self.run_dir), project=project, group=group, tags=tags,
                         job_type=job_type, offline=offline, id=self.run_dir.name.replace(".", "-"), **kwargs)
        if offline:
            rank_zero_info(f"[medattn] W&B: no credentials found, logging offline. Run directory: {self.run_dir}\n"
                           f"[medattn] Upload later with: wandb sync {self.run_dir}/wandb/offline-run-*")

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
