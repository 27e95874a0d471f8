"""``medattn compare``: one table of methods x metrics (mean ± std over seeds) from finished runs, offline or online.

    medattn compare runs/suite                                  # every run directory below runs/suite
    medattn compare runs/suite --tags suite:synthetic --out results --name synthetic
    medattn compare runs/suite --tags suite:synthetic pair:pcam --out results --name pcam    # one pair
    medattn compare runs/pcam-synthetic/*/metrics.csv --metrics test/auroc 'test/loc/*'
    medattn compare --wandb my-team/medattn --groups 'suite-synthetic/*'   # W&B server (wandb.Api)

Sources (``--source``):

* ``auto`` (default): a run directory written by ``experiments.logging.MedAttnLogger``
  (``runs/<group>/<name>-<id>/`` with ``config.yaml`` and ``metrics.csv``) is read from its CSV; a directory
  holding only W&B offline runs (``wandb/offline-run-*/run-*.wandb``) is read with ``wandb leet inspect --json``.
  A bare Lightning ``CSVLogger`` folder (``metrics.csv`` and maybe ``hparams.yaml``) works too.
* ``csv`` / ``wandb``: only that kind. ``--wandb ENTITY/PROJECT`` reads a W&B server instead (needs network);
  nothing else here touches the network.

Which value of a metric a run contributes (documented choice):

* ``test/*`` and ``time/*``: the **last** logged value (the test of the checkpoint the run chose, logged once).
* ``val/*``: with ``--val best`` (default) every ``val/*`` value is taken **at the epoch where the monitored
  metric was best** (the ``ModelCheckpoint`` monitor of the run's config, else ``val/auroc`` max, ``val/dice``
  max or ``val/loss`` min; ``--monitor`` overrides), i.e. the epoch of the checkpoint that was tested, never a
  per-metric maximum (which would be optimistic). ``--val last`` takes the last epoch.
* ``train/*``: the last value.

Rows are (method, label fraction). ``method`` is the run's ``method:<x>`` tag (the suite sets it), else its W&B
group, else its name, else its parent folder (``--by`` chooses). The label fraction is the ``labels:<b>`` tag, else
``label_ratio`` or ``1 - unlabeled_fraction`` of the data config, else 1. The seed is ``seed_everything``.
If the same (method, labels, seed) appears more than once, the run with the latest run id (time-stamped) is
kept and the others are listed. Cells show the mean ± sample standard deviation (n − 1) over seeds; one seed
shows the value alone; "(k/n)" marks a metric that only k of the n runs logged. A metric whose runs also logged
``<metric>_ci_low`` / ``<metric>_ci_high`` (the patient-level bootstrap 95 % interval of one run's test set,
e.g. ``test/auroc_ci_low``; :mod:`lightning_modules.metrics.bootstrap`) shows it after the seed spread as
``[low, high]``, each bound averaged over the runs: "± std" is the spread due to the seed, "[low, high]" the
uncertainty due to the finite test set. The bounds are kept in the csv as ``<metric> ci_low`` / ``ci_high`` and are
not shown as columns of their own.

Writes ``<out>/<name>.csv`` (mean, std, n per metric), ``<name>.md``, ``<name>_runs.csv`` (one row per run),
``<name>.png`` (bars with error bars), ``<name>_labels.png`` (AUROC and localisation against the label
fraction, when runs have several fractions) and ``<name>_pairs.md`` (method − baseline differences, paired
by seed, for runs tagged ``pair:<p>`` and ``role:method|baseline``). ``--doc FILE --section KEY`` (older name
``--readme``; the tables live in ``docs/results.md``) also replaces the text between ``<!-- KEY:start -->``
and ``<!-- KEY:end -->`` in FILE by the table (and the differences).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import yaml

# Headline metrics shown by default (those that at least one run logged), in this order.
HEADLINE = ("test/auroc", "test/accuracy", "test/f1", "test/loc/iou@0.3", "test/loc/maxboxacc_v2", "test/loc/pointing",
            "test/mtiou", "test/tiou@0.5", "test/map", "test/map_40", "test/auroc_local", "test/dice", "test/hd95",
            "time/fit_s")
CLASSIFICATION = ("test/auroc", "test/auroc_local", "test/dice", "test/accuracy")
LOCALISATION = ("test/loc/iou@0.3", "test/loc/maxboxacc_v2", "test/mtiou", "test/map_40", "test/map", "test/hd95")
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
        if col.startswith(("test/", "time/", "train/")):
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
    """One row per run: identity columns then every value; duplicates of (method, labels, seed) keep the latest."""
    rows = []
    for run in runs:
        method, labels, seed = identify(run, by)
        rows.append({"method": method, "labels": labels, "seed": seed, "pair": run.tag("pair"),
                     "role": run.tag("role"), "run_id": run.run_id, "path": run.path, "source": run.source,
                     **run_values(run, val, monitor)})
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table = table.sort_values(["run_id", "path"], kind="stable")
    key = ["method", "labels", "seed"]
    dupes = table[table.duplicated(key, keep="last") & table["seed"].notna()]
    for _, row in dupes.iterrows():
        print(f"[compare] ignoring {row['path']}: a later run has the same method/labels/seed "
              f"({row['method']}, {row['labels']:g}, {row['seed']})", file=sys.stderr)
    return table.drop(dupes.index).reset_index(drop=True)


# ----------------------------------------------------------------------------------------------- aggregation
CI_SUFFIXES = ("_ci_low", "_ci_high", "_ci_resamples")


def _is_ci(column: str) -> bool:
    """``test/auroc_ci_low``, ``test/auroc_ci_high_teacher``: bootstrap bounds, shown inside their metric's cell."""
    return any(suffix in column for suffix in CI_SUFFIXES)


def _ci_columns(metric: str) -> tuple[str, str]:
    """``test/auroc`` -> ``test/auroc_ci_low``; ``test/auroc_teacher`` -> ``test/auroc_ci_low_teacher``."""
    for base in ("auroc",):
        head, sep, tail = metric.rpartition(f"/{base}")
        if sep and (tail == "" or tail.startswith("_")):
            return f"{head}/{base}_ci_low{tail}", f"{head}/{base}_ci_high{tail}"
    return f"{metric}_ci_low", f"{metric}_ci_high"


def select_metrics(table: pd.DataFrame, patterns: list[str] | None) -> list[str]:
    """Columns matching the glob ``patterns`` (in pattern order), else the HEADLINE metrics that runs logged (their
    ``val/`` twins when no run was tested), else every ``test/*``."""
    columns = [c for c in table.columns if "/" in c and c not in ("pair", "role") and not _is_ci(c)]
    if patterns:
        chosen = []
        for pattern in patterns:
            chosen += [c for c in columns if fnmatch.fnmatchcase(c, pattern) and c not in chosen]
        return chosen
    for names in (HEADLINE, [m.replace("test/", "val/") for m in HEADLINE]):  # runs never tested: val/*
        chosen = [m for m in names if m in columns and table[m].notna().any()]
        if any(not m.startswith("time/") for m in chosen):
            return chosen
    return sorted(c for c in columns if c.startswith("test/"))


def _order(table: pd.DataFrame) -> list[tuple[str, float]]:
    pairs = list(dict.fromkeys(p for p in table["pair"] if isinstance(p, str)))
    first = {}
    for _, row in table.iterrows():
        pair_rank = pairs.index(row["pair"]) if row["pair"] in pairs else len(pairs)
        role_rank = 0 if row["role"] == "method" else 1
        first.setdefault((row["method"], row["labels"]), (-row["labels"], pair_rank, role_rank, row["method"]))
    return sorted(first, key=first.get)


def aggregate(table: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Rows (method, labels): n runs, seeds, and per metric mean, std (n − 1; NaN for one value) and count."""
    rows = []
    for method, labels in _order(table):
        runs = table[(table["method"] == method) & (table["labels"] == labels)]
        row = {"method": method, "labels": labels, "n": len(runs),
               "seeds": " ".join(str(int(s)) for s in sorted(runs["seed"].dropna()))}
        for metric in metrics:
            values = runs[metric].dropna().to_numpy(float) if metric in runs else np.zeros(0)
            row[f"{metric} mean"] = values.mean() if len(values) else float("nan")
            row[f"{metric} std"] = values.std(ddof=1) if len(values) > 1 else float("nan")
            row[f"{metric} n"] = len(values)
            low, high = _ci_columns(metric)
            if low in runs and high in runs:  # mean bounds of the single-run bootstrap intervals
                row[f"{metric} ci_low"] = runs[low].dropna().astype(float).mean()
                row[f"{metric} ci_high"] = runs[high].dropna().astype(float).mean()
        rows.append(row)
    return pd.DataFrame(rows)


def format_cell(mean: float, std: float, count: int, n: int, digits: int = 3, ci: tuple[float, float] | None = None) -> str:
    if count == 0 or math.isnan(mean):
        return "–"
    text = f"{mean:.{digits}f}" + ("" if math.isnan(std) else f" ± {std:.{digits}f}")
    if ci is not None and not any(math.isnan(float(b)) for b in ci):
        text += f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    return text + (f" ({count}/{n})" if count < n else "")


def markdown(summary: pd.DataFrame, metrics: list[str], digits: int = 3) -> str:
    header = ["method", "labels", "seeds", *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in summary.iterrows():
        cells = [format_cell(row[f"{m} mean"], row[f"{m} std"], int(row[f"{m} n"]), int(row["n"]),
                             0 if m.startswith("time/") else digits,
                             (row[f"{m} ci_low"], row[f"{m} ci_high"]) if f"{m} ci_low" in row else None)
                 for m in metrics]
        lines.append(f"| {row['method']} | {row['labels']:g} | {row['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def pair_differences(table: pd.DataFrame, metrics: list[str], digits: int = 3) -> str | None:
    """Markdown: method − baseline per pair and label fraction, paired by seed (mean ± std of the differences)."""
    tagged = table[table["pair"].notna() & table["role"].isin(["method", "baseline"])]
    if tagged.empty:
        return None
    lines = ["| pair | labels | method − baseline | seeds | " + " | ".join(f"Δ {m}" for m in metrics) + " |",
             "|" + "---|" * (4 + len(metrics))]
    for pair in dict.fromkeys(tagged["pair"]):
        for labels in sorted(set(tagged.loc[tagged["pair"] == pair, "labels"]), reverse=True):
            rows = tagged[(tagged["pair"] == pair) & (tagged["labels"] == labels)]
            for method in dict.fromkeys(rows.loc[rows["role"] == "method", "method"]):
                for baseline in dict.fromkeys(rows.loc[rows["role"] == "baseline", "method"]):
                    a = rows[rows["method"] == method].set_index("seed")
                    b = rows[rows["method"] == baseline].set_index("seed")
                    seeds = sorted(set(a.index.dropna()) & set(b.index.dropna()))
                    cells = []
                    for m in metrics:
                        diff = np.array([a.at[s, m] - b.at[s, m] for s in seeds if m in a and m in b], float)
                        diff = diff[~np.isnan(diff)]
                        cells.append(format_cell(diff.mean() if len(diff) else float("nan"),
                                                 diff.std(ddof=1) if len(diff) > 1 else float("nan"),
                                                 len(diff), len(seeds), 0 if m.startswith("time/") else digits))
                    lines.append(f"| {pair} | {labels:g} | {method} − {baseline} | {len(seeds)} | "
                                 + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else None


# ---------------------------------------------------------------------------------------------------- plots
def plot_bars(summary: pd.DataFrame, metrics: list[str], path: Path) -> None:
    """One panel per metric: a bar per method (one colour per label fraction), error bar = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(summary["method"]))
    fractions = sorted(set(summary["labels"]), reverse=True)
    cols = min(3, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows + 0.4 * len(methods) / 4), squeeze=False)
    width = 0.8 / len(fractions)
    x = np.arange(len(methods))
    for ax, metric in zip(axes.flat, metrics):
        for j, frac in enumerate(fractions):
            part = summary[summary["labels"] == frac].set_index("method").reindex(methods)
            mean = part[f"{metric} mean"].to_numpy(float)
            std = np.nan_to_num(part[f"{metric} std"].to_numpy(float))
            ax.bar(x + (j - (len(fractions) - 1) / 2) * width, mean, width, yerr=std if std.any() else None, capsize=3,
                   label=f"labels {frac:g}", color=plt.cm.viridis(0.15 + 0.7 * j / max(1, len(fractions) - 1)))
        ax.set_title(metric, fontsize=10)
        ax.set_xticks(x, methods, rotation=35, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    if len(fractions) > 1:
        axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_labels(summary: pd.DataFrame, metrics: list[str], path: Path) -> None:
    """Metric against label fraction, one line per method (error bars = std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(4.8 * len(metrics), 3.6), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        for method in dict.fromkeys(summary["method"]):
            part = summary[summary["method"] == method].sort_values("labels")
            if part[f"{metric} mean"].notna().any():
                ax.errorbar(part["labels"], part[f"{metric} mean"], yerr=np.nan_to_num(part[f"{metric} std"]),
                            marker="o", capsize=3, label=method)
        ax.set_xscale("log")
        fractions = sorted(set(summary["labels"]))
        ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
        ax.minorticks_off()
        ax.set_xlabel("label fraction")
        ax.set_title(metric, fontsize=10)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def update_readme_section(path: Path, key: str, text: str) -> None:
    """Replace what lies between ``<!-- key:start -->`` and ``<!-- key:end -->`` in ``path`` by ``text``."""
    source = path.read_text()
    pattern = re.compile(rf"(<!-- {re.escape(key)}:start -->\n).*?(<!-- {re.escape(key)}:end -->)", re.S)
    if not pattern.search(source):
        raise ValueError(f"{path} has no '<!-- {key}:start -->' ... '<!-- {key}:end -->' markers")
    path.write_text(pattern.sub(lambda m: m.group(1) + text + m.group(2), source))


# ------------------------------------------------------------------------------------------------------ main
def compare(runs: list[Run], out: Path, name: str = "results", metrics: list[str] | None = None,
            val: str = "best", monitor: str | None = None, by: str = "auto", digits: int = 3,
            plot: bool = True) -> dict:
    """Tabulate ``runs``; write CSV, Markdown and PNG files; return the tables and the paths written."""
    table = runs_table(runs, val, monitor, by)
    if table.empty:
        raise SystemExit("no runs found (give run directories, a folder of them, or --wandb ENTITY/PROJECT)")
    chosen = select_metrics(table, metrics)
    if not chosen:
        raise SystemExit(f"no metric matches {metrics}; the runs logged: "
                         f"{sorted(c for c in table.columns if '/' in c)}")
    summary = aggregate(table, chosen)
    md = markdown(summary, chosen, digits)
    out.mkdir(parents=True, exist_ok=True)
    written = {"csv": out / f"{name}.csv", "md": out / f"{name}.md", "runs_csv": out / f"{name}_runs.csv"}
    summary.to_csv(written["csv"], index=False)
    table.to_csv(written["runs_csv"], index=False)
    written["md"].write_text(md)
    pairs = pair_differences(table, chosen, digits)
    if pairs:
        written["pairs_md"] = out / f"{name}_pairs.md"
        written["pairs_md"].write_text(pairs)
    if plot:
        written["png"] = out / f"{name}.png"
        plot_bars(summary, chosen, written["png"])
        if summary["labels"].nunique() > 1:
            curves = [next((m for m in group if m in table and table[m].notna().any()), None)
                      for group in (CLASSIFICATION, LOCALISATION)]
            curves = [m for m in curves if m]
            if curves:
                written["labels_png"] = out / f"{name}_labels.png"
                plot_labels(aggregate(table, curves), curves, written["labels_png"])
    return {"table": table, "summary": summary, "markdown": md, "pairs": pairs, "written": written}


def _filter(runs: list[Run], groups: list[str] | None, tags: list[str] | None) -> list[Run]:
    if groups:
        runs = [r for r in runs if r.group and any(fnmatch.fnmatchcase(r.group, g) for g in groups)]
    if tags:
        runs = [r for r in runs if set(tags) <= set(r.tags)]
    return runs


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="medattn compare", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="See experiments/compare.py for how each value is chosen.")
    parser.add_argument("paths", nargs="*", help="run directories, folders of them, metrics.csv or offline-run-* paths")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read runs from a W&B server (wandb.Api)")
    parser.add_argument("--source", choices=["auto", "csv", "wandb"], default="auto", help="for local paths")
    parser.add_argument("--groups", nargs="+", help="keep runs whose W&B group matches one of these globs")
    parser.add_argument("--tags", nargs="+", help="keep runs carrying all these tags (e.g. suite:synthetic pair:pcam)")
    parser.add_argument("--metrics", nargs="+", help="metric names or globs (default: the headline metrics)")
    parser.add_argument("--val", choices=["best", "last"], default="best", help="which epoch the val/* values come from")
    parser.add_argument("--monitor", help="val metric defining the best epoch (default: the run's checkpoint monitor)")
    parser.add_argument("--by", choices=["auto", "method", "group", "name", "parent"], default="auto",
                        help="what a table row is (auto: method tag, else group, else name, else parent folder)")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"), help="output folder")
    parser.add_argument("--name", default="results", help="output file stem")
    parser.add_argument("--digits", type=int, default=3)
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--doc", "--readme", dest="readme", type=Path, metavar="FILE",
                        help="also write the table into this Markdown file (docs/results.md), between markers")
    parser.add_argument("--section", default="results", help="marker key for --doc")
    args = parser.parse_args(argv)
    if not args.paths and not args.wandb:
        parser.error("give run paths or --wandb ENTITY/PROJECT")

    runs = find_runs(args.paths, args.source) if args.paths else []
    if args.wandb:
        runs += load_wandb_online(args.wandb, args.groups, args.tags)
    runs = _filter(runs, args.groups, args.tags)
    result = compare(runs, args.out, args.name, args.metrics, args.val, args.monitor, args.by, args.digits,
                     not args.no_plot)
    print(result["markdown"])
    if result["pairs"]:
        print(result["pairs"])
    if args.readme:  # the table, then the method − baseline differences when there are pairs
        pairs = f"\nMethod − baseline, paired by seed:\n\n{result['pairs']}" if result["pairs"] else ""
        update_readme_section(args.readme, args.section, result["markdown"] + pairs)
    print("wrote " + ", ".join(str(p) for p in result["written"].values()))
    return result


if __name__ == "__main__":
    main()
