"""Lightning overhead of the DC-MT training step (student + teacher): ``MeanTeacherModule`` under
``Trainer.fit`` with its ``EMATeacher`` callback, versus a bare PyTorch loop doing the same work on a copy
with identical weights: student forward on view 1, teacher forward (no grad) on view 2, the same loss terms
(CE, nMSE, bound, classification and attention consistency, all active), backward, Adam step, EMA update.

    python -m experiments.benchmarks.dcmt_step [--backbone test_resnet] [--output-stride 8] [--image-size 64]
        [--labeled 10] [--unlabeled 30] [--fa-channels 64] [--steps 12] [--warmup 2] [--repeats 11]
        [--bf16] [--channels-last]
    python -m experiments.benchmarks.dcmt_step --paper        # the paper's network and batch (minutes on 2 cores)
    python -m experiments.benchmarks.dcmt_step --paper --accelerator gpu --name dcmt_step_paper_gpu

``--paper`` is the named configuration of the paper's network: SE-ResNeXt50 at output stride 16, FA and head
channels 512, batch 4 (1 labeled + 3 unlabeled, the reference's 1:3) at 256², with channels_last + bf16 (medattn's
recommended settings), 6 steps, 5 rounds, written to ``results/dcmt_step_paper.json``; flags given with it win.
The default (a tiny ``test_resnet`` at 64²) takes seconds a step, so a few noisy rounds decide its median: it runs
11 rounds (``REPEATS``), which ``run_all`` leaves as they are.

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

import argparse
import copy

import torch
from torch.utils.data import DataLoader

from experiments.benchmarks.common import (SameBatch, bare_steps, compare_and_write, fit_steps, named_configuration,
                                           parse_step_args, step_parser)
from lightning_modules.dcmt import MeanTeacherModule
from networks.dcmt import DCMTNet
from networks.ema import ema_alpha, ema_update_

REPEATS = 11  # the tiny default step is short: 5 rounds left its median to 1-2 noisy rounds (+6.5 % vs +2.6 %)
PAPER = dict(backbone="seresnext50_32x4d", output_stride=16, image_size=256, fa_channels=512, labeled=1,
             unlabeled=3, steps=6, repeats=5, bf16=True, channels_last=True, name="dcmt_step_paper")


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
             decay: float, step0: int, device: torch.device, bf16: bool = False) -> tuple[float, float]:
    """The same work without Lightning: ``compute_losses`` (student + no-grad teacher; channels_last inputs when
    the module has it), backward, step, EMA (``module``, ``optimizer`` and the loader's batch already on ``device``);
    with ``bf16`` the losses run under autocast, as Lightning's ``bf16-mixed`` does."""
    module.train()

    def loss_of(step: int, batch: dict) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return module.compute_losses(batch)["total"]

    return bare_steps(loader, optimizer, loss_of, warmup, device,
                      lambda step: ema_update_(module.teacher, module.student, ema_alpha(step0 + step + 1, decay)))


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, torch.device]:
    """The arguments (``--paper``'s values as defaults when given) and the device of ``--accelerator``."""
    parser = step_parser(__doc__, "dcmt_step", steps=12, backbone="test_resnet", image_size=64, repeats=REPEATS)
    parser.add_argument("--output-stride", type=int, default=8)
    parser.add_argument("--fa-channels", type=int, default=64)
    parser.add_argument("--labeled", type=int, default=10)
    parser.add_argument("--unlabeled", type=int, default=30)
    parser.add_argument("--bf16", action="store_true", help="bf16-mixed (autocast) in both arms")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--paper", action="store_true",
                        help="the paper's network and batch (SE-ResNeXt50 OS16, b4, 256², bf16 + channels_last)")
    named_configuration(parser, argv, "paper", PAPER)
    return parse_step_args(parser, argv)


def main(argv: list[str] | None = None) -> dict:
    args, device = parse_args(argv)

    torch.manual_seed(0)
    net = DCMTNet(args.backbone, num_classes=3, output_stride=args.output_stride, fa_channels=args.fa_channels,
                  head_channels=args.fa_channels)
    # consistency from step 0 so every term (and the teacher forward) is in the measured step
    kwargs = dict(consistency_start=0, ramp_unit="step", channels_last=args.channels_last)
    module = MeanTeacherModule(net, optimizer=lambda p: torch.optim.Adam(p, lr=1e-4), **kwargs)
    bare = MeanTeacherModule(copy.deepcopy(net), **kwargs).to(device)  # on the device Lightning trains on
    if args.channels_last:  # what MedAttnModule.setup does on the Lightning arm
        bare = bare.to(memory_format=torch.channels_last)
    bare_opt = torch.optim.Adam(bare.student.parameters(), lr=1e-4)
    loader = SameBatch(make_batch(args.labeled, args.unlabeled, args.image_size), args.steps, device).loader()

    bare_steps = 0  # the bare arm's EMA step count runs on across rounds, as each run continues the weights

    def bare_run() -> tuple[float, float]:
        nonlocal bare_steps
        got = run_bare(bare, bare_opt, loader, args.warmup, 0.99, bare_steps, device, args.bf16)
        bare_steps += args.steps
        return got

    precision = "bf16-mixed" if args.bf16 else "32-true"
    return compare_and_write(
        args, device, lambda: fit_steps(module, loader, args.steps, args.warmup, args.accelerator, precision), bare_run)


if __name__ == "__main__":
    main()
