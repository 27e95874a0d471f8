"""Lightning overhead of the DC-MT training step (student + teacher): ``MeanTeacherModule`` under
``Trainer.fit`` with its ``EMATeacher`` callback, versus a bare PyTorch loop doing the same work on a copy
with identical weights: student forward on view 1, teacher forward (no grad) on view 2, the same loss terms
(CE, nMSE, bound, classification and attention consistency, all active), backward, Adam step, EMA update.

    python -m experiments.benchmarks.dcmt_step [--backbone test_resnet] [--output-stride 8] [--image-size 64]
        [--labeled 10] [--unlabeled 30] [--fa-channels 64] [--steps 12] [--warmup 2] [--repeats 5]
    python -m experiments.benchmarks.dcmt_step --backbone seresnext50_32x4d --output-stride 16 \\
        --image-size 256 --fa-channels 512 --name dcmt_step_paper          # the paper's network (slow on CPU)

Per-step time is measured between successive batch ends, so the Lightning figure includes everything around
``training_step``: logging of 6 loss terms and 3 scalars, the NaN guard, hooks and the EMA callback. Rounds
alternate Lightning / bare (order flipped every round); the overhead is the median over rounds of (Lightning
median step / bare median step) − 1. Target ≤ 5 %. Writes ``results/<name>.json``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from callbacks.ema_teacher import ema_alpha, ema_update_
from experiments.benchmarks.common import write
from experiments.benchmarks.pcam_step import SameBatch, StepTimer, _step_times
from lightning_modules.mean_teacher import MeanTeacherModule
from networks.dcmt import DCMTNet


def make_batch(labeled: int, unlabeled: int, size: int, classes: int = 3) -> dict:
    g = torch.Generator().manual_seed(0)
    b = labeled + unlabeled
    labels = torch.zeros(b, classes)
    labels[torch.arange(labeled), torch.randint(0, classes, (labeled,), generator=g)] = 1.0
    mask = torch.zeros(b, 1, size, size)
    mask[..., size // 4: size // 2, size // 4: 3 * size // 4] = 1.0
    return {"image": torch.randn(b, 1, size, size, generator=g), "image_teacher": torch.randn(b, 1, size, size, generator=g),
            "labels": labels, "label_mask": (torch.arange(b) < labeled)[:, None].expand(b, classes).clone(),
            "stream": torch.tensor([1] * labeled + [2] * unlabeled), "attention_mask": mask,
            "has_attention_mask": torch.ones(b, dtype=torch.bool)}


def run_lightning(module: MeanTeacherModule, loader: DataLoader, steps: int, warmup: int) -> float:
    timer = StepTimer()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=50, callbacks=[timer])
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    return statistics.median(_step_times(timer.stamps, start, warmup))


def run_bare(module: MeanTeacherModule, optimizer: torch.optim.Optimizer, loader: DataLoader, warmup: int,
             decay: float, step0: int) -> float:
    """The same work without Lightning: ``compute_losses`` (student + no-grad teacher), backward, step, EMA."""
    module.train()
    stamps: list[float] = []
    step = step0
    start = time.perf_counter()
    for batch in loader:
        loss = module.compute_losses(batch)["total"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        ema_update_(module.teacher, module.student, ema_alpha(step, decay))
        stamps.append(time.perf_counter())
    return statistics.median(_step_times(stamps, start, warmup))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="test_resnet")
    parser.add_argument("--output-stride", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--fa-channels", type=int, default=64)
    parser.add_argument("--labeled", type=int, default=10)
    parser.add_argument("--unlabeled", type=int, default=30)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--name", default="dcmt_step")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    net = DCMTNet(args.backbone, num_classes=3, output_stride=args.output_stride, fa_channels=args.fa_channels,
                  head_channels=args.fa_channels)
    # consistency from step 0 so every term (and the teacher forward) is in the measured step
    kwargs = dict(consistency_start=0, ramp_unit="step")
    module = MeanTeacherModule(net, optimizer=lambda p: torch.optim.Adam(p, lr=1e-4), **kwargs)
    bare = MeanTeacherModule(copy.deepcopy(net), **kwargs)
    bare_opt = torch.optim.Adam(bare.student.parameters(), lr=1e-4)
    loader = DataLoader(SameBatch(make_batch(args.labeled, args.unlabeled, args.image_size), args.steps),
                        batch_size=None, shuffle=False, num_workers=0)

    lightning_ms, bare_ms, ratios = [], [], []
    bare_steps = 0
    for r in range(args.repeats):
        order = ("lightning", "bare") if r % 2 == 0 else ("bare", "lightning")
        got = {}
        for case in order:
            if case == "lightning":
                got[case] = run_lightning(module, loader, args.steps, args.warmup)
            else:
                got[case] = run_bare(bare, bare_opt, loader, args.warmup, 0.99, bare_steps)
                bare_steps += args.steps
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
