"""Aggregating the per-run table of ``medattn compare``: which metrics to show, and mean ± std over seeds per
(method, label fraction)."""

from __future__ import annotations

import fnmatch

import numpy as np
import pandas as pd

# Headline metrics shown by default (those that at least one run logged), in this order.
HEADLINE = ("test/auroc", "test/accuracy", "test/f1", "test/loc/iou@0.3", "test/loc/maxboxacc_v2", "test/loc/pointing",
            "test/mtiou", "test/tiou@0.5", "test/map", "test/map_40", "test/auroc_local", "test/dice", "test/hd95",
            "time/fit_s")
CLASSIFICATION = ("test/auroc", "test/auroc_local", "test/dice", "test/accuracy")
LOCALIZATION = ("test/loc/iou@0.3", "test/loc/maxboxacc_v2", "test/mtiou", "test/map_40", "test/map", "test/hd95")


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

