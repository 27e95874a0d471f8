"""The training-step benchmark harness (``experiments.benchmarks.common``): step medians and round alternation on
hand-made stamps, the batch placement, ``run_all`` passing ``--accelerator`` to the step benchmarks, and tiny
end-to-end runs of the four step benchmarks on the CPU."""

from __future__ import annotations

import json

import pytest
import torch

from experiments.benchmarks import common, run_all

STEP_BENCHMARKS = ("pcam_step", "dcmt_step", "magsd_step", "oxnet_step")


def test_step_medians_drop_warmup_and_take_interval_medians():
    start = (0.0, 9.0)
    stamps = [(1.0, 10.0), (3.0, 11.0), (4.0, 13.0), (8.0, 14.0)]
    # intervals: wall 1, 2, 1, 4 and CPU 1, 1, 2, 1; warm-up 1 leaves wall 2, 1, 4 and CPU 1, 2, 1
    assert common.step_medians(stamps, start, warmup=1) == (2.0, 1.0)
    assert common.step_medians(stamps, start, warmup=0) == (1.5, 1.0)
    with pytest.raises(ValueError, match="--warmup 4"):
        common.step_medians(stamps, start, warmup=4)


def test_compare_rounds_alternates_order_and_reports_median_ratio_overhead(capsys):
    calls = []
    lightning_times = iter([(9.0, 9.0), (1.2, 2.2), (1.1, 2.6), (1.5, 2.4)])  # the first is the discarded round

    def lightning():
        calls.append("L")
        return next(lightning_times)

    def bare():
        calls.append("B")
        return 1.0, 2.0

    out = common.compare_rounds(lightning, bare, repeats=3, discard=1)
    assert calls == ["L", "B", "L", "B", "B", "L", "L", "B"]
    assert out["ratio_per_round"] == pytest.approx([1.2, 1.1, 1.5])
    assert out["overhead_median"] == pytest.approx(0.2) and out["cpu_overhead_median"] == pytest.approx(0.2)
    assert out["lightning_step_ms"]["values"] == pytest.approx([1200.0, 1100.0, 1500.0])
    assert out["bare_step_cpu_ms"]["median"] == pytest.approx(2000.0)
    assert out["passes"] is False and out["passes_cpu"] is False
    assert [line.split(":")[0] for line in capsys.readouterr().out.splitlines()[:3]] == ["round 0", "round 1", "round 2"]


def test_same_batch_moves_nested_tensors_once_and_serves_them_steps_times():
    batch = {"image": torch.zeros(2, 1, 4, 4), "boxes": [torch.zeros(1, 4), torch.zeros(0, 4)], "name": "x"}
    data = common.SameBatch(batch, 3, "cpu")
    served = list(data.loader())
    assert len(served) == 3 and all(b["image"] is data.batch["image"] for b in served)  # no per-step copy
    assert data.batch["image"] is batch["image"]  # already on the device: not copied
    assert data.batch["name"] == "x" and isinstance(data.batch["boxes"], list) and len(data.batch["boxes"]) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_gpu_accelerator_without_cuda_is_a_clear_error():
    assert common.device_of("cpu") == torch.device("cpu")
    with pytest.raises(SystemExit, match="cuda"):
        common.device_of("gpu")


def test_run_all_passes_accelerator_to_every_step_benchmark():
    todo, notes = run_all.commands(list(STEP_BENCHMARKS), "quick", "gpu")
    assert [name for name, _ in todo] == list(STEP_BENCHMARKS) and not notes
    assert all(cmd[-2:] == ["--accelerator", "gpu"] for _, cmd in todo)


TINY = {
    "pcam_step": ["--backbone", "test_resnet", "--output-stride", "32", "--image-size", "32", "--batch", "2"],
    "dcmt_step": ["--image-size", "32", "--labeled", "1", "--unlabeled", "1", "--fa-channels", "8"],
    "magsd_step": ["--backbone", "test_resnet", "--image-size", "32", "--batch", "2", "--no-bf16"],
    "oxnet_step": ["--backbone", "test_resnet", "--image-size", "64", "--levels", "3", "4", "5", "--channels", "8",
                   "--head-depth", "1", "--per-stream", "1"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", STEP_BENCHMARKS)
def test_step_benchmark_runs_tiny_on_cpu(name, tmp_path, monkeypatch):
    import importlib

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    bench = importlib.import_module(f"experiments.benchmarks.{name}")
    payload = bench.main([*TINY[name], "--steps", "3", "--warmup", "1", "--repeats", "1", "--name", "tiny"])
    saved = json.loads((tmp_path / "tiny.json").read_text())
    assert saved["device"] == "cpu" and saved["config"]["accelerator"] == "cpu"
    for key in ("lightning_step_ms", "bare_step_ms", "lightning_step_cpu_ms", "bare_step_cpu_ms"):
        assert len(payload[key]["values"]) == 1 and payload[key]["median"] > 0
    assert payload["overhead_median"] == pytest.approx(payload["ratio_per_round"][0] - 1)


def test_bare_steps_runs_loss_backward_step_then_after_step_per_batch():
    weight = torch.nn.Parameter(torch.tensor(1.0))
    optimizer = torch.optim.SGD([weight], lr=0.5)
    seen, after = [], []

    def loss_of(step, batch):
        seen.append((step, weight.item()))
        return batch["x"] * weight  # gradient x: each step subtracts 0.5 * x

    loader = common.SameBatch({"x": torch.tensor(2.0)}, steps=3).loader()
    wall, cpu = common.bare_steps(loader, optimizer, loss_of, warmup=1, device=torch.device("cpu"),
                                  after_step=lambda step: after.append((step, weight.item())))
    assert seen == [(0, 1.0), (1, 0.0), (2, -1.0)]  # the loss of step k sees the weights after k steps
    assert after == [(0, 0.0), (1, -1.0), (2, -2.0)]  # after_step(k) runs after step k's optimiser step
    assert wall >= 0 and cpu >= 0
