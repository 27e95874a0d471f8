"""What ``medattn`` prints: one-line errors, the headline test table, and ``null`` on the command line.

* A data, weights, checkpoint or config error is printed as ONE line, ``medattn: error: <Type>: <message>``, and the
  run exits with status 2 (the argparse convention for usage/config errors). The message is the original
  exception's, found in the exception chain (jsonargparse wraps an error raised while it instantiates a class in
  "Does not validate against any of the Union subtypes"). ``MEDATTN_DEBUG=1`` shows the full traceback instead.
* ``trainer.test``/``trainer.validate`` print a compact table of the headline metrics; per-class values
  (``<stage>/<metric>/<class>``, ``<stage>/<metric>_<class>``, ``..._per_class...``) go to ``metrics.csv`` and W&B
  only (88 rows for PCAM on NIH would bury the headline).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

DEBUG_ENV = "MEDATTN_DEBUG"
USAGE_EXIT = 2
MISSING = ("file not found", "no file matches", "does not exist", "No such file")


def debug() -> bool:
    return os.environ.get(DEBUG_ENV, "0").lower() in ("1", "true", "yes", "on")


def _chain(err: BaseException) -> list[BaseException]:
    out, seen = [], set()
    while err is not None and id(err) not in seen:
        out.append(err)
        seen.add(id(err))
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    return out


def _raised_in_jsonargparse(err: BaseException) -> bool:
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return f"{os.sep}jsonargparse{os.sep}" in tb.tb_frame.f_code.co_filename


def user_error(err: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    """The exception to report for ``err``: the first in its chain of one of ``kinds`` (data, weights, checkpoint,
    resume errors); else, when jsonargparse wrapped an error raised while instantiating a class (a network or
    DataModule constructor refusing its arguments), that original error; else None (a bug: keep the traceback)."""
    chain = _chain(err)
    for item in chain:
        if isinstance(item, kinds):
            return item
    if len(chain) > 1 and _raised_in_jsonargparse(chain[0]):
        for item in chain[1:]:
            if not _raised_in_jsonargparse(item):
                return item
    return None


def one_line(err: BaseException) -> str:
    """``medattn: error: <Type>: <message>`` with the message's lines joined (a list of arguments stays readable)."""
    message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    if isinstance(err, KeyError) and len(err.args) == 1:
        message = str(err.args[0])
    if any(words in message for words in MISSING) and "--" not in message:  # say where the path comes from
        message += ("; fix the path in the config or on the command line (a data root is the reader's root, e.g. "
                    "--data.init_args.reader.init_args.root <dir>)")
    return f"medattn: error: {type(err).__name__}: {message} (set {DEBUG_ENV}=1 for the traceback)"


def report_and_exit(err: BaseException) -> None:
    print(one_line(err), file=sys.stderr, flush=True)
    sys.exit(USAGE_EXIT)


# --- `--a.init_args.b.init_args.c null` -----------------------------------------------------------------------
def null_flags(argv: Sequence[str] | None) -> list[str]:
    """The ``--key`` flags given the value ``null`` on the command line (``--key null`` or ``--key=null``)."""
    out, argv = [], [str(a) for a in (argv or [])]
    for i, arg in enumerate(argv):
        if not arg.startswith("--"):
            continue
        key, eq, value = arg.partition("=")
        if eq and value == "null":
            out.append(key[2:])
        elif not eq and i + 1 < len(argv) and argv[i + 1] == "null":
            out.append(key[2:])
    return out


def rewrite_nulls(argv: Sequence[str]) -> list[str]:
    """``--a.init_args.b.init_args.c null`` given as ``--a.init_args.b '{"init_args": {"c": null}}'``, which
    jsonargparse merges into ``b``'s arguments with a real None (so ``--print_config`` shows ``null`` too). Only
    for two class levels: deeper keys go through the same string formatting again; :func:`restore_nulls` fixes
    those after parsing."""
    out, argv, i = [], [str(a) for a in argv], 0
    while i < len(argv):
        arg = argv[i]
        key, eq, value = arg.partition("=")
        given = value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
        if arg.startswith("--") and given == "null" and key.count(".init_args.") == 2:
            parent, _, name = key.rpartition(".init_args.")
            out += [parent, json.dumps({"init_args": {name: None}})]
            i += 1 if eq else 2
            continue
        out.append(arg)
        i += 1
    return out


def restore_nulls(config, argv: Sequence[str] | None, subcommand: str | None) -> list[str]:
    """Set back to None every ``--key null`` that jsonargparse turned into the string ``'None'``.

    jsonargparse (4.x) passes an argument two class levels down (``--model.init_args.net.init_args.weights_file``)
    to the inner parser as ``--weights_file=None`` (``str(None)``), so a ``str | None`` argument received the
    string ``'None'`` and, for a weights file, failed with "weights_file None does not exist". Returns the keys fixed.
    """
    fixed = []
    section = config.get(subcommand) if subcommand else config
    if section is None:
        return fixed
    for key in null_flags(argv):
        try:
            value = section[key]
        except (KeyError, TypeError):
            continue
        if value == "None":
            section[key] = None
            fixed.append(key)
    return fixed


# --- the end-of-test table -----------------------------------------------------------------------------------
def is_per_class(key: str, class_names: Iterable[str]) -> bool:
    """``<stage>/<metric>/<class>``, ``<stage>/<metric>_<class>`` or any key with ``_per_class`` in it."""
    if "_per_class" in key:
        return True
    names = {str(n) for n in class_names or ()}
    parts = key.split("/")
    if any(part in names for part in parts[1:]):
        return True
    return any(parts[-1].endswith(f"_{name}") for name in names)


def headline_table(results: Sequence[Mapping[str, Any]], class_names: Iterable[str], title: str = "Test") -> str:
    """A compact table of the headline metrics of ``trainer.test``/``validate`` results (one dict per dataloader);
    the number of per-class values left out (they are in metrics.csv and W&B) is written underneath."""
    class_names = list(class_names or ())
    rows, hidden = {}, 0
    for d, metrics in enumerate(results):
        for key, value in sorted(metrics.items()):
            if is_per_class(key, class_names):
                hidden += 1
                continue
            rows.setdefault(key, [""] * len(results))[d] = f"{float(value):.4f}"
    if not rows and not hidden:
        return ""
    header = [f"{title} metric"] + [f"DataLoader {d}" for d in range(len(results))]
    width = [max([len(header[0])] + [len(k) for k in rows])] + [max(len(header[c]), 8) for c in range(1, len(header))]
    line = "-" * (sum(width) + 3 * (len(width) - 1))
    fmt = lambda cells: " | ".join(str(c).ljust(w) for c, w in zip(cells, width))  # noqa: E731
    out = [line, fmt(header), line] + [fmt([k, *v]) for k, v in rows.items()] + [line]
    if hidden:
        out.append(f"({hidden} per-class values not shown: see metrics.csv in the run directory and W&B)")
    return "\n".join(out)
