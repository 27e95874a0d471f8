"""One registry of every method, so contract tests can be parameterised over all of them (as timm does
over ``list_models()``).

Each method file registers itself with :func:`register_method`, giving a factory that builds a *tiny*
configuration (tiny backbone, tiny images) of the module and its DataModule for tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import lightning.pytorch as pl


@dataclass(frozen=True)
class MethodSpec:
    """A registered method.

    Attributes:
        name: short name used in configs, W&B groups and tests (``"pcam"``).
        module_class: the LightningModule class.
        tiny: ``tiny(tmp_dir) -> (module, datamodule)``; tiny enough for a CPU forward/backward in < 2 s.
        paper: citation shown in the README table.
    """

    name: str
    module_class: type
    tiny: Callable[[Path], tuple[pl.LightningModule, pl.LightningDataModule]]
    paper: str = ""


METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, module_class: type, tiny: Callable, paper: str = "") -> None:
    if name in METHODS and METHODS[name].module_class is not module_class:
        raise KeyError(f"method {name!r} is already registered by {METHODS[name].module_class.__name__}")
    METHODS[name] = MethodSpec(name, module_class, tiny, paper)


def list_methods() -> list[str]:
    return sorted(METHODS)
