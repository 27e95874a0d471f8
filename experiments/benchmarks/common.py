"""Helpers shared by the benchmark scripts: machine description, robust timing, JSON/Markdown output, and the
harness of the training-step benchmarks (``*_step.py``: a LightningModule under ``Trainer.fit`` versus a bare
PyTorch loop doing the same work).

Step-benchmark harness (``--accelerator {cpu,gpu}`` from :func:`add_common_args`, resolved by :func:`device_of`):
:class:`SameBatch` (one pre-built batch, already on the device, served ``steps`` times), :func:`clock` (wall and
process-CPU time, read after a CUDA synchronise on a GPU so that queued kernels are counted), :func:`step_timer`
(a Lightning callback stamping every ``on_train_batch_end``), :func:`step_medians`, :func:`fit_steps` (the
minimal Trainer, ``devices=1``) and :func:`compare_rounds` (rounds alternating the two arms, order flipped every
round; overhead = median over rounds of the ratio of median steps, minus one; :func:`paired_rounds` is its
round loop for any two arms), :func:`bare_steps` (the bare arm's
loop: loss, backward, step, optional after-step work) and :func:`compare_and_write`. Each benchmark supplies its
own bare loss and after-step work, with its network, optimiser and batch on ``device_of(accelerator)`` like
Lightning does: that is the method-specific work.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch.utils.data import DataLoader, Dataset

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


# ------------------------------------------------------------------------------------ training-step harness
def add_common_args(parser: argparse.ArgumentParser, steps: int, warmup: int = 2, repeats: int = 5) -> None:
    """``--accelerator {cpu,gpu}`` and the round settings shared by the step benchmarks (defaults per benchmark)."""
    parser.add_argument("--accelerator", choices=["cpu", "gpu"], default="cpu",
                        help="gpu: both arms on cuda:0 (Lightning devices=1), clocks read after a CUDA synchronise")
    parser.add_argument("--steps", type=int, default=steps, help="optimiser steps per run")
    parser.add_argument("--warmup", type=int, default=warmup, help="first steps of every run left out of its median")
    parser.add_argument("--repeats", type=int, default=repeats, help="rounds of one Lightning and one bare run")


def step_parser(doc: str, name: str, steps: int, backbone: str, image_size: int, batch: int | None = None,
                classes: int | None = None, warmup: int = 2, repeats: int = 5) -> argparse.ArgumentParser:
    """The parser every step benchmark starts from (defaults per benchmark): the network's ``--backbone`` and
    ``--image-size`` (``--batch`` and ``--classes`` where given), ``--name`` of the results file and
    :func:`add_common_args`; the description is the first paragraph of ``doc``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--backbone", default=backbone)
    parser.add_argument("--image-size", type=int, default=image_size)
    if batch is not None:
        parser.add_argument("--batch", type=int, default=batch)
    if classes is not None:
        parser.add_argument("--classes", type=int, default=classes)
    parser.add_argument("--name", default=name, help="writes results/<name>.json")
    add_common_args(parser, steps=steps, warmup=warmup, repeats=repeats)
    return parser


def named_configuration(parser: argparse.ArgumentParser, argv: list[str] | None, flag: str, values: dict) -> None:
    """When the boolean option ``flag`` (its ``dest``) is given in ``argv``, make ``values`` the parser's defaults:
    a named configuration that flags given with it still override."""
    if getattr(parser.parse_known_args(argv)[0], flag):
        parser.set_defaults(**values)


def parse_step_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, torch.device]:
    """The parsed arguments and the device of ``--accelerator``."""
    args = parser.parse_args(argv)
    return args, device_of(args.accelerator)


def device_of(accelerator: str) -> torch.device:
    """The device Lightning's ``accelerator`` with ``devices=1`` trains on (``gpu`` -> ``cuda:0``)."""
    if accelerator == "cpu":
        return torch.device("cpu")
    if accelerator == "gpu":
        if not torch.cuda.is_available():
            raise SystemExit("--accelerator gpu but torch.cuda.is_available() is False")
        return torch.device("cuda", 0)
    raise ValueError(f"accelerator must be 'cpu' or 'gpu', got {accelerator!r}")


def _to(data, device: torch.device):  # tensors in nested dicts/lists/tuples (OXnet boxes are lists)
    if isinstance(data, torch.Tensor):
        return data.to(device)
    if isinstance(data, dict):
        return {k: _to(v, device) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(_to(v, device) for v in data)
    return data


class SameBatch(Dataset):
    """``steps`` copies of one pre-built batch dict, for a ``batch_size=None`` loader (no collation cost).

    With ``device`` the batch is moved there once, up front (as a prefetching loader would deliver it): neither
    arm then pays a host-to-device copy per step (Lightning's transfer of an on-device batch is a no-op)."""

    def __init__(self, batch: dict, steps: int, device: torch.device | str | None = None) -> None:
        self.batch = batch if device is None else _to(batch, torch.device(device))
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int) -> dict:
        return self.batch

    def loader(self) -> DataLoader:
        return DataLoader(self, batch_size=None, shuffle=False, num_workers=0)


def clock(device: torch.device | str = "cpu") -> tuple[float, float]:
    """(wall, process CPU) seconds. On a CUDA device the queue is drained first, so a stamp means "the work
    launched so far is done" (without it a GPU step would measure only the kernel launches). CPU time is the
    more robust figure on a shared CPU machine; on a GPU it includes the host waiting in the synchronise."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter(), time.process_time()


def step_timer(device: torch.device | str = "cpu"):
    """A Lightning callback whose ``stamps`` list gets a :func:`clock` stamp at every ``on_train_batch_end``
    (after the optimiser step and the callbacks placed before it)."""
    import lightning.pytorch as pl  # here, not at the top: the other benchmarks (and ga_block's memory probes)
    # stay free of Lightning's import time and memory

    class StepTimer(pl.Callback):
        def __init__(self) -> None:
            self.stamps: list[tuple[float, float]] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.stamps.append(clock(device))

    return StepTimer()


def step_medians(stamps: list[tuple[float, float]], start: tuple[float, float], warmup: int) -> tuple[float, float]:
    """Median (wall, CPU) seconds per step between successive stamps (the first from ``start``), the first
    ``warmup`` steps dropped (they carry the fit's setup, the first-call costs, cuDNN's autotuning)."""
    if len(stamps) <= warmup:
        raise ValueError(f"{len(stamps)} steps recorded, none left after --warmup {warmup}: raise --steps")
    pairs = list(zip([start, *stamps[:-1]], stamps))[warmup:]
    return statistics.median(b[0] - a[0] for a, b in pairs), statistics.median(b[1] - a[1] for a, b in pairs)


def bare_copy(net: torch.nn.Module, device: torch.device, channels_last: bool) -> torch.nn.Module:
    """The bare arm's network: a deep copy (the same initial weights as the Lightning arm's), moved to the device
    Lightning trains on and, with ``channels_last``, to that memory format (as ``MedAttnModule.setup`` does)."""
    bare = copy.deepcopy(net).to(device)
    return bare.to(memory_format=torch.channels_last) if channels_last else bare


def labelled_image_batch(labels: torch.Tensor, image_size: int) -> dict:
    """One classification batch: random single-channel ``image_size``² images (drawn after ``labels``, from the
    global generator) for the (B, K) ``labels``, every label known."""
    image = torch.randn(labels.shape[0], 1, image_size, image_size)
    return {"image": image, "labels": labels, "label_mask": torch.ones_like(labels, dtype=torch.bool)}


def bare_steps(loader: DataLoader, optimizer: torch.optim.Optimizer, loss_of: Callable[[int, dict], torch.Tensor],
               warmup: int, device: torch.device, after_step: Callable[[int], None] | None = None
               ) -> tuple[float, float]:
    """The bare arm's loop: per batch ``loss_of(step, batch)``, backward, optimiser step, then ``after_step(step)``
    (EMA, prototype update: what a method's callbacks do after the step), a :func:`clock` stamp per step.
    Median (wall, CPU) seconds per step after ``warmup``, like :func:`fit_steps`."""
    stamps: list[tuple[float, float]] = []
    start = clock(device)
    for step, batch in enumerate(loader):
        loss = loss_of(step, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step(step)
        stamps.append(clock(device))
    return step_medians(stamps, start, warmup)


def fit_steps(module, loader: DataLoader, steps: int, warmup: int, accelerator: str = "cpu",
              precision: str = "32-true", callbacks: Iterable = ()) -> tuple[float, float]:
    """``Trainer.fit`` for ``steps`` steps on one device; median (wall, CPU) seconds per step after ``warmup``.
    The Trainer is minimal, as in a benchmark (no logger, checkpointing, progress bar, model summary or
    validation); ``callbacks`` run before the step timer. Lightning moves the module to the device at the start of
    the fit and back to the CPU at its end (outside the timed steps)."""
    import lightning.pytorch as pl

    device = device_of(accelerator)
    timer = step_timer(device)
    trainer = pl.Trainer(accelerator=accelerator, devices=1, max_steps=steps, max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=50,
                         callbacks=[*callbacks, timer], precision=precision)
    start = clock(device)
    trainer.fit(module, train_dataloaders=loader)
    return step_medians(timer.stamps, start, warmup)


def paired_rounds(arms: dict[str, Callable[[], tuple[float, float]]], repeats: int, discard: int = 0
                  ) -> tuple[dict[str, list[float]], dict[str, list[float]], list[float], list[float]]:
    """``repeats`` rounds of one run of each of the two ``arms`` (each returns median (wall, CPU) seconds per step),
    the order flipped every round so that drift hits both alike, after ``discard`` untimed rounds. Returns wall and
    CPU ms per arm and round, and the per-round wall and CPU ratios first arm / second arm; prints one line a round."""
    (a, run_a), (b, run_b) = arms.items()
    for _ in range(discard):  # first-call costs (thread pools, allocator, Trainer imports) are not per-step costs
        run_a()
        run_b()
    wall_ms: dict[str, list[float]] = {a: [], b: []}
    cpu_ms: dict[str, list[float]] = {a: [], b: []}
    ratios, cpu_ratios = [], []
    for r in range(repeats):
        got = {case: arms[case]() for case in ((a, b) if r % 2 == 0 else (b, a))}
        for case, (wall, cpu) in got.items():
            wall_ms[case].append(1e3 * wall)
            cpu_ms[case].append(1e3 * cpu)
        ratios.append(got[a][0] / got[b][0])
        cpu_ratios.append(got[a][1] / got[b][1])
        print(f"round {r}: wall {a} {wall_ms[a][-1]:.1f} ms, {b} {wall_ms[b][-1]:.1f} ms, ratio {ratios[-1]:.3f}; "
              f"cpu {a} {cpu_ms[a][-1]:.1f} ms, {b} {cpu_ms[b][-1]:.1f} ms, ratio {cpu_ratios[-1]:.3f}", flush=True)
    return wall_ms, cpu_ms, ratios, cpu_ratios


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "values": values}


def compare_rounds(lightning: Callable[[], tuple[float, float]], bare: Callable[[], tuple[float, float]],
                   repeats: int, discard: int = 0, target: float = 0.05) -> dict:
    """:func:`paired_rounds` of ``lightning()`` and ``bare()``. The overhead is the median over rounds of
    (Lightning step / bare step) - 1, for wall and CPU time. Prints the summary; returns the JSON entries."""
    wall_ms, cpu_ms, ratios, cpu_ratios = paired_rounds({"lightning": lightning, "bare": bare}, repeats, discard)
    overhead, cpu_overhead = statistics.median(ratios) - 1, statistics.median(cpu_ratios) - 1
    print(f"Lightning overhead (median of per-round ratios): wall {100 * overhead:+.1f}%, process CPU "
          f"{100 * cpu_overhead:+.1f}% (target <= {100 * target:.0f}%); load average {os.getloadavg()}")
    return {
        "lightning_step_ms": summary(wall_ms["lightning"]), "bare_step_ms": summary(wall_ms["bare"]),
        "ratio_per_round": ratios, "overhead_median": overhead,
        "lightning_step_cpu_ms": summary(cpu_ms["lightning"]), "bare_step_cpu_ms": summary(cpu_ms["bare"]),
        "cpu_ratio_per_round": cpu_ratios, "cpu_overhead_median": cpu_overhead,
        "target": target, "passes": overhead <= target, "passes_cpu": cpu_overhead <= target,
    }


def compare_and_write(args: argparse.Namespace, device: torch.device, lightning: Callable[[], tuple[float, float]],
                      bare: Callable[[], tuple[float, float]], discard: int = 0, **extra) -> dict:
    """:func:`compare_rounds` over ``args.repeats`` rounds, written to ``results/<args.name>.json`` with the
    command's arguments, the device and ``extra`` entries; returns the payload."""
    payload = {"config": vars(args), "device": str(device), **extra,
               **compare_rounds(lightning, bare, args.repeats, discard=discard)}
    write(args.name, payload)
    return payload
