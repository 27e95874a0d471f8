"""Acceptance run for OXnet on the built-in synthetic data: OXnet vs RetinaNet on the boxed 20 % alone, several seeds.

Protocol per seed (all runs: same split, data seed 0, same network; only ``--seed_everything`` changes):

1. **stage 1**: RetinaNet on the box stream (``experiments/retinanet/synthetic.yaml``) for ``--stage1-minutes``;
2. **retinanet**: the box-only continuation from that checkpoint (same config, fresh AdamW at OXnet's stage-2
   learning rate, BatchNorm statistics frozen as in OXnet) for ``--stage2-minutes``;
3. **oxnet**: OXnet stage 2 from the same checkpoint (``experiments/oxnet/synthetic.yaml``: the same box stream plus
   image-label and unlabeled streams) for ``--stage2-minutes``.

So both arms cost stage 1 + stage 2 of wall clock (≤ 15 min by default: 6 + 7 minutes of training plus data
generation and evaluation), start from the same weights, and differ only in the data and losses of stage 2. Budgets
are ``trainer.max_time`` (wall clock): OXnet's step costs ~3x RetinaNet's (12 images and a teacher forward vs 4
images), so it takes fewer steps, and that cost is part of the comparison. Each run is ``fit`` then ``test`` of its
best checkpoint (``val/map_50``), via ``python -m experiments.suite fit-test``.

Run it on a quiet machine (another busy process on 2 cores can halve the steps that fit in the budget)::

    OMP_NUM_THREADS=2 python -m experiments.oxnet.acceptance --seeds 0 1 2 --out runs/oxnet/acceptance

**Equal work** (the paper's claim is about label efficiency, not speed): ``--stage1-epochs E1 --stage2-epochs E2``
replaces both wall-clock budgets by epochs, with no time limit. Both configs define the epoch by the box stream
(``epoch_stream: box``, 4 box images per step), so the two stage-2 arms make the same number of box-stream passes
and steps; OXnet's extra label and unlabeled streams cycle beside it. The wall clock each arm took is logged
(``time/fit_s``) and reported beside the metrics. The result does not depend on the machine's load::

    python -m experiments.oxnet.acceptance --seeds 0 1 2 --stage1-epochs 20 --stage2-epochs 20 --out runs/acc/oxnet-epochs

Writes ``acceptance.json`` and ``acceptance.md`` (one row per run, then per-arm mean/std of test mAP50, mAP, AP40)
and prints whether OXnet's mean test mAP50 is at least RetinaNet's. Add ``--dry-run`` to print the commands only.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from experiments.logging import logger_flags
from experiments.magsd.runner import to_markdown
from experiments.suite import budget_flags_for

ROOT = Path(__file__).resolve().parents[2]
RETINANET = "experiments/retinanet/synthetic.yaml"
OXNET = "experiments/oxnet/synthetic.yaml"
METRICS = ["test/map_50", "test/map", "test/map_40", "test/map_75", "test/auroc_local", "test/auroc",
           "test/map_50_teacher", "time/fit_s", "time/steps", "time/epochs"]


def _max_time(minutes: float) -> str:
    return time.strftime("00:%H:%M:%S", time.gmtime(int(minutes * 60)))


def _command(config: str, seed: int, arm: str, out: Path, budget: list[str], flags: list[str]) -> list[str]:
    return [sys.executable, "-m", "experiments.suite", "fit-test", "-c", config, "--seed_everything", str(seed),
            *budget, "--trainer.enable_progress_bar", "false",
            *logger_flags(out, f"oxnet-acceptance/{arm}", f"{arm}-s{seed}"), *flags]


def _run_dir(out: Path, arm: str, seed: int, tag: str) -> Path:
    return out / f"oxnet-acceptance-{arm}" / f"{arm}-s{seed}-{tag}"


def _metrics(run_dir: Path) -> dict:
    table = pd.read_csv(run_dir / "metrics.csv", low_memory=False)
    return {k: float(table[k].dropna().iloc[-1]) for k in METRICS if k in table and table[k].notna().any()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--stage1-minutes", type=float, default=6.0)
    parser.add_argument("--stage2-minutes", type=float, default=7.0)
    parser.add_argument("--stage1-epochs", type=int, help="stage-1 budget in box-stream epochs (no time limit)")
    parser.add_argument("--stage2-epochs", type=int, help="stage-2 budget of both arms in box-stream epochs "
                        "(no time limit): equal work instead of equal wall clock")
    parser.add_argument("--stage2-lr", type=float, default=3e-4, help="AdamW lr of both stage-2 arms")
    parser.add_argument("--out", default="runs/oxnet/acceptance")
    parser.add_argument("--tag", default="acc", help="run id; re-using it skips finished runs")
    parser.add_argument("--dry-run", action="store_true")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    if (args.stage1_epochs is None) != (args.stage2_epochs is None):
        parser.error("give both --stage1-epochs and --stage2-epochs (an epoch budget for every stage) or neither")
    by_epochs = args.stage2_epochs is not None
    out = Path(args.out).resolve()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "MEDATTN_RUN_ID": args.tag, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "WANDB_SILENT": "true"}
    env.pop("MEDATTN_RUN_DIR", None)
    # both stage-2 arms: the same fresh AdamW and BatchNorm statistics frozen at their stage-1 values
    stage2 = ["--model.init_args.optimizer.init_args.lr", str(args.stage2_lr), "--model.init_args.freeze_bn", "true"]
    rows = []
    for seed in args.seeds:
        stage1 = _run_dir(out, "stage1", seed, args.tag) / "checkpoints"
        stage1_budget = (budget_flags_for(None, args.stage1_epochs) if by_epochs
                         else budget_flags_for(_max_time(args.stage1_minutes), None))
        stage2_budget = (budget_flags_for(None, args.stage2_epochs) if by_epochs
                         else budget_flags_for(_max_time(args.stage2_minutes), None))
        plan = [("stage1", RETINANET, stage1_budget, False), ("retinanet", RETINANET, stage2_budget, True),
                ("oxnet", OXNET, stage2_budget, True)]
        for arm, config, budget, from_stage1 in plan:
            flags = []
            if from_stage1:  # the best stage-1 checkpoint, or its last one if no validation ran within the budget
                best = (stage1 / "best.ckpt").is_file() or args.dry_run
                ckpt = stage1 / ("best.ckpt" if best else "last.ckpt")
                flags = ["--model.init_args.init_checkpoint", str(ckpt), *stage2]
            cmd = _command(config, seed, arm, out, budget, flags + extra)
            run_dir = _run_dir(out, arm, seed, args.tag)
            print(f"[acceptance] seed {seed} {arm}: {shlex.join(['python', *cmd[1:]])}", flush=True)
            if args.dry_run:
                continue
            if not (run_dir / "metrics.csv").is_file() or "test/map_50" not in _metrics(run_dir):
                out.mkdir(parents=True, exist_ok=True)
                with (out / f"{arm}-s{seed}.log").open("w") as log:
                    code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
                if code != 0:
                    raise SystemExit(f"{arm} seed {seed} failed (exit {code}); see {out / f'{arm}-s{seed}.log'}")
            rows.append({"arm": arm, "seed": seed, **_metrics(run_dir), "run_dir": str(run_dir)})
    if args.dry_run:
        return {}
    frame = pd.DataFrame(rows)
    columns = [c for c in METRICS if c in frame]
    summary = frame.groupby("arm")[columns].agg(["mean", "std"])
    summary.columns = [f"{metric} {stat}" for metric, stat in summary.columns]
    means = frame.groupby("arm")["test/map_50"].mean().to_dict()
    verdict = {"mean_test_map_50": means, "oxnet_ge_retinanet": means.get("oxnet", -1) >= means.get("retinanet", 2),
               "seeds": args.seeds, **({"stage1_epochs": args.stage1_epochs, "stage2_epochs": args.stage2_epochs} if by_epochs
                                       else {"stage1_minutes": args.stage1_minutes, "stage2_minutes": args.stage2_minutes})}
    markdown = to_markdown(frame[["arm", "seed", *columns]], 4) + "\n\n" + \
        to_markdown(summary.reset_index(), 4) + "\n\n" + json.dumps(verdict) + "\n"
    (out / "acceptance.md").write_text(markdown)
    (out / "acceptance.json").write_text(json.dumps({"extra_args": extra, "verdict": verdict, "runs": rows}, indent=2))
    print(markdown)
    return verdict


if __name__ == "__main__":
    main()
