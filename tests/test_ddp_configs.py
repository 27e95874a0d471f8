"""Every method's shipped synthetic config trains under plain 2-process CPU DDP (issue 18 item 3).

Each config runs exactly as a user runs it - ``python -m experiments.cli fit -c experiments/<method>/synthetic.yaml
-c experiments/configs/trainer/ddp_cpu.yaml`` (``strategy: ddp``, gloo, 2 devices; Lightning launches the second
process itself) - shrunk only by command-line flags (tiny images and data, 2 training batches, 1 validation batch,
one epoch, test-after-fit off). The multi-stage workflows run as documented: DC-MT fit -> ``predict`` (slice
features, written by both ranks and merged) -> DC-MT stage-2 fit on them; RetinaNet fit -> OXnet fit with
``init_checkpoint`` = RetinaNet's ``last.ckpt``. Every run must exit 0 with 2 members, and its ``last.ckpt`` must
load as data (``AtomicCheckpointIO``) at ``global_step`` 2 with finite weights.

Not flaky by construction: each run gets a free port (``MASTER_PORT``; Lightning's launcher passes it to rank 1),
its own logger folder and data cache, and a wall-clock limit after which its whole process group is killed.

The fast tests at the top pin the cause of the RetinaNet/OXnet crash (``net.fpn.extra_blocks.p7`` unused with a
pyramid ending at P6).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
DDP_CPU = EXPERIMENTS / "configs" / "trainer" / "ddp_cpu.yaml"
RUN_TIMEOUT_S = 420  # one run: 2 imports + a few tiny steps take ~30-60 s on 2 busy cores
STEPS = 2


# ------------------------------------------------------------------------------------------- the cause, fast
@pytest.mark.parametrize("levels", [(2, 3, 4, 5, 6), (3, 4, 5, 6, 7), (3, 4, 5)])
def test_retinanet_builds_only_the_levels_it_uses(levels):
    """Every parameter gets a gradient from the detection losses (DDP requires it), and the network has P7 iff its
    pyramid ends at P7."""
    from networks.retina import RetinaNet, detection_losses

    torch.manual_seed(0)
    net = RetinaNet(num_classes=2, backbone="test_resnet", fpn_levels=levels, fpn_channels=16, head_depth=1)
    names = [n for n, _ in net.named_parameters()]
    assert any(".p6." in n for n in names) == (levels[-1] >= 6)
    assert any(".p7." in n for n in names) == (levels[-1] == 7)
    out = net(torch.randn(1, 1, 128, 128))
    assert len(out["cls_maps"]) == len(levels)
    anchors = net.anchors((128, 128), out["cls_maps"])
    cls, reg = detection_losses(out["cls_logits"], out["box_deltas"], anchors, [torch.tensor([[30., 30., 70., 70.]])],
                                [torch.tensor([1])], net.box_coder)
    (cls + reg).sum().backward()
    unused = [n for n, p in net.named_parameters() if p.grad is None]
    assert not unused, f"parameters without a gradient (plain DDP fails at step 2): {unused}"


def test_stage1_checkpoint_with_the_old_unused_p7_still_loads(tmp_path):
    """A stage-1 checkpoint written before P7 was dropped from P2-P6 pyramids (it held an unused P7 conv) loads into
    today's network as OXnet's ``init_checkpoint``; every other weight is taken over exactly."""
    from lightning_modules.retinanet import load_stage1_weights
    from networks.retina import RetinaNet

    def net():
        return RetinaNet(num_classes=2, backbone="test_resnet", fpn_levels=(3, 4, 5, 6), fpn_channels=16,
                         head_depth=1)

    state = {f"net.{k}": v for k, v in net().state_dict().items()}
    state["net.fpn.extra_blocks.p7.weight"] = torch.zeros(16, 16, 3, 3)
    state["net.fpn.extra_blocks.p7.bias"] = torch.zeros(16)
    torch.save({"state_dict": state}, tmp_path / "old.ckpt")
    target = net()
    load_stage1_weights(target, tmp_path / "old.ckpt")
    for key, value in target.state_dict().items():
        assert torch.equal(value, state[f"net.{key}"]), key


# ------------------------------------------------------------------------------------------- the configs, slow
CXR = ["--data.init_args.reader.init_args.n_images", "120", "--data.init_args.reader.init_args.image_size", "64",
       "--data.init_args.image_size", "64", "--data.init_args.eval_batch_size", "8", "--data.init_args.num_workers",
       "0", "--data.init_args.min_per_class", "0"]
DCMT = ["--data.init_args.reader.init_args.n_subjects", "30", "--data.init_args.reader.init_args.image_size", "32",
        "--data.init_args.reader.init_args.min_slices", "6", "--data.init_args.reader.init_args.max_slices", "8",
        "--data.init_args.image_size", "32", "--data.init_args.labeled_batch_size", "2",
        "--data.init_args.unlabeled_batch_size", "2", "--data.init_args.eval_batch_size", "16",
        "--data.init_args.min_per_class", "0"]  # 30 subjects: 1-2 of a grade in val/test, counts not the point
RETINA = CXR + ["--data.init_args.box_batch_size", "2"]
# name -> (config, subcommand, flags). Batch sizes are per rank.
RUNS: dict[str, tuple[str, str, list[str]]] = {
    "cam_baseline": ("cam_baseline", "fit", CXR + ["--data.init_args.labeled_batch_size", "4",
                                                   "--model.init_args.net.init_args.backbone", "test_resnet"]),
    "pcam": ("pcam", "fit", CXR + ["--data.init_args.labeled_batch_size", "4",
                                   "--model.init_args.net.init_args.backbone", "test_resnet"]),
    "magsd": ("magsd", "fit", CXR + ["--data.init_args.labeled_batch_size", "4",
                                     "--model.init_args.net.init_args.backbone", "test_resnet"]),
    "nonlocal_unet": ("nonlocal_unet", "fit", [
        "--data.init_args.reader.init_args.shape", "[24, 24, 24]", "--data.init_args.patch_size", "16",
        "--data.init_args.batch_size", "2", "--model.init_args.roi_size", "16",
        "--model.init_args.net.init_args.filters", "8"]),
    "dcmt": ("dcmt", "fit", DCMT),
    "dcmt_predict": ("dcmt", "predict", DCMT),
    "dcmt_subject": ("dcmt_subject", "fit", ["--data.init_args.labeled_batch_size", "2",
                                             "--data.init_args.unlabeled_batch_size", "2",
                                             "--data.init_args.eval_batch_size", "8"]),
    "retinanet": ("retinanet", "fit", RETINA),
    "oxnet": ("oxnet", "fit", RETINA + ["--data.init_args.labeled_batch_size", "2",
                                        "--data.init_args.unlabeled_batch_size", "2"]),
}
NEEDS = {"dcmt_predict": "dcmt", "dcmt_subject": "dcmt_predict", "oxnet": "retinanet"}
FIT = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", str(STEPS), "--trainer.limit_val_batches", "1",
       "--trainer.check_val_every_n_epoch", "1", "--trainer.enable_progress_bar", "false", "--test_after_fit", "false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Workspace:
    """One folder (the runs' working directory: relative paths in the configs land here) and the runs done in it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.done: dict[str, Path] = {}  # run name -> its logger folder
        self.seconds: dict[str, float] = {}

    def run(self, name: str) -> Path:
        if name in self.done:
            return self.done[name]
        extra: list[str] = []
        if name in NEEDS:
            needed = self.run(NEEDS[name])
            if name == "dcmt_predict":
                extra = ["--ckpt_path", str(_last_checkpoint(needed))]
            if name == "oxnet":
                extra = ["--model.init_args.init_checkpoint", str(_last_checkpoint(needed))]
        config, command, flags = RUNS[name]
        save_dir = self.root / "runs_of" / name
        argv = [sys.executable, "-m", "experiments.cli", command, "-c", str(EXPERIMENTS / config / "synthetic.yaml"),
                "-c", str(DDP_CPU), *flags, *(FIT if command == "fit" else []),
                "--trainer.logger.init_args.save_dir", str(save_dir), *extra]
        env = {k: v for k, v in os.environ.items()
               if k not in ("MEDATTN_RUN_DIR", "MEDATTN_RUN_ID", "LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK",
                            "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID")}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1", WANDB_MODE="disabled",
                   HF_HUB_OFFLINE="1", MEDATTN_CACHE=str(self.root / "cache"), PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
        start = time.monotonic()
        # own session: on a timeout the launcher and the rank it started are killed together
        proc = subprocess.Popen(argv, cwd=self.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            pytest.fail(f"{name}: no result after {RUN_TIMEOUT_S} s (killed)\n{output[-4000:]}")
        finally:
            self.seconds[name] = time.monotonic() - start
        (self.root / f"{name}.log").write_text(output)
        assert proc.returncode == 0, f"{name}: exit status {proc.returncode}\n{' '.join(argv)}\n{output[-6000:]}"
        assert "MEMBER: 2/2" in output, f"{name}: the run did not start 2 DDP processes\n{output[-3000:]}"
        self.done[name] = save_dir
        return save_dir


def _last_checkpoint(save_dir: Path) -> Path:
    found = sorted(save_dir.rglob("last.ckpt"))
    assert len(found) == 1, f"expected one last.ckpt under {save_dir}, found {found}"
    return found[0]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    space = Workspace(tmp_path_factory.mktemp("ddp_configs"))
    yield space
    total = sum(space.seconds.values())
    print("\n[ddp configs] " + ", ".join(f"{k} {v:.0f} s" for k, v in space.seconds.items()) + f"; total {total:.0f} s")


def test_every_synthetic_config_is_covered():
    shipped = {p.parent.name for p in EXPERIMENTS.glob("*/synthetic.yaml")}
    assert shipped == {config for config, command, _ in RUNS.values() if command == "fit"}, shipped


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in RUNS if RUNS[n][1] == "fit"])
def test_synthetic_config_trains_under_two_process_ddp(name, workspace):
    from callbacks.checkpoint_io import AtomicCheckpointIO

    save_dir = workspace.run(name)
    checkpoint = AtomicCheckpointIO().load_checkpoint(_last_checkpoint(save_dir))  # as data (weights_only=True)
    assert checkpoint["global_step"] == STEPS, checkpoint["global_step"]
    bad = [k for k, v in checkpoint["state_dict"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    assert not bad, f"{name}: non-finite weights {bad[:5]}"
    if name == "dcmt_subject":  # it trained on the features the 2-rank predict wrote and merged
        from datamodules.subject_features import read_slice_features

        features = read_slice_features(workspace.root / "runs" / "dcmt" / "synthetic" / "slice_features.npz")
        assert len(set(features["subject_id"].tolist())) == 30
