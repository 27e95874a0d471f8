"""Render the benchmark tables (Markdown) from the JSON files in ``experiments/benchmarks/results/``.

    python -m experiments.benchmarks.report                       # print
    python -m experiments.benchmarks.report --out benchmarks.md
    python -m experiments.benchmarks.report --doc docs/performance.md   # replace <!-- benchmarks:start/end --> there

``--readme`` is the older name of ``--doc``.

Known layouts get one table each: the training-step benchmarks (any JSON with ``lightning_step_ms`` and
``bare_step_ms``: Lightning module vs a bare PyTorch loop, one row per method), the data loader and the precision
variants; any other JSON shows its own ``.md`` table if one lies beside it, else its top-level numbers. Every
section names the machine it was measured on (from the ``machine`` record each JSON carries).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine_line(machine: dict | None) -> str:
    if not machine:
        return "_machine not recorded_"
    load = machine.get("load_average")
    parts = [machine.get("cuda") or machine.get("processor") or "?", f"{machine.get('cpu_count')} CPUs",
             f"{machine.get('torch_threads')} torch threads", f"torch {machine.get('torch')}",
             f"load {load[0]:.1f}" if load else None, machine.get("time")]
    return "_Measured on " + ", ".join(str(p) for p in parts if p) + "._"


def _setting(config: dict) -> str:
    keys = ("backbone", "image_size", "batch", "num_scales", "output_stride", "bf16", "channels_last")
    items = []
    for key in keys:
        if key in config:
            value = config[key]
            items.append(key.replace("_", " ") if value is True else f"{key.replace('_', ' ')} {value}")
    return ", ".join(i for i in items if not i.endswith(" False"))


def step_table(entries: dict[str, dict]) -> str:
    rows = ["| benchmark | setting | Lightning step ms | bare PyTorch step ms | overhead (median of ratios) |",
            "|---|---|---|---|---|"]
    for name, data in entries.items():
        rows.append(f"| {name} | {_setting(data.get('config', {}))} | {data['lightning_step_ms']['median']:.1f} | "
                    f"{data['bare_step_ms']['median']:.1f} | {100 * data.get('overhead_median', float('nan')):+.1f} % |")
    return "\n".join(rows) + "\n"


def dataloader_table(data: dict) -> str:
    """medattn's training loader (with and, where measured, without mask decoding) against the plain loader."""
    rates = data["images_per_second"]
    has_nomasks = any(k.startswith("medattn_nomasks/") for k in rates)
    extra = (" medattn, train_masks=False |", "---|") if has_nomasks else ("", "")
    rows = [f"| format | workers | medattn img/s |{extra[0]} plain torchvision img/s | ratio |",
            f"|---|---|---|{extra[1]}---|---|"]

    def cell(value: float | None) -> str:
        return f"{value:.1f}" if value else "–"

    for key in sorted(k for k in rates if k.startswith("medattn/")):
        _, fmt, workers = key.split("/")
        mine, plain = rates[key]["median"], rates.get(f"plain/{fmt}/{workers}", {}).get("median")
        nomasks = f" {cell(rates.get(f'medattn_nomasks/{fmt}/{workers}', {}).get('median'))} |" if has_nomasks else ""
        ratio = f"{mine / plain:.2f}" if plain else "–"
        rows.append(f"| {fmt} | {workers[1:]} | {cell(mine)} |{nomasks} {cell(plain)} | {ratio} |")
    return "\n".join(rows) + "\n" + _prepared_table(rates)


def _prepared_table(rates: dict) -> str:
    """The prepared loader (``medattn prepare``; alone, and with ``BatchAugment`` on the CPU) against the PNG
    loader, the augmentation alone per device, and ``medattn prepare``'s own throughput; empty when not measured."""
    def median(key: str) -> float | None:
        return rates.get(key, {}).get("median")

    def cell(value: float | None, unit: str = "") -> str:
        return f"{value:.1f}{unit}" if value else "–"

    workers = sorted({int(k.rsplit("/w", 1)[1]) for k in rates if k.startswith(("prepared/", "prepared_loader/"))})
    made = sorted(k for k in rates if k.startswith("prepare/"))
    if not workers and not made:
        return ""
    rows = ["", "| workers | prepared loader img/s (augmentation on the device) | with BatchAugment on this CPU | "
                "medattn png img/s | speed-up: loader, with CPU augmentation |", "|---|---|---|---|---|"] if workers else []
    for w in workers:
        loader, cpu, png = median(f"prepared_loader/png/w{w}"), median(f"prepared/png/w{w}"), median(f"medattn/png/w{w}")
        ratios = ", ".join(cell(v / png, "×") if v and png else "–" for v in (loader, cpu))
        rows.append(f"| {w} | {cell(loader)} | {cell(cpu)} | {cell(png)} | {ratios} |")
    alone = [f"{k.split('/')[1]} {median(k):.1f} img/s" for k in sorted(rates) if k.startswith("batch_augment/")]
    rows += ["", f"BatchAugment alone: {', '.join(alone)}."] if alone else []
    if made:
        rows += ["", "| `medattn prepare` on | workers | img/s |", "|---|---|---|"]
        rows += [f"| {k.split('/')[1]} | {k.rsplit('/w', 1)[1]} | {median(k):.1f} |" for k in made]
    return "\n".join(rows) + "\n"


def precision_table(data: dict) -> str:
    rates, speedup = data["images_per_second"], data.get("speedup_vs_fp32", {})
    warm = data.get("warmup_seconds", {})
    rows = ["| variant | images/s (median [min–max]) | vs fp32 | warm-up s (incl. compilation) |", "|---|---|---|---|"]
    for variant, r in rates.items():
        ratio = f"{speedup[variant]:.2f}×" if variant in speedup else "–"
        rows.append(f"| {variant} | {r['median']:.1f} [{r['min']:.1f}–{r['max']:.1f}] | {ratio} | "
                    f"{warm.get(variant, float('nan')):.1f} |")
    return "\n".join(rows) + "\n"


def generic_table(data: dict) -> str:
    rows = ["| key | value |", "|---|---|"]
    for key, value in data.items():
        if isinstance(value, (int, float, str, bool)) and key != "machine":
            rows.append(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
    return "\n".join(rows) + "\n"


def render(results: Path = RESULTS) -> str:
    files = {p.stem: json.loads(p.read_text()) for p in sorted(results.glob("*.json"))}
    if not files:
        return f"_No benchmark results in {results}._\n"
    sections = []
    steps = {k: v for k, v in files.items() if "lightning_step_ms" in v and "bare_step_ms" in v}
    if steps:
        machines = {machine_line(v.get("machine")) for v in steps.values()}
        sections.append("#### Training step: Lightning module vs a bare PyTorch loop\n\n" + step_table(steps)
                        + "\n" + "\n".join(sorted(machines)) + "\n")
    for name, data in files.items():
        if name in steps:
            continue
        if name == "dataloader" and "images_per_second" in data:
            title, table = "Data loader throughput (512² training images)", dataloader_table(data)
        elif "speedup_vs_fp32" in data:
            title, table = "Throughput by precision and memory format", precision_table(data)
        elif (results / f"{name}.md").is_file():
            title, table = name.replace("_", " "), (results / f"{name}.md").read_text()
        else:
            title, table = name.replace("_", " "), generic_table(data)
        sections.append(f"#### {title[0].upper() + title[1:]}\n\n{table.rstrip()}\n\n{machine_line(data.get('machine'))}\n")
    return "\n".join(sections)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--out", type=Path, help="write the Markdown here")
    parser.add_argument("--doc", "--readme", dest="readme", type=Path, metavar="FILE",
                        help="replace the text between the markers in this file (docs/performance.md)")
    parser.add_argument("--section", default="benchmarks", help="marker key for --doc")
    args = parser.parse_args(argv)
    text = render(args.results)
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.readme:
        from experiments.compare import update_readme_section

        update_readme_section(args.readme, args.section, text)
    return text


if __name__ == "__main__":
    main()
