"""``CAMLogger``: heatmap overlays of a fixed set of validation images, with ground-truth boxes and masks.

Under DDP every rank computes maps for the first images of its first validation batch, the maps are
all-gathered (a collective, so it runs on every rank), and only rank 0 renders and logs them: one set of
images per epoch, whatever the number of ranks.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import WandbLogger
from matplotlib import colormaps
from PIL import Image, ImageDraw


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a [0, 1] heatmap (jet colour map) onto a grayscale image; both (H, W). Returns uint8 (H, W, 3)."""
    gray = (image - image.min()) / max(float(image.max() - image.min()), 1e-6)
    colour = colormaps["jet"](np.clip(heatmap, 0, 1))[..., :3]
    return (255 * ((1 - alpha) * gray[..., None] + alpha * colour)).clip(0, 255).astype(np.uint8)


def image_dir(trainer: pl.Trainer) -> Path | None:
    """Folder for the PNGs of the image loggers: the run directory (``trainer.log_dir``, a collective under DDP: call
    it on every rank), else ``default_root_dir``; None in a ``fast_dev_run``, which Lightning runs without loggers or
    checkpoints and which must not leave images in the working directory either."""
    log_dir = trainer.log_dir
    return None if trainer.fast_dev_run else Path(log_dir or trainer.default_root_dir)


class CAMLogger(pl.Callback):
    """Log attention-map overlays for ``num_images`` validation images every ``every_n_epochs`` epochs.

    The module must implement ``attention_maps(image) -> (B, K, h, w)`` in [0, 1] and have ``class_names``.
    For each image the map of the highest-scoring class is shown (or the first positive class when the module
    has no ``forward``). W&B receives the overlay with ground-truth boxes and the attention (lesion) mask as
    interactive layers; PNGs with boxes drawn in are also written to ``<run dir>/cams/`` for offline viewing (none in a
    ``fast_dev_run``, see :func:`image_dir`).
    """

    def __init__(self, num_images: int = 8, every_n_epochs: int = 1, key: str = "val/cam") -> None:
        super().__init__()
        self.num_images = num_images
        self.every_n_epochs = every_n_epochs
        self.key = key

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx != 0 or trainer.sanity_checking or (trainer.current_epoch % self.every_n_epochs):
            return
        per_rank = math.ceil(self.num_images / trainer.world_size)
        image = batch["image"][:per_rank]
        count = image.shape[0]
        # pad to a fixed count so that all_gather sees equal shapes on every rank
        pad = per_rank - count
        with torch.no_grad():
            maps = pl_module.attention_maps(image).float()
            maps = F.interpolate(maps, size=image.shape[-2:], mode="bilinear", align_corners=False)
            scores = pl_module(image).float() if hasattr(pl_module, "forward") else maps.amax(dim=(2, 3))
        attention = batch["attention_mask"][:per_rank].float()
        labels = batch["labels"][:per_rank].float()
        boxes = torch.zeros(per_rank, 16, 5, device=image.device) - 1  # up to 16 boxes/image, -1 = none
        for i in range(count):
            b = torch.cat([batch["boxes"][i], batch["box_labels"][i][:, None].float()], dim=1)[:16]
            boxes[i, : len(b)] = b.to(boxes)
        tensors = [image, maps, scores, attention, labels]
        if pad:
            tensors = [torch.cat([t, t.new_zeros(pad, *t.shape[1:])]) for t in tensors]
        valid = torch.arange(per_rank, device=image.device) < count
        gathered = pl_module.all_gather({"image": tensors[0], "maps": tensors[1], "scores": tensors[2],
                                         "attention": tensors[3], "labels": tensors[4], "boxes": boxes,
                                         "valid": valid})
        out_dir = image_dir(trainer)  # a collective under DDP (it broadcasts): never call it inside the rank-0 branch
        if trainer.is_global_zero:
            self._log(trainer, pl_module, gathered, out_dir)

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, gathered: dict, log_dir: Path | None) -> None:
        flat = {k: (v.flatten(0, 1) if trainer.world_size > 1 else v).cpu() for k, v in gathered.items()}
        keep = flat["valid"].bool()
        flat = {k: v[keep][: self.num_images] for k, v in flat.items()}
        names = list(getattr(pl_module, "class_names", [str(k) for k in range(flat["maps"].shape[1])]))
        overlays, captions, wandb_boxes, wandb_masks = [], [], [], []
        out_dir = None if log_dir is None else log_dir / "cams" / f"epoch_{trainer.current_epoch:03d}"
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
        for i in range(len(flat["image"])):
            k = int(flat["scores"][i].argmax())
            picture = overlay(flat["image"][i, 0].numpy(), flat["maps"][i, k].numpy())
            positives = [names[j] for j in np.flatnonzero(flat["labels"][i].numpy() > 0.5)]
            captions.append(f"map: {names[k]} | truth: {', '.join(positives) or 'none'}")
            box_rows = [b for b in flat["boxes"][i].tolist() if b[4] >= 0]
            pil = Image.fromarray(picture)
            draw = ImageDraw.Draw(pil)
            for x0, y0, x1, y1, c in box_rows:
                draw.rectangle([x0, y0, x1, y1], outline=(255, 255, 255), width=1)
            if out_dir is not None:
                pil.save(out_dir / f"{i:02d}_{names[k]}.png")
            overlays.append(picture)
            wandb_boxes.append({"ground_truth": {
                "box_data": [{"position": {"minX": x0, "minY": y0, "maxX": x1, "maxY": y1}, "domain": "pixel",
                              "class_id": int(c), "box_caption": names[int(c)]} for x0, y0, x1, y1, c in box_rows],
                "class_labels": dict(enumerate(names))}})
            wandb_masks.append({"attention_mask": {"mask_data": flat["attention"][i, 0].numpy().astype(np.uint8),
                                                   "class_labels": {0: "background", 1: "target"}}})
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(self.key, overlays, step=trainer.global_step, caption=captions,
                                 boxes=wandb_boxes, masks=wandb_masks)
