"""PrototypeMomentum: dossier (g.1) arithmetic, first-update copy, no decay of absent classes, and DDP agreement."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from callbacks.prototype_momentum import PrototypeMomentum, momentum_update_


def updates_from(p0: torch.Tensor | None, means: list[torch.Tensor], beta: float = 0.7) -> torch.Tensor:
    d = means[0].numel()
    protos = torch.zeros(1, d) if p0 is None else p0[None].clone()
    count = torch.zeros(1) if p0 is None else torch.ones(1)
    for m in means:
        momentum_update_(protos, count, m[None] * 2.0, torch.tensor([2.0]), beta)  # weights 2 -> target m
    return protos[0]


def test_beta_arithmetic_from_a_set_prototype():
    torch.manual_seed(0)
    p0, *m = torch.randn(5, 6)
    want = 0.2401 * p0 + 0.1029 * m[0] + 0.147 * m[1] + 0.21 * m[2] + 0.3 * m[3]
    assert torch.allclose(updates_from(p0, m), want, atol=1e-6)


def test_first_update_copies():
    torch.manual_seed(1)
    m = list(torch.randn(4, 6))
    assert torch.allclose(updates_from(None, m[:1]), m[0])
    want = 0.343 * m[0] + 0.147 * m[1] + 0.21 * m[2] + 0.3 * m[3]
    assert torch.allclose(updates_from(None, m), want, atol=1e-6)


def test_absent_class_keeps_its_prototype():
    protos = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    count = torch.tensor([1.0, 1.0])
    momentum_update_(protos, count, torch.tensor([[10.0, 10.0], [0.0, 0.0]]), torch.tensor([1.0, 0.0]), 0.7)
    assert protos[1].tolist() == [3.0, 4.0]  # the reference would give 0.7 x [3, 4]
    assert protos[0].tolist() == pytest.approx([0.7 + 3.0, 1.4 + 3.0])
    assert count.tolist() == [2.0, 1.0]


class _Module(pl.LightningModule):
    """Minimal module honouring the callback contract."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 4)
        self.register_buffer("prototypes", torch.zeros(2, 4))
        self.register_buffer("prototype_updates", torch.zeros(2))
        self.prototype_stats = None

    def training_step(self, batch, batch_idx):
        features = self.layer(batch)  # (B, 4), requires grad
        weights = torch.tensor([[1.0, 0.0]] * len(batch))
        # stats deliberately left attached to the graph: the callback must not keep it
        self.prototype_stats = (weights.T @ features, weights.sum(0))
        return features.pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_callback_updates_outside_autograd_and_needs_buffers(tmp_path):
    module = _Module()
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[PrototypeMomentum(0.7)], default_root_dir=tmp_path)
    trainer.fit(module, torch.utils.data.DataLoader(torch.randn(4, 3), batch_size=2))
    assert not module.prototypes.requires_grad and module.prototypes.grad_fn is None
    assert module.prototype_updates.tolist() == [2.0, 0.0]
    assert torch.count_nonzero(module.prototypes[1]) == 0
    bare = pl.LightningModule()
    with pytest.raises(AttributeError, match="prototypes"):
        PrototypeMomentum().on_fit_start(trainer, bare)


# --------------------------------------------------------------------------------------------------- DDP
STEPS, PER_RANK, WORLD = 3, 3, 2


def _sample(i: int) -> dict:
    from datamodules.batch import STREAM_BOX, STREAM_UNLABELED

    g = torch.Generator().manual_seed(i)
    stream = (i // WORLD) % 3  # under DistributedSampler(shuffle=False) every rank gets one image per stream
    labels = (torch.rand(3, generator=g) < 0.5).float()
    labels[i % 3] = 1.0
    box = torch.tensor([[8.0, 10.0, 30.0, 34.0]]) + i
    return {
        "image": torch.randn(1, 64, 64, generator=g),
        "labels": labels if stream != STREAM_UNLABELED else torch.zeros(3),
        "label_mask": torch.full((3,), stream != STREAM_UNLABELED),
        "stream": torch.tensor(stream),
        "has_boxes": torch.tensor(stream == STREAM_BOX),
        "boxes": box if stream == STREAM_BOX else torch.zeros(0, 4),
        "box_labels": torch.tensor([i % 3]) if stream == STREAM_BOX else torch.zeros(0, dtype=torch.long),
        "image_id": str(i),
        "patient_id": str(i),
    }


class _Data(pl.LightningDataModule):
    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self):
        from datamodules.dataset import collate_cxr

        samples = [_sample(i) for i in range(STEPS * PER_RANK * WORLD)]
        # rank r takes items r, r + W, ... in order (Lightning's own replacement sampler would shuffle)
        sampler = torch.utils.data.DistributedSampler(samples, self.trainer.world_size, self.trainer.global_rank,
                                                      shuffle=False)
        return torch.utils.data.DataLoader(samples, batch_size=self.batch_size, sampler=sampler,
                                           collate_fn=collate_cxr)


class _SaveState(pl.Callback):
    """Every rank writes its prototypes and teacher after training (ddp_spawn returns rank 0's weights only)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_train_end(self, trainer, pl_module):
        state = {"prototypes": pl_module.prototypes.clone(), "updates": pl_module.prototype_updates.clone(),
                 "teacher": {k: v.clone() for k, v in pl_module.teacher.state_dict().items()},
                 "student": {k: v.clone() for k, v in pl_module.student.state_dict().items()}}
        torch.save(state, f"{self.directory}/rank{trainer.global_rank}_of{trainer.world_size}.pt")


def _sgd(params):
    return torch.optim.SGD(params, lr=0.02)  # SGD, not Adam: Adam's normalisation amplifies 1e-9 noise


def _run(tmp_path, devices: int) -> None:
    from callbacks.ema_teacher import EMATeacher
    from ddp_utils import DestroyProcessGroup
    from lightning_modules.oxnet import OXnetModule
    from networks.oxnet import OXnet
    from networks.retina import RetinaNet

    torch.manual_seed(0)
    net = OXnet(RetinaNet(num_classes=3, backbone="test_resnet", fpn_levels=(3, 4, 5), fpn_channels=16,
                          head_depth=1, anchor_size_factor=2.0))
    module = OXnetModule(net, freeze_bn=True, optimizer=_sgd)
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto",
                         max_steps=STEPS, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path,
                         callbacks=[EMATeacher(0.99), PrototypeMomentum(0.7), _SaveState(str(tmp_path)),
                                    DestroyProcessGroup()])  # last: tears gloo down after every other hook
    trainer.fit(module, datamodule=_Data(PER_RANK * WORLD // devices))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ddp_prototypes_and_teacher_match_single_process(tmp_path):
    _run(tmp_path, devices=1)
    _run(tmp_path, devices=2)
    single = torch.load(tmp_path / "rank0_of1.pt")
    ranks = [torch.load(tmp_path / f"rank{r}_of2.pt") for r in range(2)]
    assert single["updates"].tolist() == [3.0, 3.0, 3.0]
    for key in ("prototypes", "updates"):
        assert torch.equal(ranks[0][key], ranks[1][key]), f"{key} differ between ranks"
        assert torch.allclose(ranks[0][key], single[key], atol=1e-5), f"{key}: DDP differs from one process"
    for net in ("teacher", "student"):
        for name, value in single[net].items():
            assert torch.equal(ranks[0][net][name], ranks[1][net][name]), f"{net}.{name} differs between ranks"
            assert torch.allclose(ranks[0][net][name].float(), value.float(), atol=1e-5), f"{net}.{name}"
    # the run did move: the teacher is not the initial network and the prototypes are set
    assert torch.count_nonzero(single["prototypes"]) > 0
