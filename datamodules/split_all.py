"""``split="all"`` (``--data.init_args.split all``: every item of the reader is the test split, for testing a
trained model on another cohort) for the DataModules besides ``CXRDataModule``: one implementation of the
option's checks and texts, in ``CXRDataModule``'s wording (:func:`datamodules.splits.all_images_split`), so the
flag means the same everywhere. Also the ``describe_split`` text that ``medattn test`` prints.
"""

from __future__ import annotations

import os
from pathlib import Path

from datamodules.manifest import DataError

__all__ = ["SPLIT_CHOICES", "check_split_choice", "refuse_split_all_stage", "split_all_note", "describe_evaluated"]

SPLIT_CHOICES = ("patients", "all")


def check_split_choice(owner: str, split: object) -> None:
    """``ValueError`` naming the option for a ``split`` value outside :data:`SPLIT_CHOICES`."""
    if split not in SPLIT_CHOICES:
        raise ValueError(f"{owner}: split must be one of {SPLIT_CHOICES} (--data.init_args.split), got {split!r}")


def refuse_split_all_stage(split: str, stage: str | None, items: str) -> None:
    """``fit``/``validate`` with ``split="all"``: a :class:`DataError` naming the option (``items``: what is
    tested, e.g. ``"volume of SyntheticVolumes"``). Other stages (test, predict, None) pass."""
    if split == "all" and str(stage) in ("fit", "validate"):
        raise DataError(f"stage {stage!r} is not possible with split='all' (--data.init_args.split all): every "
                        f"{items} is the test split, for testing a trained model on this dataset (medattn test "
                        "--ckpt_path <checkpoint> ... --data.init_args.split all); train and validate with "
                        "split='patients' (the default)")


def split_all_note(unit: str, settings: dict[str, object], neutral: dict[str, object],
                   counts: dict[str, int] | None = None, min_per_class: int = 0) -> str:
    """The summary note of ``split="all"``: ``every <unit> (split=all)``, then the splitting arguments that were
    set (``settings[k] != neutral[k]``) and are therefore ignored, then the classes with fewer than
    ``min_per_class`` examples in ``counts`` (not an error for a fixed external set: named instead), in the
    words of :func:`datamodules.splits.all_images_split`."""
    note = f"every {unit} (split=all)"
    ignored = {k: settings[k] for k, value in neutral.items() if settings[k] != value}
    if ignored:
        note += "; " + ", ".join(f"{k}={v}" for k, v in ignored.items()) + " ignored"
    few = {cls: c for cls, c in (counts or {}).items() if c < min_per_class}
    if min_per_class > 0 and few:
        note += (f"; fewer than min_per_class={min_per_class}: " + ", ".join(f"{cls} {c}" for cls, c in few.items())
                 + " (a class without positives or negatives is left out of the AUROC, reported as NaN)")
    return note


def describe_evaluated(reader_name: str, root: object, split: str, how: str, size: str) -> str:
    """The ``describe_split`` text read by ``medattn test`` (``Test data: ...``, summary.json ``test_data``):
    ``<reader> <resolved root>, <split> split: <how>, <size>``, as ``CXRDataModule.describe_split``."""
    where = f" {Path(root).expanduser().resolve()}" if isinstance(root, (str, os.PathLike)) else ""
    return f"{reader_name}{where}, {split} split: {how}, {size}"
