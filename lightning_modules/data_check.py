"""The one check that a model's class count matches its data (every module's ``setup`` calls it).

Under ``medattn`` the count is linked from the DataModule to the network (``experiments/cli.py``, ``DATA_LINKS``)
and a config that forces a different one is refused there. This check is for everything else (a network built in
Python, a checkpoint loaded against other data): it fails before the first step, naming both counts and the setting,
instead of a shape error deep in the loss.
"""

from __future__ import annotations

import lightning.pytorch as pl


def check_data_classes(module: pl.LightningModule, outputs: int, what: str = "network",
                       set_names: bool = True):
    """Return the trainer's DataModule (None without one, or one that does not know its classes) after checking
    that it has ``outputs`` classes; with ``set_names`` the module takes the data's ``class_names``."""
    datamodule = getattr(module._trainer, "datamodule", None) if module._trainer is not None else None
    if datamodule is None or not hasattr(datamodule, "num_classes"):
        return None
    if datamodule.num_classes != outputs:
        raise ValueError(f"{type(module).__name__}: the {what} has {outputs} outputs but the data "
                         f"({type(datamodule).__name__}) has {datamodule.num_classes} classes "
                         f"{list(datamodule.class_names)}; build the {what} with num_classes={datamodule.num_classes} "
                         "(under medattn, leave num_classes out of the config: it is linked from the data)")
    if set_names:
        module.class_names = list(datamodule.class_names)
    return datamodule
