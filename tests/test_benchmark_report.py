"""Benchmark collection: the README tables rendered from result JSONs (hand-written here), the precision benchmark
on a tiny network, and ``run_all``'s command list."""

from __future__ import annotations

import json

import pytest

from experiments.benchmarks import report, run_all

MACHINE = {"processor": "x86_64", "cpu_count": 2, "torch_threads": 2, "torch": "2.x", "cuda": None,
           "load_average": [1.25, 1.0, 1.0], "time": "2026-01-01 12:00:00"}


def _write(folder, name, payload, md=None):
    (folder / f"{name}.json").write_text(json.dumps({"machine": MACHINE, **payload}))
    if md is not None:
        (folder / f"{name}.md").write_text(md)


def test_report_renders_every_kind_of_result(tmp_path):
    _write(tmp_path, "pcam_step", {"config": {"backbone": "resnet18", "image_size": 128, "batch": 32, "bf16": False},
                                   "lightning_step_ms": {"median": 105.0}, "bare_step_ms": {"median": 100.0},
                                   "overhead_median": 0.05})
    _write(tmp_path, "dataloader", {"images_per_second": {
        "medattn/png/w0": {"median": 30.0}, "plain/png/w0": {"median": 40.0},
        "medattn/jpeg/w1": {"median": 50.0}, "plain/jpeg/w1": {"median": 50.0}}})
    _write(tmp_path, "precision", {"images_per_second": {"fp32": {"median": 10.0, "min": 9.0, "max": 11.0},
                                                         "channels_last+bf16": {"median": 20.0, "min": 18.0, "max": 21.0}},
                                   "speedup_vs_fp32": {"fp32": 1.0, "channels_last+bf16": 2.0},
                                   "warmup_seconds": {"fp32": 0.5, "channels_last+bf16": 0.7}})
    _write(tmp_path, "ga_block", {"results": []}, md="| case | ms |\n|---|---|\n| 2d:32 | 1.0 |\n")
    _write(tmp_path, "other", {"answer": 42, "ratio": 0.123456})
    text = report.render(tmp_path)
    assert "| pcam_step | backbone resnet18, image size 128, batch 32 | 105.0 | 100.0 | +5.0 % |" in text
    assert "| png | 0 | 30.0 | 40.0 | 0.75 |" in text and "| jpeg | 1 | 50.0 | 50.0 | 1.00 |" in text
    assert "| channels_last+bf16 | 20.0 [18.0–21.0] | 2.00× | 0.7 |" in text
    assert "| 2d:32 | 1.0 |" in text  # a benchmark's own table is used as it is
    assert "| answer | 42 |" in text and "| ratio | 0.1235 |" in text
    assert text.count("_Measured on x86_64, 2 CPUs, 2 torch threads, torch 2.x, load 1.2, 2026-01-01 12:00:00._") == 5


def test_report_updates_readme_between_markers(tmp_path):
    _write(tmp_path, "other", {"answer": 42})
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- benchmarks:start -->\nold\n<!-- benchmarks:end -->\nb\n")
    report.main(["--results", str(tmp_path), "--readme", str(readme)])
    text = readme.read_text()
    assert "old" not in text and "| answer | 42 |" in text and text.startswith("a\n") and text.endswith("b\n")
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="markers"):
        report.main(["--results", str(tmp_path), "--readme", str(readme)])


def test_precision_benchmark_measures_every_variant(tmp_path, monkeypatch):
    from experiments.benchmarks import common, precision

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    payload = precision.main(["--backbone", "test_resnet", "--image-size", "32", "--batch", "2", "--steps", "1",
                              "--warmup", "1", "--repeats", "2", "--variants", "fp32", "channels_last", "bf16"])
    assert set(payload["images_per_second"]) == {"fp32", "channels_last", "bf16"}
    assert payload["speedup_vs_fp32"]["fp32"] == 1.0
    assert all(r["median"] > 0 and len(r["values"]) == 2 for r in payload["images_per_second"].values())
    saved = json.loads((tmp_path / "precision.json").read_text())
    assert saved["machine"]["cpu_count"] and "channels_last" in (tmp_path / "precision.md").read_text()


def test_run_all_lists_existing_benchmarks_and_gpu_support():
    todo, notes = run_all.commands(["precision", "dataloader", "nonexistent_step"], "quick", "gpu")
    names = [name for name, _ in todo]
    assert names == ["precision", "dataloader"]
    precision_cmd = dict(todo)["precision"]
    assert precision_cmd[1:3] == ["-m", "experiments.benchmarks.precision"] and precision_cmd[-2:] == ["--accelerator", "gpu"]
    assert any("nonexistent_step" in n and "does not exist" in n for n in notes)
    assert any(n.startswith("dataloader: has no --accelerator") for n in notes)


def test_dataloader_table_shows_the_no_mask_column_when_measured():
    rates = {"medattn/png/w0": {"median": 30.0}, "medattn_nomasks/png/w0": {"median": 45.0},
             "plain/png/w0": {"median": 60.0}}
    table = report.dataloader_table({"images_per_second": rates})
    assert "train_masks=False" in table and "| png | 0 | 30.0 | 45.0 | 60.0 | 0.50 |" in table
