"""Test finished runs again with today's evaluation code, without retraining.

    python -m experiments.retest runs/acc/pcamgap --out runs/acc/pcamgap-retest
    medattn compare runs/acc/pcamgap-retest --by name ...

When an evaluation rule changes (a metric's definition, a new metric), the trained weights are still valid: only the
test has to run again. For every run directory under the given folders that holds ``config.yaml`` and
``checkpoints/best.ckpt`` (the checkpoint its ``fit`` selected on the validation split), this runs ``test`` with the
run's own resolved config (same data, split and seed) in a fresh process, one at a time, and logs into
``<out>/<same group>/<same name>-<run id>/`` with the same tags, so ``medattn compare`` reads the new test metrics
exactly as it read the old ones. The originals are not touched; the new run directories record where their
weights came from (``retest_of.txt``). A run without ``best.ckpt`` is skipped with a note (never its ``last.ckpt``:
that would change the selection rule silently).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def runs_under(folders: list[Path]) -> list[Path]:
    """Run directories (``config.yaml`` beside ``checkpoints/``) under ``folders``, hidden folders skipped."""
    found = []
    for folder in folders:
        for config in sorted(folder.rglob("config.yaml")):
            if any(part.startswith(".") for part in config.relative_to(folder).parts):
                continue
            if (config.parent / "checkpoints").is_dir():
                found.append(config.parent)
    return found


def run_id_of(run_dir: Path) -> str:
    """The run id of ``<name>-<run id>`` (the logger's directory name), from the run's own logger name."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    name = str((((config.get("trainer") or {}).get("logger") or {}).get("init_args") or {}).get("name") or "")
    if not name or not run_dir.name.startswith(name + "-"):
        raise ValueError(f"{run_dir}: the folder name does not start with the run's logger name {name!r} + '-'; "
                         "cannot tell its run id")
    return run_dir.name[len(name) + 1:]


def retest_command(run_dir: Path, out: Path) -> list[str]:
    """``medattn test`` of ``run_dir``'s best checkpoint with its own config, logged under ``out``."""
    return [sys.executable, "-m", "experiments.retest", "test-one", str(run_dir),
            "--trainer.logger.init_args.save_dir", str(out)]


def test_one(run_dir: Path, overrides: list[str]) -> None:
    """Child process: build the run's config, load ``best.ckpt`` and test."""
    import tempfile

    from experiments.cli import MedAttnCLI

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    # keep the sections that build trainer, model and data; the fit subcommand's own arguments (ckpt_path,
    # weights_only, test_after_fit) do not apply: the checkpoint tested is best.ckpt
    config = {k: v for k, v in config.items() if k in ("seed_everything", "trainer", "model", "data", "optimizer",
                                                       "lr_scheduler")}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        yaml.safe_dump(config, handle)
    try:
        cli = MedAttnCLI(args=["--config", handle.name, *overrides], run=False)
    finally:
        os.unlink(handle.name)
    ckpt = run_dir / "checkpoints" / "best.ckpt"
    cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=str(ckpt))
    log_dir = Path(cli.trainer.loggers[0].log_dir) if cli.trainer.loggers else None
    if log_dir is not None and cli.trainer.is_global_zero:
        (log_dir / "retest_of.txt").write_text(f"{ckpt.resolve()}\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["test-one"]:
        test_one(Path(argv[1]), argv[2:])
        return 0
    parser = argparse.ArgumentParser(prog="python -m experiments.retest", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="folders holding finished run directories")
    parser.add_argument("--out", type=Path, required=True, help="where the retested runs are logged")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    if any(out == f.resolve() or out.is_relative_to(f.resolve()) for f in args.folders):
        parser.error(f"--out {args.out} lies inside a folder being retested; choose a separate folder")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "WANDB_SILENT": "true"}
    failures = []
    runs = runs_under([f.resolve() for f in args.folders])
    for i, run_dir in enumerate(runs, 1):
        if not (run_dir / "checkpoints" / "best.ckpt").is_file():
            print(f"[retest] {i}/{len(runs)} {run_dir}: no checkpoints/best.ckpt - skipped")
            continue
        run_id = run_id_of(run_dir)  # a folder we cannot name again is an error before it runs (also in a dry run)
        cmd = retest_command(run_dir, out)
        print(f"[retest] {i}/{len(runs)} {run_dir}", flush=True)
        if args.dry_run:
            continue
        # the same run id as the original, so the retest of run <name>-<id> is <out>/<group>/<name>-<id>
        env["MEDATTN_RUN_ID"] = run_id
        if subprocess.run(cmd, env=env).returncode != 0:  # the caller's folder: relative paths in configs hold
            failures.append(str(run_dir))
    for failure in failures:
        print(f"[retest] FAILED: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
