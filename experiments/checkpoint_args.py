"""Comparing a command line's model and data arguments with a checkpoint's (``--ckpt_path``): the resume guard of
``experiments/cli.py`` refuses changed arguments, and an evaluation on other data names its preprocessing changes."""

from __future__ import annotations

from typing import Any

__all__ = ["changed_arguments", "preprocessing_changes"]


def _flat(prefix: str, value: Any) -> dict[str, Any]:
    """A dumped config section as ``{flag: value}`` (``--model.init_args.net.init_args.backbone``), in the layout of
    the checkpoint's hyper-parameters (``_class_path`` plus the init args)."""
    if isinstance(value, dict) and ("class_path" in value or "_class_path" in value):
        args = {**(value.get("init_args") or {}), **(value.get("dict_kwargs") or {}),
                **{k: v for k, v in value.items() if k not in ("class_path", "_class_path", "init_args", "dict_kwargs",
                                                                 "_instantiator")}}
        out = {prefix: value.get("class_path", value.get("_class_path"))}
        for key, item in args.items():
            out.update(_flat(f"{prefix}.init_args.{key}", item))
        return out
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(f"{prefix}.{key}", item).items()}
    return {prefix: list(value) if isinstance(value, tuple) else value}


def changed_arguments(config: dict | None, saved: dict | None, prefix: str) -> list[str]:
    """``flag: here vs checkpoint`` for every argument given in ``config`` (a dumped ``model``/``data`` section) that
    differs from the checkpoint's hyper-parameters or its run's ``config.yaml`` section (``saved``). Arguments missing on either side (not saved by the
    module, added since) and arguments left at ``None`` here (the module resolved a default) are not compared."""
    if not config or not saved:
        return []
    here, there = _flat(prefix, config), _flat(prefix, saved)
    return [f"{key}: {here[key]!r} here, {there[key]!r} in the checkpoint" for key in here
            if key in there and here[key] is not None and here[key] != there[key]]


# data arguments an evaluation on other data is expected to change: where the data is, which part is evaluated, how
# it is batched and split; any other difference changes what the network sees (size, intensity, preprocessing)
_EVALUATION_DATA_KEYS = ("reader", "root", "split", "batch_size", "num_workers", "fraction", "fold", "seed",
                         "min_per_class", "use_official_test_split", "hold_out_boxed_for_test", "subjects",
                         "features_file", "val_", "test_", "holdout")


def preprocessing_changes(config: dict | None, saved: dict | None) -> list[str]:
    """The data arguments of an evaluation (``test``/``validate``/``predict`` with a checkpoint) that differ from the
    training run's other than those that choose and batch the data (:data:`_EVALUATION_DATA_KEYS`): e.g. a
    different ``image_size`` or normalisation, under which the network sees inputs unlike its training inputs."""
    return [c for c in changed_arguments(config, saved, "--data")
            if not any(k in c.split(":")[0].rsplit(".", 1)[-1] or f".{k}" in c.split(":")[0]
                       for k in _EVALUATION_DATA_KEYS)]
