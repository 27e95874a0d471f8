"""Weak-localisation metrics for heatmaps (CAMs, PCAM probability maps, attention maps).

All are torchmetrics ``Metric`` s whose states are sums of counts (or a binned confusion matrix), so they
synchronise exactly under DDP. Inputs (B = images, K = classes, H, W = image size)::

    heatmaps    float (B, K, H, W) in [0, 1], one map per class, *at the resolution of the boxes*
    boxes       list of B float tensors (N_i, 4), xyxy in pixels of that image (x = column, y = row)
    box_labels  list of B long tensors (N_i,), class indices

Conventions (chosen deliberately; each is the one of the protocol's paper unless stated):
  * Pixel (r, c) covers [c, c+1) × [r, r+1); a connected component spanning columns c0..c1 and rows
    r0..r1 becomes the box (c0, r0, c1 + 1, r1 + 1). GT boxes are continuous xyxy.
  * Binarisation is strict, ``heatmap > threshold`` (as cv2.THRESH_BINARY in Choe et al.), so an all-zero
    map has no foreground at any threshold ≥ 0. Components are 8-connected (scipy.ndimage.label).
  * **One normalisation rule per protocol.** The threshold-sweep metrics (:class:`MaxBoxAccV2`,
    :class:`PixelAP`) min-max normalise every (image, class) map before the sweep, for every method, as
    Choe et al. do (wsolevaluation: ``normalize_scoremap``): ``(M − min) / (max − min)`` with min and max over
    the map's valid (non-letterbox) ``region``, 0 outside it, and an all-zero map where max = min
    (:func:`normalize_heatmaps`). So PCAM's σ-maps and the CAMs of GAP are swept on the same scale. Built with
    ``normalize=False`` they sweep the raw map instead and name their keys ``..._raw``
    (``maxboxacc_v2_raw``, ``pxap_raw`` in :func:`localization_metrics`).
  * The fixed-threshold ChestX-ray14 protocol (:class:`LocalizationAccuracy`) keeps each paper's own rule and
    thresholds the map it is given: PCAM's σ-map at 0.5 (0.5 ⇔ logit 0, the point of PCAM), the min-max
    normalised CAM of GAP at 0.5. The pointing game takes the raw map: its arg-max is unchanged by any
    per-map increasing affine normalisation.
  * Unit of evaluation: a GT box for the ChestX-ray14 protocol (Wang et al. 2017: a box is found if some
    predicted box of its class exceeds the overlap threshold); an (image, class) pair with ≥ 1 GT box of
    that class for MaxBoxAccV2 and the pointing game (Choe et al.: a pair is correct if some predicted box
    reaches IoU ≥ δ with some GT box). Class means are macro over classes with ≥ 1 unit; the overall
    MaxBoxAccV2 pools all pairs so that one CAM threshold serves every class, as Choe et al. pick one
    operating point for the dataset.

References:
    X. Wang et al., "ChestX-ray8", CVPR 2017 (T(IoBB), IoBB = intersection / predicted-box area).
    Z. Li et al., "Thoracic Disease Identification and Localization with Limited Supervision", CVPR 2018
    (T(IoU) ∈ {0.1, …, 0.7}). J. Choe et al., "Evaluating Weakly Supervised Object Localization Methods
    Right", CVPR 2020 (MaxBoxAccV2, PxAP). J. Zhang et al., "Top-down Neural Attention by Excitation
    Backprop", ECCV 2016 (pointing game).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import BinaryAveragePrecision

from lightning_modules.metrics.boxes import box_iobb, box_iou, heatmap_to_boxes

__all__ = [
    "IOBB_THRESHOLDS", "IOU_THRESHOLDS", "CAM_THRESHOLDS", "heatmap_to_boxes", "box_iou", "box_iobb",
    "normalize_heatmaps", "LocalizationAccuracy", "MaxBoxAccV2", "PixelAP", "PointingGame", "localization_metrics",
]

IOBB_THRESHOLDS = (0.1, 0.25, 0.5, 0.75, 0.9)
IOU_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
CAM_THRESHOLDS = tuple(round(0.01 * i, 2) for i in range(100))  # Choe et al.: 0, 0.01, ..., 0.99

def _broadcast_region(region: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """``region`` (B, H, W), (B, 1, H, W) or the maps' shape, as a bool tensor of the maps' shape."""
    region = torch.as_tensor(region, device=maps.device).to(torch.bool)
    if region.dim() == maps.dim() - 1:
        region = region.unsqueeze(1)
    if region.dim() != maps.dim() or region.shape[0] != maps.shape[0] or region.shape[-2:] != maps.shape[-2:]:
        raise ValueError(f"region {tuple(region.shape)} does not fit heatmaps {tuple(maps.shape)}: expected "
                         "(B, H, W), (B, 1, H, W) or the heatmaps' shape")
    return region.expand_as(maps)


def normalize_heatmaps(heatmaps: torch.Tensor, region: torch.Tensor | None = None) -> torch.Tensor:
    """Min-max normalise each (…, H, W) map over its ``region`` (Choe et al., CVPR 2020), float32 in [0, 1].

    ``(M − min) / (max − min)`` with min and max over the pixels of ``region`` (bool (B, H, W), (B, 1, H, W)
    or the maps' shape; default: every pixel); pixels outside ``region`` become 0, and a map that is constant
    on its region (or has no region) becomes all 0, so it has no foreground at any threshold ≥ 0.

    Example:
        >>> normalize_heatmaps(torch.tensor([[[[0.2, 0.4], [0.3, 0.9]]]]), torch.tensor([[[True, True], [True, False]]]))
        tensor([[[[0.0000, 1.0000],
                  [0.5000, 0.0000]]]])
    """
    maps = heatmaps.detach().float()
    inside = torch.ones_like(maps, dtype=torch.bool) if region is None else _broadcast_region(region, maps)
    lo = maps.masked_fill(~inside, float("inf")).flatten(-2).amin(-1)[..., None, None]
    hi = maps.masked_fill(~inside, float("-inf")).flatten(-2).amax(-1)[..., None, None]
    span = hi - lo
    ok = torch.isfinite(span) & (span > 0)
    out = torch.where(ok, (maps - lo) / torch.where(ok, span, torch.ones_like(span)), torch.zeros_like(maps))
    return out.clamp(0, 1) * inside


def _pairs(heatmaps: torch.Tensor, boxes: Sequence[torch.Tensor], box_labels: Sequence[torch.Tensor],
           num_classes: int):
    """Yield (class k, heatmap (H, W) numpy, GT boxes (N, 4) numpy) per (image, class) with boxes.

    ``boxes is None`` (a mask-only update through :func:`localization_metrics`) yields nothing."""
    if boxes is None or box_labels is None:
        return
    if heatmaps.dim() != 4 or heatmaps.shape[1] != num_classes:
        raise ValueError(f"heatmaps must be (B, {num_classes}, H, W); got {tuple(heatmaps.shape)}")
    if len(boxes) != heatmaps.shape[0] or len(box_labels) != heatmaps.shape[0]:
        raise ValueError(f"boxes/box_labels must be lists of length B={heatmaps.shape[0]}; "
                         f"got {len(boxes)} and {len(box_labels)}")
    maps = None
    for b, (bx, lb) in enumerate(zip(boxes, box_labels)):
        bx = torch.as_tensor(bx).detach().reshape(-1, 4).double().cpu().numpy()
        lb = torch.as_tensor(lb).detach().reshape(-1).long().cpu().numpy()
        if len(bx) != len(lb):
            raise ValueError(f"image {b}: {len(bx)} boxes but {len(lb)} box labels")
        if len(lb) and (lb.min() < 0 or lb.max() >= num_classes):
            raise ValueError(f"image {b}: box label out of range [0, {num_classes}): {lb.tolist()}")
        if len(lb) == 0:
            continue
        if maps is None:  # one device->host copy for the whole batch
            maps = heatmaps.detach().float().cpu().numpy()
        for k in np.unique(lb):
            yield int(k), maps[b, k], bx[lb == k]


class _ClassMetric(Metric):
    full_state_update = False
    is_differentiable = False

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else [str(k) for k in range(num_classes)]

    def _per_class(self, out: dict, key: str, values: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Add ``key/<class>`` entries and return the macro mean over classes with ≥ 1 unit (NaN if none)."""
        acc = values / counts.clamp_min(1)
        for k, name in enumerate(self.class_names):
            if counts[k] > 0:
                out[f"{key}/{name}"] = acc[k]
        has = counts > 0
        return acc[has].mean() if has.any() else torch.tensor(float("nan"), device=values.device)


class LocalizationAccuracy(_ClassMetric):
    """ChestX-ray14 protocol: the fraction of GT boxes found at T(IoBB) and T(IoU), per class and mean.

    The heatmap of the box's class is binarised at ``cam_threshold``; every connected component gives a
    predicted box; a GT box counts as found at threshold T when some predicted box has overlap **> T**
    (strict, as worded by Wang et al. and Li et al.). ``compute()`` returns ``iou@T`` and ``iobb@T`` (macro
    mean over classes with boxes) plus ``iou@T/<class>``, ``iobb@T/<class>``.

    Example:
        >>> m = LocalizationAccuracy(1, cam_threshold=0.5)
        >>> hm = torch.zeros(1, 1, 8, 8); hm[0, 0, 2:6, 2:6] = 1
        >>> m.update(hm, [torch.tensor([[2., 2., 6., 6.]])], [torch.tensor([0])])
        >>> float(m.compute()["iou@0.7"])
        1.0
    """

    def __init__(self, num_classes: int, iobb_thresholds: Sequence[float] = IOBB_THRESHOLDS,
                 iou_thresholds: Sequence[float] = IOU_THRESHOLDS, cam_threshold: float = 0.5,
                 class_names: Sequence[str] | None = None, **kwargs) -> None:
        super().__init__(num_classes, class_names, **kwargs)
        self.iobb_thresholds, self.iou_thresholds = tuple(iobb_thresholds), tuple(iou_thresholds)
        self.cam_threshold = float(cam_threshold)
        self.add_state("iou_hits", torch.zeros(len(self.iou_thresholds), num_classes), dist_reduce_fx="sum")
        self.add_state("iobb_hits", torch.zeros(len(self.iobb_thresholds), num_classes), dist_reduce_fx="sum")
        self.add_state("n_boxes", torch.zeros(num_classes), dist_reduce_fx="sum")

    def update(self, heatmaps: torch.Tensor, boxes: Sequence[torch.Tensor] | None = None,
               box_labels: Sequence[torch.Tensor] | None = None) -> None:
        t_iou, t_iobb = np.array(self.iou_thresholds), np.array(self.iobb_thresholds)
        iou_hits = np.zeros((len(t_iou), self.num_classes))
        iobb_hits = np.zeros((len(t_iobb), self.num_classes))
        n = np.zeros(self.num_classes)
        for k, hm, gt in _pairs(heatmaps, boxes, box_labels, self.num_classes):
            pred = heatmap_to_boxes(hm, self.cam_threshold)
            n[k] += len(gt)
            if len(pred) == 0:
                continue
            best_iou = box_iou(pred, gt).max(0)  # (N,) best predicted box per GT box
            best_iobb = box_iobb(pred, gt).max(0)
            iou_hits[:, k] += (best_iou[None, :] > t_iou[:, None]).sum(1)
            iobb_hits[:, k] += (best_iobb[None, :] > t_iobb[:, None]).sum(1)
        self.iou_hits += torch.as_tensor(iou_hits, dtype=self.iou_hits.dtype, device=self.device)
        self.iobb_hits += torch.as_tensor(iobb_hits, dtype=self.iobb_hits.dtype, device=self.device)
        self.n_boxes += torch.as_tensor(n, dtype=self.n_boxes.dtype, device=self.device)

    def compute(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, ts, hits in (("iou", self.iou_thresholds, self.iou_hits), ("iobb", self.iobb_thresholds, self.iobb_hits)):
            for i, t in enumerate(ts):
                out[f"{name}@{t:g}"] = self._per_class(out, f"{name}@{t:g}", hits[i], self.n_boxes)
        return out


class MaxBoxAccV2(_ClassMetric):
    """MaxBoxAccV2 (Choe et al., CVPR 2020): mean over δ of max over CAM thresholds τ of BoxAcc(δ, τ).

    BoxAcc(δ, τ) = fraction of (image, class) pairs for which some connected-component box of
    ``heatmap > τ`` has IoU ≥ δ with some GT box of that class (V2: all components, not only the largest).
    ``compute()`` returns ``maxboxacc_v2``, ``maxboxacc@δ``, the best ``threshold@δ`` (all pooled over the
    pairs of every class) and ``maxboxacc_v2/<class>`` (each class with its own best τ).
    A perfect map (1 inside the boxes, 0 outside) scores 1; an all-zero map scores 0.

    ``normalize=True`` (default, Choe et al.): each (image, class) map is min-max normalised over its
    ``region`` (the valid, non-letterbox pixels; :func:`normalize_heatmaps`) before the sweep, whatever the
    method, so one pooled τ means the same for every map. ``normalize=False`` sweeps the raw map and names
    the keys ``maxboxacc_v2_raw``, ``maxboxacc_raw@δ``, ``threshold_raw@δ``, ``maxboxacc_v2_raw/<class>``.
    """

    def __init__(self, num_classes: int, cam_thresholds: Sequence[float] = CAM_THRESHOLDS,
                 iou_deltas: Sequence[float] = (0.3, 0.5, 0.7), class_names: Sequence[str] | None = None,
                 normalize: bool = True, **kwargs) -> None:
        super().__init__(num_classes, class_names, **kwargs)
        self.cam_thresholds = tuple(sorted(float(t) for t in cam_thresholds))
        self.iou_deltas = tuple(iou_deltas)
        self.normalize = bool(normalize)
        self.key_suffix = "" if self.normalize else "_raw"
        self.add_state("hits", torch.zeros(len(self.iou_deltas), len(self.cam_thresholds), num_classes),
                       dist_reduce_fx="sum")
        self.add_state("n_pairs", torch.zeros(num_classes), dist_reduce_fx="sum")

    def update(self, heatmaps: torch.Tensor, boxes: Sequence[torch.Tensor] | None = None,
               box_labels: Sequence[torch.Tensor] | None = None, region: torch.Tensor | None = None) -> None:
        if self.normalize and boxes is not None:
            heatmaps = normalize_heatmaps(heatmaps, region)
        deltas = np.array(self.iou_deltas)
        hits = np.zeros((len(deltas), len(self.cam_thresholds), self.num_classes))
        n = np.zeros(self.num_classes)
        for k, hm, gt in _pairs(heatmaps, boxes, box_labels, self.num_classes):
            n[k] += 1
            top = float(hm.max())
            for j, tau in enumerate(self.cam_thresholds):
                if tau >= top:  # thresholds are sorted: no foreground from here on
                    break
                pred = heatmap_to_boxes(hm, tau)
                if len(pred) == 0:  # τ rounds to the top value in the map's dtype
                    break
                best = box_iou(pred, gt).max()
                hits[:, j, k] += best >= deltas
        self.hits += torch.as_tensor(hits, dtype=self.hits.dtype, device=self.device)
        self.n_pairs += torch.as_tensor(n, dtype=self.n_pairs.dtype, device=self.device)

    def compute(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        total = self.n_pairs.sum()
        curve = self.hits.sum(-1) / total.clamp_min(1)  # (D, T)
        best, arg = curve.max(1)
        thresholds = torch.tensor(self.cam_thresholds, device=curve.device)
        nan = torch.tensor(float("nan"), device=curve.device)
        s = self.key_suffix
        out[f"maxboxacc_v2{s}"] = best.mean() if total > 0 else nan
        for i, d in enumerate(self.iou_deltas):
            out[f"maxboxacc{s}@{d:g}"] = best[i] if total > 0 else nan
            out[f"threshold{s}@{d:g}"] = thresholds[arg[i]] if total > 0 else nan
        per_class = (self.hits / self.n_pairs.clamp_min(1)).amax(1).mean(0)  # (K,)
        for k, name in enumerate(self.class_names):
            if self.n_pairs[k] > 0:
                out[f"maxboxacc_v2{s}/{name}"] = per_class[k]
        return out


class PixelAP(BinaryAveragePrecision):
    """PxAP (Choe et al., CVPR 2020): average precision of heatmap pixels against GT masks, all pixels of all
    evaluated maps pooled, with binned thresholds (``thresholds`` evenly spaced in [0, 1], a constant-size
    DDP-synchronised confusion-matrix state from torchmetrics).

    ``update(heatmaps, masks, valid=None, region=None, classes=None)``:

    * without ``classes``: ``heatmaps`` and ``masks`` of equal shape (B, K, H, W) or (B, H, W), one scored
      map per mask;
    * with ``classes`` bool (B, K): ``heatmaps`` (B, K, H, W) and one class-agnostic mask per image
      ((B, 1, H, W) or (B, H, W)); the scored map is the max over the image's selected classes (images with
      none are skipped). This is how lesion masks, which do not say which finding they outline, are scored.

    ``valid`` bool (B,) or (B, K) selects the maps that have a real mask; ``region`` (bool (B, H, W) or
    (B, 1, H, W)) the image's pixels (letterbox padding is not scored). ``normalize=True`` (default, Choe et
    al.) min-max normalises every (image, class) map over its region before the sweep
    (:func:`normalize_heatmaps`; with ``classes``, before the max); ``normalize=False`` scores the raw
    map. ``compute()`` is NaN when no foreground pixel was seen.
    """

    def __init__(self, thresholds: int = 101, normalize: bool = True, **kwargs) -> None:
        super().__init__(thresholds=thresholds, **kwargs)
        self.normalize = bool(normalize)
        self.add_state("n_foreground", torch.zeros(()), dist_reduce_fx="sum")

    def update(self, heatmaps: torch.Tensor, masks: torch.Tensor | None = None,  # type: ignore[override]
               valid: torch.Tensor | None = None, region: torch.Tensor | None = None,
               classes: torch.Tensor | None = None) -> None:
        if masks is None:  # a box-only update through localization_metrics
            return
        maps = heatmaps.detach().float()
        if classes is not None:
            if maps.dim() != 4 or tuple(classes.shape) != tuple(maps.shape[:2]):
                raise ValueError(f"with classes, heatmaps must be (B, K, H, W) and classes (B, K); got heatmaps "
                                 f"{tuple(maps.shape)} and classes {tuple(classes.shape)}")
            if masks.numel() != maps.shape[0] * maps.shape[-2] * maps.shape[-1] or masks.shape[-2:] != maps.shape[-2:]:
                raise ValueError(f"with classes, masks must be (B, 1, H, W) or (B, H, W) for heatmaps "
                                 f"{tuple(maps.shape)}; got {tuple(masks.shape)}")
        elif maps.shape != masks.shape:
            raise ValueError(f"heatmaps {tuple(maps.shape)} and masks {tuple(masks.shape)} must match")
        if self.normalize:
            maps = normalize_heatmaps(maps, region)
        if classes is not None:
            chosen = classes.to(device=maps.device, dtype=torch.bool)
            maps = maps.masked_fill(~chosen[:, :, None, None], 0).amax(1, keepdim=True)
            masks = masks.reshape(maps.shape)
            has = chosen.any(1)
            valid = has if valid is None else valid.to(torch.bool).reshape(-1) & has
        keep = torch.ones_like(maps, dtype=torch.bool)
        if valid is not None:
            valid = valid.to(device=maps.device, dtype=torch.bool)
            keep = keep & valid.reshape(valid.shape + (1,) * (maps.dim() - valid.dim()))
        if region is not None:
            keep = keep & _broadcast_region(region, maps)
        preds, target = maps.clamp(0, 1)[keep], (masks > 0.5).long().to(maps.device)[keep]
        if preds.numel() == 0:
            return
        self.n_foreground += target.sum()
        super().update(preds.reshape(-1), target.reshape(-1))

    def compute(self) -> torch.Tensor:
        if self.n_foreground == 0:
            return torch.tensor(float("nan"), device=self.device)
        return super().compute()


class PointingGame(_ClassMetric):
    """Pointing game (Zhang et al., ECCV 2016): a hit when the heatmap's maximum lies within ``tolerance``
    pixels of a GT box of that class; accuracy = hits / (image, class) pairs, per class and mean.

    Choices: the point is the centre (c + 0.5, r + 0.5) of the first arg-max pixel; a constant map
    (max = min, e.g. all zeros) points nowhere and is a miss. ``tolerance`` defaults to 0 (the original
    used 15 px at 224², scale it with the image size). ``compute()`` returns ``pointing`` and
    ``pointing/<class>``.
    """

    def __init__(self, num_classes: int, tolerance: float = 0.0, class_names: Sequence[str] | None = None,
                 **kwargs) -> None:
        super().__init__(num_classes, class_names, **kwargs)
        self.tolerance = float(tolerance)
        self.add_state("hits", torch.zeros(num_classes), dist_reduce_fx="sum")
        self.add_state("n_pairs", torch.zeros(num_classes), dist_reduce_fx="sum")

    def update(self, heatmaps: torch.Tensor, boxes: Sequence[torch.Tensor] | None = None,
               box_labels: Sequence[torch.Tensor] | None = None) -> None:
        hits, n = np.zeros(self.num_classes), np.zeros(self.num_classes)
        for k, hm, gt in _pairs(heatmaps, boxes, box_labels, self.num_classes):
            n[k] += 1
            if hm.max() <= hm.min():
                continue
            r, c = np.unravel_index(int(np.argmax(hm)), hm.shape)
            x, y = c + 0.5, r + 0.5
            dx = np.maximum(np.maximum(gt[:, 0] - x, x - gt[:, 2]), 0)
            dy = np.maximum(np.maximum(gt[:, 1] - y, y - gt[:, 3]), 0)
            hits[k] += bool((np.hypot(dx, dy) <= self.tolerance).any())
        self.hits += torch.as_tensor(hits, dtype=self.hits.dtype, device=self.device)
        self.n_pairs += torch.as_tensor(n, dtype=self.n_pairs.dtype, device=self.device)

    def compute(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        out["pointing"] = self._per_class(out, "pointing", self.hits, self.n_pairs)
        return out


def localization_metrics(num_classes: int, class_names: Sequence[str] | None = None, cam_threshold: float = 0.5,
                         cam_thresholds: Sequence[float] = CAM_THRESHOLDS, pointing_tolerance: float = 0.0,
                         pixel_ap: bool = True, raw_sweeps: bool = True, prefix: str | None = None) -> MetricCollection:
    """All box metrics (and PxAP) in one ``MetricCollection``. Call it with keywords,
    ``m.update(heatmaps=..., boxes=..., box_labels=..., region=...)`` (and ``masks=``, ``valid=``,
    ``classes=`` for PxAP); each metric takes the keywords it needs. ``compute()`` returns one flat dict
    (``iou@0.3``, ``maxboxacc_v2``, ``pointing``, ``pxap``, per-class entries ...), prefixed by ``prefix``.

    ``maxboxacc*`` and ``pxap`` sweep per-map min-max normalised maps (Choe et al.); with ``raw_sweeps`` the
    same sweeps on the raw maps are added as ``maxboxacc_v2_raw``, ``maxboxacc_raw@δ``, ``threshold_raw@δ``,
    ``maxboxacc_v2_raw/<class>`` and ``pxap_raw``. ``iou@T``/``iobb@T`` and ``pointing`` use the raw maps.
    """
    metrics: dict[str, Metric] = {
        "acc": LocalizationAccuracy(num_classes, cam_threshold=cam_threshold, class_names=class_names),
        "maxboxacc": MaxBoxAccV2(num_classes, cam_thresholds=cam_thresholds, class_names=class_names),
        "pointing": PointingGame(num_classes, tolerance=pointing_tolerance, class_names=class_names),
    }
    if raw_sweeps:
        metrics["maxboxacc_raw"] = MaxBoxAccV2(num_classes, cam_thresholds=cam_thresholds, class_names=class_names,
                                               normalize=False)
    if pixel_ap:
        metrics["pxap"] = PixelAP()
        if raw_sweeps:
            metrics["pxap_raw"] = PixelAP(normalize=False)
    return MetricCollection(metrics, prefix=prefix, compute_groups=False)
