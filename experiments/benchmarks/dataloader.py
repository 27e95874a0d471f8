"""Data-loader throughput: images/s of ``CXRDataModule``'s training loader versus a plain torchvision loader
doing the same decoding and resizing, at 512x512 from 1024x1024 8-bit PNG and JPEG files, with 0, 1 and 2 workers.

    python -m experiments.benchmarks.dataloader [--size 512] [--images 96] [--workers 0 1 2]

The medattn loader does more work than the plain one (letterbox, MONAI random zoom with boxes and masks, two
masks, photometric noise); the ratio is that cost. The ``train_masks=False`` column is the same loader without
decoding the two masks (what the configs of methods that do not train on masks use).

The ``prepared`` rows read the same PNGs after ``medattn prepare`` (decoded and letterboxed once, LitData), masks
on, from ``CXRDataModule(prepared=..., augment_on="batch")``: ``prepared_loader`` is the loader alone (what a GPU
run needs from it: ``on_after_batch_transfer`` augments on the device), ``prepared`` adds ``BatchAugment`` on every
batch in the main process (a CPU-only run), ``batch_augment/<device>`` is the augmentation alone. Unlike the rows
above (a new DataLoader per repeat, worker start-up included), the prepared rows time whole epochs of one
persistent loader after a warm-up epoch, as a fit uses it, for at least 2 s per repeat. ``prepare/...`` is the
throughput of ``medattn prepare`` itself (decode, letterbox, write, verify; new output folder per repeat) on the
synthetic PNGs and, when present, on the 119 real images of ``covid-cxr-mini`` (``experiments/magsd/covid_cxr.yaml``
at ``--size``; ``--covid-root``). Writes ``results/dataloader.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image, encode_jpeg, read_file
from torchvision.transforms.v2 import functional as TF

from datamodules.batch_augment import BatchAugment
from datamodules.cxr import CXRDataModule
from datamodules.synthetic import SyntheticCXR
from datamodules.transforms import CXRTransform
from experiments.benchmarks.common import interleaved, write
from experiments.benchmarks.report import dataloader_table
from experiments.config_links import data_root
from experiments.prepare import run as prepare

COVID = Path(__file__).resolve().parents[1] / "magsd" / "covid_cxr.yaml"


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


def _rate(loader: DataLoader, n_images: int, augment: Callable[[dict], dict] | None = None) -> float:
    start = time.perf_counter()
    seen = 0
    for batch in loader:
        if augment is not None:
            batch = augment(batch)
        seen += len(batch["image"]) if isinstance(batch, dict) else len(batch)
    return seen / (time.perf_counter() - start)


def _prepare_rate(argv: list[str], out: Path) -> float:
    """``medattn prepare`` images/s into a fresh folder (the whole command after parsing: manifest, hashes, decode,
    write, verify)."""
    start = time.perf_counter()
    count = prepare([*argv, "--out", str(out)])["manifest"]["count"]
    return count / (time.perf_counter() - start)


def _steady_rate(loader: DataLoader | list, augment: Callable[[dict], dict] | None = None, seconds: float = 2.0) -> float:
    """Images/s over whole epochs of one persistent loader (workers started before), for at least ``seconds``."""
    start, seen = time.perf_counter(), 0
    while True:
        for batch in loader:
            seen += len((augment(batch) if augment is not None else batch)["image"])
        if (elapsed := time.perf_counter() - start) >= seconds:
            return seen / elapsed


def _augment_alone(batches: list[dict], device: str, size: int) -> Callable[[], float]:
    """Images/s of ``BatchAugment`` alone on ``device``, on loaded batches already there (a GPU waits for it)."""
    augment = BatchAugment.from_transform(CXRTransform(size, train=True)).to(device)
    generator = torch.Generator(device).manual_seed(0)
    moved = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in batches]

    def step(batch: dict) -> dict:
        out = augment(batch, generator)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    return lambda: _steady_rate(moved, step)


def _prepared_cases(reader, args, tmp: Path) -> dict[str, Callable[[], float]]:
    """The prepared loader (alone, and with the batch augmentation on this CPU), ``BatchAugment`` alone on each
    device, and ``medattn prepare``'s own throughput."""
    prepared = tmp / "prepared"
    synthetic = ["--data", "datamodules.cxr.CXRDataModule", "--data.init_args.reader", "datamodules.synthetic.SyntheticCXR",
                 "--data.init_args.reader.init_args.cache_dir", str(reader.root.parent),
                 "--data.init_args.reader.init_args.n_images", str(args.images),
                 "--data.init_args.reader.init_args.image_size", str(args.source_size),
                 "--data.init_args.image_size", str(args.size)]
    prepare([*synthetic, "--out", str(prepared), "--num_workers", str(max(args.workers + [1]))])
    augment = BatchAugment.from_transform(CXRTransform(args.size, train=True))  # the default augmentation
    generator = torch.Generator().manual_seed(0)
    cases: dict[str, Callable[[], float]] = {}
    for workers in args.workers:
        dm = CXRDataModule(reader, image_size=args.size, val_fraction=0.0, test_fraction=0.0,
                           labeled_batch_size=args.batch_size, num_workers=workers, seed=0, min_per_class=0,
                           prepared=str(prepared), augment_on="batch")
        loader = dm.train_dataloader()  # persistent workers, as in a fit: built once, warmed by one epoch
        batches = list(loader)
        cases[f"prepared/png/w{workers}"] = (lambda loader=loader: _steady_rate(
            loader, lambda batch: augment(batch, generator)))
        cases[f"prepared_loader/png/w{workers}"] = lambda loader=loader: _steady_rate(loader)
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        cases[f"batch_augment/{device}"] = _augment_alone(batches, device, args.size)
    covid = ["-c", str(COVID), "--data.init_args.reader.init_args.root", args.covid_root,
             "--data.init_args.image_size", str(args.size)]
    runs = itertools.count()  # a fresh output folder per run
    covid_found = Path(args.covid_root).is_dir()
    for workers in sorted({max(1, w) for w in args.workers}):  # prepare always decodes in worker processes
        cases[f"prepare/synthetic-png/w{workers}"] = (lambda w=workers: _prepare_rate(
            [*synthetic, "--num_workers", str(w)], tmp / f"run{next(runs)}"))
        if covid_found:
            cases[f"prepare/covid-cxr-mini/w{workers}"] = (lambda w=workers: _prepare_rate(
                [*covid, "--num_workers", str(w)], tmp / f"run{next(runs)}"))
    if not covid_found:
        print(f"covid-cxr-mini not found at {args.covid_root} (--covid-root): its prepare throughput is not measured")
    return cases


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--source-size", type=int, default=1024)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--covid-root", type=str, default=str(data_root() / "covid-cxr-mini"),
                        help="the real images whose `medattn prepare` throughput is measured (skipped when absent)")
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
        cases.update(_prepared_cases(reader, args, Path(tmp)))
        results = interleaved(cases, args.repeats)

    table = dataloader_table({"images_per_second": results})  # the same table as the docs/performance.md report
    print(table)
    write("dataloader", {"args": vars(args), "images_per_second": results}, table)


if __name__ == "__main__":
    main()
