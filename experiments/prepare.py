"""``medattn prepare``: decode and letterbox a dataset once, for fast loading (``datamodules/prepared.py``).

    medattn prepare -c experiments/pcam/synthetic.yaml --out prepared/pcam-synthetic [--num_workers 4]
    medattn fit -c experiments/pcam/synthetic.yaml --data.init_args.prepared prepared/pcam-synthetic \\
        --data.init_args.augment_on batch

Any experiment or data config works (``-c`` may be repeated; only its ``data`` section is used, ``trainer`` and
``model`` are ignored), and ``--data...`` flags override it as in ``medattn fit``. Every image of the reader's
manifest is prepared (all splits), in manifest order, at the config's ``image_size`` (and CLAHE setting). The
command is resumable: run it again after an interruption and it continues where the workers stopped (with the
interrupted run's worker count); on a finished folder it only verifies and says so. A folder prepared with other
settings or another manifest is refused, naming the difference, unless ``--overwrite``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace
from lightning.pytorch import LightningDataModule

from datamodules.cxr import CXRDataModule
from datamodules.manifest import DataError
from datamodules.prepared import CHUNK_BYTES, prepare, stored_settings
from experiments import cli_support
from experiments.config_links import expand_data_root

# keys of a full experiment config that preparing the data does not use
_IGNORED = ("trainer", "model", "seed_everything", "ckpt_path", "test_after_fit", "optimizer", "lr_scheduler")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="medattn prepare", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="an experiment or data config (YAML)")
    parser.add_subclass_arguments(LightningDataModule, "data", required=True)
    parser.add_argument("--out", type=str, required=True, help="the folder to write (new, empty or resumable)")
    parser.add_argument("--num_workers", type=int, default=max(1, min(8, (os.cpu_count() or 2) - 1)),
                        help="decoding processes (default: CPU cores - 1, at most 8)")
    parser.add_argument("--chunk_bytes", type=str, default=CHUNK_BYTES,
                        help="LitData chunk size (the unit of a resume, and of a download from object storage)")
    parser.add_argument("--overwrite", type=bool, default=False,
                        help="replace a folder prepared with other settings or another manifest")
    for key in _IGNORED:
        parser.add_argument(f"--{key}", type=Any, default=None, help="ignored (from a full experiment config)")
    return parser


def _reader_args(config: Namespace) -> dict | None:
    """The reader's init arguments as the config resolved them (defaults filled in), for the prepared record."""
    args = config.data.init_args.get("reader", {}).get("init_args") if isinstance(
        config.data.init_args.get("reader"), Namespace) else None
    return args.as_dict() if isinstance(args, Namespace) else args


def run(argv: list[str]) -> dict:
    """Parse ``argv`` (after ``prepare``), prepare the data and return the prepared folder's record."""
    parser = build_parser()
    config = parser.parse_args(argv)
    expand_data_root(config)
    for key in _IGNORED:  # never built (a logger in `trainer` would open a run directory)
        config[key] = None
    datamodule = parser.instantiate_classes(config).data
    if not isinstance(datamodule, CXRDataModule):
        raise DataError(f"medattn prepare: data must be a datamodules.cxr.CXRDataModule (2D images), got "
                        f"{type(datamodule).__name__}")
    hp = datamodule.hparams
    datamodule.prepare_data()
    manifest = datamodule._ensure_manifest()  # the reader's manifest as training reads it (skip_corrupt applied)
    meta = prepare(manifest, config.out, stored_settings(hp.image_size, hp.augment_kwargs), datamodule.reader,
                   reader_args=_reader_args(config), num_workers=config.num_workers,
                   overwrite=config.overwrite, chunk_bytes=config.chunk_bytes)
    print(f"[medattn] train with --data.init_args.prepared {config.out}")
    return meta


def main(argv: list[str] | None = None) -> None:
    """``medattn prepare``: a data or config error is one line naming what to fix (exit status 2)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        run(argv)
    except Exception as err:  # noqa: BLE001 - reported in one line when it is a user's error, re-raised otherwise
        found = cli_support.user_error(err, (DataError, FileNotFoundError))
        if found is None or cli_support.debug():
            raise
        cli_support.report_and_exit(found)


if __name__ == "__main__":
    main()
