"""Benchmarks declare their own rounds and named configurations, and ``run_all`` runs them as declared: the DC-MT step
benchmark's 11 rounds (``run_all`` used to leave it at 5, which measured +6.5 % instead of +2.6 %), ``--paper``
(the paper's DC-MT network), ``--resnet50-512`` and the loader-workers estimate built on it."""

from __future__ import annotations

import json
import math

import pytest

from experiments.benchmarks import dcmt_step, precision, run_all


def test_dcmt_step_declares_11_rounds_and_run_all_keeps_them():
    args, _ = dcmt_step.parse_args([])
    assert args.repeats == dcmt_step.REPEATS == 11
    (name, cmd), = run_all.commands(["dcmt_step"], "full", "cpu")[0]
    assert cmd[1:] == ["-m", "experiments.benchmarks.dcmt_step"]  # nothing overrides the declared defaults
    assert dcmt_step.parse_args(cmd[3:])[0].repeats == 11


def test_dcmt_paper_configuration_and_flags_given_with_it_win():
    args, _ = dcmt_step.parse_args(["--paper"])
    assert (args.backbone, args.output_stride, args.image_size, args.labeled + args.unlabeled) == \
        ("seresnext50_32x4d", 16, 256, 4)
    assert args.bf16 and args.channels_last and args.name == "dcmt_step_paper"
    assert dcmt_step.parse_args(["--paper", "--repeats", "2"])[0].repeats == 2
    assert dcmt_step.parse_args([])[0].backbone == "test_resnet"  # the defaults are untouched without --paper


def test_opt_in_configurations_run_only_when_named():
    default = [name for name, _ in run_all.commands(list(run_all.BENCHMARKS), "full", "cpu")[0]]
    assert "dcmt_step_paper" not in default and "resnet50_512" not in default
    todo, notes = run_all.commands(["dcmt_step_paper", "resnet50_512"], "full", "cpu")
    assert not notes
    assert dict(todo)["dcmt_step_paper"][2:] == ["experiments.benchmarks.dcmt_step", "--paper"]
    assert dict(todo)["resnet50_512"][2:] == ["experiments.benchmarks.precision", "--resnet50-512"]
    assert precision.parse_args(["--resnet50-512"]).image_size == 512


def test_workers_needed_is_the_ceiling_of_the_rate_ratio():
    assert precision.workers_needed(470.0, 47.0) == 10
    assert precision.workers_needed(470.1, 47.0) == 11


def test_consumption_scales_the_published_gpu_rate_and_reads_the_loader(tmp_path):
    loader = tmp_path / "dataloader.json"
    loader.write_text(json.dumps({"images_per_second": {
        "medattn/png/w0": {"median": 30.0}, "medattn/png/w1": {"median": 24.0}, "medattn/png/w2": {"median": 50.0},
        "plain/png/w2": {"median": 150.0}, "medattn/jpeg/w2": {"median": 60.0}}}))
    out = precision.consumption({"fp32": 1.0, "channels_last+bf16": 2.0}, 512, loader)
    gpu = 2470.0 * (224 / 512) ** 2  # 472.7 img/s: the published 224² rate over the pixel ratio
    assert out["gpu_published_not_measured"]["scaled_images_per_second"] == pytest.approx(gpu)
    assert out["loader"]["workers"] == 2 and out["loader"]["per_worker_images_per_second"] == 25.0
    assert out["workers_per_gpu"] == math.ceil(gpu / 25.0) == 19
    assert out["workers_per_cpu_run"] == 1
    assert "workers_per_gpu" not in precision.consumption({"fp32": 1.0}, 512, tmp_path / "absent.json")
