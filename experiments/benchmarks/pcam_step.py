"""Lightning overhead of the PCAM training step: ``PCAMModule`` under ``Trainer.fit`` versus a bare PyTorch loop
with the same network (identical initial weights), the same batch, the same loss function and optimiser.

    python -m experiments.benchmarks.pcam_step [--backbone resnet18] [--output-stride 16] [--image-size 128]
                                              [--batch 32] [--steps 12] [--repeats 5] [--bf16] [--channels-last]

Per-step time is measured between successive batch ends (so it includes fetching the batch and everything
Lightning does around ``training_step``: logging, the NaN guard, the train AUROC update, hooks), the first
``--warmup`` steps of every run dropped. Runs alternate Lightning / bare, the order flipped every round; the
reported overhead is the median over rounds of (Lightning median step / bare median step) − 1. Target ≤ 5 %.
The Trainer is minimal (no logger, checkpointing or progress bar), as in a benchmark; epoch-end work (AUROC
compute) is outside the per-step figure. Writes ``results/pcam_step.json``.
"""

from __future__ import annotations

import argparse
import copy
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


class StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.stamps.append(time.perf_counter())


def _step_times(stamps: list[float], start: float, warmup: int) -> list[float]:
    times = [b - a for a, b in zip([start, *stamps[:-1]], stamps)]
    return times[warmup:]


def run_lightning(module: PCAMModule, loader: DataLoader, steps: int, warmup: int, bf16: bool) -> float:
    timer = StepTimer()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=50, callbacks=[timer],
                         precision="bf16-mixed" if bf16 else "32-true")
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    return statistics.median(_step_times(timer.stamps, start, warmup))


def run_bare(net: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, warmup: int, bf16: bool,
             channels_last: bool) -> float:
    net.train()
    stamps: list[float] = []
    start = time.perf_counter()
    for batch in loader:
        image = batch["image"].contiguous(memory_format=torch.channels_last) if channels_last else batch["image"]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = net(image)
        loss, _ = pcam_bce(logits, batch["labels"], batch["label_mask"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        stamps.append(time.perf_counter())
    return statistics.median(_step_times(stamps, start, warmup))


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

    lightning_ms, bare_ms, ratios = [], [], []
    for r in range(args.repeats):
        order = ("lightning", "bare") if r % 2 == 0 else ("bare", "lightning")
        got = {}
        for case in order:
            if case == "lightning":
                got[case] = run_lightning(module, loader, args.steps, args.warmup, args.bf16)
            else:
                got[case] = run_bare(bare_net, bare_opt, loader, args.warmup, args.bf16, args.channels_last)
        lightning_ms.append(1e3 * got["lightning"])
        bare_ms.append(1e3 * got["bare"])
        ratios.append(got["lightning"] / got["bare"])
        print(f"round {r}: lightning {lightning_ms[-1]:.1f} ms, bare {bare_ms[-1]:.1f} ms, ratio {ratios[-1]:.3f}")

    overhead = statistics.median(ratios) - 1
    payload = {
        "config": vars(args),
        "lightning_step_ms": {"median": statistics.median(lightning_ms), "values": lightning_ms},
        "bare_step_ms": {"median": statistics.median(bare_ms), "values": bare_ms},
        "ratio_per_round": ratios,
        "overhead_median": overhead,
        "target": 0.05,
        "passes": overhead <= 0.05,
    }
    print(f"Lightning overhead (median of per-round ratios): {100 * overhead:+.1f}% "
          f"({'within' if overhead <= 0.05 else 'above'} the 5% target)")
    write(args.name, payload)
    return payload


if __name__ == "__main__":
    main()
