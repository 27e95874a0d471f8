"""Lightning overhead of the DC-MT training step (student + teacher): ``MeanTeacherModule`` under
``Trainer.fit`` with its ``EMATeacher`` callback, versus a bare PyTorch loop doing the same work on a copy
with identical weights: student forward on view 1, teacher forward (no grad) on view 2, the same loss terms
(CE, nMSE, bound, classification and attention consistency, all active), backward, Adam step, EMA update.

    python -m experiments.benchmarks.dcmt_step [--backbone test_resnet] [--output-stride 8] [--image-size 64]
        [--labeled 10] [--unlabeled 30] [--fa-channels 64] [--steps 12] [--warmup 2] [--repeats 5]
    python -m experiments.benchmarks.dcmt_step --backbone seresnext50_32x4d --output-stride 16 \\
        --image-size 256 --fa-channels 512 --name dcmt_step_paper          # the paper's network (slow on CPU)
    python -m experiments.benchmarks.dcmt_step --accelerator gpu --backbone seresnext50_32x4d --output-stride 16 \\
        --image-size 256 --fa-channels 512 --name dcmt_step_paper_gpu      # the same on cuda:0

Per-step time is measured between successive batch ends, so the Lightning figure includes everything around
``training_step``: logging of 6 loss terms and 3 scalars, the NaN guard, hooks and the EMA callback. Rounds
alternate Lightning / bare (order flipped every round); the overhead is the median over rounds of (Lightning
median step / bare median step) − 1. Target ≤ 5 %. Both wall-clock and process-CPU time are recorded: on a
shared machine the CPU-time ratio is the more trustworthy figure (run with ``OMP_NUM_THREADS=1`` so that
OpenMP spin-waiting does not count). With ``--accelerator gpu`` both arms run on ``cuda:0`` (batch placed there
once, clocks read after a CUDA synchronise; wall time is then the figure). Harness:
``experiments.benchmarks.common``. Writes ``results/<name>.json``.
"""

from __future__ import annotations

import copy

import torch
from torch.utils.data import DataLoader

from experiments.benchmarks.common import (SameBatch, bare_steps, compare_and_write, fit_steps, parse_step_args,
                                           step_parser)
from lightning_modules.dcmt import MeanTeacherModule
from networks.dcmt import DCMTNet
from networks.ema import ema_alpha, ema_update_


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


def run_bare(module: MeanTeacherModule, optimizer: torch.optim.Optimizer, loader: DataLoader, warmup: int,
             decay: float, step0: int, device: torch.device) -> tuple[float, float]:
    """The same work without Lightning: ``compute_losses`` (student + no-grad teacher), backward, step, EMA
    (``module``, ``optimizer`` and the loader's batch already on ``device``)."""
    module.train()
    return bare_steps(loader, optimizer, lambda step, batch: module.compute_losses(batch)["total"], warmup, device,
                      lambda step: ema_update_(module.teacher, module.student, ema_alpha(step0 + step + 1, decay)))


def main(argv: list[str] | None = None) -> dict:
    parser = step_parser(__doc__, "dcmt_step", steps=12, backbone="test_resnet", image_size=64)
    parser.add_argument("--output-stride", type=int, default=8)
    parser.add_argument("--fa-channels", type=int, default=64)
    parser.add_argument("--labeled", type=int, default=10)
    parser.add_argument("--unlabeled", type=int, default=30)
    args, device = parse_step_args(parser, argv)

    torch.manual_seed(0)
    net = DCMTNet(args.backbone, num_classes=3, output_stride=args.output_stride, fa_channels=args.fa_channels,
                  head_channels=args.fa_channels)
    # consistency from step 0 so every term (and the teacher forward) is in the measured step
    kwargs = dict(consistency_start=0, ramp_unit="step")
    module = MeanTeacherModule(net, optimizer=lambda p: torch.optim.Adam(p, lr=1e-4), **kwargs)
    bare = MeanTeacherModule(copy.deepcopy(net), **kwargs).to(device)  # on the device Lightning trains on
    bare_opt = torch.optim.Adam(bare.student.parameters(), lr=1e-4)
    loader = SameBatch(make_batch(args.labeled, args.unlabeled, args.image_size), args.steps, device).loader()

    bare_steps = 0  # the bare arm's EMA step count runs on across rounds, as each run continues the weights

    def bare_run() -> tuple[float, float]:
        nonlocal bare_steps
        got = run_bare(bare, bare_opt, loader, args.warmup, 0.99, bare_steps, device)
        bare_steps += args.steps
        return got

    return compare_and_write(
        args, device, lambda: fit_steps(module, loader, args.steps, args.warmup, args.accelerator), bare_run)


if __name__ == "__main__":
    main()
