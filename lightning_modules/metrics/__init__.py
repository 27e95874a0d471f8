"""torchmetrics ``Metric`` s shared by every method: weak localisation (boxes, masks, pointing, MAG-SD's
attention region) and a multilabel AUROC that honours label masks and skips undefined classes."""

from lightning_modules.metrics.attention_region import AttentionRegionAccuracy
from lightning_modules.metrics.auroc import MaskedMultilabelAUROC
from lightning_modules.metrics.localization import (
    CAM_THRESHOLDS,
    IOBB_THRESHOLDS,
    IOU_THRESHOLDS,
    LocalizationAccuracy,
    MaxBoxAccV2,
    PixelAP,
    PointingGame,
    box_iobb,
    box_iou,
    heatmap_to_boxes,
    localization_metrics,
    normalize_heatmaps,
)

__all__ = [
    "AttentionRegionAccuracy", "CAM_THRESHOLDS", "IOBB_THRESHOLDS", "IOU_THRESHOLDS", "LocalizationAccuracy",
    "MaskedMultilabelAUROC",
    "MaxBoxAccV2", "PixelAP", "PointingGame", "box_iobb", "box_iou", "heatmap_to_boxes", "localization_metrics",
    "normalize_heatmaps",
]
