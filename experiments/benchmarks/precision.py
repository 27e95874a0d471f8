"""Training throughput with ``channels_last``, ``bf16-mixed`` and ``torch.compile``, recorded as measured.

    python -m experiments.benchmarks.precision                     # CPU, resnet18 @ 128 px, batch 16
    python -m experiments.benchmarks.precision --accelerator gpu --backbone resnet50 --image-size 256 --batch 64
    python -m experiments.benchmarks.precision --variants fp32 channels_last+bf16   # a subset
    python -m experiments.benchmarks.precision --resnet50-512     # the model's consumption (results/resnet50_512.json)

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

``--resnet50-512`` is the named configuration of the data-loading question ("how many loader workers does a GPU
need"): ResNet-50 at 512², batch 8, ``fp32`` and ``channels_last+bf16``, 3 rounds of 2 steps, written to
``results/resnet50_512.json`` with a ``consumption`` entry: the images/s measured here, a GPU's images/s
**published, not measured** (:data:`GPU_PUBLISHED`, scaled from 224² to 512² by the pixel ratio: the step's FLOPs
grow with the pixel count), the training loader's images/s per worker from ``results/dataloader.json`` (medattn,
PNG, the most workers measured, divided by their number) and :func:`workers_needed`. Flags given with it win.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time

import torch
import torch.nn.functional as F

from experiments.benchmarks.common import RESULTS, interleaved, named_configuration, write
from networks.cam_classifier import CAMNet

VARIANTS = ("fp32", "channels_last", "bf16", "channels_last+bf16", "compile", "channels_last+bf16+compile")
DEFAULT = ("fp32", "channels_last", "bf16", "channels_last+bf16", "channels_last+bf16+compile")
RESNET50_512 = dict(backbone="resnet50", image_size=512, batch=8, steps=2, warmup=1, repeats=3,
                    variants=["fp32", "channels_last+bf16"], name="resnet50_512")
# Published, not measured: NVIDIA DeepLearningExamples, PyTorch ResNet-50 v1.5, "Training performance: NVIDIA DGX A100
# (8x A100 80GB)", 1 GPU, mixed precision, 224², pytorch-21.03 NGC container (V100 16GB: 1200 img/s).
GPU_PUBLISHED = {"gpu": "NVIDIA A100 80GB", "precision": "mixed", "image_size": 224, "images_per_second": 2470.0,
                 "source": "https://github.com/NVIDIA/DeepLearningExamples/blob/master/PyTorch/Classification/"
                           "ConvNets/resnet50v1.5/README.md (Training performance: NVIDIA DGX A100, 1 GPU)"}


def workers_needed(consumer_img_s: float, per_worker_img_s: float) -> int:
    """Loader workers that keep a consumer of ``consumer_img_s`` busy when one worker delivers ``per_worker_img_s``
    (workers scale about linearly while each has a core of its own): ceil(consumer / per worker)."""
    return math.ceil(consumer_img_s / per_worker_img_s)


def consumption(measured: dict[str, float], image_size: int, dataloader_json=None) -> dict:
    """The ``consumption`` entry of ``--resnet50-512`` (see the module docstring)."""
    scale = (GPU_PUBLISHED["image_size"] / image_size) ** 2
    gpu = GPU_PUBLISHED["images_per_second"] * scale
    out = {"cpu_measured_images_per_second": measured, "gpu_published_not_measured": {
        **GPU_PUBLISHED, "scaled_to": image_size, "scaled_images_per_second": gpu}}
    path = RESULTS / "dataloader.json" if dataloader_json is None else dataloader_json
    rates = json.loads(path.read_text()).get("images_per_second", {}) if path.is_file() else {}
    loader = {int(k.rsplit("/w", 1)[1]): v["median"] for k, v in rates.items() if k.startswith("medattn/png/w")}
    workers = max((w for w in loader if w > 0), default=None)
    if workers is not None:
        per_worker = loader[workers] / workers
        out["loader"] = {"source": str(path.name), "workers": workers, "images_per_second": loader[workers],
                         "per_worker_images_per_second": per_worker}
        out["workers_per_gpu"] = workers_needed(gpu, per_worker)
        out["workers_per_cpu_run"] = workers_needed(max(measured.values()), per_worker)
    return out


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments, ``--resnet50-512``'s values as defaults when it is given."""
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
    parser.add_argument("--resnet50-512", action="store_true",
                        help="ResNet-50 at 512², fp32 vs channels_last+bf16, with the loader-workers estimate")
    named_configuration(parser, argv, "resnet50_512", RESNET50_512)
    args = parser.parse_args(argv)
    if args.accelerator == "gpu" and not torch.cuda.is_available():
        parser.error("--accelerator gpu but torch.cuda.is_available() is False")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
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
    if args.resnet50_512:
        payload["consumption"] = consumption({v: results[v]["median"] for v in args.variants}, args.image_size)
        print(json.dumps(payload["consumption"], indent=1))
    write(args.name, payload, table)
    return payload


if __name__ == "__main__":
    main()
