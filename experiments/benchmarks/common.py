"""Helpers shared by the benchmark scripts: machine description, robust timing, JSON/Markdown output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def interleaved(cases: dict[str, Callable[[], float]], repeats: int) -> dict[str, dict]:
    """Run each case ``repeats`` times, round-robin (so drift hits all cases alike); each call returns a value
    (a time or a rate). Returns median, min and max per case."""
    values: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            values[name].append(fn())
    return {name: {"median": statistics.median(v), "min": min(v), "max": max(v), "values": v}
            for name, v in values.items()}


def write(name: str, payload: dict, table: str | None = None) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2, default=float))
    if table is not None:
        (RESULTS / f"{name}.md").write_text(table)
    print(f"wrote {path}")
    return path
