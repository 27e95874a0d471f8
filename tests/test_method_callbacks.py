"""A method is the method however it is started (issue 19.2): the callbacks that *are* a method (EMA teacher,
prototype momentum) come from the module's ``configure_callbacks``, and a duplicate in ``trainer.callbacks`` is
either dropped with a note (identical) or an error naming it (different settings, or a subclass)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from callbacks.ema_teacher import EMATeacher
from callbacks.prototype_momentum import PrototypeMomentum
from test_oxnet import _batch, tiny_oxnet


class _Data(pl.LightningDataModule):
    def train_dataloader(self):
        return torch.utils.data.DataLoader([_batch()] * 4, batch_size=None)  # each item is a whole batch


def _plain_trainer(tmp_path, callbacks=None, steps: int = 4) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                      callbacks=callbacks)


def _oxnet(**kwargs):
    from lightning_modules.oxnet import OXnetModule

    return OXnetModule(tiny_oxnet(), freeze_bn=False, optimizer=lambda p: torch.optim.SGD(p, lr=0.01), **kwargs)


def test_oxnet_under_a_plain_trainer_updates_prototypes_teacher_and_gpa(tmp_path):
    module = _oxnet()
    recorded = []
    compute = module.compute_losses

    def spy(batch):
        terms = compute(batch)
        recorded.append({k: float(v.detach()) for k, v in terms.items()})
        return terms

    module.compute_losses = spy
    teacher_before = [p.clone() for p in module.teacher.parameters()]
    _plain_trainer(tmp_path).fit(module, datamodule=_Data())  # no callbacks given
    assert module.prototype_updates.tolist() == [4.0, 4.0, 4.0]  # every class is labelled in every batch
    assert torch.count_nonzero(module.prototypes) > 0
    assert recorded[0]["intra"] == 0.0 and recorded[0]["inter"] == 0.0  # no prototype exists at step 1
    assert all(r["intra"] > 0 and r["inter"] > 0 for r in recorded[1:]), recorded
    moved = [float((a - b).abs().max()) for a, b in zip(teacher_before, module.teacher.parameters())]
    assert max(moved) > 0, "the EMA teacher never moved"


def test_oxnet_callbacks_come_from_its_hyperparameters(tmp_path):
    module = _oxnet(ema_decay=0.95, prototype_beta=0.5)
    trainer = _plain_trainer(tmp_path, steps=1)
    trainer.fit(module, datamodule=_Data())
    ema = [c for c in trainer.callbacks if isinstance(c, EMATeacher)]
    momentum = [c for c in trainer.callbacks if isinstance(c, PrototypeMomentum)]
    assert [c.decay for c in ema] == [0.95] and [c.beta for c in momentum] == [0.5]


def test_identical_duplicate_is_kept_once_with_a_note(tmp_path, capsys):
    module = _oxnet()
    trainer = _plain_trainer(tmp_path, callbacks=[EMATeacher(0.99), PrototypeMomentum(0.7)], steps=2)
    trainer.fit(module, datamodule=_Data())
    assert sum(isinstance(c, EMATeacher) for c in trainer.callbacks) == 1
    assert sum(isinstance(c, PrototypeMomentum) for c in trainer.callbacks) == 1
    assert module.prototype_updates.tolist() == [2.0, 2.0, 2.0]  # updated once per step, not twice
    out = capsys.readouterr().out
    assert "adds EMATeacher itself" in out and "adds PrototypeMomentum itself" in out
    # a later stage on the same trainer does not mistake the module's own callbacks for duplicates
    assert module.configure_callbacks() == []  # already attached: nothing to add again, no note
    assert "adds" not in capsys.readouterr().out


@pytest.mark.parametrize("listed, match", [
    (lambda: EMATeacher(decay=0.9), r"EMATeacher\{'decay': 0.9.*ema_decay"),
    (lambda: PrototypeMomentum(beta=0.5), r"PrototypeMomentum\{'beta': 0.5.*prototype_beta"),
])
def test_conflicting_duplicate_is_an_error_naming_it(tmp_path, listed, match):
    with pytest.raises(ValueError, match=match):
        _plain_trainer(tmp_path, callbacks=[listed()], steps=1).fit(_oxnet(), datamodule=_Data())


def test_subclass_duplicate_would_update_twice_and_is_an_error(tmp_path):
    from lightning_modules.tiny import dcmt

    class MyEMA(EMATeacher):
        pass

    module, data = dcmt(Path(tmp_path))
    with pytest.raises(ValueError, match="MyEMA"):
        _plain_trainer(tmp_path, callbacks=[MyEMA(0.99)], steps=1).fit(module, datamodule=data)


def test_mean_teacher_conflicting_decay_is_not_dropped_silently(tmp_path):
    from lightning_modules.tiny import dcmt

    module, data = dcmt(Path(tmp_path))
    with pytest.raises(ValueError, match=r"decay': 0.5.*ema_decay"):
        _plain_trainer(tmp_path, callbacks=[EMATeacher(decay=0.5)], steps=1).fit(module, datamodule=data)


def test_every_registered_method_adds_the_callbacks_it_needs(tmp_path):
    """Modules with an EMA teacher need EMATeacher, modules with prototype buffers need PrototypeMomentum: both
    must come from configure_callbacks (oxnet, dcmt, dcmt_subject today; the others need none)."""
    import lightning_modules  # noqa: F401  (imports every method file, which registers itself)
    from lightning_modules.registry import METHODS

    needing = set()
    for name, spec in sorted(METHODS.items()):
        module, _ = spec.tiny(Path(tmp_path) / name)
        own = module.configure_callbacks() or []
        own = own if isinstance(own, (list, tuple)) else [own]
        if isinstance(getattr(module, "teacher", None), torch.nn.Module):
            needing.add(name)
            assert any(isinstance(c, EMATeacher) for c in own), f"{name}: its teacher would never move"
        if "prototypes" in dict(module.named_buffers()):
            needing.add(name)
            assert any(isinstance(c, PrototypeMomentum) for c in own), f"{name}: its prototypes would stay 0"
    assert needing == {"oxnet", "dcmt", "dcmt_subject"}
