"""torchmetrics ``Metric`` s shared by every method: weak localisation (boxes, masks, pointing) and a
multilabel AUROC that honours label masks and skips undefined classes."""

from lightning_modules.metrics.classification import MaskedMultilabelAUROC
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
)

__all__ = [
    "CAM_THRESHOLDS", "IOBB_THRESHOLDS", "IOU_THRESHOLDS", "LocalizationAccuracy", "MaskedMultilabelAUROC",
    "MaxBoxAccV2", "PixelAP", "PointingGame", "box_iobb", "box_iou", "heatmap_to_boxes", "localization_metrics",
]
