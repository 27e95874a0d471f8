"""Lightning overhead of the MAG-SD training step: ``MAGSDModule`` under ``Trainer.fit`` versus a bare PyTorch loop
doing the same four forward passes (raw shot, then mix-up, dimming and patching shots), the same loss and optimiser.

    python -m experiments.benchmarks.magsd_step [--backbone resnet50] [--image-size 128] [--batch 16]
                                                [--steps 8] [--repeats 5] [--no-bf16] [--no-channels-last]

Both sides use the same network class with identical initial weights, the same batch, the same augmentation
functions (``networks.attention_augment``, a seeded generator per step) and the same optimiser; the bare loop
writes the loss inline (CE on the raw shot + three soft-distance terms). Per-step time is measured between
successive batch ends (so it includes the batch fetch and everything Lightning does around ``training_step``:
the NaN guard, logging, the log-only CE of the augmented shots, hooks), the first ``--warmup`` steps of every run
dropped. Runs alternate Lightning / bare with the order flipped every round; the overhead is the median over
rounds of (Lightning median step / bare median step) − 1. Target ≤ 5 %. The Trainer is minimal (no logger,
checkpointing or progress bar). Defaults match ``experiments/magsd/synthetic.yaml`` (ResNet-50, 128 px,
batch 16, bf16 autocast, channels_last). Writes ``results/magsd_step.json``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from experiments.benchmarks.common import write
from lightning_modules.magsd import MAGSDModule
from networks.attention_augment import magsd_augment
from networks.magsd import MAGSDNet


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


def run_lightning(module: MAGSDModule, loader: DataLoader, steps: int, warmup: int, bf16: bool) -> float:
    timer = StepTimer()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=50, callbacks=[timer],
                         precision="bf16-mixed" if bf16 else "32-true")
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    return statistics.median(_step_times(timer.stamps, start, warmup))


def bare_loss(net: MAGSDNet, image: torch.Tensor, target: torch.Tensor, generator: torch.Generator,
              channels_last: bool) -> torch.Tensor:
    """The MAG-SD loss written out without the module: four forwards, CE + three soft-distance terms."""
    features, attention = net.forward_features(image)
    logits = net.forward_head(features, attention)
    views = magsd_augment(image, attention, generator)
    if channels_last:
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    shots = [net(v) for v in views]
    q = torch.softmax(logits.detach().float(), dim=1)
    peak, predicted = q.max(dim=1)
    smooth = torch.full_like(q, 0.01).scatter_(1, target[:, None], 1 - 0.01 * q.shape[1])
    q = torch.where(((predicted != target) | (peak < 0.7))[:, None], smooth, q)
    sd = sum((q - torch.softmax(p.float(), dim=1)).abs().mean() for p in shots)
    return F.cross_entropy(logits.float(), target) + sd


def run_bare(net: MAGSDNet, optimizer: torch.optim.Optimizer, loader: DataLoader, warmup: int, bf16: bool,
             channels_last: bool) -> float:
    net.train()
    generator = torch.Generator()
    stamps: list[float] = []
    start = time.perf_counter()
    for step, batch in enumerate(loader):
        image = batch["image"].contiguous(memory_format=torch.channels_last) if channels_last else batch["image"]
        generator.manual_seed(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = bare_loss(net, image, batch["labels"].argmax(dim=1), generator, channels_last)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        stamps.append(time.perf_counter())
    return statistics.median(_step_times(stamps, start, warmup))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--num-scales", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-bf16", dest="bf16", action="store_false")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--name", default="magsd_step")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    net = MAGSDNet(num_classes=args.classes, backbone=args.backbone, num_scales=args.num_scales)
    bare_net = copy.deepcopy(net)  # same initial weights
    if args.channels_last:
        bare_net = bare_net.to(memory_format=torch.channels_last)
    sgd = dict(lr=1e-3, momentum=0.9, nesterov=True, weight_decay=5e-4)
    module = MAGSDModule(net, optimizer=lambda p: torch.optim.SGD(p, **sgd), channels_last=args.channels_last,
                         augment_seed=0)
    bare_opt = torch.optim.SGD(bare_net.parameters(), **sgd)
    labels = F.one_hot(torch.arange(args.batch) % args.classes, args.classes).float()
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
        print(f"round {r}: lightning {lightning_ms[-1]:.1f} ms, bare {bare_ms[-1]:.1f} ms, ratio {ratios[-1]:.3f}",
              flush=True)

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
