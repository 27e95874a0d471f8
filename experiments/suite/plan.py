"""Planning the suite: the runs of a list of arms (seeds x label fractions x folds), their label and time budgets."""

from __future__ import annotations

import copy
import itertools
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from experiments.logging import logger_flags
from experiments.suite.arms import ARMS, Arm

ROOT = Path(__file__).resolve().parents[2]
FEATURES = "slice_features.npz"  # what a features_from source run exports into its run directory


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
    fold: int | None = None
    export_features: bool = False  # another arm of the plan reads this run's slice features

    @property
    def key(self) -> tuple:
        """Which run of a dependency this run pairs with: same seed, label fraction and fold."""
        return self.seed, self.labels, self.fold

    def command(self, budget: list[str], extra: list[str], test: str = "best") -> list[str]:
        cmd = [sys.executable, "-m", "experiments.suite", "fit-test"]
        cmd += ["--test-weights", test] if test != "best" else []
        cmd += ["--export-features", str(self.run_dir / FEATURES)] if self.export_features else []
        for config in self.configs:
            cmd += ["-c", config]
        return cmd + ["--seed_everything", str(self.seed), *budget, "--trainer.enable_progress_bar", "false",
                      *logger_flags(self.run_dir.parent.parent, self.group, self.name),
                      "--trainer.logger.init_args.tags", json.dumps(self.tags), *self.flags, *extra]


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
    if arm.knob == "inherit":
        return []
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


def with_dependencies(arms: list[Arm], notes: list[str]) -> list[Arm]:
    """``arms`` plus the arms they start from (added with a note), dependencies first, order otherwise kept."""
    chosen = list(arms)
    for arm in arms:
        needed = arm.needs
        while needed and needed not in {a.name for a in chosen}:
            notes.append(f"{arm.name}: needs the {needed} arm - added")
            chosen.append(ARMS[needed])
            needed = ARMS[needed].needs
    depth = {}

    def level(arm: Arm) -> int:
        return 0 if not arm.needs else 1 + level(ARMS[arm.needs])

    for arm in chosen:
        depth[arm.name] = level(arm)
    return sorted(chosen, key=lambda a: depth[a.name])


def plan(arms: list[Arm], seeds: list[int], labels: list[float], dataset: str, name: str, extra_configs: list[str],
         out: Path, tag: str, folds: int | None = None) -> tuple[list[Run], list[str]]:
    """The runs in execution order (labels, then seeds, then folds, then arms: a partial suite still compares pairs)
    and notes on arms added or left out. ``folds`` k: every run becomes k runs, fold i held out as the test split
    (``data.num_folds``/``data.fold``: the same patient-level folds for every arm)."""
    notes, available = [], []
    for arm in with_dependencies(arms, notes):
        config = arm.config.format(dataset=dataset)
        if not (ROOT / config).is_file() and not Path(config).is_file():
            notes.append(f"{arm.name}: {config} does not exist - arm left out")
        elif arm.needs and arm.needs not in {a.name for a in available}:
            notes.append(f"{arm.name}: needs the {arm.needs} arm, which is left out - arm left out")
        else:
            available.append(arm)
    readers = {a.features_from for a in available if a.features_from}
    runs = []
    for frac, seed, fold, arm in itertools.product(labels, seeds, range(folds) if folds else [None], available):
        configs = [arm.config.format(dataset=dataset), *arm.overlays, *extra_configs]
        flags = budget_flags(arm, merged_config(configs), frac)
        if flags is None:
            if seed == seeds[0] and fold in (None, 0):
                notes.append(f"{arm.name}: no label knob - runs at labels 1 only, skipped at {frac:g}")
            continue
        arm_label = f"{arm.name}-l{frac:g}"
        run_name = f"{arm_label}-s{seed}" + (f"-f{fold}" if fold is not None else "")
        group = f"{name}/{arm_label}"
        tags = [f"suite:{name}", f"method:{arm.name}", f"labels:{frac:g}", f"seed:{seed}"]
        tags += [f"pair:{arm.pair}", f"role:{arm.role}"] if arm.pair else []
        if fold is not None:
            tags.append(f"fold:{fold}")
            flags = [*flags, "--data.init_args.num_folds", str(folds), "--data.init_args.fold", str(fold)]
        run_dir = out / group.replace("/", "-") / f"{run_name}-{tag}"
        runs.append(Run(arm, configs, seed, frac, run_name, group, tags, [*arm.flags, *flags], run_dir, fold=fold,
                        export_features=arm.name in readers))
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


def _seconds(max_time: str) -> int:
    parts = [int(p) for p in max_time.split(":")]
    return sum(v * m for v, m in zip(reversed(parts), (1, 60, 3600, 86400)))


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
