"""Rendering ``medattn compare``'s tables and figures: Markdown cells and tables, method − baseline differences,
bar and label-fraction plots, and the marked section of a docs file. :func:`to_markdown` renders any frame (the
one Markdown writer of the repository)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd


def to_markdown(frame: pd.DataFrame, digits: int = 3) -> str:
    """Any frame as a GitHub Markdown table: floats with ``digits`` decimals, trailing zeros dropped (23.000 -> 23,
    0.280 -> 0.28), NaN as ``nan``; no ``tabulate`` dependency."""

    def cell(value) -> str:
        if isinstance(value, (float, np.floating)):
            return "nan" if math.isnan(value) else f"{value:.{digits}f}".rstrip("0").rstrip(".")
        return str(value)

    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


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
                    # paired by seed (and fold, in cross-validation: the same held-out patients)
                    a = rows[rows["method"] == method].fillna({"fold": -1}).set_index(["seed", "fold"])
                    b = rows[rows["method"] == baseline].fillna({"fold": -1}).set_index(["seed", "fold"])
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

