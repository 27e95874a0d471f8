"""DDP parity on CPU: every registered method trains under 2-process DDP (gloo) and agrees with a 1-process run.

The 2-process runs happen in one pair of processes for all methods (``tests/ddp_job.py``: ``torch.multiprocessing``
spawns them once, Lightning's DDP strategy runs in them), because starting processes dominates the cost.

Batch sizes: the DataModules' batch sizes are **per rank** (global = world size x per rank). The 2-process run
halves the tiny configuration's per-rank training batch sizes and the 1-process run keeps them, so both see the
same global batch (the mixed-stream sampler gives rank r the images r, r + 2, ... of a permutation shared by the
ranks, so the union of the two ranks' batches is the 1-process batch). A configuration with an odd size (OXnet's
one image per stream) is doubled for the 1-process run instead.

Checked for every method, after 2 training steps and one validation epoch:

1. the 2-process run completes;
2. model (student, EMA teacher, prototype buffers, BN statistics) and optimiser state are bitwise identical on
   both ranks, and so are the logged validation metrics;
3. evaluation parity: the 2-process run's validation metrics equal a 1-process ``validate`` of the same weights to
   1e-5 (no padding duplicates: ``UnpaddedDistributedSampler``; torchmetrics states are synced; ``sync_dist``
   means are sample-weighted, see ``MedAttnModule.log``);
4. training parity: the 1-process run ends with the same weights and validation metrics as the 2-process run, to
   1e-5, for methods whose training step is a function of the global batch. The parity runs switch augmentation
   off and freeze BatchNorm statistics (per-rank batch statistics are inherent to DDP without SyncBatchNorm,
   which gloo/CPU lacks). Methods that are *by design* not world-size invariant are listed in
   ``NOT_WORLD_SIZE_INVARIANT`` with the reason; for them the difference is measured and printed, not asserted;
5. CAM images are logged once: ``CAMLogger(num_images=4)`` gathers 2 images per rank and rank 0 alone writes 4.
"""

from __future__ import annotations

import json

import pytest
import torch

from ddp_job import RESUME_METHODS, WORLD, cam_capable, parity_build, parity_trainer, run_job
from reliability_utils import FreezeBatchNorm, RankStateDump, max_abs_diff, method_callbacks, method_names, methods_for

TOLERANCE = 1e-5

# Methods whose training step is not a function of the global batch alone, so a 2-process run may differ from a
# 1-process run with the same global batch. Measured differences are printed (see the closing note of issue 8).
NOT_WORLD_SIZE_INVARIANT = {
    "pcam": "batch-weighted BCE: pos_weight = (N - P) / P is computed from each rank's batch (the reference does "
            "the same per GPU)",
    "dcmt": "the normalised attention MSE Σ(a - b)² / Σ(a + b) is a ratio of per-rank sums",
    "dcmt_subject": "GRU dropout masks are drawn per rank from the same generator state",
    "magsd": "attention-guided augmentation is seeded by (seed, step, batch, rank)",
    "nonlocal_unet": "random patches are drawn from the global generator per item, in rank order",
}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return tmp_path_factory.mktemp("ddp_data")


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory, data_root):
    out = tmp_path_factory.mktemp("ddp_runs")
    run_job(method_names(), out, data_root)
    return out


def _val(metrics: dict) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(float(v)) for k, v in metrics.items() if k.startswith("val/")}


def _model(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith("model/")}


@pytest.mark.slow
@pytest.mark.parametrize("name", methods_for("ddp"))
def test_ddp_two_ranks_agree_with_one_process(name, ddp_runs, data_root, tmp_path):
    folder = ddp_runs / name
    # ---- 1. completed on both ranks
    for problem in ("crashed.txt", "error0.txt", "error1.txt"):
        assert not (folder / problem).exists(), f"{name}: {problem}\n{(folder / problem).read_text()[-3000:]}"
    ranks = [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    ddp_val = [_val(json.loads((folder / f"metrics{r}.json").read_text())) for r in range(WORLD)]
    assert ddp_val[0], f"{name}: no validation metric logged"

    # ---- 2. identical state and metrics on both ranks
    rank_diff, where = max_abs_diff(ranks[0], ranks[1])
    assert rank_diff == 0.0, f"{name}: ranks differ by {rank_diff} at {where}"
    assert max_abs_diff(ddp_val[0], ddp_val[1])[0] == 0.0

    # ---- 5. CAM images written once (2 per rank gathered, written by rank 0)
    if cam_capable(name, data_root):
        pngs = sorted((folder / "cams" / "epoch_000").glob("*.png"))
        assert len(pngs) == 4, f"{name}: {len(pngs)} CAM images instead of 4"

    # ---- 3. evaluation parity: the same weights validated by one process
    module, data = parity_build(name, data_root, world=WORLD)
    module.load_state_dict({k[len("model/"):]: v for k, v in _model(ranks[0]).items()})
    single_eval = _val(parity_trainer(tmp_path / "eval", 1, []).validate(module, datamodule=data)[0])
    assert set(single_eval) == set(ddp_val[0]), sorted(set(single_eval) ^ set(ddp_val[0]))
    eval_diff, eval_where = max_abs_diff(ddp_val[0], single_eval)
    assert eval_diff <= TOLERANCE, f"{name}: validation metrics differ by {eval_diff} at {eval_where}"

    # ---- 4. training parity: one process, same global batch
    module, data = parity_build(name, data_root, world=1)
    single = parity_trainer(tmp_path / "single", 1, [RankStateDump(tmp_path / "single"), FreezeBatchNorm(),
                                                      *method_callbacks(module)])
    single.fit(module, data)
    single_state = torch.load(tmp_path / "single" / "rank0.pt", weights_only=True)
    weight_diff, weight_where = max_abs_diff(_model(ranks[0]), _model(single_state))
    metric_diff, metric_where = max_abs_diff(ddp_val[0], _val(single.callback_metrics))
    print(f"[ddp] {name}: ranks {rank_diff:.3g} | eval parity {eval_diff:.3g} ({eval_where}) | training parity: "
          f"weights {weight_diff:.3g} ({weight_where}), val metrics {metric_diff:.3g} ({metric_where})")
    if name in NOT_WORLD_SIZE_INVARIANT:
        return
    assert weight_diff <= TOLERANCE, f"{name}: 1-process weights differ by {weight_diff} at {weight_where}"
    assert metric_diff <= TOLERANCE, f"{name}: 1-process validation metrics differ by {metric_diff} at {metric_where}"


@pytest.mark.slow
@pytest.mark.parametrize("name", RESUME_METHODS)
def test_ddp_resume_is_exact_on_every_rank(name, ddp_runs):
    """2-process DDP with augmentation on: resuming from the epoch-1 checkpoint (every rank's RNG and augmentation
    state restored by ``RngStateCallback``) ends bitwise where the uninterrupted DDP run ends, on each rank."""
    folder = ddp_runs / name / "resume"
    for rank in range(WORLD):
        error = ddp_runs / name / f"resume_error{rank}.txt"
        assert not error.exists(), error.read_text()[-3000:]
        full = torch.load(folder / "full" / f"rank{rank}.pt", weights_only=True)
        resumed = torch.load(folder / "resumed" / f"rank{rank}.pt", weights_only=True)
        diff, where = max_abs_diff(full, resumed)
        print(f"[ddp resume] {name} rank {rank}: max |diff| = {diff:.3g} at {where}")
        assert diff == 0.0, f"{name}: rank {rank} differs by {diff} at {where}"
