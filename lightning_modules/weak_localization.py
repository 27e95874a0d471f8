"""Feeding the shared weak-localisation metrics from any classification method's heatmaps.

Every classification method (CAM baseline, PCAM, DC-MT, MAG-SD) evaluates localisation the same way, so the
comparison between them is fair: heatmaps are brought to the network input size, the letterbox padding is
zeroed, images with boxes feed the box metrics and images with a lesion mask feed PxAP.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection


def heatmaps_at_input(heatmaps: torch.Tensor, image_size: Sequence[int], frame: torch.Tensor | None = None) -> torch.Tensor:
    """(B, K, h, w) heatmaps -> (B, K, H, W) at the network input, bilinear, letterbox padding set to 0."""
    out = F.interpolate(heatmaps.float(), size=tuple(image_size), mode="bilinear", align_corners=False).clamp(0, 1)
    if frame is not None:
        h_valid = (frame[:, 0] * frame[:, 2]).round().long().clamp(1, out.shape[-2])
        w_valid = (frame[:, 1] * frame[:, 2]).round().long().clamp(1, out.shape[-1])
        rows = torch.arange(out.shape[-2], device=out.device)[None, :, None] < h_valid[:, None, None].to(out.device)
        cols = torch.arange(out.shape[-1], device=out.device)[None, None, :] < w_valid[:, None, None].to(out.device)
        out = out * (rows & cols)[:, None].to(out.dtype)
    return out


def update_localization(metrics: MetricCollection, batch: dict, heatmaps: torch.Tensor) -> None:
    """Update ``lightning_modules.metrics.localization_metrics`` with (B, K, h, w) heatmaps of ``batch``.

    Box metrics use the images whose box annotation is complete (``has_boxes``). PxAP uses images with a lesion
    mask and at least one positive class, scoring the class-agnostic map (max over the positive classes' maps)
    against the union lesion mask.
    """
    boxed = batch.get("has_boxes")
    with_mask = batch.get("has_attention_mask")
    has_box = boxed is not None and bool(boxed.any())
    positive = (batch["labels"] * batch["label_mask"].float()) > 0
    has_mask = with_mask is not None and bool((with_mask & positive.any(1)).any())
    if not (has_box or has_mask):
        return
    maps = heatmaps_at_input(heatmaps, batch["image"].shape[-2:], batch.get("frame"))
    if has_box:
        idx = boxed.nonzero().flatten().tolist()
        metrics.update(heatmaps=maps[idx], boxes=[batch["boxes"][i] for i in idx],
                       box_labels=[batch["box_labels"][i] for i in idx])
    if has_mask:
        keep = with_mask & positive.any(1)
        agnostic = maps.masked_fill(~positive[:, :, None, None], 0).amax(1, keepdim=True)
        metrics.update(heatmaps=agnostic[keep], masks=batch["attention_mask"][keep])
