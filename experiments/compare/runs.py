"""Reading finished runs for ``medattn compare``: run directories (``metrics.csv`` + ``config.yaml``), W&B offline
runs and a W&B server, then one row of values per run (which value of each metric a run contributes: see
:mod:`experiments.compare`)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import pandas as pd
import yaml

SKIP_DIRS = {"checkpoints", "cams", "files", "logs", "media", "compare"}


@dataclass
class Run:
    """One run, whatever its source: the resolved config, identity and the metric history (one row per log)."""

    path: str
    source: str
    history: pd.DataFrame
    config: dict = field(default_factory=dict)
    group: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)
    run_id: str = ""

    def tag(self, key: str) -> str | None:
        """Value of a ``key:value`` tag."""
        for tag in self.tags:
            if tag.startswith(f"{key}:"):
                return tag.split(":", 1)[1]
        return None


# ------------------------------------------------------------------------------------------------ reading runs
def _logger_args(config: dict) -> dict:
    logger = (config.get("trainer") or {}).get("logger")
    for item in logger if isinstance(logger, list) else [logger]:
        if isinstance(item, dict) and isinstance(item.get("init_args"), dict):
            return item["init_args"]
    return {}


def _read_yaml(path: Path) -> dict:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"cannot read {path}: {err}") from err


def load_csv_run(run_dir: Path) -> Run:
    """A run directory with ``metrics.csv`` (and ``config.yaml``, or a ``hparams.yaml`` with a ``config`` key)."""
    csv = run_dir / "metrics.csv"
    history = pd.read_csv(csv, low_memory=False)
    config = _read_yaml(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else {}
    if not config and (run_dir / "hparams.yaml").is_file():
        config = (_read_yaml(run_dir / "hparams.yaml") or {}).get("config") or {}
    logger = _logger_args(config)
    return Run(path=str(run_dir), source="csv", history=history, config=config, group=logger.get("group"),
               name=logger.get("name"), tags=list(logger.get("tags") or []), run_id=run_dir.name)


def parse_leet_records(lines: Iterable[str], path: str = "") -> Run:
    """A run from the JSON lines of ``wandb leet inspect --json <offline-run dir>`` (records ``run``, ``config``,
    ``history``); only scalar history values are kept."""
    meta: dict = {}
    config: dict = {}
    rows: list[dict] = []
    for line in lines:
        line = line.strip()
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        kind = record.get("type")
        if kind == "run":
            meta = record["run"]
        elif kind == "config":
            config.update(record["config"].get("update") or {})
        elif kind == "history":
            item = record["history"].get("item") or {}
            rows.append({k: v for k, v in item.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    resolved = config.get("config") if isinstance(config.get("config"), dict) else config
    logger = _logger_args(resolved)
    return Run(path=path, source="wandb-offline", history=pd.DataFrame(rows), config=resolved,
               group=meta.get("run_group") or logger.get("group"),
               name=meta.get("display_name") or logger.get("name"), tags=list(meta.get("tags") or logger.get("tags") or []),
               run_id=meta.get("run_id") or Path(path).name)


def load_wandb_offline(run_dir: Path) -> Run:
    """An offline W&B run directory (``offline-run-*``), read with ``wandb leet inspect --json`` (wandb >= 0.31)."""
    cmd = [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_dir)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False,
                              env={**os.environ, "WANDB_SILENT": "true"})
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ValueError(f"cannot run {' '.join(cmd)}: {err}") from err
    if done.returncode != 0:
        raise ValueError(f"`wandb leet inspect --json {run_dir}` failed ({done.returncode}): {done.stderr.strip()[-500:]}"
                         " - wandb >= 0.31 is needed to read offline runs; metrics.csv beside them needs nothing")
    return parse_leet_records(done.stdout.splitlines(), str(run_dir))


def _offline_runs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("offline-run-*") if p.is_dir() and any(p.glob("run-*.wandb")))


def find_runs(paths: Iterable[str | Path], source: str = "auto") -> list[Run]:
    """Every run below ``paths`` (run directories, folders of them, ``metrics.csv`` or ``offline-run-*`` paths)."""
    runs: list[Run] = []

    def visit(folder: Path) -> None:
        has_csv = (folder / "metrics.csv").is_file()
        offline = _offline_runs(folder / "wandb") + _offline_runs(folder)
        if folder.name.startswith("offline-run-") and any(folder.glob("run-*.wandb")):
            offline = [folder]
        if has_csv and source in ("auto", "csv"):
            runs.append(load_csv_run(folder))
            return
        if offline and source in ("auto", "wandb"):
            latest = {}  # offline-run-<date>_<time>-<id>: a resumed run has several, the latest holds everything
            for run_dir in offline:
                latest[run_dir.name.split("-", 3)[-1]] = run_dir
            runs.extend(load_wandb_offline(run_dir) for run_dir in latest.values())
            return
        if has_csv or offline:
            return
        for child in sorted(p for p in folder.iterdir()
                            if p.is_dir() and p.name not in SKIP_DIRS and not p.name.startswith(".")):
            visit(child)

    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        visit(path.parent if path.is_file() else path)
    return runs


def load_wandb_online(project: str, groups: list[str] | None = None, tags: list[str] | None = None,
                      api=None) -> list[Run]:
    """Runs of ``entity/project`` on a W&B server with one of ``groups`` and all of ``tags``, via ``wandb.Api``."""
    if api is None:
        import wandb

        api = wandb.Api(timeout=60)
    conditions = []
    if groups and not any(ch in g for g in groups for ch in "*?["):
        conditions.append({"group": {"$in": groups}})
    conditions += [{"tags": {"$in": [tag]}} for tag in tags or []]
    filters = {"$and": conditions} if len(conditions) > 1 else (conditions[0] if conditions else {})
    runs = []
    for remote in api.runs(project, filters=filters):
        history = remote.history(samples=100_000, pandas=True)
        history = history if isinstance(history, pd.DataFrame) else pd.DataFrame(history)
        # the summary holds the final values, e.g. test/* logged once (history() may sample rows away)
        final = {k: v for k, v in dict(remote.summary).items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and k.startswith(("test/", "time/"))}
        history = pd.concat([history, pd.DataFrame([final])], ignore_index=True) if final else history
        config = dict(remote.config)
        config = config["config"] if isinstance(config.get("config"), dict) else config
        runs.append(Run(path=getattr(remote, "url", remote.id), source="wandb", history=history, config=config,
                        group=remote.group, name=remote.name, tags=list(remote.tags or []), run_id=remote.id))
    return runs


# ------------------------------------------------------------------------------------------ one run -> values
def _numeric(history: pd.DataFrame) -> pd.DataFrame:
    # media columns (e.g. a logged image list) become NaN instead of breaking the arithmetic
    return history.apply(pd.to_numeric, errors="coerce")


def default_monitor(run: Run, columns: Iterable[str]) -> tuple[str | None, str]:
    """(metric, "max"|"min") of the run's ModelCheckpoint, else the first of val/auroc, val/dice, val/loss."""
    callbacks = (run.config.get("trainer") or {}).get("callbacks") or []
    for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
        args = callback.get("init_args") or {} if isinstance(callback, dict) else {}
        if "ModelCheckpoint" in str(callback.get("class_path", "")) and args.get("monitor"):
            return args["monitor"], args.get("mode") or "min"
    columns = set(columns)
    for name, mode in (("val/auroc", "max"), ("val/dice", "max"), ("val/map", "max"), ("val/loss", "min")):
        if name in columns:
            return name, mode
    return None, "max"


def run_values(run: Run, val: str = "best", monitor: str | None = None, mode: str | None = None) -> dict[str, float]:
    """The values a run contributes to the table (see the module docstring)."""
    df = _numeric(run.history)
    out: dict[str, float] = {}
    for col in df.columns:
        if col.startswith(("test/", "time/", "train/", "data/")):
            valid = df[col].dropna()
            if len(valid):
                out[col] = float(valid.iloc[-1])
    val_cols = [c for c in df.columns if c.startswith("val/")]
    if val_cols:
        per_epoch = df.groupby("epoch")[val_cols].last() if "epoch" in df else df[val_cols]
        per_epoch = per_epoch.dropna(how="all")
        picked = None
        if val == "best" and len(per_epoch):
            name, default_mode = (monitor, mode or "max") if monitor else default_monitor(run, val_cols)
            mode = mode or default_mode
            if name in per_epoch and per_epoch[name].notna().any():
                series = per_epoch[name]
                picked = series.idxmax() if mode == "max" else series.idxmin()
                if "epoch" in df:
                    out["val/best_epoch"] = float(picked)
        if picked is not None:
            row = per_epoch.loc[picked]
            out.update({c: float(v) for c, v in row.items() if not math.isnan(v)})
        else:  # last: per metric, its last logged value
            for col in val_cols:
                valid = per_epoch[col].dropna()
                if len(valid):
                    out[col] = float(valid.iloc[-1])
    return out


def _as_float(value) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def identify(run: Run, by: str = "auto") -> tuple[str, float, int | None]:
    """(method, label fraction, seed) of a run."""
    parent = Path(run.path).parent.name if run.source == "csv" else ""
    candidates = {"method": run.tag("method"), "group": run.group, "name": run.name, "parent": parent}
    order = ["method", "group", "name", "parent"] if by == "auto" else [by]
    method = next((candidates[k] for k in order if candidates.get(k)), None) or run.path
    labels = _as_float(run.tag("labels"))
    if labels is None:
        data = ((run.config.get("data") or {}).get("init_args") or {}) if isinstance(run.config.get("data"), dict) else {}
        if data.get("label_ratio") is not None:
            labels = float(data["label_ratio"])
        elif data.get("unlabeled_fraction") is not None:
            labels = 1.0 - float(data["unlabeled_fraction"])
        else:
            labels = 1.0
    seed = _as_float(run.tag("seed"))
    if seed is None and not isinstance(run.config.get("seed_everything"), bool):
        seed = _as_float(run.config.get("seed_everything"))
    return str(method), round(labels, 6), None if seed is None else int(seed)


def runs_table(runs: list[Run], val: str = "best", monitor: str | None = None, by: str = "auto") -> pd.DataFrame:
    """One row per run: identity columns then every value; duplicates of (method, labels, seed, fold) keep the
    latest."""
    rows = []
    for run in runs:
        method, labels, seed = identify(run, by)
        fold = run.tag("fold")  # k-fold / leave-one-subject-out runs: one row per (seed, fold)
        fold = int(fold) if fold is not None and fold.isdigit() else fold
        rows.append({"method": method, "labels": labels, "seed": seed, "fold": fold,
                     "pair": run.tag("pair"),
                     "role": run.tag("role"), "run_id": run.run_id, "path": run.path, "source": run.source,
                     **run_values(run, val, monitor)})
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table = table.sort_values(["run_id", "path"], kind="stable")
    key = ["method", "labels", "seed", "fold"]
    dupes = table[table.fillna({"fold": -1}).duplicated(key, keep="last") & table["seed"].notna()]
    for _, row in dupes.iterrows():
        print(f"[compare] ignoring {row['path']}: a later run has the same method/labels/seed "
              f"({row['method']}, {row['labels']:g}, {row['seed']})", file=sys.stderr)
    return table.drop(dupes.index).reset_index(drop=True)

