"""Metrics mean what their names say (issue 19 item 6): DC-MT balanced accuracy, MAG-SD's positive-class rates,
and one macro-AUROC policy (mean over classes with positives and negatives, count logged) in every module."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

# Hand case shared by the AUROC tests: 3 classes, class 2 never a target (no positives -> undefined AUROC).
# Class 0: positives score 0.6, 0.5 > negatives 0.3, 0.2 -> 1.0. Class 1: positives 0.35, 0.6 vs negatives 0.3, 0.4:
# 3 of 4 pairs ordered -> 0.75. Policy macro = (1 + 0.75) / 2 = 0.875 over 2 classes (torchmetrics: 1.75 / 3).
PROBS = torch.tensor([[0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.3, 0.35, 0.35], [0.2, 0.6, 0.2]])
TARGET = torch.tensor([0, 0, 1, 1])
MACRO, N_DEFINED = 0.875, 2


def _close(value, expected):
    assert abs(float(value) - expected) < 1e-6, (float(value), expected)


def test_dcmt_balanced_accuracy_leaves_out_classes_absent_from_targets():
    from lightning_modules.dcmt_metrics import SliceMetrics

    metrics = SliceMetrics(3, class_names=["a", "b", "c"])
    # targets [0, 0, 1, 1], predictions [0, 2, 1, 1]: recall 1/2 (class 0), 2/2 (class 1); class 2 only predicted
    metrics.classification.update(F.one_hot(torch.tensor([0, 2, 1, 1]), 3).float(), TARGET)
    values = metrics.compute()
    _close(values["balanced_accuracy"], 0.75)  # 00a25c0: 0.5 (class 2 counted as recall 0)


def test_dcmt_slice_and_subject_auroc_follow_the_policy():
    from lightning_modules.dcmt_metrics import SliceMetrics, SubjectMetrics

    sl = SliceMetrics(3, class_names=["a", "b", "c"], suffix="_teacher")
    sl.classification.update(PROBS, TARGET)
    values = sl.compute()
    _close(values["auroc_teacher"], MACRO)  # 00a25c0: 0.583 (class 2 counted as 0)
    _close(values["auroc_classes_teacher"], N_DEFINED)
    assert math.isnan(float(values["auroc_teacher/c"]))
    sub = SubjectMetrics(3, class_names=["a", "b", "c"])
    sub.update(PROBS, TARGET)
    values = sub.compute()
    _close(values["auroc"], MACRO)
    _close(values["auroc_classes"], N_DEFINED)
    # sensitivity of class 2 (no positive subject) is undefined, not 0 (00a25c0: macro (1 + 1 + 0) / 3);
    # argmax predictions are [0, 0, 1, 1] (row 2's tie goes to the first class)
    assert math.isnan(float(values["sensitivity/c"]))
    _close(values["sensitivity"], 1.0)


def test_shared_auroc_metrics_follow_the_policy():
    from lightning_modules.classification_metrics import classification_metrics
    from lightning_modules.metrics import MaskedMultilabelAUROC

    multiclass = classification_metrics("multiclass", 3, ["a", "b", "c"])  # CAM baseline, multiclass
    multiclass.update(PROBS, TARGET)
    values = multiclass.compute()
    _close(values["auroc"], MACRO)
    _close(values["auroc_classes"], N_DEFINED)
    _close(values["auroc_per_class/b"], 0.75)
    multilabel = MaskedMultilabelAUROC(3, ["a", "b", "c"])  # PCAM, CAM baseline multilabel
    multilabel.update(PROBS, F.one_hot(TARGET, 3))
    values = multilabel.compute()
    _close(values["auroc"], MACRO)
    _close(values["auroc_classes"], N_DEFINED)


def test_magsd_auroc_policy_and_positive_class_rates():
    from lightning_modules.magsd import MAGSDModule
    from networks.magsd import MAGSDNet

    module = MAGSDModule(MAGSDNet(num_classes=3, backbone="test_resnet", num_maps=4), class_names=["a", "b", "c"])
    logged = {}
    module.log_dict = lambda d, **k: logged.update(d)
    module.val_metrics.update(PROBS, TARGET)
    module.on_validation_epoch_end()
    _close(logged["val/auroc"], MACRO)
    _close(logged["val/auroc_classes"], N_DEFINED)

    # Binary COVID-19 / Other. Targets: 3 COVID, 2 Other; predictions: COVID, COVID, Other | COVID, Other.
    # COVID-19 sensitivity = 2/3, specificity = 1/2; macro recall = macro specificity = (2/3 + 1/2) / 2.
    binary = MAGSDModule(MAGSDNet(num_classes=2, backbone="test_resnet", num_maps=4), class_names=["COVID-19", "Other"])
    logged.clear()
    binary.log_dict = lambda d, **k: logged.update(d)
    predicted = torch.tensor([0, 0, 1, 0, 1])
    binary.val_metrics.update(F.one_hot(predicted, 2).float() * 0.8 + 0.1, torch.tensor([0, 0, 0, 1, 1]))
    binary.on_validation_epoch_end()
    _close(logged["val/sensitivity/COVID-19"], 2 / 3)  # 00a25c0: not logged
    _close(logged["val/specificity/COVID-19"], 1 / 2)
    _close(logged["val/recall"], (2 / 3 + 1 / 2) / 2)
    _close(logged["val/specificity"], (2 / 3 + 1 / 2) / 2)


def test_detection_image_level_auroc_follows_the_policy():
    from lightning_modules.retinanet import DetectionEvaluation
    from lightning_modules.stage_metrics import log_stage_metrics

    evaluation = DetectionEvaluation(3, global_scores=True, class_names=["a", "b", "c"])
    labels = F.one_hot(TARGET, 3).float()
    batch = {"labels": labels, "label_mask": torch.ones(4, 3, dtype=torch.bool),
             "has_boxes": torch.zeros(4, dtype=torch.bool), "boxes": [torch.zeros(0, 4)] * 4,
             "box_labels": [torch.zeros(0, dtype=torch.long)] * 4, "image_id": ["i0", "i1", "i2", "i3"]}
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    evaluation.update([empty] * 4, batch, PROBS, PROBS)

    class _Module:
        logged: dict = {}

        def log_dict(self, values, **kwargs):
            self.logged.update(values)

    module = _Module()
    log_stage_metrics(module, "test", evaluation)
    _close(module.logged["test/auroc_local"], MACRO)  # 00a25c0: torchmetrics' macro with class 2 as 0
    _close(module.logged["test/auroc_local_classes"], N_DEFINED)
    _close(module.logged["test/auroc"], MACRO)


@pytest.mark.parametrize("cls", ["MaskedMultilabelAUROC", "DefinedMulticlassAUROC"])
def test_no_defined_class_gives_nan_and_zero_count(cls):
    from lightning_modules.metrics import auroc as mc

    metric = getattr(mc, cls)(2)
    target = torch.tensor([[1, 0], [1, 0]]) if cls == "MaskedMultilabelAUROC" else torch.tensor([0, 0])
    metric.update(torch.tensor([[0.9, 0.1], [0.8, 0.2]]), target)
    values = metric.compute()
    assert math.isnan(float(values["auroc"])) and float(values["auroc_classes"]) == 0
