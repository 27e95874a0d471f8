"""Leave-one-subject-out (LOSO) evaluation of a volume segmentation config: the Non-local U-Net paper's protocol.

    python -m experiments.nonlocal_unet.loso -c experiments/nonlocal_unet/iseg2017.yaml --root /data/iSeg-2017-Training
    python -m experiments.nonlocal_unet.loso -c experiments/nonlocal_unet/iseg2017.yaml --root DIR --folds 1 5 \\
        --name iseg-plain -- --model.init_args.net.init_args.global_aggregation false     # the plain U-Net arm

Fold ``k`` holds subject ``k`` out as the **test** subject. Its **validation** subject (which picks
``best.ckpt``) is the next subject in the reader's order, cyclically (subject 10's is subject 1), so it is never
the test subject and every subject validates exactly one fold; the remaining subjects train (8 of iSeg-2017's
10). Documented deviation: the reference code validates on the held-out subject itself (``validation_id``)
and trains on 9; here checkpoint selection never sees the test subject, at the price of one training subject.

Each fold is one ``python -m experiments.suite fit-test`` process (fit, then test of the best checkpoint, in one
run directory ``<out>/loso-<name>/<name>-fold<k>-<tag>/``) with ``--data.init_args.test_subjects ["k"]`` and
``--data.init_args.val_subjects [<next>]``; the data root is set with ``--data.init_args.reader.init_args.root``.
A fold whose run directory already holds test metrics is skipped, so the same ``--tag`` resumes. Everything after
``--`` goes to every fold's command. At the end ``medattn compare`` tabulates the folds (one row per fold, i.e.
per test subject, as the paper reports) into ``<out>/compare/<name>.md``, and a second ``medattn compare --by group``
writes the mean ± sample std over the folds of every ``test/dice*`` metric to ``<out>/compare/<name>_loso.md``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from experiments.cli import DATA_PLACEHOLDER, data_root
from experiments.logging import logger_flags
from experiments.suite import ROOT, finished, merged_config

__all__ = ["subjects_of", "fold_plan", "main"]


def subjects_of(configs: list[str], root: str | None) -> list[str]:
    """The subject ids the config's reader lists (with ``root`` replacing its ``root`` argument)."""
    data = (merged_config(configs).get("data") or {}).get("init_args") or {}
    reader = data.get("reader")
    if not isinstance(reader, dict) or "class_path" not in reader:
        raise ValueError(f"{configs}: data.init_args.reader must be a class_path/init_args mapping (a VolumeReader)")
    kwargs = dict(reader.get("init_args") or {})
    if root is not None:
        kwargs["root"] = root
    for key, value in kwargs.items():
        if isinstance(value, str) and value.startswith(DATA_PLACEHOLDER):
            kwargs[key] = str(data_root()) + value[len(DATA_PLACEHOLDER):]
    module, _, name = reader["class_path"].rpartition(".")
    return [s.subject_id for s in getattr(importlib.import_module(module), name)(**kwargs).subjects()]


def fold_plan(subjects: list[str], folds: list[str] | None = None) -> list[tuple[str, str]]:
    """(test subject, validation subject) per fold: the validation subject is the next one, cyclically."""
    if len(subjects) < 3:
        raise ValueError(f"leave-one-subject-out with a validation subject needs at least 3 subjects, got {subjects}")
    unknown = sorted(set(folds or []) - set(subjects))
    if unknown:
        raise ValueError(f"--folds {unknown} are not subject ids of the reader ({subjects})")
    chosen = subjects if not folds else [s for s in subjects if s in set(folds)]
    return [(s, subjects[(subjects.index(s) + 1) % len(subjects)]) for s in chosen]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m experiments.nonlocal_unet.loso", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", action="append", required=True, help="config file(s), composed in order")
    parser.add_argument("--root", help="data folder (sets data.init_args.reader.init_args.root)")
    parser.add_argument("--folds", nargs="+", help="test subject ids to run (default: every subject)")
    parser.add_argument("--seed", type=int, default=0, help="seed_everything of every fold")
    parser.add_argument("--name", help="run name prefix and loso:<name> tag (default: the first config's stem)")
    parser.add_argument("--out", type=Path, default=Path("runs/loso"))
    parser.add_argument("--tag", default=time.strftime("%Y%m%d-%H%M%S"), help="run id suffix; reuse it to resume")
    parser.add_argument("--dry-run", action="store_true", help="print the folds and commands only")
    args = parser.parse_args(argv)
    configs = [str(Path(c).resolve()) if Path(c).exists() else c for c in args.config]
    root = str(Path(args.root).expanduser().resolve()) if args.root else None
    name = args.name or Path(args.config[0]).stem
    out = args.out if args.out.is_absolute() else Path.cwd() / args.out
    plan = fold_plan(subjects_of(configs, root), args.folds)
    group = f"loso-{name}"
    env = {k: v for k, v in os.environ.items() if k != "MEDATTN_RUN_DIR"}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])), MEDATTN_RUN_ID=args.tag,
               HF_HUB_OFFLINE=env.get("HF_HUB_OFFLINE", "1"), WANDB_SILENT="true")
    failures = []
    for i, (test, val) in enumerate(plan, 1):
        run_name = f"{name}-fold{test}"
        run_dir = out / group / f"{run_name}-{args.tag}"
        cmd = [sys.executable, "-m", "experiments.suite", "fit-test", *[x for c in configs for x in ("-c", c)],
               *(["--data.init_args.reader.init_args.root", root] if root else []),
               "--data.init_args.test_subjects", json.dumps([test]), "--data.init_args.val_subjects", json.dumps([val]),
               "--seed_everything", str(args.seed), "--trainer.enable_progress_bar", "false",
               *logger_flags(out, group, run_name), "--trainer.logger.init_args.tags",
               json.dumps([f"loso:{name}", f"fold:{test}", f"test_subject:{test}", f"val_subject:{val}"]), *extra]
        print(f"[loso] {i}/{len(plan)} test {test}, validation {val}: {shlex.join(['python', *cmd[1:]])}", flush=True)
        if args.dry_run:
            continue
        if finished(run_dir):
            print(f"[loso]   already done: {run_dir}")
            continue
        log = out / "logs" / args.tag / f"{run_name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as handle:
            code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT).returncode
        if code != 0 or not finished(run_dir):
            failures.append(f"fold {test}: exit {code}, log {log}")
            print(f"[loso]   FAILED (exit {code}; log {log})", flush=True)
    if args.dry_run:
        return 0
    from experiments.compare import main as compare

    # one row per fold (per test subject, as the paper reports), then the mean ± sample std over the folds
    common = [str(out / group), "--tags", f"loso:{name}", "--out", str(out / "compare"), "--metrics", "test/dice*",
              "test/hd95", "test/mhd", "--no-plot"]
    compare([*common, "--by", "name", "--name", name])
    compare([*common, "--by", "group", "--name", f"{name}_loso"])
    for failure in failures:
        print(f"[loso] {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
