"""``BoxLogger``: predicted and ground-truth boxes drawn on a fixed set of validation images (a sibling of
``callbacks.cam_logger.CAMLogger`` for detectors).

The module must provide ``detect(image) -> list[{"boxes" (M, 4) xyxy, "scores" (M,), "labels" (M,)}]`` (boxes in
input pixels, x = column) and ``class_names``; ``RetinaNetModule`` and ``OXnetModule`` do.

DDP: every rank detects on the first images of its first validation batch, pads detections and ground truth to
fixed-size tensors, and all-gathers them (a collective, so it runs on every rank); the run directory is resolved on
every rank too (``trainer.log_dir`` broadcasts); only rank 0 draws and logs. One set of images per epoch, whatever
the number of ranks.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from matplotlib import colormaps
from PIL import Image, ImageDraw

from callbacks.cam_logger import image_dir

__all__ = ["BoxLogger", "draw_boxes"]


def _colour(k: int) -> tuple[int, int, int]:
    r, g, b, _ = colormaps["tab10"](k % 10)
    return int(255 * r), int(255 * g), int(255 * b)


def draw_boxes(image: np.ndarray, truth: list[tuple], predicted: list[tuple], names: list[str]) -> Image.Image:
    """Grey (H, W) image -> RGB with ground truth in white and predictions in class colours with their score.

    ``truth`` rows: (x0, y0, x1, y1, class); ``predicted`` rows: (x0, y0, x1, y1, score, class)."""
    grey = (image - image.min()) / max(float(image.max() - image.min()), 1e-6)
    pil = Image.fromarray((255 * grey).astype(np.uint8)).convert("RGB")
    draw = ImageDraw.Draw(pil)
    for x0, y0, x1, y1, _ in truth:
        draw.rectangle([x0, y0, x1, y1], outline=(255, 255, 255), width=1)
    for x0, y0, x1, y1, score, c in predicted:
        draw.rectangle([x0, y0, x1, y1], outline=_colour(int(c)), width=1)
        draw.text((x0 + 1, y0 + 1), f"{names[int(c)][:4]} {score:.2f}", fill=_colour(int(c)))
    return pil


class BoxLogger(pl.Callback):
    """Log ``num_images`` validation images with their top ``max_boxes`` detections above ``min_score``.

    PNGs go to ``<run dir>/boxes/epoch_XXX/`` (none in a ``fast_dev_run``); W&B (when a ``WandbLogger`` is attached)
    receives the images with ``predictions`` and ``ground_truth`` box layers under ``key``.
    """

    def __init__(self, num_images: int = 8, every_n_epochs: int = 1, max_boxes: int = 10, min_score: float = 0.2,
                 key: str = "val/boxes") -> None:
        super().__init__()
        self.num_images = num_images
        self.every_n_epochs = every_n_epochs
        self.max_boxes = max_boxes
        self.min_score = min_score
        self.key = key

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx != 0 or trainer.sanity_checking or (trainer.current_epoch % self.every_n_epochs):
            return
        per_rank = math.ceil(self.num_images / trainer.world_size)
        image = batch["image"][:per_rank]
        count = image.shape[0]
        detections = pl_module.detect(image)
        predicted = image.new_full((per_rank, self.max_boxes, 6), -1.0)  # x0 y0 x1 y1 score class; -1 = none
        truth = image.new_full((per_rank, 16, 5), -1.0)
        for i, det in enumerate(detections):
            keep = det["scores"] >= self.min_score
            rows = torch.cat([det["boxes"][keep], det["scores"][keep, None], det["labels"][keep, None].float()], 1)
            rows = rows[: self.max_boxes]
            predicted[i, : len(rows)] = rows.to(predicted)
            gt = torch.cat([batch["boxes"][i], batch["box_labels"][i][:, None].float()], dim=1)[:16]
            truth[i, : len(gt)] = gt.to(truth)
        if per_rank > count:
            image = torch.cat([image, image.new_zeros(per_rank - count, *image.shape[1:])])
        valid = torch.arange(per_rank, device=image.device) < count
        gathered = pl_module.all_gather({"image": image.float(), "predicted": predicted, "truth": truth,
                                         "valid": valid})
        run_dir = image_dir(trainer)  # a collective under DDP: resolve on every rank
        if trainer.is_global_zero:
            self._log(trainer, pl_module, gathered, run_dir)

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, gathered: dict, run_dir: Path | None) -> None:
        flat = {k: (v.flatten(0, 1) if trainer.world_size > 1 else v).cpu() for k, v in gathered.items()}
        keep = flat["valid"].bool()
        flat = {k: v[keep][: self.num_images] for k, v in flat.items()}
        names = list(getattr(pl_module, "class_names", [str(k) for k in range(100)]))
        out_dir = None if run_dir is None else run_dir / "boxes" / f"epoch_{trainer.current_epoch:03d}"
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
        pictures, layers = [], []
        for i in range(len(flat["image"])):
            truth = [tuple(r) for r in flat["truth"][i].tolist() if r[4] >= 0]
            predicted = [tuple(r) for r in flat["predicted"][i].tolist() if r[5] >= 0]
            picture = draw_boxes(flat["image"][i, 0].numpy(), truth, predicted, names)
            if out_dir is not None:
                picture.save(out_dir / f"{i:02d}.png")
            pictures.append(np.asarray(picture))
            layers.append({
                "predictions": {"box_data": [
                    {"position": {"minX": x0, "minY": y0, "maxX": x1, "maxY": y1}, "domain": "pixel",
                     "class_id": int(c), "scores": {"score": s}, "box_caption": f"{names[int(c)]} {s:.2f}"}
                    for x0, y0, x1, y1, s, c in predicted], "class_labels": dict(enumerate(names))},
                "ground_truth": {"box_data": [
                    {"position": {"minX": x0, "minY": y0, "maxX": x1, "maxY": y1}, "domain": "pixel",
                     "class_id": int(c), "box_caption": names[int(c)]} for x0, y0, x1, y1, c in truth],
                    "class_labels": dict(enumerate(names))},
            })
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(self.key, pictures, step=trainer.global_step, boxes=layers)
