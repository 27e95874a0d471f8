"""MAG-SD's own localisation protocol: the box region of the strongly attended pixels against the lesion.

J. Li et al., "Multiscale Attention Guided Network for COVID-19 Diagnosis Using Chest X-Ray Images", IEEE JBHI
2021; reference ``core/localize.py`` (``localize_penumonia``), dossier ``method-magsd.md`` (c, e.11):
the mean attention map is upsampled to the input, thresholded **> 0.85**, every connected component of the
result is replaced by its bounding box (``mask2bbox``: the boxes are filled into one region), and the image
counts as localised when the pixel IoU of that region with the ground-truth lesion region is **> 0.3**.

Choices where the reference is silent or broken (documented in the metric):
  * The map is min-max normalised over the image's valid region first (:func:`normalize_heatmaps`, the rule
    of every threshold sweep in :mod:`lightning_modules.metrics.localization`); the reference applied 0.85
    to an unnormalised mean map, whose scale is arbitrary (dossier e.11).
  * Components are 8-connected (cv2's default in the reference); the reference's ``stats[:-1]`` drops the
    *largest* labelled area, assuming it is the background, which fails when attention covers most of the
    image: here the background is never a component.
  * The ground-truth region is the lesion mask (the reference's NIH pneumonia masks) or, for images with only
    boxes, the union of the boxes (:func:`lightning_modules.weak_localization.attention_targets`).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torchmetrics import Metric

from lightning_modules.metrics.localization import normalize_heatmaps

__all__ = ["AttentionRegionAccuracy", "attention_region"]

_EIGHT = np.ones((3, 3), dtype=bool)


def attention_region(heatmap: np.ndarray, threshold: float) -> np.ndarray:
    """(H, W) bool: the filled bounding boxes of the 8-connected components of ``heatmap > threshold``."""
    labels, n = ndimage.label(np.asarray(heatmap) > threshold, structure=_EIGHT)
    region = np.zeros(labels.shape, dtype=bool)
    for rows, cols in ndimage.find_objects(labels)[:n]:
        region[rows, cols] = True
    return region


class AttentionRegionAccuracy(Metric):
    """MAG-SD localisation accuracy: fraction of images whose attention region (module docstring) has pixel
    IoU > ``iou_threshold`` (strict, as the reference) with the ground-truth region; and the mean IoU.

    ``update(heatmaps, targets, present=None, region=None)``: ``heatmaps`` (B, 1, H, W) or (B, H, W), one
    class-agnostic map per image; ``targets`` bool, same (H, W), the ground-truth region; ``present`` bool (B,)
    selects the images that have one; ``region`` the valid (non-letterbox) pixels for the normalisation.
    ``compute()``: ``magsd_acc@<iou>`` and ``magsd_miou`` (NaN without images). Sums only: exact under DDP.

    Example:
        >>> m = AttentionRegionAccuracy()
        >>> hm = torch.zeros(1, 8, 8); hm[0, 2:6, 2:6] = 1
        >>> m.update(hm, hm > 0)
        >>> float(m.compute()["magsd_acc@0.3"])
        1.0
    """

    full_state_update = False
    is_differentiable = False

    def __init__(self, threshold: float = 0.85, iou_threshold: float = 0.3, normalize: bool = True,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.threshold, self.iou_threshold, self.normalize = float(threshold), float(iou_threshold), bool(normalize)
        self.add_state("hits", torch.zeros(()), dist_reduce_fx="sum")
        self.add_state("iou_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_images", torch.zeros(()), dist_reduce_fx="sum")

    def update(self, heatmaps: torch.Tensor, targets: torch.Tensor, present: torch.Tensor | None = None,
               region: torch.Tensor | None = None) -> None:
        maps = heatmaps.detach().float()
        if maps.dim() == 4:
            if maps.shape[1] != 1:
                raise ValueError(f"heatmaps must be one class-agnostic map per image, (B, 1, H, W) or (B, H, W); "
                                 f"got {tuple(maps.shape)}")
            maps = maps[:, 0]
        if targets.reshape(-1).numel() != maps.numel():
            raise ValueError(f"targets {tuple(targets.shape)} do not match heatmaps {tuple(heatmaps.shape)}")
        if self.normalize:
            maps = normalize_heatmaps(maps, None if region is None else region.reshape(maps.shape))
        maps_np = maps.cpu().numpy()
        gt = targets.reshape(maps.shape).bool().cpu().numpy()
        use = np.ones(len(maps_np), bool) if present is None else present.reshape(-1).bool().cpu().numpy()
        hits = iou_sum = n = 0.0
        for hm, g in zip(maps_np[use], gt[use]):
            if not g.any():
                continue  # nothing to localise
            pred = attention_region(hm, self.threshold)
            iou = float((pred & g).sum() / (pred | g).sum())
            hits, iou_sum, n = hits + (iou > self.iou_threshold), iou_sum + iou, n + 1
        self.hits += hits
        self.iou_sum += iou_sum
        self.n_images += n

    def compute(self) -> dict[str, torch.Tensor]:
        nan = torch.tensor(float("nan"), device=self.hits.device)
        n = self.n_images
        return {f"magsd_acc@{self.iou_threshold:g}": self.hits / n if n > 0 else nan,
                "magsd_miou": (self.iou_sum / n).float() if n > 0 else nan}
