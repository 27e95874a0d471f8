"""Speed-up of the CPU preset (channels_last + bf16-mixed, ``experiments/configs/trainer/cpu_fast.yaml``) over fp32
NCHW, per ready-made config: the training step of the config's own module on a batch of its own data.

    python -m experiments.benchmarks.cpu_preset                                  # every config in CONFIGS
    python -m experiments.benchmarks.cpu_preset --configs pcam dcmt --repeats 5 --name cpu_preset_pcam_dcmt

For each config the module and DataModule are built as ``medattn`` builds them (``MedAttnCLI(run=False)``, no
logger, no config callbacks; the module's own callbacks such as the EMA teacher stay), one training batch is
drawn and served ``--steps`` times (no data loading in the timing, as in the ``*_step`` benchmarks), and two copies
of the module with identical weights run under ``Trainer.fit``: ``fp32`` (``32-true``, NCHW) and ``preset``
(``bf16-mixed``, ``channels_last``), whatever the config itself sets. Every run restarts from the same weights with
a fresh optimiser (identical work, e.g. the same OXnet pseudo-boxes). Rounds alternate the two arms, order flipped
every round (``common.paired_rounds``); the speed-up is the median over rounds of (fp32 median step / preset median
step), wall and process CPU time. On a shared machine that ratio of interleaved rounds is the figure to trust, not
the absolute times. bf16 is forced here (``MEDATTN_CPU_BF16`` is not consulted): on a CPU without native bf16 the
"preset" arm measures what the fallback avoids. Writes ``results/<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
from pathlib import Path

import torch

from experiments.benchmarks.common import SameBatch, fit_steps, paired_rounds, summary, write

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = {name: f"experiments/{name}/synthetic.yaml"
           for name in ("pcam", "cam_baseline", "magsd", "dcmt", "retinanet", "oxnet")}


def build(config: str, cache_dir: str | None):
    """(module, one training batch) of ``config`` as ``medattn fit -c config`` builds them."""
    from experiments.cli import MedAttnCLI

    args = ["-c", str(ROOT / config), "--trainer.logger", "false", "--trainer.callbacks", "[]",
            "--data.init_args.num_workers", "0"]
    if cache_dir:
        args += ["--data.init_args.reader.init_args.cache_dir", cache_dir]
    cli = MedAttnCLI(args=args, run=False)
    cli.datamodule.setup("fit")
    batch = next(iter(cli.datamodule.train_dataloader()))
    return cli.model, batch


def measure(name: str, args: argparse.Namespace) -> dict:
    print(f"== {name}: {CONFIGS[name]}", flush=True)
    torch.manual_seed(0)
    module, batch = build(CONFIGS[name], args.cache_dir)
    pristine = copy.deepcopy(module.state_dict())
    arms = {}
    for arm, precision, channels_last in (("fp32", "32-true", False), ("preset", "bf16-mixed", True)):
        copy_ = copy.deepcopy(module)
        copy_.channels_last = channels_last  # MedAttnModule.setup converts the module when set

        def run(m=copy_, p=precision) -> tuple[float, float]:
            m.load_state_dict(pristine)
            return fit_steps(m, SameBatch(batch, args.steps).loader(), args.steps, args.warmup, "cpu", p)

        arms[arm] = run
    wall_ms, cpu_ms, ratios, cpu_ratios = paired_rounds(arms, args.repeats, discard=args.discard)
    speedup, cpu_speedup = statistics.median(ratios), statistics.median(cpu_ratios)
    print(f"{name}: preset speed-up (median of per-round fp32/preset) wall {speedup:.2f}x, CPU {cpu_speedup:.2f}x; "
          f"load average {os.getloadavg()}", flush=True)
    return {"config": CONFIGS[name], "fp32_step_ms": summary(wall_ms["fp32"]),
            "preset_step_ms": summary(wall_ms["preset"]), "fp32_step_cpu_ms": summary(cpu_ms["fp32"]),
            "preset_step_cpu_ms": summary(cpu_ms["preset"]), "speedup_per_round": ratios,
            "cpu_speedup_per_round": cpu_ratios, "speedup_median": speedup, "cpu_speedup_median": cpu_speedup}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--steps", type=int, default=6, help="optimiser steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="first steps of every run left out of its median")
    parser.add_argument("--repeats", type=int, default=5, help="rounds of one fp32 and one preset run")
    parser.add_argument("--discard", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--cache-dir", help="where the synthetic data is generated (default: the config's)")
    parser.add_argument("--name", default="cpu_preset", help="writes results/<name>.json")
    args = parser.parse_args(argv)

    results = {name: measure(name, args) for name in args.configs}
    rows = ["| config | fp32 NCHW ms/step | preset ms/step | speed-up (median of rounds) [min–max] | CPU-time speed-up |",
            "|---|---|---|---|---|"]
    for name, r in results.items():
        rows.append(f"| {r['config']} | {r['fp32_step_ms']['median']:.0f} | {r['preset_step_ms']['median']:.0f} | "
                    f"{r['speedup_median']:.2f}× [{min(r['speedup_per_round']):.2f}–{max(r['speedup_per_round']):.2f}] "
                    f"| {r['cpu_speedup_median']:.2f}× |")
    table = "\n".join(rows) + "\n"
    print(table)
    payload = {"args": vars(args), "results": results}
    write(args.name, payload, table)
    return payload


if __name__ == "__main__":
    main()
