"""Callbacks that *are* part of a method, added by the LightningModule itself (``configure_callbacks``).

A mean teacher is only a mean teacher if :class:`callbacks.ema_teacher.EMATeacher` updates it, and OXnet's global
prototype alignment only works if :class:`callbacks.prototype_momentum.PrototypeMomentum` updates the prototypes.
A module whose method needs such a callback therefore returns it from ``configure_callbacks``, built from its own
hyper-parameters, so a plain ``Trainer()`` (Python API, or ``--trainer.callbacks`` overridden) runs the method and
not a silently different one.

Duplicates in ``trainer.callbacks`` (e.g. an older config that still lists ``EMATeacher``). What Lightning 2.6 does
on its own (``_CallbackConnector._attach_model_callbacks``): a trainer callback of *exactly* the same class is
removed and only an info line is printed, so a listed ``EMATeacher(decay=0.9)`` would be replaced by the module's
``decay=0.99`` without a word; a trainer callback of a *subclass* is kept, so the update would run twice. Here:

* same class and same settings (``state_key``): one instance is kept (the module's) and a note says so;
* different settings, or a subclass: ``ValueError`` naming the listed callback and the module's hyper-parameter.
"""

from __future__ import annotations

from typing import Sequence

import lightning.pytorch as pl

__all__ = ["module_callbacks"]


def module_callbacks(module: pl.LightningModule, build: dict[str, callable]) -> list[pl.Callback]:
    """The module's own callbacks, checked against ``trainer.callbacks`` (see the module doc).

    Args:
        module: the LightningModule (its ``configure_callbacks`` calls this).
        build: ``{hyper-parameter name(s) for the error message: zero-argument factory}``; each factory is called
            once per module, so a later stage on the same trainer recognises the instances it attached earlier.
    """
    cached: list[pl.Callback] | None = module.__dict__.get("_medattn_method_callbacks")
    if cached is None:
        cached = [factory() for factory in build.values()]
        module.__dict__["_medattn_method_callbacks"] = cached
    trainer = module._trainer
    listed: Sequence[pl.Callback] = trainer.callbacks if trainer is not None else ()
    name = type(module).__name__
    for own, param in zip(cached, build):
        for other in listed:
            if other is own or not isinstance(other, type(own)):
                continue
            if type(other) is type(own) and other.state_key == own.state_key:
                print(f"[medattn] {name} adds {type(own).__name__} itself ({own.state_key}); the identical entry in "
                      "trainer.callbacks is dropped so that the update runs once")
                continue
            raise ValueError(
                f"trainer.callbacks lists {other.state_key}, but {name} adds its own {own.state_key} from its "
                f"hyper-parameters ({param}). Lightning would drop the listed one silently (same class) or run both "
                f"(a subclass). Remove it from trainer.callbacks and set model.init_args.{param.split(',')[0]} instead.")
    # Instances already attached (``fit`` then ``test`` on one trainer) are not returned again: Lightning would
    # otherwise print that they "override" themselves.
    return [own for own in cached if not any(own is other for other in listed)]
