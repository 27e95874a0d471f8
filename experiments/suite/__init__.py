"""The comparison suite: every method against its baseline on the same split, with the same time budget and seeds.

    python -m experiments.suite --preset quick            # PCAM vs the CAM baseline, 2 seeds: <= 15 min on 2 cores
    python -m experiments.suite --preset full             # every pair below, 2 seeds: <= 60 min on 2 cores
    python -m experiments.suite --preset labels           # the semi/weak pairs at 10 %, 25 % and 100 % labels
    python -m experiments.suite --preset full --dry-run   # print the plan and every command, run nothing
    python -m experiments.suite --arms pcam cam_baseline --seeds 0 1 2 --labels 0.1 1.0 --minutes 30
    python -m experiments.suite --dataset nih --arms pcam pcam_avg pcam_lse     # experiments/pcam/nih.yaml (+ avg.yaml / lse.yaml)
    python -m experiments.suite --arms pcam cam_baseline -c my_reader.yaml --name mydata   # your data
    python -m experiments.suite --configs a.yaml b.yaml --seeds 0 1   # offline grid: a list of config files
    python -m experiments.suite --grid experiments/sweeps/pcam.yaml    # offline twin of a W&B sweep (grid)
    python -m experiments.suite --list                                 # arms and presets
    python -m experiments.suite --preset oxnet --stage1-epochs 20 --epochs 20      # OXnet vs RetinaNet, equal work
    python -m experiments.suite --preset dcmt-acceptance                # DC-MT, labeled-only, no attention, stage 2
    python -m experiments.suite --preset magsd-reference-cv             # 5 patient-level folds, both arms

Pairs (arm = one config; ``role`` tells the method from its baselines):

==========  =========================================  ==============================================================
pair        method                                     baselines
==========  =========================================  ==============================================================
pcam        ``pcam`` (PCAM pooling)                    ``cam_baseline`` (GAP + linear), ``pcam_avg``, ``pcam_lse``
magsd       ``magsd`` (MAG-SD)                         ``resnet50`` (plain ResNet-50, same schedule)
dcmt        ``dcmt`` (dual-consistency mean teacher)   ``dcmt_supervised`` (labeled slices only)
oxnet       ``oxnet`` (stage 2, from stage 1)          ``retinanet`` (stage 2 on the box subset only)
nonlocal    ``nonlocal_unet``                          ``unet`` (same net, ``global_aggregation: false``)
==========  =========================================  ==============================================================

Every run is ``fit`` then ``test`` of the best checkpoint (the config's ``ModelCheckpoint`` monitor) in one
process, ``python -m experiments.suite fit-test <medattn fit arguments>`` (equivalent to ``medattn fit ...``
followed by ``medattn test ... --ckpt_path <run dir>/checkpoints/best.ckpt``, but in the same run directory and
W&B run), one at a time: two runs side by side on a 2-core machine would each get one core and the time budget
would mean nothing. After the test the run logs ``time/fit_s`` (Lightning's ``Timer``: the training loop with its
validation), ``time/test_s``, ``time/epochs`` and ``time/steps``.

Budget: the same ``trainer.max_time`` for every run (``--minutes`` split evenly after ``--overhead`` seconds of
start-up/test per run, or ``--max-time`` per run) and the config's own ``max_epochs`` cap; a slower method gets
fewer epochs, and its cost shows in ``time/*``. Label budget ``--labels b``: ``CXRDataModule`` runs hide the
labels of ``1 - b`` of the training images (``unlabeled_fraction``; supervised arms never see them, semi-supervised
arms use them unlabeled), slice runs label ``b`` of the training subjects (``label_ratio``), the detection pair
keeps ``b`` of its box-annotated images (``box_fraction`` times ``b``); an arm without such a knob (the U-Nets) runs
at ``b = 1`` only. At ``b = 1`` a config with an unlabeled stream gets ``unlabeled_batch_size 0`` (no unlabeled
image is left).

Chained arms (``experiments/suite/arms.py``). OXnet: ``retinanet_stage1`` (RetinaNet on the box stream) runs first;
``oxnet`` and the ``retinanet`` baseline both start from its checkpoint of the same seed, labels and fold (best, else
last) with the same fresh AdamW (lr 3e-4) and frozen BatchNorm, so they differ only in stage 2's data and losses;
``--stage1-epochs`` sets stage 1's epochs apart from ``--epochs`` (both configs count epochs on the box stream, so
equal epochs are equal box-stream work). DC-MT: the ``dcmt`` run exports the slice features of its tested weights
(``slice_features.npz`` in its run directory) and ``dcmt_subject`` (stage 2, whose ``test/meanpool_*`` is the
mean-pooling baseline) reads them. An arm's dependency is added to the plan when missing. ``--test-weights final``
tests the weights at the end of training instead of the best checkpoint (the DC-MT and MAG-SD acceptance presets:
small validation splits). ``--folds k``: patient-level k-fold cross-validation, the same folds for every arm
(``data.num_folds``/``data.fold``, tag ``fold:<i>``). Every single-label run is also scored from its
``test_predictions.csv`` by one scorer (``experiments/suite/scoring.py``), and logs its split sizes (``data/n_*``).

Runs go to ``<out>/<name>-<arm>-l<b>/<arm>-l<b>-s<seed>-<tag>/`` (W&B group ``<name>/<arm>-l<b>``: the seeds of
one arm at one label fraction; tags ``suite:<name>``, ``method:<arm>``, ``pair:<pair>``, ``role:<role>``,
``labels:<b>``, ``seed:<s>``), which ``medattn compare`` reads. A run whose directory already holds test metrics
is skipped, so the same ``--tag`` resumes an interrupted suite. Extra ``medattn`` flags for every run follow ``--``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from experiments.suite.arms import ARMS, PRESETS, STAGE2, Arm
from experiments.suite.execute import execute, fit_test
from experiments.suite.grid import _arg, _short, grid_plan, grid_runs
from experiments.suite.plan import (ROOT, Run, _seconds, budget_flags, budget_flags_for, checkpoint_of, finished,
                                    max_time_for, merged_config, plan)

__all__ = ["ARMS", "PRESETS", "STAGE2", "Arm", "Run", "ROOT", "budget_flags", "budget_flags_for", "checkpoint_of",
           "execute", "finished", "fit_test", "grid_plan", "grid_runs", "main", "max_time_for", "merged_config", "plan",
           "_arg", "_seconds", "_short"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.suite", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Extra medattn flags for every run go after `--`.")
    parser.add_argument("--preset", choices=list(PRESETS), help="arms, seeds, labels and budget of a documented run")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS))
    parser.add_argument("--configs", nargs="+", help="offline grid: these config files instead of arms")
    parser.add_argument("--grid", help="offline grid from a W&B sweep YAML (experiments/sweeps/<method>.yaml)")
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument("--labels", nargs="+", type=float, help="label fractions (label budget), e.g. 0.1 0.25 1")
    parser.add_argument("--folds", type=int, help="k-fold cross-validation: every run once per held-out fold")
    parser.add_argument("--dataset", help="picks experiments/<method>/<dataset>*.yaml (default synthetic)")
    parser.add_argument("-c", "--config", action="append", default=[], dest="extra_configs",
                        help="extra config file for every run (e.g. your data), after the arm's own")
    parser.add_argument("--name", help="suite name: W&B group prefix and `suite:` tag (default: the preset's, else "
                        "the dataset)")
    parser.add_argument("--minutes", type=float, help="wall-clock budget of the whole suite")
    parser.add_argument("--overhead", type=float, default=45.0, help="seconds per run outside training (start, test)")
    parser.add_argument("--max-time", help="trainer.max_time per run (DD:HH:MM:SS); overrides --minutes")
    parser.add_argument("--epochs", type=int, help="budget in epochs instead of wall clock: trainer.max_epochs for "
                        "every run and no time limit (results do not depend on the machine's load)")
    parser.add_argument("--stage1-epochs", type=int, help="epochs of the stage-1 arms (retinanet_stage1) when "
                        "--epochs budgets the others")
    parser.add_argument("--test-weights", choices=["best", "final"], help="test the best checkpoint (default) or the "
                        "weights at the end of training")
    parser.add_argument("--arm-flags", nargs=2, action="append", default=[], metavar=("ARM", "FLAGS"),
                        help="extra medattn flags (one quoted string) for one arm, e.g. dcmt_subject "
                        "'--data.init_args.unlabeled_batch_size 24'")
    parser.add_argument("--out", type=Path, default=Path("runs/suite"))
    parser.add_argument("--tag", default=time.strftime("%Y%m%d-%H%M%S"), help="run id suffix; reuse it to resume")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and commands only")
    parser.add_argument("--list", action="store_true", help="list arms and presets")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["fit-test"]:
        fit_test(argv[1:])
        return 0
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = _parser()
    args = parser.parse_args(argv)

    if args.list:
        for arm in ARMS.values():
            print(f"{arm.name:18s} pair={arm.pair:15s} role={arm.role:9s} knob={arm.knob:7s} {arm.config} "
                  f"{' '.join(arm.overlays)}{' <- ' + arm.needs if arm.needs else ''}")
        for key, preset in PRESETS.items():
            print(f"preset {key}: {preset}")
        return 0
    unknown = sorted({a for a, _ in args.arm_flags} - set(ARMS))
    if unknown:
        parser.error(f"--arm-flags: unknown arm(s) {unknown}; arms: {sorted(ARMS)}")
    arm_flags = {arm: shlex.split(flags) for arm, flags in args.arm_flags}
    # the runs start in the repository root: paths given relative to the caller's folder must survive that
    args.extra_configs = [_absolute(c) for c in args.extra_configs]
    args.configs = [_absolute(c) for c in args.configs] if args.configs else None
    preset = PRESETS.get(args.preset, {})
    seeds = args.seeds or preset.get("seeds") or [0]
    labels = args.labels or preset.get("labels") or [1.0]
    dataset = args.dataset or preset.get("dataset") or "synthetic"
    name = args.name or preset.get("name") or dataset
    folds = args.folds if args.folds is not None else preset.get("folds")
    if folds is not None and folds < 2:
        parser.error(f"--folds {folds}: cross-validation needs at least 2 folds")
    out = args.out if args.out.is_absolute() else Path.cwd() / args.out
    notes: list[str] = []
    if (args.grid or args.configs) and (folds or args.labels):
        parser.error("--folds and --labels apply to arms (--arms / --preset), not to --grid / --configs; use "
                     "--arms <method> --dataset <config stem> --folds k instead")
    if args.grid or args.configs:
        name = args.name or (Path(args.grid).stem if args.grid else "configs")
        runs = grid_plan(args.grid, args.configs or [], seeds, name, args.extra_configs, out, args.tag)
    else:
        arms = [ARMS[a] for a in (args.arms or preset.get("arms") or ["pcam", "cam_baseline"])]
        runs, notes = plan(arms, seeds, labels, dataset, name, args.extra_configs, out, args.tag, folds)
    if not runs:
        print("\n".join(notes) or "nothing to run")
        return 1
    if args.epochs and (args.minutes or args.max_time):
        parser.error("--epochs replaces the wall-clock budget; drop --minutes / --max-time")
    wall_clock = bool(args.minutes or args.max_time)
    epochs = args.epochs or (None if wall_clock else preset.get("epochs"))
    stage1_epochs = args.stage1_epochs or (None if wall_clock or args.epochs else preset.get("stage1_epochs"))
    if stage1_epochs and not epochs:
        parser.error("--stage1-epochs budgets stage 1 beside an epoch budget: give --epochs for the other runs too")
    own = preset.get("own_budget") and not wall_clock and not epochs
    minutes = args.minutes or preset.get("minutes") or 60
    max_time = None if epochs or own else args.max_time or (
        max_time_for(len(runs), minutes, args.overhead) if args.minutes or not (args.grid or args.configs) else None)
    budget = (f"trainer.max_epochs {epochs} each" + (f" ({stage1_epochs} for stage 1)" if stage1_epochs else "")
              + ", no time limit" if epochs else
              f"trainer.max_time {max_time} each (+~{args.overhead:.0f} s start-up/test), estimated "
              f"{len(runs) * (_seconds(max_time) + args.overhead) / 60:.0f} min" if max_time else "the configs' own budgets")
    test = args.test_weights or preset.get("test") or "best"
    print(f"[suite] {len(runs)} runs, {budget}; tested: {test} weights; tag {args.tag}; out {out}")
    for note in notes:
        print(f"[suite] note: {note}")
    failures = execute(runs, budget_flags_for(max_time, epochs), extra, args.tag, out / "logs" / args.tag, args.dry_run,
                       test, budget_flags_for(None, stage1_epochs) if stage1_epochs else None, arm_flags)
    for failure in failures:
        print(f"[suite] {failure}")
    shown = out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out
    print(f"\nCompare (offline, any time):\n  medattn compare {shown} --tags suite:{name} --out {shown}/compare --name {name}")
    return 1 if failures else 0


def _absolute(path: str) -> str:
    return str(Path(path).resolve()) if Path(path).exists() else path
