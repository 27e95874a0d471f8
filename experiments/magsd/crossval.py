"""Patient-level, seeded k-fold cross-validation of any ``medattn`` experiment, with a results table.

Each fold ``i`` is the run ``medattn fit <config> --data.init_args.num_folds k --data.init_args.fold i``:
:class:`datamodules.cxr.CXRDataModule` shuffles the *patients* with ``data.seed`` and holds fold ``i`` out as
the test split (``val_fraction`` of the remaining patients is validation), so folds are disjoint, cover every
patient once, never split a patient, and are the same on every machine. (The MAG-SD reference drew its folds
with unseeded ``random.sample`` after a split seeded with the time of day.) Every fold trains a fresh model.

Usage::

    python -m experiments.magsd.crossval -c experiments/magsd/covid_cxr.yaml --num_folds 5 --out runs/magsd/cv
    python -m experiments.magsd.crossval -c experiments/magsd/synthetic.yaml --folds 0 1 -- --trainer.max_epochs 2

Everything after ``--`` (or any unknown flag) goes to ``medattn fit``. Writes ``crossval.csv``, ``crossval.md``
(per-fold rows, then mean and standard deviation) and ``crossval.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from experiments.magsd.runner import run_experiment, summary_table, to_markdown

COLUMNS = ["n_train", "n_val", "n_test", "fit_seconds", "test/accuracy", "test/precision", "test/recall",
           "test/specificity", "test/f1", "test/auroc"]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", action="append", required=True, help="medattn config file(s)")
    parser.add_argument("--num_folds", type=int, default=5)
    parser.add_argument("--folds", type=int, nargs="*", default=None, help="run only these folds (default all)")
    parser.add_argument("--out", default="runs/crossval", help="folder for the results table")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    if args.num_folds < 2:
        parser.error("--num_folds must be at least 2")
    folds = range(args.num_folds) if args.folds is None else args.folds
    configs = [x for c in args.config for x in ("-c", c)]
    rows = []
    for fold in folds:
        print(f"[crossval] fold {fold} of {args.num_folds}", flush=True)
        result = run_experiment(configs + ["--data.init_args.num_folds", str(args.num_folds),
                                           "--data.init_args.fold", str(fold), *extra])
        rows.append({"fold": fold, **result})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    per_class = sorted({k for r in rows for k in r if k.startswith("test/auroc_per_class/")})
    table = summary_table(rows, "fold", COLUMNS + per_class)
    table.to_csv(out / "crossval.csv", index=False)
    markdown = to_markdown(table)
    (out / "crossval.md").write_text(markdown + "\n")
    (out / "crossval.json").write_text(json.dumps({"configs": args.config, "num_folds": args.num_folds,
                                                   "extra_args": extra, "folds": rows}, indent=2))
    print(markdown)
    return markdown


if __name__ == "__main__":
    main()
