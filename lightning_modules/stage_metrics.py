"""The one idiom for per-stage metrics in every medattn module (the lightning-hydra-template pattern).

1. **Create** one metric object per stage with one factory, as attributes named ``<stage>_metrics``::

       self.val_metrics, self.test_metrics = for_stages(lambda stage: make_metrics(), "val", "test")

   A metric object is anything with ``update(...)``, ``compute() -> {name: scalar tensor}`` and ``reset()``: a
   torchmetrics ``Metric`` or ``MetricCollection``, or a method's own container of them (DC-MT's ``SliceMetrics``,
   detection's ``DetectionEvaluation``, segmentation's ``SegmentationMetrics``). Several networks evaluated side by
   side (a mean teacher's student and teacher) get an ``nn.ModuleDict`` of them per stage.
2. **Update** it in the step: ``getattr(self, f"{stage}_metrics").update(...)``.
3. **Log** it at the epoch end with :func:`log_stage_metrics`: every value as ``<stage>/<name>``, then reset.

States are synchronised across DDP ranks by torchmetrics inside ``compute()`` (detection gathers its pairs there
too), so the values are logged with ``sync_dist=False``; ``compute()`` is a collective and every rank calls it.
The DataModule's class names reach the metrics' per-class keys through :func:`set_class_names` in ``setup``.
"""

from __future__ import annotations

from typing import Callable, Collection, Iterable, Sequence, TypeVar

import torch
from torch import nn

__all__ = ["for_stages", "log_stage_metrics", "set_class_names"]

M = TypeVar("M")


def for_stages(factory: Callable[[str], M], *stages: str) -> tuple[M, ...]:
    """A fresh metric object per stage, ``factory(stage)`` (the stage names a prefix where the keys carry it)."""
    return tuple(factory(stage) for stage in stages)


def log_stage_metrics(module, stage: str, metrics, *, prefix: str | None = None, drop_nan: bool = False,
                      keep_nan: Collection[str] = (), prog_bar: Collection[str] = ()) -> None:
    """Compute ``metrics``, log each value as ``<prefix><name>`` (``prefix`` defaults to ``"<stage>/"``; a name that
    already starts with ``"<stage>/"``, from a prefixed ``MetricCollection``, is kept as it is) and reset.

    Args:
        drop_nan: leave NaN values (nothing to evaluate) out of the log, except the names in ``keep_nan`` (the
            names as ``compute()`` returns them).
        prog_bar: names also shown in the progress bar.

    Raises:
        ValueError: a value that is not a scalar (name and shape given): per-class values are separate names.
    """
    prefix = f"{stage}/" if prefix is None else prefix
    plain, shown = {}, {}
    for name, value in metrics.compute().items():
        value = torch.as_tensor(value)
        if value.numel() != 1:
            raise ValueError(f"{type(metrics).__name__}.compute() gave {name!r} of shape {tuple(value.shape)}; "
                             "log_stage_metrics takes scalars (one name per class)")
        if drop_nan and name not in keep_nan and bool(torch.isnan(value)):
            continue
        key = name if name.startswith(f"{stage}/") else f"{prefix}{name}"
        (shown if name in prog_bar else plain)[key] = value.reshape(()).float()
    module.log_dict(plain, sync_dist=False)  # torchmetrics synchronised the states in compute()
    if shown:
        module.log_dict(shown, sync_dist=False, prog_bar=True)
    metrics.reset()


def set_class_names(metrics: nn.Module | Iterable[nn.Module], names: Sequence[str]) -> None:
    """Give every metric in ``metrics`` (and in the collections and containers it holds) that keys values by class
    the class names ``names`` (the DataModule's, taken in the module's ``setup``)."""
    for root in ([metrics] if isinstance(metrics, nn.Module) else metrics):
        for metric in root.modules():
            if hasattr(metric, "class_names"):
                metric.class_names = list(names)
