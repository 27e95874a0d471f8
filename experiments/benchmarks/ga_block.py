"""Benchmark: the global aggregation block with SDPA vs an explicit matmul-softmax block.

For each case (2D 32^2, 64^2, 96^2 and 3D 16^3, 24^3, 32^3 by default; batch 2, C channels, 1 head, query
``same``), one training step = forward + ``mean(y^2)`` + backward of ``networks.global_aggregation``:

  * ``explicit``: ``softmax(q k^T / sqrt(d)) v`` with two matmuls (materialises B x N x L x L);
  * ``sdpa``: ``scaled_dot_product_attention`` on contiguous q/k/v (the flash kernel on CPU);
  * ``sdpa_drop`` and ``explicit_drop`` (with ``--with-dropout``): the same with ``attn_drop=0.5`` on the
    attention weights (the reference's). SDPA then runs its math kernel; both show what the dropout costs.

Time: the variants are interleaved in one process (round robin, order rotated each round), after one warm-up
step each; the table gives the median and [min-max] over ``--repeats`` rounds and the median of the per-round
ratios explicit / sdpa. Memory: for every (case, variant) a *fresh* subprocess builds the block and input,
reads ``VmHWM`` from ``/proc/self/status``, runs one step and reads it again: the difference is the step's peak
memory. Its address space is capped at VmSize + ``--cap-gb`` (``RLIMIT_AS``), so an oversized allocation raises
an error (reported as OOM) instead of waking the kernel's OOM killer. Variants that OOM in the probe are not
timed. Each timed sample also records the process's CPU/wall ratio (about 2.0 when two threads run
uncontended) and the 1-minute load average, so a noisy machine shows in the output.

Run (writes ``ga_block.json`` and ``ga_block.md`` into ``--out``, default ``experiments/benchmarks/results``)::

    PYTHONPATH=. python experiments/benchmarks/ga_block.py --with-dropout
    PYTHONPATH=. python experiments/benchmarks/ga_block.py --cases 2d:32 3d:16 --repeats 3   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from experiments.benchmarks.common import RESULTS, machine
from networks.global_aggregation import GlobalAggregation

DEFAULT_CASES = ["2d:32", "2d:64", "2d:96", "3d:16", "3d:24", "3d:32"]
VARIANTS = {"explicit": ("explicit", 0.0), "sdpa": ("sdpa", 0.0), "sdpa_drop": ("sdpa", 0.5),
            "explicit_drop": ("explicit", 0.5)}


def parse_case(case: str) -> tuple[int, int]:
    dims, size = case.lower().split(":")
    return int(dims.rstrip("d")), int(size)


def build(case: str, variant: str, channels: int, batch: int, heads: int, seed: int = 0):
    dims, size = parse_case(case)
    attention, drop = VARIANTS[variant]
    torch.manual_seed(seed)
    block = GlobalAggregation(dims, channels, channels, num_heads=heads, attn_drop=drop, attention=attention).train()
    x = torch.randn(batch, channels, *(size,) * dims, requires_grad=True)
    return block, x


def step(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    block.zero_grad(set_to_none=True)
    x.grad = None
    y = block(x)
    (y ** 2).mean().backward()
    return y.detach()


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def probe(spec: dict) -> dict:
    """Inside a fresh subprocess: peak memory of one training step under an address-space cap."""
    torch.set_num_threads(spec["threads"])
    block, x = build(spec["case"], spec["variant"], spec["channels"], spec["batch"], spec["heads"])
    cap = _status_kb("VmSize") * 1024 + int(spec["cap_gb"] * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    before = _status_kb("VmHWM")
    try:
        step(block, x)
    except (RuntimeError, MemoryError) as err:  # torch raises RuntimeError for a failed allocation
        return {"ok": False, "error": str(err).splitlines()[0][:200], "peak_mb": None}
    return {"ok": True, "peak_mb": (_status_kb("VmHWM") - before) / 1024}


def run_probe(spec: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.run([sys.executable, __file__, "--probe", json.dumps(spec)], capture_output=True, text=True,
                          env=env, timeout=1800)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"ok": False, "error": f"exit {proc.returncode}: {tail[0][:200]}", "peak_mb": None}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def time_case(case: str, variants: list[str], args) -> dict:
    built = {v: build(case, v, args.channels, args.batch, args.heads) for v in variants}
    outputs = {v: step(*built[v]) for v in variants}  # warm-up (and outputs for the correctness check)
    samples: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(args.repeats):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for v in order:
            wall, cpu = time.perf_counter(), time.process_time()
            step(*built[v])
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            samples[v].append({"ms": 1000 * wall, "cpu_per_wall": cpu / wall, "load1": os.getloadavg()[0]})
    result = {"samples": samples}
    if "explicit" in outputs and "sdpa" in outputs:
        result["max_abs_diff"] = float((outputs["explicit"] - outputs["sdpa"]).abs().max())
        result["ratio_explicit_over_sdpa"] = statistics.median(
            a["ms"] / b["ms"] for a, b in zip(samples["explicit"], samples["sdpa"]))
    return result


def summarize(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def markdown(results: dict, args) -> str:
    cols = [v for v in VARIANTS if v in args.variants]
    head = ["case", "tokens L", "B x L x L fp32"] + [f"{v} ms" for v in cols] + ["explicit / sdpa"] + \
           [f"{v} peak MB" for v in cols] + ["max abs diff", "cpu/wall", "load1"]
    lines = [f"GA block, fwd + bwd, batch {args.batch}, C = {args.channels}, {args.heads} head(s), query 'same', "
             f"{args.threads} threads, {args.repeats} interleaved rounds; median [min-max]. Peak MB = VmHWM rise "
             f"of a fresh process over one step, address space capped at VmSize + {args.cap_gb:g} GB.", ""]
    rows = []
    for case, res in results.items():
        dims, size = parse_case(case)
        tokens = size ** dims
        row = [f"{dims}D {size}^{dims}", f"{tokens:,}", f"{args.batch * tokens * tokens * 4 / 2**20:,.0f} MiB"]
        for v in cols:
            t = res["time"].get(v)
            row.append("OOM" if t is None else f"{t['median']:.0f} [{t['min']:.0f}-{t['max']:.0f}]")
        ratio = res.get("ratio_explicit_over_sdpa")
        row.append("-" if ratio is None else f"{ratio:.2f}x")
        for v in cols:
            m = res["memory"][v]
            row.append(f"{m['peak_mb']:.0f}" if m["ok"] else "OOM")
        diff = res.get("max_abs_diff")
        row.append("-" if diff is None else f"{diff:.1e}")
        util = [s["cpu_per_wall"] for v in cols for s in res["samples"].get(v, [])]
        load = [s["load1"] for v in cols for s in res["samples"].get(v, [])]
        row.append(f"{statistics.median(util):.2f}" if util else "-")
        row.append(f"{statistics.median(load):.1f}" if load else "-")
        rows.append(row)
    import pandas as pd

    from experiments.compare.render import to_markdown  # the repository's one Markdown table writer

    return "\n".join([*lines, to_markdown(pd.DataFrame(rows, columns=head))]) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="e.g. 2d:64 3d:24")
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cap-gb", type=float, default=12.0)
    parser.add_argument("--with-dropout", action="store_true", help="also time SDPA with attention dropout 0.5")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        print(json.dumps(probe(json.loads(args.probe))))
        return
    torch.set_num_threads(args.threads)
    args.variants = ["explicit", "sdpa"] + (["sdpa_drop", "explicit_drop"] if args.with_dropout else [])
    results = {}
    for case in args.cases:
        memory = {v: run_probe({"case": case, "variant": v, "channels": args.channels, "batch": args.batch,
                                "heads": args.heads, "threads": args.threads, "cap_gb": args.cap_gb})
                  for v in args.variants}
        timed = [v for v in args.variants if memory[v]["ok"]]
        res = time_case(case, timed, args) if timed else {"samples": {}}
        res["memory"] = memory
        res["time"] = {v: summarize([s["ms"] for s in res["samples"][v]]) for v in timed}
        results[case] = res
        print(case, {v: (round(res["time"][v]["median"]) if v in res["time"] else "OOM") for v in args.variants},
              {v: (round(memory[v]["peak_mb"]) if memory[v]["ok"] else "OOM") for v in args.variants}, flush=True)
        table = write_results(results, args)  # after every case, so a long run that dies keeps what it measured
    print(table)


def write_results(results: dict, args) -> str:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {k: v for k, v in vars(args).items() if k != "probe"}
    (out / "ga_block.json").write_text(json.dumps({"machine": machine(), "args": meta, "results": results}, indent=1))
    table = markdown(results, args)
    (out / "ga_block.md").write_text(table)
    return table


if __name__ == "__main__":
    main()
