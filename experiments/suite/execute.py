"""Running the suite's plan: each run is ``fit-test`` in a fresh process, one at a time."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path

from experiments.suite.plan import FEATURES, ROOT, Run, checkpoint_of, finished


def fit_test(argv: list[str]) -> None:
    """Child process: ``fit``, then ``test`` (the best checkpoint, or the final weights with ``--test-weights
    final`` or when nothing was checkpointed), then log times, split sizes and the metrics recomputed from the test
    predictions (:mod:`experiments.suite.scoring`); ``--export-features FILE`` then writes the tested weights' slice
    features (DC-MT stage 1 for stage 2). Fit and test times come from Lightning's ``Timer`` callback (the one
    ``trainer.max_time`` installs, else one added here): ``time/fit_s`` is the training loop with its validation,
    from ``on_train_start`` to ``on_train_end`` (data setup and the sanity check are not in it)."""
    from lightning.pytorch.callbacks import Timer

    from experiments.cli import MedAttnCLI
    from experiments.suite.scoring import scored_predictions

    parser = argparse.ArgumentParser(prog="python -m experiments.suite fit-test", add_help=False)
    parser.add_argument("--test-weights", choices=["best", "final"], default="best")
    parser.add_argument("--export-features", type=Path)
    opts, args = parser.parse_known_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cli = MedAttnCLI(args=args, run=False)
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    if timer is None:
        timer = Timer()
        trainer.callbacks.append(timer)
    trainer.fit(model, datamodule=data)
    callback = trainer.checkpoint_callback
    best = opts.test_weights == "best" and callback is not None and getattr(callback, "best_model_path", "")
    tested_at = time.time()
    results = trainer.test(model, datamodule=data, ckpt_path="best" if best else None)
    values = {"time/fit_s": timer.time_elapsed("train"), "time/test_s": timer.time_elapsed("test"),
              "time/epochs": float(trainer.current_epoch), "time/steps": float(trainer.global_step)}
    values.update({f"data/n_{split}": float(len(index)) for split, index in (getattr(data, "splits", None) or {}).items()})
    logged = {k: float(v) for k, v in (results[0] if results else {}).items()}
    run_dir = Path(trainer.log_dir or trainer.default_root_dir)
    values.update(scored_predictions(run_dir / "test_predictions.csv", logged, tested_at))
    for logger in trainer.loggers:
        logger.log_metrics(values, step=trainer.global_step)
        logger.save()
    if opts.export_features:
        export_features(model, data, opts.export_features)
    print("[suite] " + json.dumps({k: round(v, 4) for k, v in values.items()}))


def export_features(model, data, path: Path) -> None:
    """``predict`` with the model's current (tested) weights, writing the slice features stage 2 reads."""
    import lightning.pytorch as pl

    from callbacks.feature_export import SliceFeatureWriter

    exporter = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                          enable_model_summary=False, callbacks=[SliceFeatureWriter(path)])
    exporter.predict(model, datamodule=data, return_predictions=False)


def dependency_flags(run: Run, done: dict, dry_run: bool) -> list[str] | None:
    """Flags that start ``run`` from its dependency's run of the same seed/labels/fold (a checkpoint or exported
    features); None when that output is missing (the run cannot start)."""
    arm = run.arm
    source = done.get((arm.needs, *run.key))
    placeholder = (source or Path(f"<{arm.needs} run dir>"))
    if arm.init_from:
        ckpt = checkpoint_of(source) if source else None
        if ckpt is None and not dry_run:
            return None
        return [arm.init_flag, str(ckpt or placeholder / "checkpoints" / "best.ckpt")]
    features = placeholder / FEATURES
    if not features.is_file() and not dry_run:
        return None
    return ["--data.init_args.features_file", str(features)]


def execute(runs: list[Run], budget: list[str], extra: list[str], tag: str, log_dir: Path, dry_run: bool,
            test: str = "best", stage1_budget: list[str] | None = None,
            arm_flags: dict[str, list[str]] | None = None) -> list[str]:
    """Run each plan entry in a fresh process, sequentially; return the failures. ``stage1_budget`` replaces
    ``budget`` for the runs of ``role: stage1`` arms; ``arm_flags`` adds flags to the runs of one arm."""
    failures, done_dirs, started, executed = [], {}, time.perf_counter(), 0
    env = {k: v for k, v in os.environ.items() if k != "MEDATTN_RUN_DIR"}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])), MEDATTN_RUN_ID=tag,
               HF_HUB_OFFLINE=env.get("HF_HUB_OFFLINE", "1"), WANDB_SILENT="true")
    for i, run in enumerate(runs, 1):
        flags = [*run.flags, *(arm_flags or {}).get(run.arm.name, [])]
        if run.arm.needs:
            needed = dependency_flags(run, done_dirs, dry_run)
            if needed is None:
                failures.append(f"{run.name}: no {run.arm.needs} output to start from - skipped")
                print(f"[suite] {i}/{len(runs)} {run.name}: skipped (no {run.arm.needs} output)")
                continue
            flags += needed
        run_budget = stage1_budget if stage1_budget is not None and run.arm.role == "stage1" else budget
        cmd = Run(**{**run.__dict__, "flags": flags}).command(run_budget, extra, test)
        printable = shlex.join(["python", *cmd[1:]])
        print(f"[suite] {i}/{len(runs)} {run.name}: {printable}", flush=True)
        done_dirs[(run.arm.name, *run.key)] = run.run_dir
        if dry_run:
            continue
        if finished(run.run_dir):
            print(f"[suite]   already done: {run.run_dir}")
            continue
        if run.run_dir.exists():  # an interrupted attempt: keep it aside (compare skips dot folders)
            aside = run.run_dir.parent.parent / ".incomplete" / f"{run.run_dir.name}-{int(time.time())}"
            aside.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(run.run_dir), aside)
        log_dir.mkdir(parents=True, exist_ok=True)
        log = log_dir / f"{run.name}.log"
        start = time.perf_counter()
        with log.open("w") as handle:
            code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT).returncode
        took = time.perf_counter() - start
        executed += 1
        elapsed = time.perf_counter() - started
        status = "ok" if code == 0 and finished(run.run_dir) else f"FAILED (exit {code}; log {log})"
        print(f"[suite]   {status} in {took:.0f} s -> {run.run_dir}; {elapsed / 60:.1f} min so far, projected "
              f"{(elapsed + elapsed / executed * (len(runs) - i)) / 60:.0f} min in all", flush=True)
        if status != "ok":
            failures.append(f"{run.name}: {status}")
    return failures
