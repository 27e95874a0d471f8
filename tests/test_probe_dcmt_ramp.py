"""Probe (issue 14 s7): DC-MT's epoch/step-to-ramp mapping, through a real ``Trainer`` (nothing monkeypatched).

Dossier ``method-dcmt.md`` a.8, with e the 1-based epoch (or the optimiser step t with ``ramp_unit="step"``):
    ω_cls(e) = c · exp(−5 (1 − min(e, T)/T)²),  ω_att(e) = a · exp(−5 (1 − (clip(e, s, T) − s)/T)²)   for e ≥ s,
    both 0 for e < s (the switch). L = L_cls + 0.5 L_mse + 0.001 L_bound + ω_cls L_cc + ω_att L_ac.
The ramps depend on e/T and s/T only, so s = 2, T = 4 here gives the dossier's values for s = 20, T = 40 at
e = 20, 30, 40: ω_cls = 1.43252, 3.65808, 5 and ω_att = 0.006738, 0.060055, 0.286505 (the cap).
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch

from lightning_modules.dcmt import MeanTeacherModule
from networks.dcmt import DCMTNet

START, T = 2, 4


def _omega(e: float) -> tuple[float, float]:
    """The dossier's formulas, written out (c = 5, a = 1)."""
    if e < START:
        return 0.0, 0.0
    w_cls = 5 * math.exp(-5 * (1 - min(e, T) / T) ** 2)
    w_att = math.exp(-5 * (1 - (min(max(e, START), T) - START) / T) ** 2)
    return w_cls, w_att


def test_oracle_matches_the_dossier_values():
    assert _omega(1) == (0.0, 0.0)
    for e, (w_cls, w_att) in {2: (1.43252, 0.006738), 3: (3.65808, 0.060055), 4: (5.0, 0.286505),
                              9: (5.0, 0.286505)}.items():
        assert _omega(e) == pytest.approx((w_cls, w_att), abs=1e-5)


def _batch(seed: int, size: int = 32) -> dict:
    """2 labelled + 3 unlabeled slices; the teacher sees an independent image, so the consistency terms are > 0."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.zeros(5, 3)
    labels[0, 1] = labels[1, 2] = 1.0
    mask = torch.zeros(5, 1, size, size)
    mask[..., 5:15, 5:20] = 1.0
    return {"image": torch.randn(5, 1, size, size, generator=g), "image_teacher": torch.randn(5, 1, size, size, generator=g),
            "labels": labels, "label_mask": (torch.arange(5) < 2)[:, None].expand(5, 3).clone(),
            "stream": torch.tensor([1, 1, 2, 2, 2]), "attention_mask": mask,
            "has_attention_mask": torch.ones(5, dtype=torch.bool)}


class _Data(pl.LightningDataModule):
    def train_dataloader(self):
        return torch.utils.data.DataLoader([_batch(0), _batch(1)], batch_size=None)  # 2 steps per epoch


class _LoggedWeights(pl.Callback):
    def __init__(self) -> None:
        self.per_epoch: list[tuple[float, float]] = []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        m = trainer.callback_metrics
        self.per_epoch.append((float(m["train/w_cls"]), float(m["train/w_att"])))


def _fit(ramp_unit: str, epochs: int):
    torch.manual_seed(0)
    module = MeanTeacherModule(DCMTNet("test_resnet", num_classes=3, fa_channels=8, head_channels=8),
                               consistency_start=START, cls_rampup=T, att_rampup=T, ramp_unit=ramp_unit)
    seen = []
    compute = module.compute_losses

    def observe(batch):  # observes the real compute_losses (the ramp is not replaced)
        terms = compute(batch)
        seen.append((module.current_epoch, module.global_step, {k: v.detach() for k, v in terms.items()}))
        return terms

    module.compute_losses = observe
    logged = _LoggedWeights()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                         callbacks=[logged])
    trainer.fit(module, datamodule=_Data())
    return seen, logged.per_epoch


def _check_total(terms: dict, w_cls: float, w_att: float) -> None:
    base = terms["cls"] + 0.5 * terms["mse"] + 0.001 * terms["bound"]
    if w_cls == 0 and w_att == 0:
        assert "cons_cls" not in terms and "cons_att" not in terms  # before the switch: not even computed
        torch.testing.assert_close(terms["total"], base)
        return
    assert "cons_cls" in terms, f"no consistency term although ω = ({w_cls:.4g}, {w_att:.4g})"
    # L_cc is large enough that a wrong ω_cls shows: Δω·L_cc ≫ the float32 tolerance (the teacher sees an independent
    # image). L_ac may be ~0 on a trajectory where the CAMs agree, so ω_att is pinned by the logged weights instead.
    assert float(terms["cons_cls"]) > 1e-4 and "cons_att" in terms
    want = base + w_cls * terms["cons_cls"] + w_att * terms["cons_att"]
    torch.testing.assert_close(terms["total"], want, rtol=0, atol=1e-6)


def test_epoch_ramp_uses_the_one_based_epoch():
    seen, logged = _fit("epoch", epochs=2)
    # (epoch index, step): a ramp read from the 0-based epoch would be 0 in both epochs, one read from the step
    # would differ between steps 2 and 3
    assert [(e, t) for e, t, _ in seen] == [(0, 0), (0, 1), (1, 2), (1, 3)]
    for epoch_index, _, terms in seen:
        _check_total(terms, *_omega(epoch_index + 1))  # Lightning's epoch 0 is the dossier's epoch 1
    assert logged == [pytest.approx(_omega(e), abs=1e-5) for e in (1, 2)]


def test_step_ramp_uses_the_optimizer_step():
    seen, _ = _fit("step", epochs=2)
    assert [t for _, t, _ in seen] == [0, 1, 2, 3]
    for _, step, terms in seen:
        _check_total(terms, *_omega(step))  # t = optimiser steps taken before this one: 0 ... 3
