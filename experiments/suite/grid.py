"""Offline grids: the combinations of a W&B sweep YAML's ``values``, or a list of config files, as suite runs."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import yaml

from experiments.suite.arms import Arm
from experiments.suite.plan import ROOT, Run

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
