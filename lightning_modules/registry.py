"""One registry of every method, so contract tests can be parameterised over all of them (as timm does
over ``list_models()``).

Each method file registers itself with :func:`register_method` (name, class, paper). The factory that builds its
*tiny* configuration (tiny backbone, tiny images) of the module and DataModule for tests lives in
:mod:`lightning_modules.tiny`, the one home of test fixtures, and is looked up there by name when called.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import lightning.pytorch as pl


@dataclass(frozen=True)
class MethodSpec:
    """A registered method.

    Attributes:
        name: short name used in configs, W&B groups and tests (``"pcam"``).
        module_class: the LightningModule class.
        tiny: ``tiny(tmp_dir) -> (module, datamodule)``; tiny enough for a CPU forward/backward in < 2 s
            (by default the factory of the same name in :mod:`lightning_modules.tiny`).
        paper: citation shown in the README table.
    """

    name: str
    module_class: type
    tiny: Callable[[Path], tuple[pl.LightningModule, pl.LightningDataModule]]
    paper: str = ""


METHODS: dict[str, MethodSpec] = {}


def tiny_fixture(name: str, tmp_dir: Path) -> tuple[pl.LightningModule, pl.LightningDataModule]:
    """Build method ``name``'s tiny (module, datamodule) with :data:`lightning_modules.tiny.FACTORIES` (imported on
    first use, so the method files never import test fixtures)."""
    from lightning_modules.tiny import FACTORIES

    if name not in FACTORIES:
        raise KeyError(f"method {name!r} has no tiny factory: add one to FACTORIES in lightning_modules/tiny.py "
                       f"(it has {sorted(FACTORIES)})")
    return FACTORIES[name](Path(tmp_dir))


def register_method(name: str, module_class: type, tiny: Callable | None = None, paper: str = "") -> None:
    """Register a method. ``tiny``: its tiny factory; default: ``lightning_modules.tiny.FACTORIES[name]``."""
    if tiny is None:
        tiny = partial(tiny_fixture, name)  # a partial of a module-level function pickles (ddp_spawn)
    if name in METHODS and METHODS[name].module_class is not module_class:
        raise KeyError(f"method {name!r} is already registered by {METHODS[name].module_class.__name__}")
    METHODS[name] = MethodSpec(name, module_class, tiny, paper)


def list_methods() -> list[str]:
    return sorted(METHODS)
