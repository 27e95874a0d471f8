"""Data-loader throughput: images/s of ``CXRDataModule``'s training loader versus a plain torchvision loader
doing the same decoding and resizing, at 512x512 from 1024x1024 8-bit PNG and JPEG files, with 0, 1 and 2 workers.

    python -m experiments.benchmarks.dataloader [--size 512] [--images 96] [--workers 0 1 2]

The medattn loader does more work than the plain one (letterbox, MONAI random zoom with boxes and masks, two
masks, photometric noise); the ratio is that cost. The ``train_masks=False`` column is the same loader without
decoding the two masks (what the configs of methods that do not train on masks use). Writes
``results/dataloader.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image, encode_jpeg, read_file
from torchvision.transforms.v2 import functional as TF

from datamodules.cxr import CXRDataModule
from datamodules.synthetic import SyntheticCXR
from experiments.benchmarks.common import interleaved, write
from experiments.benchmarks.report import dataloader_table


class PlainLoader(Dataset):
    """ImageFolder-style baseline: decode, resize to size x size, scale and normalise."""

    def __init__(self, paths: list[str], size: int) -> None:
        self.paths, self.size = paths, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        image = decode_image(read_file(self.paths[i]), mode=ImageReadMode.GRAY)
        image = TF.resize(image, [self.size, self.size], antialias=True)
        return (image.float() / 255 - 0.5) / 0.25


def _rate(loader: DataLoader, n_images: int) -> float:
    start = time.perf_counter()
    seen = 0
    for batch in loader:
        seen += len(batch["image"]) if isinstance(batch, dict) else len(batch)
    return seen / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--source-size", type=int, default=1024)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        reader = SyntheticCXR(cache_dir=tmp, n_images=args.images, image_size=args.source_size, seed=0)
        manifest = reader.load()
        # a JPEG copy of the same images (quality 90)
        jpeg_dir = Path(tmp) / "jpeg"
        jpeg_dir.mkdir()
        jpeg_paths = []
        for path in manifest.records["image_path"]:
            target = jpeg_dir / (Path(path).stem + ".jpg")
            target.write_bytes(encode_jpeg(decode_image(read_file(path), mode=ImageReadMode.GRAY), quality=90).numpy().tobytes())
            jpeg_paths.append(str(target))

        class JpegReader:
            def load(self):
                m = reader.load()
                m.records["image_path"] = jpeg_paths
                return m

        cases = {}
        for fmt, source in (("png", reader), ("jpeg", JpegReader())):
            paths = list(source.load().records["image_path"])
            for workers in args.workers:
                for name, train_masks in (("medattn", True), ("medattn_nomasks", False)):
                    dm = CXRDataModule(source, image_size=args.size, val_fraction=0.0, test_fraction=0.0,
                                       labeled_batch_size=args.batch_size, num_workers=workers, seed=0,
                                       train_masks=train_masks, min_per_class=0)  # speed only
                    dm.setup("fit")
                    n = len(dm.splits["train"])
                    cases[f"{name}/{fmt}/w{workers}"] = (lambda dm=dm, n=n: _rate(dm.train_dataloader(), n))
                plain = PlainLoader(paths, args.size)
                cases[f"plain/{fmt}/w{workers}"] = (lambda plain=plain, w=workers: _rate(
                    DataLoader(plain, batch_size=args.batch_size, num_workers=w, shuffle=True), len(plain)))
        results = interleaved(cases, args.repeats)

    table = dataloader_table({"images_per_second": results})  # the same table as the docs/performance.md report
    print(table)
    write("dataloader", {"args": vars(args), "images_per_second": results}, table)


if __name__ == "__main__":
    main()
