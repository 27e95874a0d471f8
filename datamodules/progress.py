"""One progress bar for long preparation steps (synthetic data generation, the ``skip_corrupt`` scan).

The bar is drawn only when the stream is an interactive terminal: under pytest, CI, SLURM or a
redirected log (stderr not a TTY) it is disabled, so logs get no carriage-return noise. Every call site
goes through :func:`progress` so that policy lives in one place.
"""
from __future__ import annotations

import sys
from typing import IO, Iterable, Iterator, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T], total: int | None = None, desc: str | None = None,
             file: IO[str] | None = None) -> Iterator[T]:
    """Yield the items of ``iterable`` unchanged, with a tqdm bar on ``file`` (default stderr) if it is a TTY."""
    stream = sys.stderr if file is None else file
    isatty = getattr(stream, "isatty", None)
    enabled = bool(isatty and isatty())
    # leave=False: the bar disappears when done, the step's own log line (if any) stays readable.
    return iter(tqdm(iterable, total=total, desc=desc, file=stream, disable=not enabled, leave=False,
                     dynamic_ncols=True))
