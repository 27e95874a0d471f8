"""EMATeacher: the α schedule, the closed form after k steps, frozen teacher, checkpoint identity, DDP."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks.ema_teacher import EMATeacher, eval_model_names
from networks.ema import ema_alpha, ema_update_, make_teacher


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))


class _MT(pl.LightningModule):
    """Student + frozen teacher; the loss uses both so the teacher path is exercised like in DC-MT."""

    def __init__(self, lr: float = 0.1, record: bool = False) -> None:
        super().__init__()
        self.student = _net()
        self.teacher = make_teacher(self.student)
        self.lr = lr
        self.record = record
        self.snapshots: list[dict[str, torch.Tensor]] = []

    def train(self, mode: bool = True):
        # The teacher always runs in eval mode, so its BN statistics change only through the EMA.
        super().train(mode)
        self.teacher.train(False)
        return self

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.student(x)
        with torch.no_grad():
            target = self.teacher(x).softmax(-1)
        return nn.functional.cross_entropy(logits, y) + ((logits.softmax(-1) - target) ** 2).mean()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        # Module hooks run after callback hooks: this sees the student *after* the step.
        if self.record:
            self.snapshots.append({k: v.detach().clone() for k, v in self.student.state_dict().items()})

    def configure_optimizers(self):
        return torch.optim.SGD(self.student.parameters(), lr=self.lr)


def _loader(n: int = 16, batch_size: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 6, 6, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def _trainer(tmp_path, **kw) -> pl.Trainer:
    base = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                enable_checkpointing=False, default_root_dir=tmp_path)
    base.update(kw)
    return pl.Trainer(**base)


def test_alpha_formula_oracle():
    # dossier g.4 values, with the step in place of the epoch
    assert ema_alpha(0, 0.99) == 0.0
    assert ema_alpha(1, 0.99) == 0.5
    assert ema_alpha(2, 0.99) == pytest.approx(2 / 3)
    assert ema_alpha(9, 0.99) == pytest.approx(0.9)
    assert ema_alpha(49, 0.99) == pytest.approx(0.98)
    assert ema_alpha(50, 0.99) == pytest.approx(0.980392, abs=1e-6)
    assert ema_alpha(99, 0.99) == pytest.approx(0.99)
    assert ema_alpha(10_000, 0.99) == 0.99
    with pytest.raises(ValueError):
        ema_alpha(-1)


def test_update_closed_form_fixed_alpha():
    """Fixed student S, k updates with α: T_k = α^k T_0 + (1 − α^k) S (dossier g.4: 0.5, k=10 → 0.000977)."""
    student = _net()
    teacher = make_teacher(student)
    with torch.no_grad():
        for p in teacher.parameters():
            p.normal_()
        teacher[1].running_mean.fill_(3.0)
        teacher[1].num_batches_tracked.fill_(99)
    t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    for _ in range(10):
        ema_update_(teacher, student, 0.5)
    w = 0.5**10
    assert w == pytest.approx(0.000977, abs=5e-7)
    for k, v in teacher.state_dict().items():
        s = student.state_dict()[k]
        if v.is_floating_point():
            torch.testing.assert_close(v, w * t0[k] + (1 - w) * s, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(v, s), f"non-float buffer {k} must be copied"


def test_update_rejects_mismatched_modules():
    with pytest.raises(ValueError, match="differ"):
        ema_update_(nn.Linear(2, 2), nn.Linear(2, 3), 0.5)
    with pytest.raises(ValueError, match="differ"):
        ema_update_(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), 0.5)


def test_frozen_teacher_gets_no_grads_and_is_not_optimized(tmp_path):
    module = _MT()
    assert all(not p.requires_grad for p in module.teacher.parameters())
    x, y = next(iter(_loader()))
    module.training_step((x, y), 0).backward()
    assert all(p.grad is None for p in module.teacher.parameters())
    assert all(p.grad is not None for p in module.student.parameters())
    # an unfrozen teacher is refused at fit start
    bad = _MT()
    bad.teacher.requires_grad_(True)
    with pytest.raises(ValueError, match="frozen"):
        _trainer(tmp_path, max_steps=1, callbacks=[EMATeacher()]).fit(bad, _loader())


def test_closed_form_after_k_steps_in_trainer(tmp_path):
    """lr = 0 keeps the student fixed, so after k steps T_k = Π_t α_t T_0 + (1 − Π_t α_t) S with α_t for t=1..k."""
    module = _MT(lr=0.0)
    with torch.no_grad():
        for p in module.teacher.parameters():
            p.add_(1.0)
    t0 = {k: v.clone() for k, v in module.teacher.named_parameters()}
    k, decay = 4, 0.7
    _trainer(tmp_path, max_steps=k, callbacks=[EMATeacher(decay=decay)]).fit(module, _loader())
    w = math.prod(ema_alpha(t, decay) for t in range(1, k + 1))  # 0.5 · 0.6667 · 0.7 · 0.7
    assert w == pytest.approx(0.5 * (2 / 3) * 0.7 * 0.7)
    for name, p in module.teacher.named_parameters():
        s = dict(module.student.named_parameters())[name]
        torch.testing.assert_close(p, w * t0[name] + (1 - w) * s, rtol=1e-5, atol=1e-6)


def test_teacher_follows_recursion_with_moving_student_and_accumulation(tmp_path):
    """Real training: the teacher equals the EMA recursion over the student snapshots taken after each
    optimiser step; with accumulate_grad_batches=2 there is one update per two batches."""
    module = _MT(lr=0.1, record=True)
    expected = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    _trainer(tmp_path, max_epochs=1, accumulate_grad_batches=2, callbacks=[EMATeacher(decay=0.9)]).fit(
        module, _loader(n=16, batch_size=2))
    stepped = module.snapshots[1::2]  # batches 2, 4, ... stepped the optimiser
    assert len(stepped) == 4
    for t, snap in enumerate(stepped, start=1):
        a = ema_alpha(t, 0.9)
        expected = {k: (a * v + (1 - a) * snap[k]) if v.is_floating_point() else snap[k].clone()
                    for k, v in expected.items()}
    for k, v in module.teacher.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=1e-5, atol=1e-6)
    assert not torch.equal(module.teacher[0].weight, module.student[0].weight)


def test_teacher_survives_checkpoint_save_load(tmp_path):
    module = _MT()
    trainer = _trainer(tmp_path, max_steps=3, callbacks=[EMATeacher(decay=0.99)], enable_checkpointing=True)
    trainer.fit(module, _loader())
    path = tmp_path / "mt.ckpt"
    trainer.save_checkpoint(path)
    restored = _MT.load_from_checkpoint(path)
    assert not torch.equal(module.teacher[0].weight, module.student[0].weight)
    for (k, v), (k2, v2) in zip(module.teacher.state_dict().items(), restored.teacher.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    assert all(not p.requires_grad for p in restored.teacher.parameters())
    # and a resumed fit continues the schedule from the saved global step
    resumed = _MT()
    cb = EMATeacher(decay=0.99)
    _trainer(tmp_path, max_steps=4, callbacks=[cb]).fit(resumed, _loader(), ckpt_path=path)
    assert cb._last_step == 4


def test_eval_model_names():
    assert eval_model_names("student") == ("student",)
    assert eval_model_names("teacher") == ("teacher",)
    assert eval_model_names("both") == ("student", "teacher")
    with pytest.raises(ValueError):
        eval_model_names("ema")


class _DDPCheck(pl.Callback):
    """Gathers a teacher checksum from every rank at the end of training."""

    def on_train_end(self, trainer, pl_module):
        flat = torch.cat([p.detach().flatten() for p in pl_module.teacher.parameters()])
        gathered = pl_module.all_gather(flat)
        if trainer.is_global_zero:
            torch.save(gathered, trainer.default_root_dir + "/teachers.pt")


@pytest.mark.slow
def test_ddp_ranks_hold_identical_teachers(tmp_path):
    module = _MT()
    from ddp_utils import DestroyProcessGroup

    # DestroyProcessGroup: without it a worker exits with gloo alive and sometimes aborts (SIGABRT) at teardown
    _trainer(str(tmp_path), max_steps=3, devices=2, strategy="ddp_spawn",
             callbacks=[EMATeacher(decay=0.99), _DDPCheck(), DestroyProcessGroup()]).fit(module, _loader(n=32))
    gathered = torch.load(tmp_path / "teachers.pt")
    assert gathered.shape[0] == 2
    assert torch.equal(gathered[0], gathered[1])
