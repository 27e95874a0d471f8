"""What a config may leave out, and where its data lives (used by :class:`experiments.cli.MedAttnCLI`).

Values the data knows are not written in configs: the class count and names, the input channels, ``spatial_dims``,
the per-slice feature size (DC-MT stage 2) and the sliding-window ROI (= ``data.patch_size``) are linked from the
DataModule's properties to the model on instantiation (``DATA_LINKS``; the DataModule reads its reader's index for
them, the same read ``setup`` uses). The links are ``LightningCLI.link_arguments(apply_on="instantiate")`` with
targets inside the nested network (``model.init_args.net.init_args.num_classes``, OXnet's ``...retina.init_args...``):
jsonargparse skips a link whose source property the DataModule lacks or whose target the chosen class lacks, so
one parser serves every method (``_LinkedInstantiator`` keeps such skipped links out of the hyper-parameters). A
config that still sets a linked value is accepted when it equals the data's and refused otherwise, with one
``ConfigLinkError`` naming the argument and the data's value.

Data roots: a config names its data as ``${MEDATTN_DATA}/<dataset>`` (``root: ${MEDATTN_DATA}/covid-cxr-mini``). The
CLI replaces the prefix before anything is built, with the environment variable ``MEDATTN_DATA`` when set and
otherwise ``<repository>/../shared/data`` (the project's layout), so ``medattn fit -c experiments/magsd/covid_cxr.yaml``
works from any directory. A flag (``--data.init_args.reader.init_args.root /data/covid``) overrides as usual.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import _InstantiatorFn


# (DataModule property, model argument under ``model.init_args``): filled on instantiation, from the reader.
DATA_LINKS = (
    ("num_classes", "net.init_args.num_classes"),
    ("num_classes", "net.init_args.retina.init_args.num_classes"),  # OXnet wraps its RetinaNet
    ("in_channels", "net.init_args.in_chans"),  # timm-style networks
    ("in_channels", "net.init_args.retina.init_args.in_chans"),
    ("in_channels", "net.init_args.in_channels"),  # MONAI-style networks
    ("spatial_dims", "net.init_args.spatial_dims"),
    ("num_features", "net.init_args.in_features"),  # DC-MT subject aggregator: per-slice input size
    ("class_names", "class_names"),
    ("roi_size", "roi_size"),  # sliding-window ROI = training patch
)


DATA_VAR = "MEDATTN_DATA"
DATA_PLACEHOLDER = "${MEDATTN_DATA}"


def data_root() -> Path:
    """Where ``${MEDATTN_DATA}`` in a config points: the ``MEDATTN_DATA`` environment variable, else the project's
    layout ``<repository>/../shared/data`` (resolved from this file, never from the working directory)."""
    return Path(os.environ.get(DATA_VAR) or Path(__file__).resolve().parents[2] / "shared" / "data").expanduser()


def expand_data_root(config) -> None:
    """Replace a leading ``${MEDATTN_DATA}`` in every string value of ``config`` (a parsed jsonargparse
    namespace) by :func:`data_root`, so a config finds its data from any working directory."""
    for key, value in list(config.items()):
        if isinstance(value, str) and value.startswith(DATA_PLACEHOLDER):
            config[key] = str(data_root()) + value[len(DATA_PLACEHOLDER):]


class ConfigLinkError(ValueError):
    """A config sets a value that is linked from the data (DATA_LINKS) to something the data contradicts."""


def forced_link_values(config) -> dict[str, Any]:
    """``{model argument: value}`` for every linked argument the config sets itself (YAML or flag), before the
    link overwrites it on instantiation."""
    forced = {}
    for source, target in DATA_LINKS:
        key = f"model.init_args.{target}"
        try:
            value, owner = config[key], config[key.rsplit(".init_args.", 1)[0] + ".class_path"]
        except (KeyError, TypeError):
            continue
        if value is not None and value != _default(owner, key.rsplit(".", 1)[1]):
            forced[target] = (source, value)
    return forced


def _default(class_path: str, name: str) -> Any:
    """The default of argument ``name`` of ``class_path`` (a value equal to it was not set by the config)."""
    import importlib
    import inspect

    module, _, cls = str(class_path).rpartition(".")
    try:
        parameter = inspect.signature(getattr(importlib.import_module(module), cls)).parameters.get(name)
    except (ImportError, AttributeError, ValueError, TypeError):
        return None
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def _same(value: Any, known: Any) -> bool:
    if isinstance(known, (list, tuple)):
        if isinstance(value, int):  # an int ROI means that size along every axis
            return all(k == value for k in known)
        return list(value) == list(known)
    return value == known


def check_forced_links(forced: dict[str, Any], datamodule, checkpoint: str | None = None) -> None:
    """One error for a linked value that a config forces to differ from what the data says (the link would
    otherwise silently replace it). Equal values are accepted, so older configs that repeat them still run.
    ``checkpoint``: the model arguments came from this checkpoint (``test --ckpt_path``), so a difference means the
    model was trained on other classes (or channels) than the data it is asked to evaluate."""
    for target, (source, value) in forced.items():
        known = getattr(datamodule, source, None)
        if known is None:
            continue
        if not _same(value, known) and checkpoint:
            raise ConfigLinkError(
                f"--ckpt_path {checkpoint}: the model was trained with {target.rsplit('.', 1)[-1]}={value!r}, but "
                f"the data to evaluate ({type(datamodule).__name__}) has {source}={known!r}. A model is evaluated "
                "only on data with the same classes in the same order (and the same input channels): set the "
                "reader's classes / label mapping to match (e.g. --data.init_args.reader.init_args.classes).")
        if not _same(value, known):
            raise ConfigLinkError(
                f"--model.init_args.{target}={value!r} contradicts the data: {type(datamodule).__name__}."
                f"{source} is {known!r}. This value is linked from the data; remove it from the config (or change "
                "the data/reader settings).")


def _accepts(section: Any, dotted: str) -> bool:
    """Whether the class a config section names (``{"class_path": ..., "init_args": {...}}``) takes the argument
    ``dotted`` (``net.init_args.num_classes``: its ``net`` argument, whose own class takes ``num_classes``). Read
    from the signatures, not from the dumped config, which leaves link targets out."""
    import importlib
    import inspect

    if not isinstance(section, dict) or not isinstance(section.get("class_path"), str):
        return False
    head, _, rest = dotted.partition(".init_args.")
    module, _, name = section["class_path"].rpartition(".")
    try:
        parameters = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    except (ImportError, AttributeError, ValueError, TypeError):
        return False
    if head not in parameters:
        return False
    return not rest or _accepts((section.get("init_args") or {}).get(head), rest)


class _LinkedInstantiator(_InstantiatorFn):
    """Lightning's instantiator (it records the module's hyper-parameters), given only the links whose target the
    chosen classes have. jsonargparse reports a link it skipped for a missing target as applied, and Lightning would
    then write e.g. ``in_channels`` into the hyper-parameters of a network that takes ``in_chans`` (or fail on
    OXnet's ``retina`` in another network), so a checkpoint would not load."""

    def __call__(self, class_type: type, *args: Any, applied_instantiation_links: dict, **kwargs: Any):
        self.cli._dump_config()
        section = self.cli.config_dump.get(self.key, {})
        kept = {k: v for k, v in applied_instantiation_links.items()
                if not k.startswith(f"{self.key}.init_args.") or _accepts(section, k[len(f"{self.key}.init_args."):])}
        return super().__call__(class_type, *args, applied_instantiation_links=kept, **kwargs)
