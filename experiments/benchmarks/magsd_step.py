"""Lightning overhead of the MAG-SD training step: ``MAGSDModule`` under ``Trainer.fit`` versus a bare PyTorch loop
doing the same four forward passes (raw shot, then mix-up, dimming and patching shots), the same loss and optimiser.

    python -m experiments.benchmarks.magsd_step [--backbone resnet50] [--image-size 128] [--batch 16]
                                                [--steps 8] [--repeats 5] [--no-bf16] [--no-channels-last]
    python -m experiments.benchmarks.magsd_step --accelerator gpu --name magsd_step_gpu

Both sides use the same network class with identical initial weights, the same batch, the same augmentation
functions (``networks.attention_augment``, a seeded generator per step) and the same optimiser; the bare loop
writes the loss inline (CE on the raw shot + three soft-distance terms). Per-step time is measured between
successive batch ends (so it includes the batch fetch and everything Lightning does around ``training_step``:
the NaN guard, logging, the log-only CE of the augmented shots, hooks), the first ``--warmup`` steps of every run
dropped; wall-clock and process-CPU time are both recorded. Runs alternate Lightning / bare with the order
flipped every round; the overhead is the median over rounds of (Lightning median step / bare median step) − 1.
Target ≤ 5 %. The Trainer is minimal (no logger, checkpointing or progress bar). Defaults match
``experiments/magsd/synthetic.yaml`` (ResNet-50, 128 px, batch 16, bf16 autocast, channels_last). With
``--accelerator gpu`` both arms run on ``cuda:0`` (batch placed there once, augmentation generator on the GPU,
clocks read after a CUDA synchronise; wall time is then the figure). Harness: ``experiments.benchmarks.common``.
Writes ``results/<name>.json``.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from experiments.benchmarks.common import (SameBatch, bare_copy, bare_steps, compare_and_write, fit_steps,
                                           labelled_image_batch, parse_step_args, step_parser)
from lightning_modules.magsd import MAGSDModule
from networks.attention_augment import magsd_augment
from networks.magsd import MAGSDNet


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
             channels_last: bool, device: torch.device) -> tuple[float, float]:
    """The same step without Lightning (``net``, ``optimizer`` and the loader's batch already on ``device``)."""
    net.train()
    generator = torch.Generator(device=device)  # augmentation draws happen on the images' device

    def loss_of(step: int, batch: dict) -> torch.Tensor:
        image = batch["image"].contiguous(memory_format=torch.channels_last) if channels_last else batch["image"]
        generator.manual_seed(step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return bare_loss(net, image, batch["labels"].argmax(dim=1), generator, channels_last)

    return bare_steps(loader, optimizer, loss_of, warmup, device)


def main(argv: list[str] | None = None) -> dict:
    parser = step_parser(__doc__, "magsd_step", steps=8, backbone="resnet50", image_size=128, batch=16, classes=4)
    parser.add_argument("--num-scales", type=int, default=3)
    parser.add_argument("--no-bf16", dest="bf16", action="store_false")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    args, device = parse_step_args(parser, argv)

    torch.manual_seed(0)
    net = MAGSDNet(num_classes=args.classes, backbone=args.backbone, num_scales=args.num_scales)
    bare_net = bare_copy(net, device, args.channels_last)
    sgd = dict(lr=1e-3, momentum=0.9, nesterov=True, weight_decay=5e-4)
    module = MAGSDModule(net, optimizer=lambda p: torch.optim.SGD(p, **sgd), channels_last=args.channels_last,
                         augment_seed=0)
    bare_opt = torch.optim.SGD(bare_net.parameters(), **sgd)
    labels = F.one_hot(torch.arange(args.batch) % args.classes, args.classes).float()
    loader = SameBatch(labelled_image_batch(labels, args.image_size), args.steps, device).loader()

    precision = "bf16-mixed" if args.bf16 else "32-true"
    return compare_and_write(
        args, device, lambda: fit_steps(module, loader, args.steps, args.warmup, args.accelerator, precision),
        lambda: run_bare(bare_net, bare_opt, loader, args.warmup, args.bf16, args.channels_last, device))


if __name__ == "__main__":
    main()
