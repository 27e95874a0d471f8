"""Lightning overhead of the OXnet training step: ``OXnetModule`` under ``Trainer.fit`` with its ``EMATeacher`` and
``PrototypeMomentum`` callbacks, versus a bare PyTorch loop doing the same work on a copy with identical weights:
student forward on the three-stream batch, teacher forward (no grad) and pseudo-boxes, every loss term (focal,
smooth-L1, DAA, GPA intra/inter, soft focal, regression consistency), backward, AdamW step, EMA update, prototype
update.

    python -m experiments.benchmarks.oxnet_step                        # the synthetic config's network, 128 px
    python -m experiments.benchmarks.oxnet_step --backbone test_resnet --image-size 64 --levels 3 4 5 \\
        --channels 16 --head-depth 1 --name oxnet_step_tiny              # seconds, for a loaded machine
    python -m experiments.benchmarks.oxnet_step --accelerator gpu --name oxnet_step_gpu

So that the distillation terms are part of the measured step, the classification output layer is given random
weights (a fresh head predicts 0.01 everywhere and the teacher would find no pseudo-box); the JSON records the
pseudo-box count per image. Timing as in ``dcmt_step``: per-step time between successive batch ends, rounds
alternate Lightning / bare (order flipped every round) and each starts from the same weights with a fresh
optimiser, overhead = median over rounds of (Lightning median step / bare median step) − 1, wall clock and
process CPU time. Target ≤ 5 %. With ``--accelerator gpu`` both arms run on ``cuda:0`` (batch placed there once,
clocks read after a CUDA synchronise; wall time is then the figure). Harness: ``experiments.benchmarks.common``.
Writes ``results/<name>.json``.
"""

from __future__ import annotations

import copy

import torch
from torch.utils.data import DataLoader

from callbacks.ema_teacher import EMATeacher
from callbacks.prototype_momentum import PrototypeMomentum, momentum_update_
from datamodules.batch import STREAM_BOX, STREAM_LABEL, STREAM_UNLABELED
from experiments.benchmarks.common import (SameBatch, bare_steps, compare_and_write, fit_steps, parse_step_args,
                                           step_parser)
from lightning_modules.oxnet import OXnetModule
from networks.ema import ema_alpha, ema_update_
from networks.oxnet import OXnet
from networks.retina import RetinaNet

CLASSES = 4


def make_batch(per_stream: int, size: int) -> dict:
    """``per_stream`` images of each stream, labelled like the synthetic data, one box per box-stream image."""
    g = torch.Generator().manual_seed(0)
    b = 3 * per_stream
    stream = torch.tensor([STREAM_BOX] * per_stream + [STREAM_LABEL] * per_stream + [STREAM_UNLABELED] * per_stream)
    labels = (torch.rand(b, CLASSES, generator=g) < 0.4).float()
    labels[torch.arange(b), torch.arange(b) % CLASSES] = 1.0
    labels[stream == STREAM_UNLABELED] = 0.0
    boxes, box_labels = [], []
    for i in range(b):
        if stream[i] == STREAM_BOX:
            x, y = (torch.rand(2, generator=g) * size * 0.6).tolist()
            w = size * (0.1 + 0.2 * float(torch.rand(1, generator=g)))
            boxes.append(torch.tensor([[x, y, x + w, y + 0.8 * w]]))
            box_labels.append(torch.tensor([i % CLASSES]))
        else:
            boxes.append(torch.zeros(0, 4))
            box_labels.append(torch.zeros(0, dtype=torch.long))
    image = torch.randn(b, 1, size, size, generator=g)
    return {"image": image, "image_teacher": image + 0.05 * torch.randn(b, 1, size, size, generator=g),
            "labels": labels, "label_mask": (stream != STREAM_UNLABELED)[:, None].expand(b, CLASSES).clone(),
            "stream": stream, "has_boxes": stream == STREAM_BOX, "boxes": boxes, "box_labels": box_labels}


def run_bare(module: OXnetModule, optimizer: torch.optim.Optimizer, loader: DataLoader, warmup: int,
             step0: int, device: torch.device) -> tuple[float, float]:
    """The same work without Lightning: ``compute_losses``, backward, step, EMA, prototype update (``module``,
    ``optimizer`` and the loader's batch already on ``device``)."""
    module.train()

    def after_step(step: int) -> None:
        ema_update_(module.teacher, module.student, ema_alpha(step0 + step + 1, 0.99))
        sums, weights = module.prototype_stats
        momentum_update_(module.prototypes, module.prototype_updates, sums, weights, 0.7)

    return bare_steps(loader, optimizer, lambda step, batch: module.compute_losses(batch)["total"], warmup, device,
                      after_step)


def build(args) -> OXnet:
    torch.manual_seed(0)
    net = OXnet(RetinaNet(num_classes=CLASSES, backbone=args.backbone, fpn_levels=tuple(args.levels),
                          fpn_channels=args.channels, head_depth=args.head_depth, anchor_size_factor=1.5))
    torch.nn.init.normal_(net.retina.cls_head.cls_logits.weight, std=args.head_std)  # some anchors above 0.5
    return net


def main(argv: list[str] | None = None) -> dict:
    parser = step_parser(__doc__, "oxnet_step", steps=8, backbone="resnet10t", image_size=128)
    parser.add_argument("--levels", type=int, nargs="+", default=[2, 3, 4, 5, 6])
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--head-depth", type=int, default=2)
    parser.add_argument("--head-std", type=float, default=0.1)
    parser.add_argument("--per-stream", type=int, default=4)
    args, device = parse_step_args(parser, argv)

    def adamw(params):
        return torch.optim.AdamW(params, lr=1e-5)  # small: the workload (pseudo-box count) stays stable

    module = OXnetModule(build(args), freeze_bn=True, optimizer=adamw)
    bare = OXnetModule(build(args), freeze_bn=True).to(device)  # on the device Lightning trains on
    # Every round of either arm starts from these weights with a fresh optimiser and step 0 (Lightning's new
    # Trainer restarts global_step, so the EMA warm-up restarts too): identical work, no drift between arms.
    pristine = copy.deepcopy(module.state_dict())
    data = SameBatch(make_batch(args.per_stream, args.image_size), args.steps, device)
    with torch.no_grad():
        teacher = bare.forward_teacher(data.batch["image_teacher"])
        probs = torch.sigmoid(teacher["cls_logits"]).amax(dim=2)
    candidates = (probs > 0.5).sum(dim=1).tolist()
    loader = data.loader()

    def lightning_run() -> tuple[float, float]:
        module.load_state_dict(pristine)
        return fit_steps(module, loader, args.steps, args.warmup, args.accelerator,
                         callbacks=[EMATeacher(0.99), PrototypeMomentum(0.7)])

    def bare_run() -> tuple[float, float]:
        bare.load_state_dict(pristine)
        bare_opt = adamw([p for p in bare.parameters() if p.requires_grad])
        return run_bare(bare, bare_opt, loader, args.warmup, 0, device)

    return compare_and_write(args, device, lightning_run, bare_run,
                             **{"teacher_anchors_above_0.5_per_image": candidates})


if __name__ == "__main__":
    main()
