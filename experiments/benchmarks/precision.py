"""Training throughput with ``channels_last``, ``bf16-mixed`` and ``torch.compile``, recorded as measured.

    python -m experiments.benchmarks.precision                     # CPU, resnet18 @ 128 px, batch 16
    python -m experiments.benchmarks.precision --accelerator gpu --backbone resnet50 --image-size 256 --batch 64
    python -m experiments.benchmarks.precision --variants fp32 channels_last+bf16   # a subset

One training step = forward of the CAM baseline network (``networks.cam_classifier.CAMNet``: timm backbone,
GAP, linear), multilabel BCE, backward, AdamW; the batch is fixed and on the device (no data loading). Variants:

* ``fp32``: NCHW, float32 (the reference);
* ``channels_last``: model and input in NHWC memory format (``model.init_args.channels_last: true``);
* ``bf16``: ``torch.autocast(bfloat16)`` around forward and loss (``trainer.precision: bf16-mixed``);
* ``channels_last+bf16``; ``compile`` and ``channels_last+bf16+compile``: ``torch.compile(model)`` (inductor).

Every variant starts from the same weights and is warmed up first (for ``compile`` this is where compilation
happens: its time is reported as ``first_steps_s``); then the variants are timed round-robin (``--repeats``
rounds of ``--steps`` steps, so machine drift hits them alike) and the median images/s is reported with the
ratio to ``fp32``. On a GPU the device is synchronised before each clock read. Writes ``results/<name>.json``
and ``.md``.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F

from experiments.benchmarks.common import interleaved, write
from networks.cam_classifier import CAMNet

VARIANTS = ("fp32", "channels_last", "bf16", "channels_last+bf16", "compile", "channels_last+bf16+compile")
DEFAULT = ("fp32", "channels_last", "bf16", "channels_last+bf16", "channels_last+bf16+compile")


def make_step(net: torch.nn.Module, variant: str, batch: tuple[torch.Tensor, torch.Tensor], device: torch.device):
    """A closure doing one optimiser step of ``net`` as ``variant`` asks."""
    channels_last = "channels_last" in variant
    bf16 = "bf16" in variant
    net = copy.deepcopy(net).to(device)
    image, target = batch
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        image = image.contiguous(memory_format=torch.channels_last)
    model = torch.compile(net) if "compile" in variant else net
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(image)
        loss = F.binary_cross_entropy_with_logits(logits.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accelerator", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(DEFAULT))
    parser.add_argument("--name", default="precision")
    args = parser.parse_args(argv)
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        parser.error("--accelerator gpu but torch.cuda.is_available() is False")
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")

    torch.manual_seed(0)
    net = CAMNet(args.backbone, num_classes=args.classes, in_chans=1).train()
    image = torch.randn(args.batch, 1, args.image_size, args.image_size, device=device)
    target = (torch.rand(args.batch, args.classes, device=device) < 0.3).float()

    steps, first_steps_s = {}, {}
    for variant in args.variants:
        steps[variant] = make_step(net, variant, (image, target), device)
        _sync(device)
        start = time.perf_counter()
        for _ in range(args.warmup):
            steps[variant]()
        _sync(device)
        first_steps_s[variant] = time.perf_counter() - start
        print(f"{variant}: {args.warmup} warm-up steps in {first_steps_s[variant]:.1f} s", flush=True)

    def rate(step) -> float:
        _sync(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        _sync(device)
        return args.batch * args.steps / (time.perf_counter() - start)

    results = interleaved({v: (lambda s=steps[v]: rate(s)) for v in args.variants}, args.repeats)
    reference = results.get("fp32", {}).get("median")
    rows = ["| variant | images/s (median [min–max]) | vs fp32 | warm-up s |", "|---|---|---|---|"]
    for variant in args.variants:
        r = results[variant]
        ratio = f"{r['median'] / reference:.2f}×" if reference else "–"
        rows.append(f"| {variant} | {r['median']:.1f} [{r['min']:.1f}–{r['max']:.1f}] | {ratio} | "
                    f"{first_steps_s[variant]:.1f} |")
    table = "\n".join(rows) + "\n"
    print(table)
    payload = {"config": vars(args), "device": str(device), "images_per_second": results,
               "speedup_vs_fp32": {v: results[v]["median"] / reference for v in args.variants} if reference else {},
               "warmup_seconds": first_steps_s}
    write(args.name, payload, table)
    return payload


if __name__ == "__main__":
    main()
