"""Run every benchmark of ``experiments/benchmarks/``, one fresh process each, then render the tables.

    python -m experiments.benchmarks.run_all                      # defaults of every benchmark (docs/performance.md's)
    python -m experiments.benchmarks.run_all --profile quick      # smaller settings, a smoke check
    python -m experiments.benchmarks.run_all --only precision dataloader --accelerator gpu
    python -m experiments.benchmarks.run_all --dry-run            # print the commands
    python -m experiments.benchmarks.run_all --only dcmt_step_paper resnet50_512   # opt-in (slow) configurations

Each benchmark writes ``results/<name>.json`` (with the machine description) and usually ``.md``; then
``experiments.benchmarks.report`` renders them all (``--doc docs/performance.md`` updates that page between its
``<!-- benchmarks:start -->`` / ``<!-- benchmarks:end -->`` markers). ``--profile quick`` overwrites the same
JSON files with small settings, so commit the JSONs of a default run only. The default (``full``) profile passes no
rounds or sizes: every benchmark runs with the defaults it declares itself, rounds included (``dcmt_step`` 11, the
other step benchmarks 5; each script's ``--help`` shows them); only ``ga_block`` gets ``--with-dropout``. ``OPT_IN`` entries (a benchmark script run as a named, slow
configuration) run only when named in ``--only``. Benchmarks run one after the other
(never two at once: they time the whole machine). A benchmark that does not exist yet is skipped with a note;
``--accelerator gpu`` is passed to the benchmarks that accept it, the others run on the CPU and say so.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

# name -> extra arguments per profile ("full" = the benchmark's own defaults)
BENCHMARKS: dict[str, dict[str, list[str]]] = {
    "dataloader": {"quick": ["--images", "24", "--workers", "0", "1", "--repeats", "1"]},
    "pcam_step": {"quick": ["--steps", "6", "--repeats", "3"]},
    "magsd_step": {"quick": ["--backbone", "resnet18", "--steps", "4", "--repeats", "3"]},
    "dcmt_step": {"quick": ["--steps", "6", "--repeats", "3"]},
    "oxnet_step": {},
    "ga_block": {"quick": ["--cases", "2d:32", "3d:16", "--repeats", "3"], "full": ["--with-dropout"]},
    "precision": {"quick": ["--variants", "fp32", "channels_last", "bf16", "channels_last+bf16"]},
    "cpu_preset": {"quick": ["--configs", "pcam", "--steps", "4", "--repeats", "2"]},
}
# name -> (script, arguments per profile): minutes on 2 cores, so run only when named (--only)
OPT_IN: dict[str, tuple[str, dict[str, list[str]]]] = {
    "dcmt_step_paper": ("dcmt_step", {"full": ["--paper"], "quick": ["--paper", "--steps", "4", "--repeats", "1"]}),
    "resnet50_512": ("precision", {"full": ["--resnet50-512"], "quick": ["--resnet50-512", "--repeats", "1"]}),
}


def accepts_accelerator(source: Path) -> bool:
    """Whether a benchmark script takes ``--accelerator``: its own option, or the step benchmarks' shared
    ``common.add_common_args`` (directly or through ``common.step_parser``)."""
    text = source.read_text()
    return 'add_argument("--accelerator"' in text or "add_common_args(" in text or "step_parser(" in text


def commands(names: list[str], profile: str, accelerator: str) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """(name, command) per existing benchmark, and notes."""
    out, notes = [], []
    for name in names:
        script, settings = OPT_IN.get(name, (name, BENCHMARKS.get(name, {})))
        source = HERE / f"{script}.py"
        if not source.is_file():
            notes.append(f"{name}: {source.relative_to(ROOT)} does not exist yet - skipped")
            continue
        cmd = [sys.executable, "-m", f"experiments.benchmarks.{script}", *settings.get(profile, [])]
        if accelerator != "cpu":
            if accepts_accelerator(source):
                cmd += ["--accelerator", accelerator]
            else:
                notes.append(f"{name}: has no --accelerator option - runs on the CPU")
        out.append((name, cmd))
    return out, notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=["full", "quick"], default="full")
    parser.add_argument("--only", nargs="+", choices=[*BENCHMARKS, *OPT_IN])
    parser.add_argument("--skip", nargs="+", choices=list(BENCHMARKS), default=[])
    parser.add_argument("--accelerator", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--no-report", action="store_true")
    parser.add_argument("--doc", "--readme", dest="readme", metavar="FILE",
                        help="pass to the report: update this file (docs/performance.md) between the benchmark markers")
    args = parser.parse_args(argv)

    names = [n for n in (args.only or BENCHMARKS) if n not in args.skip]
    todo, notes = commands(names, args.profile, args.accelerator)
    for note in notes:
        print(f"[benchmarks] note: {note}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    failed = []
    for name, cmd in todo:
        print(f"[benchmarks] {name}: {shlex.join(['python', *cmd[1:]])}", flush=True)
        if args.dry_run:
            continue
        start = time.perf_counter()
        code = subprocess.run(cmd, cwd=ROOT, env=env).returncode
        print(f"[benchmarks] {name}: {'ok' if code == 0 else f'FAILED (exit {code})'} in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        if code:
            failed.append(name)
    if not args.dry_run and not args.no_report:
        from experiments.benchmarks import report

        report.main(["--readme", args.readme] if args.readme else [])
    if failed:
        print(f"[benchmarks] failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
