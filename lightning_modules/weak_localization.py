"""Feeding the shared weak-localisation metrics from any classification method's heatmaps.

Every classification method (CAM baseline, PCAM, DC-MT, MAG-SD) evaluates localisation the same way, so the
comparison between them is fair: heatmaps are brought to the network input size, the letterbox padding is
zeroed, images with boxes feed the box metrics and images with a lesion mask feed PxAP. The threshold sweeps
(MaxBoxAccV2, PxAP) then min-max normalise every (image, class) map over its valid (non-letterbox) region,
whatever the method (Choe et al., CVPR 2020); the fixed-threshold ChestX-ray14 protocol and the pointing game
read the maps as given (:mod:`lightning_modules.metrics.localization`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection

__all__ = ["heatmaps_at_input", "valid_region", "update_localization", "has_localization_targets",
           "attention_targets"]


def valid_region(frame: torch.Tensor | None, image_size: Sequence[int]) -> torch.Tensor | None:
    """(B, 1, H, W) bool: the pixels of the letterboxed input that show the image (``frame`` of the batch
    contract: original height, width, scale; the padding is at the bottom/right). None without a frame."""
    if frame is None:
        return None
    h, w = int(image_size[0]), int(image_size[1])
    h_valid = (frame[:, 0] * frame[:, 2]).round().long().clamp(1, h)
    w_valid = (frame[:, 1] * frame[:, 2]).round().long().clamp(1, w)
    rows = torch.arange(h, device=frame.device)[None, :, None] < h_valid[:, None, None]
    cols = torch.arange(w, device=frame.device)[None, None, :] < w_valid[:, None, None]
    return (rows & cols)[:, None]


def heatmaps_at_input(heatmaps: torch.Tensor, image_size: Sequence[int], frame: torch.Tensor | None = None) -> torch.Tensor:
    """(B, K, h, w) heatmaps -> (B, K, H, W) at the network input, bilinear, letterbox padding set to 0."""
    out = F.interpolate(heatmaps.float(), size=tuple(image_size), mode="bilinear", align_corners=False).clamp(0, 1)
    region = valid_region(frame, image_size)
    return out if region is None else out * region.to(out.device, out.dtype)


def has_localization_targets(batch: dict) -> bool:
    """Whether ``batch`` holds anything the localisation metrics can score (complete boxes, or a lesion mask
    of an image with a positive label): modules skip computing heatmaps otherwise."""
    boxed, with_mask = batch.get("has_boxes"), batch.get("has_attention_mask")
    if boxed is not None and bool(boxed.any()):
        return True
    if with_mask is None or "labels" not in batch:
        return False
    positive = (batch["labels"] * batch["label_mask"].float()) > 0
    return bool((with_mask & positive.any(1)).any())


def update_localization(metrics: MetricCollection, batch: dict, heatmaps: torch.Tensor) -> None:
    """Update ``lightning_modules.metrics.localization_metrics`` with (B, K, h, w) heatmaps of ``batch``.

    Box metrics use the images whose box annotation is complete (``has_boxes``). PxAP uses images with a lesion
    mask and at least one positive class, scoring the class-agnostic map (max over the positive classes' maps,
    each normalised first for the normalised reading) against the union lesion mask. ``region`` (the
    non-letterbox pixels) goes with every update: the sweeps normalise over it and PxAP scores only it.
    """
    boxed = batch.get("has_boxes")
    with_mask = batch.get("has_attention_mask")
    has_box = boxed is not None and bool(boxed.any())
    positive = (batch["labels"] * batch["label_mask"].float()) > 0
    has_mask = with_mask is not None and bool((with_mask & positive.any(1)).any())
    if not (has_box or has_mask):
        return
    size = batch["image"].shape[-2:]
    maps = heatmaps_at_input(heatmaps, size, batch.get("frame"))
    region = valid_region(batch.get("frame"), size)
    if region is None:
        region = torch.ones(maps.shape[0], 1, *maps.shape[-2:], dtype=torch.bool, device=maps.device)
    region = region.to(maps.device)
    if has_box:
        idx = boxed.nonzero().flatten().tolist()
        metrics.update(heatmaps=maps[idx], boxes=[batch["boxes"][i] for i in idx],
                       box_labels=[batch["box_labels"][i] for i in idx], region=region[idx])
    if has_mask:
        keep = (with_mask & positive.any(1)).to(maps.device)
        metrics.update(heatmaps=maps[keep], masks=batch["attention_mask"][keep], classes=positive[keep],
                       region=region[keep])


def attention_targets(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-agnostic ground-truth regions for a class-agnostic attention map: (B, H, W) bool and which images
    have one (B,). The lesion mask where the image has a non-empty one (the MAG-SD reference scores masks),
    else the union of the image's complete boxes, a pixel counting as inside when its centre is."""
    image = batch["image"]
    b, (h, w) = image.shape[0], image.shape[-2:]
    targets = torch.zeros(b, h, w, dtype=torch.bool)
    present = torch.zeros(b, dtype=torch.bool)
    with_mask, boxed = batch.get("has_attention_mask"), batch.get("has_boxes")
    for i in range(b):
        if with_mask is not None and bool(with_mask[i]):
            mask = batch["attention_mask"][i].reshape(h, w).detach().cpu() > 0.5
            if bool(mask.any()):
                targets[i], present[i] = mask, True
                continue
        if boxed is not None and bool(boxed[i]) and len(batch["boxes"][i]):
            for x0, y0, x1, y1 in torch.as_tensor(batch["boxes"][i]).reshape(-1, 4).tolist():
                c0, c1 = max(int(np.ceil(x0 - 0.5)), 0), min(int(np.ceil(x1 - 0.5)), w)
                r0, r1 = max(int(np.ceil(y0 - 0.5)), 0), min(int(np.ceil(y1 - 0.5)), h)
                targets[i, r0:r1, c0:c1] = True
            present[i] = bool(targets[i].any())
    return targets.to(image.device), present.to(image.device)
