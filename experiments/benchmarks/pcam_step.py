"""Lightning overhead of the PCAM training step: ``PCAMModule`` under ``Trainer.fit`` versus a bare PyTorch loop
with the same network (identical initial weights), the same batch, the same loss function and optimiser.

    python -m experiments.benchmarks.pcam_step [--backbone resnet18] [--output-stride 16] [--image-size 128]
                                              [--batch 32] [--steps 12] [--repeats 5] [--bf16] [--channels-last]
    python -m experiments.benchmarks.pcam_step --accelerator gpu --bf16 --channels-last --name pcam_step_gpu

Per-step time is measured between successive batch ends (so it includes fetching the batch and everything
Lightning does around ``training_step``: logging, the NaN guard, the train AUROC update, hooks), the first
``--warmup`` steps of every run dropped; the process CPU time per step is recorded too (more robust than wall
time when other jobs share the cores). After one discarded round, runs alternate Lightning / bare, the order
flipped every round; the reported overhead is the median over rounds of (Lightning median step / bare median
step) − 1. Target ≤ 5 %. The Trainer is minimal (no logger, checkpointing or progress bar), as in a benchmark;
epoch-end work (AUROC compute) is outside the per-step figure. With ``--accelerator gpu`` both arms run on
``cuda:0`` (batch placed there once, clocks read after a CUDA synchronise; wall time is then the figure). Harness:
``experiments.benchmarks.common``. Writes ``results/<name>.json``.
"""

from __future__ import annotations


import torch
from torch.utils.data import DataLoader

from experiments.benchmarks.common import (SameBatch, bare_copy, bare_steps, compare_and_write, fit_steps,
                                           labelled_image_batch, parse_step_args, step_parser)
from lightning_modules.pcam import PCAMModule
from networks.cam_heads import PoolingClassifier
from networks.pcam_loss import pcam_bce


def run_bare(net: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, warmup: int, bf16: bool,
             channels_last: bool, device: torch.device) -> tuple[float, float]:
    """The same step without Lightning (``net``, ``optimizer`` and the loader's batch already on ``device``)."""
    net.train()

    def loss_of(step: int, batch: dict) -> torch.Tensor:
        image = batch["image"].contiguous(memory_format=torch.channels_last) if channels_last else batch["image"]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = net(image)
        return pcam_bce(logits, batch["labels"], batch["label_mask"])[0]

    return bare_steps(loader, optimizer, loss_of, warmup, device)


def main(argv: list[str] | None = None) -> dict:
    parser = step_parser(__doc__, "pcam_step", steps=12, backbone="resnet18", image_size=128, batch=32, classes=4)
    parser.add_argument("--output-stride", type=int, default=16)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--channels-last", action="store_true")
    args, device = parse_step_args(parser, argv)

    torch.manual_seed(0)
    kwargs = {} if args.output_stride == 32 else {"output_stride": args.output_stride}
    net = PoolingClassifier(args.backbone, num_classes=args.classes, pool="pcam", backbone_kwargs=kwargs)
    bare_net = bare_copy(net, device, args.channels_last)
    module = PCAMModule(net, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), channels_last=args.channels_last)
    bare_opt = torch.optim.AdamW(bare_net.parameters(), lr=1e-3)
    labels = (torch.rand(args.batch, args.classes) < 0.3).float()
    loader = SameBatch(labelled_image_batch(labels, args.image_size), args.steps, device).loader()

    precision = "bf16-mixed" if args.bf16 else "32-true"
    return compare_and_write(
        args, device, lambda: fit_steps(module, loader, args.steps, args.warmup, args.accelerator, precision),
        lambda: run_bare(bare_net, bare_opt, loader, args.warmup, args.bf16, args.channels_last, device), discard=1)


if __name__ == "__main__":
    main()
