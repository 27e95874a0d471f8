"""Lightning overhead of the PCAM training step: ``PCAMModule`` under ``Trainer.fit`` versus a bare PyTorch loop
with the same network (identical initial weights), the same batch, the same loss function and optimiser.

    python -m experiments.benchmarks.pcam_step [--backbone resnet18] [--output-stride 16] [--image-size 128]
                                              [--batch 32] [--steps 12] [--repeats 5] [--bf16] [--channels-last]

Per-step time is measured between successive batch ends (so it includes fetching the batch and everything
Lightning does around ``training_step``: logging, the NaN guard, the train AUROC update, hooks), the first
``--warmup`` steps of every run dropped; the process CPU time per step is recorded too (more robust than wall
time when other jobs share the cores). Runs alternate Lightning / bare, the order flipped every round; the
reported overhead is the median over rounds of (Lightning median step / bare median step) − 1. Target ≤ 5 %.
The Trainer is minimal (no logger, checkpointing or progress bar), as in a benchmark; epoch-end work (AUROC
compute) is outside the per-step figure. Writes ``results/pcam_step.json``.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from experiments.benchmarks.common import write
from lightning_modules.pcam import PCAMModule, pcam_bce
from networks.cam_heads import PoolingClassifier


class SameBatch(Dataset):
    """``steps`` copies of one pre-built batch dict (``batch_size=None`` loader: no collation cost)."""

    def __init__(self, batch: dict, steps: int) -> None:
        self.batch, self.steps = batch, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int) -> dict:
        return self.batch


def _clock() -> tuple[float, float]:
    """(wall, process CPU) time. CPU time is the more robust figure on a shared, contended machine."""
    return time.perf_counter(), time.process_time()


class StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.stamps: list[tuple[float, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.stamps.append(_clock())


def _step_times(stamps: list[tuple[float, float]], start: tuple[float, float], warmup: int) -> tuple[float, float]:
    """Median (wall, CPU) seconds per step after ``warmup`` steps."""
    pairs = list(zip([start, *stamps[:-1]], stamps))[warmup:]
    return (statistics.median(b[0] - a[0] for a, b in pairs), statistics.median(b[1] - a[1] for a, b in pairs))


def run_lightning(module: PCAMModule, loader: DataLoader, steps: int, warmup: int, bf16: bool) -> tuple[float, float]:
    timer = StepTimer()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=50, callbacks=[timer],
                         precision="bf16-mixed" if bf16 else "32-true")
    start = _clock()
    trainer.fit(module, train_dataloaders=loader)
    return _step_times(timer.stamps, start, warmup)


def run_bare(net: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, warmup: int, bf16: bool,
             channels_last: bool) -> tuple[float, float]:
    net.train()
    stamps: list[tuple[float, float]] = []
    start = _clock()
    for batch in loader:
        image = batch["image"].contiguous(memory_format=torch.channels_last) if channels_last else batch["image"]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = net(image)
        loss, _ = pcam_bce(logits, batch["labels"], batch["label_mask"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        stamps.append(_clock())
    return _step_times(stamps, start, warmup)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--output-stride", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--name", default="pcam_step")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    kwargs = {} if args.output_stride == 32 else {"output_stride": args.output_stride}
    net = PoolingClassifier(args.backbone, num_classes=args.classes, pool="pcam", backbone_kwargs=kwargs)
    bare_net = copy.deepcopy(net)  # same initial weights
    if args.channels_last:
        bare_net = bare_net.to(memory_format=torch.channels_last)
    module = PCAMModule(net, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), channels_last=args.channels_last)
    bare_opt = torch.optim.AdamW(bare_net.parameters(), lr=1e-3)
    labels = (torch.rand(args.batch, args.classes) < 0.3).float()
    batch = {"image": torch.randn(args.batch, 1, args.image_size, args.image_size), "labels": labels,
             "label_mask": torch.ones_like(labels, dtype=torch.bool)}
    loader = DataLoader(SameBatch(batch, args.steps), batch_size=None, shuffle=False, num_workers=0)

    # one discarded round: first-call costs (thread pools, allocator, Trainer imports) are not per-step costs
    run_lightning(module, loader, args.steps, args.warmup, args.bf16)
    run_bare(bare_net, bare_opt, loader, args.warmup, args.bf16, args.channels_last)
    lightning_ms, bare_ms, ratios, cpu_ratios = [], [], [], []
    for r in range(args.repeats):
        order = ("lightning", "bare") if r % 2 == 0 else ("bare", "lightning")
        got = {}
        for case in order:
            if case == "lightning":
                got[case] = run_lightning(module, loader, args.steps, args.warmup, args.bf16)
            else:
                got[case] = run_bare(bare_net, bare_opt, loader, args.warmup, args.bf16, args.channels_last)
        lightning_ms.append(1e3 * got["lightning"][0])
        bare_ms.append(1e3 * got["bare"][0])
        ratios.append(got["lightning"][0] / got["bare"][0])
        cpu_ratios.append(got["lightning"][1] / got["bare"][1])
        print(f"round {r}: lightning {lightning_ms[-1]:.1f} ms, bare {bare_ms[-1]:.1f} ms, wall ratio {ratios[-1]:.3f}, "
              f"CPU-time ratio {cpu_ratios[-1]:.3f}")

    overhead = statistics.median(ratios) - 1
    payload = {
        "config": vars(args),
        "lightning_step_ms": {"median": statistics.median(lightning_ms), "values": lightning_ms},
        "bare_step_ms": {"median": statistics.median(bare_ms), "values": bare_ms},
        "ratio_per_round": ratios,
        "overhead_median": overhead,
        "cpu_time_ratio_per_round": cpu_ratios,
        "cpu_time_overhead_median": statistics.median(cpu_ratios) - 1,
        "target": 0.05,
        "passes": overhead <= 0.05,
    }
    print(f"Lightning overhead (median of per-round wall ratios): {100 * overhead:+.1f}% "
          f"({'within' if overhead <= 0.05 else 'above'} the 5% target); CPU-time overhead "
          f"{100 * payload['cpu_time_overhead_median']:+.1f}%. Load average {os.getloadavg()}")
    write(args.name, payload)
    return payload


if __name__ == "__main__":
    main()
