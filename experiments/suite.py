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

Pairs (arm = one config; ``role`` tells the method from its baselines):

==========  =========================================  ==============================================================
pair        method                                     baselines
==========  =========================================  ==============================================================
pcam        ``pcam`` (PCAM pooling)                    ``cam_baseline`` (GAP + linear), ``pcam_avg``, ``pcam_lse``
magsd       ``magsd`` (MAG-SD)                         ``resnet50`` (plain ResNet-50, same schedule)
dcmt        ``dcmt`` (dual-consistency mean teacher)   ``dcmt_supervised`` (labeled slices only)
oxnet       ``oxnet`` (stage 2, from RetinaNet)        ``retinanet`` (the box subset only; OXnet's stage 1)
nonlocal    ``nonlocal_unet``                          ``unet`` (same net, ``global_aggregation: false``)
==========  =========================================  ==============================================================

Every run is ``fit`` then ``test`` of the best checkpoint (the config's ``ModelCheckpoint`` monitor) in one
process, ``python -m experiments.suite fit-test <medattn fit arguments>`` (equivalent to ``medattn fit ...``
followed by ``medattn test ... --ckpt_path <run dir>/checkpoints/best.ckpt``, but in the same run directory and
W&B run), one at a time: two runs side by side on a 2-core machine would each get one core and the time budget
would mean nothing. After the test the run logs ``time/fit_s`` (wall time of ``trainer.fit``: data setup, training
and validation), ``time/test_s``, ``time/epochs`` and ``time/steps``.

Budget: the same ``trainer.max_time`` for every run (``--minutes`` split evenly after ``--overhead`` seconds of
start-up/test per run, or ``--max-time`` per run) and the config's own ``max_epochs`` cap; a slower method gets
fewer epochs, and its cost shows in ``time/*``. Label budget ``--labels b``: ``CXRDataModule`` runs hide the
labels of ``1 - b`` of the training images (``unlabeled_fraction``; supervised arms never see them, semi-supervised
arms use them unlabeled), slice runs label ``b`` of the training subjects (``label_ratio``), the detection pair
keeps ``b`` of its box-annotated images (``box_fraction`` times ``b``); an arm without such a knob (the U-Nets) runs
at ``b = 1`` only. At ``b = 1`` a config with an unlabeled stream gets ``unlabeled_batch_size 0`` (no unlabeled
image is left). ``oxnet`` starts from the ``retinanet`` checkpoint of the same seed and label fraction.

Runs go to ``<out>/<name>-<arm>-l<b>/<arm>-l<b>-s<seed>-<tag>/`` (W&B group ``<name>/<arm>-l<b>``: the seeds of
one arm at one label fraction; tags ``suite:<name>``, ``method:<arm>``, ``pair:<pair>``, ``role:<role>``,
``labels:<b>``, ``seed:<s>``), which ``medattn compare`` reads. A run whose directory already holds test metrics
is skipped, so the same ``--tag`` resumes an interrupted suite. Extra ``medattn`` flags for every run follow ``--``.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from experiments.logging import logger_flags

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Arm:
    """One configuration of the suite. ``config`` may contain ``{dataset}``."""

    name: str
    config: str
    pair: str = ""
    role: str = ""
    flags: tuple[str, ...] = ()
    knob: str = "labels"  # "labels" (unlabeled_fraction / label_ratio), "box" (box_fraction) or "none"
    init_from: str | None = None  # arm whose checkpoint (same seed and labels) initialises this one
    init_flag: str = "--model.init_args.init_checkpoint"
    overlays: tuple[str, ...] = ()  # configs composed after ``config`` (-c), e.g. a pooling variant


ARMS: dict[str, Arm] = {arm.name: arm for arm in [
    Arm("pcam", "experiments/pcam/{dataset}.yaml", "pcam", "method"),
    Arm("cam_baseline", "experiments/cam_baseline/{dataset}.yaml", "pcam", "baseline"),
    Arm("pcam_avg", "experiments/pcam/{dataset}.yaml", "pcam", "baseline", overlays=("experiments/pcam/avg.yaml",)),
    Arm("pcam_lse", "experiments/pcam/{dataset}.yaml", "pcam", "baseline", overlays=("experiments/pcam/lse.yaml",)),
    Arm("magsd", "experiments/magsd/{dataset}.yaml", "magsd", "method"),
    Arm("resnet50", "experiments/magsd/{dataset}.yaml", "magsd", "baseline", overlays=("experiments/magsd/resnet50.yaml",)),
    Arm("dcmt", "experiments/dcmt/{dataset}.yaml", "dcmt", "method"),
    Arm("dcmt_supervised", "experiments/dcmt/{dataset}.yaml", "dcmt", "baseline", overlays=("experiments/dcmt/labeled_only.yaml",)),
    Arm("retinanet", "experiments/retinanet/{dataset}.yaml", "oxnet", "baseline", knob="box"),
    Arm("oxnet", "experiments/oxnet/{dataset}.yaml", "oxnet", "method", knob="box", init_from="retinanet"),
    Arm("nonlocal_unet", "experiments/nonlocal_unet/{dataset}.yaml", "nonlocal", "method", knob="none"),
    Arm("unet", "experiments/nonlocal_unet/{dataset}.yaml", "nonlocal", "baseline", knob="none",
        flags=("--model.init_args.net.init_args.global_aggregation", "false")),
]}

PRESETS = {
    # <= 15 min on 2 cores: 4 runs of ~3 min
    "quick": {"arms": ["pcam", "cam_baseline"], "seeds": [0, 1], "labels": [1.0], "minutes": 15},
    # <= 60 min on 2 cores: 24 runs
    "full": {"arms": list(ARMS), "seeds": [0, 1], "labels": [1.0], "minutes": 60},
    # the label-budget curves of the pairs that use unlabeled images or few boxes (36 runs)
    "labels": {"arms": ["pcam", "cam_baseline", "dcmt", "dcmt_supervised", "retinanet", "oxnet"], "seeds": [0, 1],
               "labels": [0.1, 0.25, 1.0], "minutes": 60},
}


@dataclass
class Run:
    arm: Arm
    configs: list[str]
    seed: int
    labels: float
    name: str
    group: str
    tags: list[str]
    flags: list[str] = field(default_factory=list)
    run_dir: Path = Path()
    note: str = ""

    def command(self, budget: list[str], extra: list[str]) -> list[str]:
        cmd = [sys.executable, "-m", "experiments.suite", "fit-test"]
        for config in self.configs:
            cmd += ["-c", config]
        return cmd + ["--seed_everything", str(self.seed), *budget, "--trainer.enable_progress_bar", "false",
                      *logger_flags(self.run_dir.parent.parent, self.group, self.name),
                      "--trainer.logger.init_args.tags", json.dumps(self.tags), *self.flags, *extra]


# ------------------------------------------------------------------------------------------------- planning
def merged_config(paths: list[str]) -> dict:
    """Later files win, dict by dict (enough to read data.class_path and a few init_args)."""

    def merge(a: dict, b: dict) -> dict:
        out = copy.deepcopy(a)
        for key, value in b.items():
            out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        return out

    config: dict = {}
    for path in paths:
        config = merge(config, yaml.safe_load((ROOT / path if not Path(path).is_absolute() else Path(path)).read_text()) or {})
    return config


def budget_flags(arm: Arm, config: dict, labels: float) -> list[str] | None:
    """``medattn`` flags setting the label budget, or None when the arm has no knob and labels < 1."""
    data = (config.get("data") or {}).get("init_args") or {}
    cls = str((config.get("data") or {}).get("class_path", ""))
    flags: list[str] = []
    if arm.knob == "box":
        base = data.get("box_fraction")
        if not isinstance(base, (int, float)):
            raise ValueError(f"arm {arm.name}: the box budget scales data.init_args.box_fraction, which is {base!r} in "
                             f"{arm.config}; set it to a number")
        if labels < 1:
            flags += ["--data.init_args.box_fraction", f"{base * labels:.6g}"]
        return flags
    if arm.knob == "none" or ("label_ratio" not in data and "CXRDataModule" not in cls):
        return [] if labels >= 1 else None
    if "label_ratio" in data or "Slice" in cls:
        flags += ["--data.init_args.label_ratio", f"{labels:.6g}"]
    else:
        flags += ["--data.init_args.unlabeled_fraction", f"{1 - labels:.6g}"]
    if labels >= 1 and (data.get("unlabeled_batch_size") or 0) > 0:
        flags += ["--data.init_args.unlabeled_batch_size", "0"]
    return flags


def plan(arms: list[Arm], seeds: list[int], labels: list[float], dataset: str, name: str, extra_configs: list[str],
         out: Path, tag: str) -> tuple[list[Run], list[str]]:
    """The runs in execution order (labels, then seeds, then arms: a partial suite still compares pairs) and
    notes on arms left out."""
    notes, available = [], []
    for arm in arms:
        config = arm.config.format(dataset=dataset)
        if not (ROOT / config).is_file() and not Path(config).is_file():
            notes.append(f"{arm.name}: {config} does not exist - arm left out")
        else:
            available.append(arm)
    names = {a.name for a in available}
    for arm in list(available):
        if arm.init_from and arm.init_from not in names:
            notes.append(f"{arm.name}: needs the {arm.init_from} arm (its stage-1 checkpoint) - arm left out")
            available.remove(arm)
    available.sort(key=lambda a: (a.init_from is not None,))  # dependencies run first, order otherwise kept
    runs = []
    for frac, seed, arm in itertools.product(labels, seeds, available):
        configs = [arm.config.format(dataset=dataset), *arm.overlays, *extra_configs]
        flags = budget_flags(arm, merged_config(configs), frac)
        if flags is None:
            if seed == seeds[0]:
                notes.append(f"{arm.name}: no label knob - runs at labels 1 only, skipped at {frac:g}")
            continue
        arm_label = f"{arm.name}-l{frac:g}"
        run_name = f"{arm_label}-s{seed}"
        group = f"{name}/{arm_label}"
        tags = [f"suite:{name}", f"method:{arm.name}", f"labels:{frac:g}", f"seed:{seed}"]
        tags += [f"pair:{arm.pair}", f"role:{arm.role}"] if arm.pair else []
        run_dir = out / group.replace("/", "-") / f"{run_name}-{tag}"
        runs.append(Run(arm, configs, seed, frac, run_name, group, tags, [*arm.flags, *flags], run_dir))
    return runs, notes


def budget_flags_for(max_time: str | None, epochs: int | None) -> list[str]:
    """``medattn`` flags of the per-run budget: wall clock (``max_time``) or a number of epochs with no time limit.

    An epoch budget makes the comparison independent of the machine's load (every arm trains the same number of
    passes over its data, whatever else runs); the wall clock each arm took is still logged as ``time/fit_s``."""
    if max_time and epochs:
        raise ValueError("give either a wall-clock budget (--minutes / --max-time) or --epochs, not both")
    if epochs:
        return ["--trainer.max_epochs", str(int(epochs)), "--trainer.max_time", "null"]
    return ["--trainer.max_time", max_time] if max_time else []


def max_time_for(n_runs: int, minutes: float, overhead_s: float) -> str:
    """``DD:HH:MM:SS`` per run so that n runs, each with ``overhead_s`` outside training, fit in ``minutes``."""
    seconds = int(max(30, (minutes * 60 - n_runs * overhead_s) / max(1, n_runs)))
    return time.strftime("00:%H:%M:%S", time.gmtime(seconds))


def finished(run_dir: Path) -> bool:
    """The run directory holds a test metric (the suite logs test after fit)."""
    csv = run_dir / "metrics.csv"
    if not csv.is_file():
        return False
    import pandas as pd

    table = pd.read_csv(csv, low_memory=False)
    return any(c.startswith("test/") and table[c].notna().any() for c in table.columns)


def checkpoint_of(run_dir: Path) -> Path | None:
    for name in ("best.ckpt", "last.ckpt"):
        if (run_dir / "checkpoints" / name).is_file():
            return run_dir / "checkpoints" / name
    return None


# -------------------------------------------------------------------------------------------------- grids
def grid_runs(sweep_file: str) -> tuple[str, list[str], list[dict]]:
    """(name, configs, parameter combinations) of a W&B sweep YAML with ``values`` lists (a grid)."""
    sweep = yaml.safe_load(Path(sweep_file).read_text())
    command = [str(c) for c in sweep.get("command", [])]
    configs = [command[i + 1] for i, c in enumerate(command[:-1]) if c in ("-c", "--config")]
    # --key=value tokens of the command, except the logger's (the grid names and groups its own runs)
    fixed = [c for c in command if c.startswith("--") and "=" in c and not c.startswith("--trainer.logger.")]
    axes = {}
    for key, spec in (sweep.get("parameters") or {}).items():
        if "values" in spec:
            axes[key] = list(spec["values"])
        elif "value" in spec:
            axes[key] = [spec["value"]]
        else:
            raise ValueError(f"{sweep_file}: parameter {key} has no `values`; an offline grid needs explicit values")
    combos = [dict(zip(axes, values)) for values in itertools.product(*axes.values())]
    for combo in combos:
        combo["_fixed"] = fixed
    return Path(sweep_file).stem, configs, combos


def _arg(value) -> str:
    """A sweep value as a command-line value (JSON for booleans, lists and dicts, as jsonargparse reads them)."""
    return json.dumps(value) if isinstance(value, (bool, list, dict)) or value is None else str(value)


def _short(combo: dict) -> str:
    return ",".join(f"{k.split('.')[-1]}={_arg(v)}" for k, v in combo.items() if not k.startswith("_") and k != "seed_everything")


def grid_plan(grid: str | None, configs: list[str], seeds: list[int], name: str, extra_configs: list[str], out: Path,
              tag: str) -> list[Run]:
    """Runs of an offline grid: every combination of a sweep's ``values`` (its ``seed_everything`` values are the
    seeds, else ``seeds``), then every config file of ``configs``, each for every seed."""
    items: dict[str, tuple[list[str], list[str], list[int]]] = {}
    if grid:
        stem, sweep_configs, combos = grid_runs(grid)
        for combo in combos:
            label = f"{stem}[{_short(combo)}]" if _short(combo) else stem
            flags = [*combo["_fixed"], *(f"--{k}={_arg(v)}" for k, v in combo.items()
                                         if not k.startswith("_") and k != "seed_everything")]
            entry = items.setdefault(label, (sweep_configs, flags, []))
            entry[2].extend([int(combo["seed_everything"])] if "seed_everything" in combo else seeds)
    for path in configs:
        label = Path(path).resolve().with_suffix("")
        label = label.relative_to(ROOT / "experiments") if label.is_relative_to(ROOT / "experiments") else label.name
        items[str(label)] = ([path], [], list(seeds))
    runs = []
    for i, (label, (run_configs, flags, run_seeds)) in enumerate(items.items()):
        arm = Arm(label, run_configs[0] if run_configs else "")
        for seed in dict.fromkeys(run_seeds):
            group, run_name = f"{name}/{i:02d}", f"{name}-{i:02d}-s{seed}"
            tags = [f"suite:{name}", f"method:{label}", f"seed:{seed}"]
            runs.append(Run(arm, [*run_configs, *extra_configs], seed, 1.0, run_name, group, tags, flags,
                            out / group.replace("/", "-") / f"{run_name}-{tag}"))
    return runs


# ---------------------------------------------------------------------------------------------- execution
def fit_test(args: list[str]) -> None:
    """Child process: ``fit``, then ``test`` the best checkpoint (or the last weights), then log times."""
    from experiments.cli import MedAttnCLI

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cli = MedAttnCLI(args=args, run=False)
    trainer = cli.trainer
    start = time.perf_counter()
    trainer.fit(cli.model, datamodule=cli.datamodule)
    fit_s = time.perf_counter() - start
    callback = trainer.checkpoint_callback
    ckpt = "best" if callback is not None and getattr(callback, "best_model_path", "") else None
    start = time.perf_counter()
    trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt)
    times = {"time/fit_s": fit_s, "time/test_s": time.perf_counter() - start,
             "time/epochs": float(trainer.current_epoch), "time/steps": float(trainer.global_step)}
    for logger in trainer.loggers:
        logger.log_metrics(times, step=trainer.global_step)
        logger.save()
    print("[suite] " + json.dumps({k: round(v, 2) for k, v in times.items()}))


def execute(runs: list[Run], budget: list[str], extra: list[str], tag: str, log_dir: Path, dry_run: bool) -> list[str]:
    """Run each plan entry in a fresh process, sequentially; return the failures."""
    failures, done_dirs, started, executed = [], {}, time.perf_counter(), 0
    env = {k: v for k, v in os.environ.items() if k != "MEDATTN_RUN_DIR"}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])), MEDATTN_RUN_ID=tag,
               HF_HUB_OFFLINE=env.get("HF_HUB_OFFLINE", "1"), WANDB_SILENT="true")
    for i, run in enumerate(runs, 1):
        flags = list(run.flags)
        if run.arm.init_from:
            source = done_dirs.get((run.arm.init_from, run.seed, run.labels))
            ckpt = checkpoint_of(source) if source else None
            if ckpt is None and not dry_run:
                failures.append(f"{run.name}: no {run.arm.init_from} checkpoint to start from - skipped")
                print(f"[suite] {i}/{len(runs)} {run.name}: skipped (no {run.arm.init_from} checkpoint)")
                continue
            flags += [run.arm.init_flag, str(ckpt or (source or Path("<run dir>")) / "checkpoints" / "best.ckpt")]
        cmd = Run(**{**run.__dict__, "flags": flags}).command(budget, extra)
        printable = shlex.join(["python", *cmd[1:]])
        print(f"[suite] {i}/{len(runs)} {run.name}: {printable}", flush=True)
        done_dirs[(run.arm.name, run.seed, run.labels)] = run.run_dir
        if dry_run:
            continue
        if finished(run.run_dir):
            print(f"[suite]   already done: {run.run_dir}")
            continue
        if run.run_dir.exists():  # an interrupted attempt: keep it aside (compare skips dot folders)
            aside = run.run_dir.parent.parent / ".incomplete" / f"{run.run_dir.name}-{int(time.time())}"
            aside.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(run.run_dir), aside)
        log_dir.mkdir(parents=True, exist_ok=True)
        log = log_dir / f"{run.name}.log"
        start = time.perf_counter()
        with log.open("w") as handle:
            code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT).returncode
        took = time.perf_counter() - start
        executed += 1
        elapsed = time.perf_counter() - started
        status = "ok" if code == 0 and finished(run.run_dir) else f"FAILED (exit {code}; log {log})"
        print(f"[suite]   {status} in {took:.0f} s -> {run.run_dir}; {elapsed / 60:.1f} min so far, projected "
              f"{(elapsed + elapsed / executed * (len(runs) - i)) / 60:.0f} min in all", flush=True)
        if status != "ok":
            failures.append(f"{run.name}: {status}")
    return failures


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["fit-test"]:
        fit_test(argv[1:])
        return 0
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="python -m experiments.suite", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Extra medattn flags for every run go after `--`.")
    parser.add_argument("--preset", choices=list(PRESETS), help="arms, seeds, labels and minutes of a documented run")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS))
    parser.add_argument("--configs", nargs="+", help="offline grid: these config files instead of arms")
    parser.add_argument("--grid", help="offline grid from a W&B sweep YAML (experiments/sweeps/<method>.yaml)")
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument("--labels", nargs="+", type=float, help="label fractions (label budget), e.g. 0.1 0.25 1")
    parser.add_argument("--dataset", default="synthetic", help="picks experiments/<method>/<dataset>*.yaml")
    parser.add_argument("-c", "--config", action="append", default=[], dest="extra_configs",
                        help="extra config file for every run (e.g. your data), after the arm's own")
    parser.add_argument("--name", help="suite name: W&B group prefix and `suite:` tag (default: the dataset)")
    parser.add_argument("--minutes", type=float, help="wall-clock budget of the whole suite")
    parser.add_argument("--overhead", type=float, default=45.0, help="seconds per run outside training (start, test)")
    parser.add_argument("--max-time", help="trainer.max_time per run (DD:HH:MM:SS); overrides --minutes")
    parser.add_argument("--epochs", type=int, help="budget in epochs instead of wall clock: trainer.max_epochs for "
                        "every run and no time limit (results do not depend on the machine's load)")
    parser.add_argument("--out", type=Path, default=Path("runs/suite"))
    parser.add_argument("--tag", default=time.strftime("%Y%m%d-%H%M%S"), help="run id suffix; reuse it to resume")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and commands only")
    parser.add_argument("--list", action="store_true", help="list arms and presets")
    args = parser.parse_args(argv)

    if args.list:
        for arm in ARMS.values():
            print(f"{arm.name:16s} pair={arm.pair:9s} role={arm.role:9s} knob={arm.knob:6s} {arm.config}")
        for key, preset in PRESETS.items():
            print(f"preset {key}: {preset}")
        return 0
    # the runs start in the repository root: paths given relative to the caller's folder must survive that
    args.extra_configs = [_absolute(c) for c in args.extra_configs]
    args.configs = [_absolute(c) for c in args.configs] if args.configs else None
    preset = PRESETS.get(args.preset, {})
    seeds = args.seeds or preset.get("seeds") or [0]
    labels = args.labels or preset.get("labels") or [1.0]
    minutes = args.minutes or preset.get("minutes") or 60
    name = args.name or args.dataset
    out = args.out if args.out.is_absolute() else Path.cwd() / args.out
    notes: list[str] = []
    if args.grid or args.configs:
        name = args.name or (Path(args.grid).stem if args.grid else "configs")
        runs = grid_plan(args.grid, args.configs or [], seeds, name, args.extra_configs, out, args.tag)
    else:
        arms = [ARMS[a] for a in (args.arms or preset.get("arms") or ["pcam", "cam_baseline"])]
        runs, notes = plan(arms, seeds, labels, args.dataset, name, args.extra_configs, out, args.tag)
    if not runs:
        print("\n".join(notes) or "nothing to run")
        return 1
    if args.epochs and (args.minutes or args.max_time):
        parser.error("--epochs replaces the wall-clock budget; drop --minutes / --max-time")
    max_time = None if args.epochs else args.max_time or (
        max_time_for(len(runs), minutes, args.overhead) if args.minutes or not (args.grid or args.configs) else None)
    budget = (f"trainer.max_epochs {args.epochs} each, no time limit" if args.epochs else
              f"trainer.max_time {max_time} each (+~{args.overhead:.0f} s start-up/test), estimated "
              f"{len(runs) * (_seconds(max_time) + args.overhead) / 60:.0f} min" if max_time else "the configs' own budgets")
    print(f"[suite] {len(runs)} runs, {budget}; tag {args.tag}; out {out}")
    for note in notes:
        print(f"[suite] note: {note}")
    failures = execute(runs, budget_flags_for(max_time, args.epochs), extra, args.tag, out / "logs" / args.tag, args.dry_run)
    for failure in failures:
        print(f"[suite] {failure}")
    shown = out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out
    print(f"\nCompare (offline, any time):\n  medattn compare {shown} --tags suite:{name} --out {shown}/compare --name {name}")
    return 1 if failures else 0


def _absolute(path: str) -> str:
    return str(Path(path).resolve()) if Path(path).exists() else path


def _seconds(max_time: str) -> int:
    parts = [int(p) for p in max_time.split(":")]
    return sum(v * m for v, m in zip(reversed(parts), (1, 60, 3600, 86400)))


if __name__ == "__main__":
    sys.exit(main())
