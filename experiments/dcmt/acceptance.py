"""Acceptance runs for DC-MT on the synthetic slice stacks (25 % of the training subjects labeled).

Per seed (only the model seed ``--seed_everything`` changes; the data and split stay fixed):

1. ``dcmt``: DC-MT (``synthetic.yaml``), then ``predict`` with the final weights exports the slice features;
2. ``dcmt_subject``: stage 2 (``../dcmt_subject/synthetic.yaml``) on those features; its ``test/meanpool_*``
   numbers are the mean-pooling baseline on the same subjects;
3. ``labeled_only``: the same network on the labeled slices alone (the ``labeled_only.yaml`` overlay);
4. ``no_attention``: DC-MT without the attention losses (``--model.init_args.attention_losses false``).

Every run is tested on the held-out fold with its final weights (no checkpoint selection on that fold).
Checks printed at the end, on the means over seeds: DC-MT macro AUROC ≥ labeled-only (teacher vs teacher and
student vs student), TIoU@0.3 with attention losses > without, stage-2 subject AUROC ≥ mean pooling. Run it on
a quiet machine (the stage-1 configs carry a 10-minute ``max_time``, which a busy machine hits early)::

    OMP_NUM_THREADS=2 WANDB_MODE=disabled python -m experiments.dcmt.acceptance --seeds 0 1 2 \\
        --out runs/dcmt/acceptance
    python -m experiments.dcmt.acceptance --quick --seeds 0      # a 2-minute plumbing check, not a result
    python -m experiments.dcmt.acceptance --stage2-only --out runs/dcmt/acceptance   # new stage-2 settings only

Extra ``medattn fit`` flags after the known ones are applied to every stage-1 run. Writes
``<out>/acceptance.json`` and ``<out>/acceptance.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import time
from pathlib import Path
from typing import Sequence

from experiments.logging import logger_flags

HERE = Path(__file__).resolve().parent
STAGE1 = {"dcmt": [str(HERE / "synthetic.yaml")], "labeled_only": [str(HERE / "synthetic.yaml"), "-c", str(HERE / "labeled_only.yaml")],
          "no_attention": [str(HERE / "synthetic.yaml"), "--model.init_args.attention_losses", "false"]}
STAGE2 = str(HERE.parent / "dcmt_subject" / "synthetic.yaml")
QUICK = ["--data.init_args.reader.init_args.n_subjects", "30", "--data.init_args.reader.init_args.min_slices", "6",
         "--data.init_args.reader.init_args.max_slices", "10", "--trainer.max_epochs", "2",
         "--model.init_args.consistency_start", "1", "--trainer.check_val_every_n_epoch", "1",
         "--data.init_args.min_per_class", "0"]  # 30 subjects hold 1-3 of a grade per split: plumbing only
KEYS = ("test/auroc", "test/auroc_teacher", "test/balanced_accuracy_teacher", "test/f1_teacher", "test/tiou@0.3",
        "test/tiou@0.3_teacher", "test/mtiou_teacher", "test/meanpool_auroc")


def fit_test(args: Sequence[str], predict_to: Path | None = None) -> dict:
    """``medattn fit <args>``, ``test`` on the final weights, optionally ``predict`` the slice features."""
    import lightning.pytorch as pl

    from callbacks.feature_export import SliceFeatureWriter
    from experiments.cli import MedAttnCLI

    cli = MedAttnCLI(args=["--trainer.enable_progress_bar", "false", *args], run=False)
    trainer, model, data = cli.trainer, cli.model, cli.datamodule
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    out = {"fit_seconds": round(time.perf_counter() - start, 1), "epochs": int(trainer.current_epoch),
           "steps": int(trainer.global_step)}
    out.update({k: float(v) for k, v in trainer.test(model, datamodule=data, verbose=False)[0].items()})
    if predict_to is not None:
        exporter = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                              enable_model_summary=False, callbacks=[SliceFeatureWriter(predict_to)])
        exporter.predict(model, datamodule=data, return_predictions=False)
        out["head_channels"] = int(model.student.num_features)
    return out


def stage2_input_width(features: Path, stage2_extra: Sequence[str]) -> int:
    """The aggregator's ``in_features`` for the stage-2 config's ``data.inputs`` (or its override in
    ``stage2_extra``) on this feature file."""
    import yaml

    from datamodules.subject_features import SubjectFeatureDataModule

    inputs = yaml.safe_load(Path(STAGE2).read_text())["data"]["init_args"].get("inputs", "features")
    if "--data.init_args.inputs" in stage2_extra:
        inputs = stage2_extra[stage2_extra.index("--data.init_args.inputs") + 1]
    return SubjectFeatureDataModule(features, inputs=inputs).num_features


def _run_name(out: Path, method: str, seed: int) -> list[str]:
    """Logger flags: run directories ``<out>/runs/dcmt-acceptance-<method>/<method>-s<seed>-<id>/`` (the group names
    the arm), so that ``medattn compare <out>/runs --by group`` tabulates the arms over seeds."""
    return logger_flags(out / "runs", f"dcmt-acceptance-{method}", f"{method}-s{seed}")


def merge_previous_rows(path: Path, rows: list[dict]) -> list[dict]:
    """Keep the rows of ``path`` (an earlier invocation with the same ``--out``) whose (method, seed) this run did
    not redo, so seeds can run as separate processes, e.g. side by side, and still be summarised together."""
    if not path.is_file():
        return rows
    done = {(r["method"], r["seed"]) for r in rows}
    previous = [r for r in json.loads(path.read_text()).get("rows", []) if (r["method"], r["seed"]) not in done]
    order = [*STAGE1, "dcmt_subject"]
    return sorted(previous + rows, key=lambda r: (r["seed"], order.index(r["method"])))


def _mean(rows: list[dict], method: str, key: str) -> float:
    values = [r[key] for r in rows if r["method"] == method and key in r]
    return sum(values) / len(values) if values else float("nan")


def _stage2(out: Path, seed: int, features: Path, args: argparse.Namespace) -> dict:
    """Stage 2 on the slice features that the seed's DC-MT run exported."""
    print(f"[acceptance] dcmt_subject seed {seed}", flush=True)
    stage2_extra = shlex.split(args.stage2_args)
    width = stage2_input_width(features, stage2_extra)
    argv2 = ["-c", STAGE2, "--seed_everything", str(seed), *_run_name(out, "dcmt_subject", seed),
             "--data.init_args.features_file", str(features),
             "--model.init_args.net.init_args.in_features", str(width), *stage2_extra]
    if args.quick:
        argv2 += ["--trainer.max_epochs", "5", "--trainer.check_val_every_n_epoch", "5",
                  "--data.init_args.labeled_batch_size", "4", "--data.init_args.unlabeled_batch_size", "12"]
    return {"method": "dcmt_subject", "seed": seed, **fit_test(argv2)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/dcmt/acceptance")
    parser.add_argument("--quick", action="store_true", help="tiny data and 2 epochs: checks the plumbing only")
    parser.add_argument("--stage2-args", default="", help="extra flags for the stage-2 runs, one string "
                        "(e.g. '--data.init_args.unlabeled_batch_size 24' with fewer subjects)")
    parser.add_argument("--stage2-only", action="store_true", help="re-run stage 2 only, on the features that an "
                        "earlier run with the same --out exported; the other rows of acceptance.json are kept")
    args, extra = parser.parse_known_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = [a for a in extra if a != "--"] + (QUICK if args.quick else [])
    previous_stage2 = out / "runs" / "dcmt-acceptance-dcmt_subject"
    if args.stage2_only and previous_stage2.is_dir():
        print(f"[acceptance] note: {previous_stage2} holds earlier stage-2 runs; move it away first if "
              "`medattn compare` should tabulate only the new ones (acceptance.json keeps only the new rows)",
              flush=True)
    rows: list[dict] = []
    for seed in args.seeds:
        features = out / f"seed{seed}" / "slice_features.npz"
        for method, config in ({} if args.stage2_only else STAGE1).items():
            print(f"[acceptance] {method} seed {seed}", flush=True)
            argv1 = ["-c", config[0], *config[1:], "--seed_everything", str(seed), *_run_name(out, method, seed), *extra]
            rows.append({"method": method, "seed": seed, **fit_test(argv1, features if method == "dcmt" else None)})
            if method == "dcmt":
                rows.append(_stage2(out, seed, features, args))
        if args.stage2_only:
            if not features.is_file():
                raise SystemExit(f"--stage2-only: {features} not found; run stage 1 for seed {seed} first")
            rows.append(_stage2(out, seed, features, args))
    rows = merge_previous_rows(out / "acceptance.json", rows)
    checks = {
        "dcmt_auroc_teacher >= labeled_only_auroc_teacher":
            _mean(rows, "dcmt", "test/auroc_teacher") >= _mean(rows, "labeled_only", "test/auroc_teacher"),
        "dcmt_auroc_student >= labeled_only_auroc_student":
            _mean(rows, "dcmt", "test/auroc") >= _mean(rows, "labeled_only", "test/auroc"),
        "tiou@0.3_teacher with attention losses > without":
            _mean(rows, "dcmt", "test/tiou@0.3_teacher") > _mean(rows, "no_attention", "test/tiou@0.3_teacher"),
        "subject auroc_teacher >= meanpool auroc":
            _mean(rows, "dcmt_subject", "test/auroc_teacher") >= _mean(rows, "dcmt_subject", "test/meanpool_auroc"),
    }
    lines = ["| method | seed | fit s | epochs | " + " | ".join(KEYS) + " |", "|---" * (4 + len(KEYS)) + "|"]
    for r in rows:
        cells = [f"{r[k]:.3f}" if k in r else "" for k in KEYS]
        lines.append(f"| {r['method']} | {r['seed']} | {r['fit_seconds']} | {r['epochs']} | " + " | ".join(cells) + " |")
    methods = ["dcmt", "labeled_only", "no_attention", "dcmt_subject"]
    for m in methods:
        cells = [f"{_mean(rows, m, k):.3f}" if any(k in r for r in rows if r["method"] == m) else "" for k in KEYS]
        lines.append(f"| **{m} mean** | | | | " + " | ".join(cells) + " |")
    lines += ["", *[f"- {name}: **{'yes' if ok else 'NO'}**" for name, ok in checks.items()]]
    table = "\n".join(lines)
    print(table)
    payload = {"seeds": sorted({r["seed"] for r in rows}), "quick": args.quick, "extra_args": extra, "rows": rows,
               "checks": checks}
    (out / "acceptance.json").write_text(json.dumps(payload, indent=2, default=float))
    (out / "acceptance.md").write_text(table + "\n")
    return payload


if __name__ == "__main__":
    main()
