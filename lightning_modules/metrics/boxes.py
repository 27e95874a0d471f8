"""Box geometry of the weak-localisation metrics: heatmap components as boxes, IoU and IoBB (numpy, xyxy).

Pixel (r, c) covers [c, c+1) × [r, r+1); a connected component spanning columns c0..c1 and rows r0..r1 becomes the box
(c0, r0, c1 + 1, r1 + 1). Binarisation is strict, ``heatmap > threshold``; components are 8-connected.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

__all__ = ["heatmap_to_boxes", "box_iou", "box_iobb"]

_EIGHT = np.ones((3, 3), dtype=bool)


def heatmap_to_boxes(heatmap: np.ndarray | torch.Tensor, threshold: float) -> np.ndarray:
    """Boxes (M, 4) xyxy of the 8-connected components of ``heatmap > threshold`` (a 2D map)."""
    hm = heatmap.detach().float().cpu().numpy() if isinstance(heatmap, torch.Tensor) else np.asarray(heatmap)
    if hm.ndim != 2:
        raise ValueError(f"heatmap_to_boxes expects a 2D (H, W) map; got shape {hm.shape}")
    labels, n = ndimage.label(hm > threshold, structure=_EIGHT)
    if n == 0:
        return np.zeros((0, 4), dtype=np.float64)
    return np.array([[s[1].start, s[0].start, s[1].stop, s[0].stop] for s in ndimage.find_objects(labels)],
                    dtype=np.float64)


def _intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    w = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    h = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    return np.clip(w, 0, None) * np.clip(h, 0, None)


def _area(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, np.float64).reshape(-1, 4)
    return np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)


def box_iou(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """(M, N) intersection over union of xyxy boxes (0 where the union is empty)."""
    inter = _intersection(pred, gt)
    union = _area(pred)[:, None] + _area(gt)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def box_iobb(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """(M, N) intersection over the *predicted* box area (Wang et al.'s IoBB)."""
    inter = _intersection(pred, gt)
    area = np.broadcast_to(_area(pred)[:, None], inter.shape)
    return np.divide(inter, area, out=np.zeros_like(inter), where=area > 0)
