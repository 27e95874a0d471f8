"""``ImageLogger``: what a method sees, for every registered method, in W&B and as PNGs in the run directory.

One callback, added to every ``medattn`` run by the CLI (``trainer_defaults``), that dispatches on what the module
and the batch provide:

* **boxes** (the module has ``detect``: RetinaNet, OXnet): predicted boxes in class colours with their score and
  ground-truth boxes in green (today's ``BoxLogger``);
* **segmentation** (a volume (B, C, D, H, W) or a ``label_map`` in the batch: Non-local U-Net): for volumes the three
  orthogonal mid-planes (axial, coronal, sagittal), each as image | ground truth | prediction overlays;
* **cam** (any other module with ``attention_maps``: PCAM, CAM, MAG-SD, DC-MT): the attention map of the
  highest-scoring class, the ground-truth boxes and the outline of the ground-truth mask in green (slices without
  boxes, e.g. DC-MT, simply show none), and the class name with its predicted probability written on the image;
* modules that see no images (``dcmt_subject``: slice features) log nothing.

PNGs are upscaled (nearest) to at least ``size`` px on the short side so that boxes and text are readable, and go to
``<run dir>/<folder>/epoch_XXX/`` (none in a ``fast_dev_run``, see :func:`image_dir`). Text is yellow, ground truth
green (``GT_COLOUR``). At test time the same callback writes the ROC curve and confusion matrix of classification
methods and the per-class Dice table of segmentation methods (:mod:`callbacks.test_plots`).

``CAMLogger`` and ``BoxLogger`` are this callback with a fixed kind. The CLI's default instance is a *fallback*: when
a config lists an explicit ``ImageLogger``/``CAMLogger``/``BoxLogger``, the fallback steps aside, so nothing is logged
twice and the explicit one's settings apply.

DDP: every rank computes its share of the first validation batch, pads to a fixed count and all-gathers (a
collective: runs on every rank); the run directory is resolved on every rank (``trainer.log_dir`` broadcasts); only
rank 0 renders and logs.
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

GT_COLOUR = (0, 255, 0)
TEXT_COLOUR = (255, 255, 0)
KINDS = ("auto", "cam", "boxes", "segmentation")
_MAX_GT = 16


def image_dir(trainer: pl.Trainer) -> Path | None:
    """Folder for the PNGs: the run directory (``trainer.log_dir``, a collective under DDP: call it on every rank),
    else ``default_root_dir``; None in a ``fast_dev_run`` (no loggers, no checkpoints, no images in the cwd)."""
    log_dir = trainer.log_dir
    return None if trainer.fast_dev_run else Path(log_dir or trainer.default_root_dir)


def _grey(image: np.ndarray) -> np.ndarray:
    return (image - image.min()) / max(float(image.max() - image.min()), 1e-6)


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a [0, 1] heatmap (jet colour map) onto a grayscale image; both (H, W). Returns uint8 (H, W, 3)."""
    colour = colormaps["jet"](np.clip(heatmap, 0, 1))[..., :3]
    return (255 * ((1 - alpha) * _grey(image)[..., None] + alpha * colour)).clip(0, 255).astype(np.uint8)


def class_colour(k: int) -> tuple[int, int, int]:
    r, g, b, _ = colormaps["tab10"](k % 10)
    return int(255 * r), int(255 * g), int(255 * b)


def label_overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5, outline: bool = False) -> np.ndarray:
    """Grey (H, W) image with an integer label map (0 = background) painted in class colours; ``outline``: the
    boundary of each class region in ``GT_COLOUR`` (for ground truth)."""
    rgb = np.repeat(255 * _grey(image)[..., None], 3, axis=-1)
    for k in np.unique(labels):
        if k > 0:
            rgb[labels == k] = (1 - alpha) * rgb[labels == k] + alpha * np.array(class_colour(int(k)))
    if outline:
        for k in np.unique(labels):
            if k > 0:
                rgb[mask_outline(labels == k)] = GT_COLOUR
    return rgb.clip(0, 255).astype(np.uint8)


def upscale(picture: np.ndarray, size: int) -> tuple[Image.Image, int]:
    """(PIL image upscaled by an integer factor so its short side is >= size, the factor)."""
    scale = max(1, math.ceil(size / max(1, min(picture.shape[:2]))))
    pil = Image.fromarray(picture)
    return pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST), scale


def caption_on(pil: Image.Image, text: str) -> Image.Image:
    """Write ``text`` (yellow on a black strip) at the top of the image."""
    draw = ImageDraw.Draw(pil)
    draw.fontmode = "1"  # no anti-aliasing: crisp text in exactly TEXT_COLOUR
    box = draw.textbbox((2, 1), text)
    draw.rectangle([0, 0, min(pil.width, box[2] + 2), box[3] + 2], fill=(0, 0, 0))
    draw.text((2, 1), text, fill=TEXT_COLOUR)
    return pil


def draw_boxes(image: np.ndarray, truth: list, predicted: list, names: list[str], size: int = 0) -> Image.Image:
    """Grey (H, W) image -> RGB, upscaled to a short side >= ``size``, with ground-truth boxes in green and
    predictions in class colours with their class and score. ``truth`` rows: (x0, y0, x1, y1, class);
    ``predicted`` rows: (x0, y0, x1, y1, score, class), in input pixels."""
    pil, scale = upscale((255 * _grey(image)).astype(np.uint8), size)
    pil = pil.convert("RGB")
    draw = ImageDraw.Draw(pil)
    draw.fontmode = "1"
    width = 1 if scale == 1 else 2
    for x0, y0, x1, y1, _ in truth:
        draw.rectangle([x0 * scale, y0 * scale, x1 * scale, y1 * scale], outline=GT_COLOUR, width=width)
    for x0, y0, x1, y1, score, c in predicted:
        colour = class_colour(int(c))
        draw.rectangle([x0 * scale, y0 * scale, x1 * scale, y1 * scale], outline=colour, width=width)
        draw.text((x0 * scale + 2, y0 * scale + 2), f"{names[int(c)]} {score:.2f}", fill=colour)
    return pil


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """Boolean boundary pixels of a binary (H, W) mask (the mask minus its 4-neighbour erosion)."""
    m = mask > 0.5
    inner = m.copy()
    inner[1:] &= m[:-1]
    inner[:-1] &= m[1:]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    return m & ~inner


def _box_layer(rows, names, predicted: bool, scale: int = 1) -> dict:
    """A W&B box layer; coordinates scaled like the upscaled picture it belongs to."""
    data = []
    for row in rows:
        x0, y0, x1, y1 = (scale * v for v in row[:4])
        c = int(row[-1])
        item = {"position": {"minX": x0, "minY": y0, "maxX": x1, "maxY": y1}, "domain": "pixel", "class_id": c,
                "box_caption": names[c] if c < len(names) else str(c)}
        if predicted:
            item["scores"] = {"score": row[4]}
            item["box_caption"] += f" {row[4]:.2f}"
        data.append(item)
    return {"box_data": data, "class_labels": dict(enumerate(names))}


def _truth_boxes(batch: dict, count: int, like: torch.Tensor) -> torch.Tensor:
    """(count, 16, 5) ground-truth rows x0 y0 x1 y1 class; -1 = none (also for batches without boxes)."""
    truth = like.new_full((count, _MAX_GT, 5), -1.0)
    if "boxes" in batch and "box_labels" in batch:
        for i in range(count):
            gt = torch.cat([batch["boxes"][i].float(), batch["box_labels"][i][:, None].float()], 1)[:_MAX_GT]
            truth[i, : len(gt)] = gt.to(truth)
    return truth


class ImageLogger(pl.Callback):
    """Log ``num_images`` validation images every ``every_n_epochs`` epochs (see the module docstring).

    Args:
        kind: ``"auto"`` (dispatch on the module and batch), or force ``"cam"``, ``"boxes"`` or ``"segmentation"``.
        size: minimum short side of the PNGs in pixels.
        max_boxes / min_score: detections drawn per image (``boxes``).
        folder: sub-folder of the run directory for the PNGs (``images``; ``cams``/``boxes`` for the aliases).
        key: W&B key (``val/images``).
        fallback: the CLI's default instance; it steps aside when the trainer holds another ``ImageLogger``.
        test_plots: at test time write ROC/confusion-matrix (classification) or the per-class Dice table.
    """

    def __init__(self, num_images: int = 8, every_n_epochs: int = 1, kind: str = "auto", size: int = 256,
                 max_boxes: int = 10, min_score: float = 0.2, folder: str = "images", key: str = "val/images",
                 fallback: bool = False, test_plots: bool = True) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"ImageLogger(kind={kind!r}): expected one of {KINDS}")
        self.num_images, self.every_n_epochs, self.kind, self.size = num_images, every_n_epochs, kind, size
        self.max_boxes, self.min_score, self.folder, self.key = max_boxes, min_score, folder, key
        self.fallback, self.test_plots = fallback, test_plots
        self.active = True

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        others = [c for c in trainer.callbacks if isinstance(c, ImageLogger) and c is not self]
        # an explicit logger in the config wins over the CLI's fallback; two fallbacks: the first one logs
        self.active = not (self.fallback and any(not c.fallback or trainer.callbacks.index(c) <
                                                 trainer.callbacks.index(self) for c in others))

    def resolve_kind(self, pl_module: pl.LightningModule, batch) -> str | None:
        if not isinstance(batch, dict) or not torch.is_tensor(batch.get("image")):
            return None  # the module sees no images (slice features)
        if self.kind != "auto":
            return self.kind
        if hasattr(pl_module, "detect"):
            return "boxes"
        if batch["image"].dim() == 5 or "label_map" in batch:
            return "segmentation"
        maps = getattr(type(pl_module), "attention_maps", None)
        if maps is None or getattr(maps, "not_implemented", False):  # MedAttnModule's placeholder: no maps
            return None
        return "cam"

    # ------------------------------------------------------------------------------------------------ collect
    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if (not self.active or batch_idx != 0 or dataloader_idx != 0 or trainer.sanity_checking
                or trainer.current_epoch % self.every_n_epochs):
            return
        kind = self.resolve_kind(pl_module, batch)
        if kind is None:
            return
        per_rank = math.ceil(self.num_images / trainer.world_size)
        count = min(per_rank, batch["image"].shape[0])
        with torch.no_grad():
            tensors = getattr(self, f"_collect_{kind}")(pl_module, batch, count)
        pad = per_rank - count
        if pad:
            tensors = {k: torch.cat([t, t.new_zeros(pad, *t.shape[1:])]) for k, t in tensors.items()}
        tensors["valid"] = torch.arange(per_rank, device=batch["image"].device) < count
        gathered = pl_module.all_gather(tensors)
        out_dir = image_dir(trainer)  # a collective under DDP: never inside the rank-0 branch
        if trainer.is_global_zero:
            flat = {k: (v.flatten(0, 1) if trainer.world_size > 1 else v).cpu() for k, v in gathered.items()}
            keep = flat.pop("valid").bool()
            flat = {k: v[keep][: self.num_images] for k, v in flat.items()}
            self._log(trainer, pl_module, kind, flat, out_dir)

    def _collect_cam(self, pl_module, batch: dict, count: int) -> dict:
        image = batch["image"][:count]
        maps = pl_module.attention_maps(image).float()
        maps = F.interpolate(maps, size=image.shape[-2:], mode="bilinear", align_corners=False)
        probs = self._probabilities(pl_module, image, maps)
        k = probs.shape[1]
        labels = batch["labels"][:count].float() if "labels" in batch else probs.new_full((count, k), -1.0)
        mask = batch.get("attention_mask", batch.get("mask"))
        mask = mask[:count, :1].float() if torch.is_tensor(mask) else torch.zeros_like(image[:, :1]).float()
        return {"image": image[:, :1].float(), "maps": maps, "probs": probs, "labels": labels, "mask": mask,
                "truth": _truth_boxes(batch, count, image.float())}

    @staticmethod
    def _probabilities(pl_module, image: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """(B, K) class probabilities: the module's ``predict_proba`` if any, else its forward logits through a
        sigmoid (multi-label) or softmax (``multiclass`` task), else the maps' maxima."""
        if hasattr(pl_module, "predict_proba"):
            return pl_module.predict_proba(image).float()
        out = pl_module(image)
        out = getattr(out, "logits", out)
        if not torch.is_tensor(out) or out.shape != maps.shape[:2]:
            return maps.amax(dim=(2, 3))
        multiclass = getattr(pl_module, "task", None) == "multiclass" or "multiclass" in type(pl_module).__name__.lower()
        return out.float().softmax(1) if multiclass else out.float().sigmoid()

    def _collect_boxes(self, pl_module, batch: dict, count: int) -> dict:
        image = batch["image"][:count]
        predicted = image.new_full((count, self.max_boxes, 6), -1.0).float()  # x0 y0 x1 y1 score class
        for i, det in enumerate(pl_module.detect(image)):
            keep = det["scores"] >= self.min_score
            rows = torch.cat([det["boxes"][keep], det["scores"][keep, None], det["labels"][keep, None].float()], 1)
            rows = rows[: self.max_boxes]
            predicted[i, : len(rows)] = rows.to(predicted)
        return {"image": image[:, :1].float(), "predicted": predicted, "truth": _truth_boxes(batch, count, predicted)}

    def _collect_segmentation(self, pl_module, batch: dict, count: int) -> dict:
        image = batch["image"][:count]
        pred = pl_module.attention_maps(image).float().argmax(1, keepdim=True)
        truth = batch["label_map"][:count].long() if "label_map" in batch else torch.zeros_like(pred)
        out = {}
        spatial = image.shape[2:]
        planes = [(f"p{d}", d) for d in range(len(spatial))] if image.dim() == 5 else [("p0", None)]
        for name, axis in planes:
            def mid(t):
                return t if axis is None else t.select(2 + axis, t.shape[2 + axis] // 2)
            out[f"{name}_image"] = mid(image[:, :1].float())
            out[f"{name}_truth"] = mid(truth.float())
            out[f"{name}_pred"] = mid(pred.float())
        return out

    # ------------------------------------------------------------------------------------------------- render
    def _log(self, trainer, pl_module, kind: str, flat: dict, run_dir: Path | None) -> None:
        n = len(next(iter(flat.values())))
        names = list(getattr(pl_module, "class_names", None) or [str(k) for k in range(100)])
        out_dir = None if run_dir is None else run_dir / self.folder / f"epoch_{trainer.current_epoch:03d}"
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
        pictures, captions, extras = [], [], []
        for i in range(n):
            pil, caption, extra = getattr(self, f"_render_{kind}")({k: v[i] for k, v in flat.items()}, names)
            if out_dir is not None:
                pil.save(out_dir / f"{i:02d}.png")
            pictures.append(np.asarray(pil))
            captions.append(caption)
            extras.append(extra)
        kwargs = {k: [e[k] for e in extras] for k in (extras[0] if extras else {})}
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and pictures:
                logger.log_image(self.key, pictures, step=trainer.global_step, caption=captions, **kwargs)

    def _render_cam(self, item: dict, names: list) -> tuple:
        probs = item["probs"].numpy()
        k = int(probs.argmax())
        picture = overlay(item["image"][0].numpy(), item["maps"][k].numpy())
        outline = mask_outline(item["mask"][0].numpy())
        picture[outline] = GT_COLOUR
        pil, scale = upscale(picture, self.size)
        draw = ImageDraw.Draw(pil)
        truth = [r for r in item["truth"].tolist() if r[4] >= 0]
        for x0, y0, x1, y1, _ in truth:
            draw.rectangle([x0 * scale, y0 * scale, x1 * scale, y1 * scale], outline=GT_COLOUR, width=2)
        positives = [names[j] for j in np.flatnonzero(item["labels"].numpy() > 0.5)]
        caption = f"{names[k]} p={probs[k]:.2f} | truth: {', '.join(positives) or 'none'}"
        mask = np.kron((item["mask"][0].numpy() > 0.5).astype(np.uint8), np.ones((scale, scale), np.uint8))
        extra = {"boxes": {"ground_truth": _box_layer(truth, names, False, scale)},
                 "masks": {"ground_truth": {"mask_data": mask,
                                            "class_labels": {0: "background", 1: "target"}}}}
        return caption_on(pil, caption), caption, extra

    def _render_boxes(self, item: dict, names: list) -> tuple:
        truth = [r for r in item["truth"].tolist() if r[4] >= 0]
        predicted = [r for r in item["predicted"].tolist() if r[5] >= 0]
        pil = draw_boxes(item["image"][0].numpy(), truth, predicted, names, self.size)
        scale = pil.width // item["image"].shape[-1]
        caption = f"{len(predicted)} detections >= {self.min_score} | {len(truth)} ground-truth boxes"
        extra = {"boxes": {"predictions": _box_layer(predicted, names, True, scale),
                           "ground_truth": _box_layer(truth, names, False, scale)}}
        return caption_on(pil, caption), caption, extra

    def _render_segmentation(self, item: dict, names: list) -> tuple:
        tile = max(96, self.size // 3)
        rows = []
        for name in sorted({k.split("_")[0] for k in item}):
            image = item[f"{name}_image"][0].numpy()
            cells = [np.repeat((255 * _grey(image))[..., None], 3, -1).astype(np.uint8),
                     label_overlay(image, item[f"{name}_truth"][0].numpy().astype(int), outline=True),
                     label_overlay(image, item[f"{name}_pred"][0].numpy().astype(int))]
            rows.append(np.concatenate([np.asarray(Image.fromarray(c).resize((tile, tile), Image.NEAREST))
                                        for c in cells], axis=1))
        pil = Image.fromarray(np.concatenate(rows, axis=0))
        caption = "image | ground truth | prediction" + (" (axial/coronal/sagittal mid-planes)" if len(rows) == 3 else "")
        return caption_on(pil, caption), caption, {}

    # --------------------------------------------------------------------------------------------------- test
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.active or not self.test_plots or trainer.fast_dev_run:
            return
        from callbacks.test_plots import log_test_plots

        log_test_plots(trainer, pl_module)
