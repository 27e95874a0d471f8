"""Throughput of ``BatchAugment`` (``CXRDataModule(augment_on="batch")``): images/s of the whole training
augmentation (zoom + flip of image, lung and attention masks and boxes; contrast, scale, noise; normalisation) on
one collated batch, on the CPU with a given thread count or on a GPU.

    python -m experiments.benchmarks.batch_augment [--batch 32] [--size 512] [--threads 1 2] [--device cpu]

:func:`batch_augment_rate` is the function the data-loader benchmark calls for its batch-augmentation column.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from datamodules.batch_augment import BatchAugment


def synthetic_batch(batch_size: int, size: int, device: str | torch.device = "cpu", seed: int = 0) -> dict:
    """A collated, un-augmented batch of the contract's shapes: [0, 1] image, two {0, 1} masks, two boxes each."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(batch_size, 1, size, size, generator=g)
    mask = (image > 0.5).float()
    corner = torch.rand(batch_size, 2, 2, generator=g) * size / 2
    boxes = [torch.cat([c, c + size / 4], dim=1).to(device) for c in corner]
    return {"image": image.to(device), "mask": mask.to(device), "attention_mask": mask.clone().to(device),
            "boxes": boxes, "box_labels": [torch.tensor([0, 1], device=device) for _ in range(batch_size)]}


def batch_augment_rate(batch_size: int = 32, size: int = 512, threads: int | None = 1, repeats: int = 3,
                       device: str = "cpu", two_views: bool = False) -> float:
    """Median images/s of ``BatchAugment`` (CXRTransform's default training settings, flips on) over ``repeats``
    timed calls after one warm-up, with ``threads`` torch threads (``None``: unchanged); on CUDA the clock is
    read after a synchronise."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        batch = synthetic_batch(batch_size, size, device)
        augment = BatchAugment(two_views=two_views, flip_prob=0.5)
        generator = torch.Generator(device=device).manual_seed(0)
        rates = []
        for i in range(repeats + 1):
            if device != "cpu":
                torch.cuda.synchronize()
            start = time.perf_counter()
            augment(batch, generator)
            if device != "cpu":
                torch.cuda.synchronize()
            if i:  # the first call is the warm-up
                rates.append(batch_size / (time.perf_counter() - start))
        return statistics.median(rates)
    finally:
        torch.set_num_threads(previous)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--two-views", action="store_true")
    args = parser.parse_args(argv)
    for threads in args.threads:
        rate = batch_augment_rate(args.batch, args.size, threads, args.repeats, args.device, args.two_views)
        print(json.dumps({"batch": args.batch, "size": args.size, "threads": threads, "device": args.device,
                          "two_views": args.two_views, "images_per_s": round(rate, 1)}))


if __name__ == "__main__":
    main()
