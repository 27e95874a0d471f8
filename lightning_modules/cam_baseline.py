"""``CAMClassifierModule``: the GAP + linear-head baseline every attention method must beat.

Zhou et al., "Learning Deep Features for Discriminative Localization", CVPR 2016 (arXiv:1512.04150).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from datamodules.batch import STREAM_UNLABELED
from lightning_modules.base import MedAttnModule, default_optimizer
from lightning_modules.classification_metrics import (classification_metrics, metric_scores, metric_targets,
                                                      prediction_targets, record_test_predictions)
from lightning_modules.metrics import MaskedMultilabelAUROC, localization_metrics
from lightning_modules.metrics.bootstrap import TestPredictions
from lightning_modules.registry import register_method
from lightning_modules.stage_metrics import for_stages, log_stage_metrics, set_class_names
from lightning_modules.weak_localization import update_localization
from lightning_modules.data_check import check_data_classes
from networks.masked_loss import masked_bce, masked_ce


class CAMClassifierModule(MedAttnModule):
    """Image classifier with class activation maps.

    AUROC: macro over the classes with positives and negatives (``<stage>/auroc_classes`` of them, the project
    policy of :mod:`lightning_modules.metrics.auroc`). Test: per-image scores in ``test_predictions.csv``
    of the run directory and the patient-level bootstrap 95 % interval ``test/auroc_ci_low``/``_high``.

    Args:
        net: an ``nn.Module`` with ``forward(x) -> logits (B, K)`` and ``attention_maps(x) -> (B, K, h, w)``,
            e.g. :class:`networks.cam_classifier.CAMNet` (injected from the config).
        task: ``"multilabel"`` (sigmoid + masked BCE) or ``"multiclass"`` (softmax + cross-entropy).
        class_names: names for per-class metric keys; default ``class_0..``. The DataModule's names are used
            when the module is trained through ``medattn``.
        localization: evaluate weak localisation at test time (``test/loc/*``: T(IoU), T(IoBB), MaxBoxAccV2,
            pointing game, PxAP) on images with boxes or lesion masks, with the same metrics and the same
            normalisation rule as PCAM (:func:`lightning_modules.weak_localization.update_localization`: the
            sweeps min-max normalise every map, and ``maxboxacc_v2_raw``/``pxap_raw`` sweep the raw map).
        cam_threshold: heatmap threshold of the ChestX-ray14 box protocol (on min-max normalised CAMs).
        optimizer, scheduler, channels_last: see :class:`lightning_modules.base.MedAttnModule`.
    """

    not_hyperparameters = ("net", "optimizer", "scheduler")

    def __init__(self, net: nn.Module, task: str = "multilabel", class_names: list[str] | None = None,
                 localization: bool = True, cam_threshold: float = 0.5,
                 optimizer: OptimizerCallable = default_optimizer, scheduler: LRSchedulerCallable | None = None,
                 channels_last: bool = False) -> None:
        super().__init__(optimizer=optimizer, scheduler=scheduler, channels_last=channels_last)
        if task not in ("multilabel", "multiclass"):
            raise ValueError(f"task must be 'multilabel' or 'multiclass', got {task!r}")
        self.net = net
        self.task = task
        num_classes = net.num_classes
        self.class_names = list(class_names) if class_names else [f"class_{k}" for k in range(num_classes)]
        if task == "multilabel":  # masked AUROC that leaves classes without both outcomes out of the macro mean
            def metrics(stage):
                return MaskedMultilabelAUROC(num_classes, self.class_names)
        else:
            def metrics(stage):
                return classification_metrics(task, num_classes, self.class_names).clone(prefix=f"{stage}/")
        self.train_metrics, self.val_metrics, self.test_metrics = for_stages(metrics, "train", "val", "test")
        self.test_predictions = TestPredictions()
        self.localization = localization
        self.test_localization = localization_metrics(num_classes, self.class_names, cam_threshold=cam_threshold,
                                                      prefix="test/loc/")

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = check_data_classes(self, self.net.num_classes)
        if datamodule is not None:
            set_class_names([self.train_metrics, self.val_metrics, self.test_metrics, self.test_localization],
                            self.class_names)
            if datamodule.task != self.task:
                raise ValueError(f"model task {self.task!r} differs from the data task {datamodule.task!r}")

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(self.prepare_image(image))

    def attention_maps(self, image: torch.Tensor) -> torch.Tensor:
        return self.net.attention_maps(self.prepare_image(image))

    def loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        if self.task == "multilabel":
            return masked_bce(logits, batch["labels"], batch["label_mask"])
        return masked_ce(logits, batch["labels"], batch["label_mask"])

    def model_step(self, batch: dict, stage: str) -> torch.Tensor:
        if stage == "test" and self.localization:
            features = self.net.forward_features(self.prepare_image(batch["image"]))
            logits = self.net.forward_head(features)
            update_localization(self.test_localization, batch, self.net.maps_from_features(features))
        else:
            logits = self(batch["image"])
        loss = self.loss(logits, batch)
        terms = {"total": loss}
        if stage == "train":
            self.check_finite(terms)
        self.log_losses(stage, terms, batch_size=len(logits))
        metrics = getattr(self, f"{stage}_metrics")
        if self.task == "multilabel":
            metrics.update(logits.detach(), batch["labels"], batch["label_mask"])
        else:
            labeled = batch["stream"] != STREAM_UNLABELED
            metrics.update(metric_scores(self.task, logits.detach())[labeled],
                           metric_targets(self.task, batch["labels"], batch["label_mask"])[labeled])
        if stage == "test":
            record_test_predictions(self.test_predictions, batch, metric_scores(self.task, logits.detach()),
                                    prediction_targets(self.task, batch["labels"], batch["label_mask"]))
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.model_step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.model_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.model_step(batch, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        return {"image_id": batch["image_id"], "scores": metric_scores(self.task, self(batch["image"]))}

    # NaN values (a metric with nothing to evaluate) are left out of the log
    def on_train_epoch_end(self) -> None:
        log_stage_metrics(self, "train", self.train_metrics, drop_nan=True)

    def on_validation_epoch_end(self) -> None:
        log_stage_metrics(self, "val", self.val_metrics, drop_nan=True)

    def on_test_epoch_end(self) -> None:
        log_stage_metrics(self, "test", self.test_metrics, drop_nan=True)
        self.test_predictions.finish(self, self.class_names)
        if self.localization:
            log_stage_metrics(self, "test", self.test_localization, drop_nan=True)


register_method("cam_baseline", CAMClassifierModule,
                paper="Zhou et al., Learning Deep Features for Discriminative Localization, CVPR 2016")
