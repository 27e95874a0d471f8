"""The one per-stage metrics idiom (:mod:`lightning_modules.stage_metrics`): keys, NaN policy, prog bar, reset, and
the class names reaching every nested metric."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torchmetrics import MetricCollection, SumMetric

from lightning_modules.metrics.auroc import MaskedMultilabelAUROC
from lightning_modules.stage_metrics import for_stages, log_stage_metrics, set_class_names


class _Values(nn.Module):
    """A metric container with fixed values; counts its resets."""

    def __init__(self, values: dict) -> None:
        super().__init__()
        self.values, self.resets = values, 0

    def compute(self) -> dict:
        return {k: torch.tensor(v) for k, v in self.values.items()}

    def reset(self) -> None:
        self.resets += 1


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[dict, dict]] = []

    def log_dict(self, values, **kwargs) -> None:
        self.calls.append(({k: float(v) for k, v in values.items()}, kwargs))

    @property
    def logged(self) -> dict:
        return {k: v for values, _ in self.calls for k, v in values.items()}


NAN = float("nan")


def test_keys_are_stage_prefixed_nan_kept_by_default_and_the_metric_reset():
    module, metrics = _Recorder(), _Values({"auroc": 0.75, "auroc/a": NAN, "val/already": 1.0})
    log_stage_metrics(module, "val", metrics)
    assert set(module.logged) == {"val/auroc", "val/auroc/a", "val/already"}
    assert module.logged["val/auroc"] == 0.75 and math.isnan(module.logged["val/auroc/a"])
    assert all(kwargs == {"sync_dist": False} for _, kwargs in module.calls)  # torchmetrics synced in compute()
    assert metrics.resets == 1


def test_drop_nan_keeps_only_the_named_nan_values():
    module = _Recorder()
    log_stage_metrics(module, "train", _Values({"auroc": NAN, "auroc/a": NAN, "auroc/b": 0.5}), drop_nan=True,
                      keep_nan=("auroc",))
    assert set(module.logged) == {"train/auroc", "train/auroc/b"}
    module = _Recorder()
    log_stage_metrics(module, "train", _Values({"auroc": NAN, "auroc/b": 0.5}), drop_nan=True)
    assert set(module.logged) == {"train/auroc/b"}


def test_prefix_and_prog_bar():
    module = _Recorder()
    log_stage_metrics(module, "test", _Values({"dice": 0.9, "dice_a": 0.8, "miou": 0.1}), prog_bar=("dice",))
    assert module.calls[0] == ({"test/dice_a": pytest.approx(0.8), "test/miou": pytest.approx(0.1)}, {"sync_dist": False})
    assert module.calls[1] == ({"test/dice": pytest.approx(0.9)}, {"sync_dist": False, "prog_bar": True})
    module = _Recorder()
    log_stage_metrics(module, "test", _Values({"magsd_miou": 0.1}), prefix="test/loc/")
    assert set(module.logged) == {"test/loc/magsd_miou"}


def test_a_vector_value_is_refused_with_its_name():
    with pytest.raises(ValueError, match=r"'dice' of shape \(3,\)"):
        log_stage_metrics(_Recorder(), "val", _Values({"dice": [0.1, 0.2, 0.3]}))


def test_a_torchmetrics_metric_is_computed_and_reset():
    module, metric = _Recorder(), MetricCollection({"total": SumMetric()})
    metric.update(torch.tensor([1.0, 2.0]))
    log_stage_metrics(module, "val", metric)
    assert module.logged == {"val/total": 3.0}
    assert float(metric["total"].sum_value) == 0.0


def test_for_stages_builds_one_object_per_stage():
    train, val = for_stages(lambda stage: MetricCollection({"s": SumMetric()}, prefix=f"{stage}/"), "train", "val")
    assert train is not val and train.prefix == "train/" and val.prefix == "val/"


def test_set_class_names_reaches_nested_metrics():
    collection = MetricCollection({"auroc": MaskedMultilabelAUROC(2)})
    per_net = nn.ModuleDict({"student": MaskedMultilabelAUROC(2)})
    set_class_names([collection, per_net], ["effusion", "nodule"])
    assert collection["auroc"].class_names == per_net["student"].class_names == ["effusion", "nodule"]
