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
from pathlib import Path

from experiments.compare.aggregate import (CI_SUFFIXES, CLASSIFICATION, HEADLINE, LOCALIZATION, _ci_columns, _is_ci,
                                           _order, aggregate, select_metrics)
from experiments.compare.render import (format_cell, markdown, pair_differences, plot_bars, plot_labels, to_markdown,
                                        update_readme_section)
from experiments.compare.runs import (SKIP_DIRS, Run, _as_float, _logger_args, _numeric, _offline_runs, _read_yaml,
                                      default_monitor, find_runs, identify, load_csv_run, load_wandb_offline,
                                      load_wandb_online, parse_leet_records, run_values, runs_table)

__all__ = ["CI_SUFFIXES", "CLASSIFICATION", "HEADLINE", "LOCALIZATION", "SKIP_DIRS", "Run", "aggregate", "compare",
           "default_monitor", "find_runs", "format_cell", "identify", "load_csv_run", "load_wandb_offline",
           "load_wandb_online", "main", "markdown", "pair_differences", "parse_leet_records", "plot_bars",
           "plot_labels", "run_values", "runs_table", "select_metrics", "to_markdown", "update_readme_section",
           "_as_float", "_ci_columns", "_is_ci", "_logger_args", "_numeric", "_offline_runs", "_order", "_read_yaml"]


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
                      for group in (CLASSIFICATION, LOCALIZATION)]
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

