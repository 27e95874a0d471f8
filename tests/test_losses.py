"""Loss oracles computed by hand (issue 14 s7): the Non-local U-Net's ``loss="dicece"`` (MONAI DiceCELoss: softmax,
one-hot target, background included, smooth 1e-5, Dice and CE weighted 1 each)."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_modules.nonlocal_unet import NonLocalUNetModule
from networks.nonlocal_unet import NonLocalUNet


def test_dicece_oracle():
    """One image, 2 classes, 2 pixels. Pixel 0: logits (ln 3, 0) -> p = (3/4, 1/4), truth class 0; pixel 1: logits
    (0, 0) -> p = (1/2, 1/2), truth class 1.
      CE   = (−ln 3/4 − ln 1/2) / 2                                  = 0.490415
      Dice = mean over classes of 1 − (2 Σ p·g + ε)/(Σ p + Σ g + ε), ε = 1e-5:
             class 0: 1 − 1.5/2.25 = 1/3;  class 1: 1 − 1.0/1.75 = 3/7  -> (1/3 + 3/7)/2 = 16/42 = 0.380952
      DiceCE = 0.871367 (ε moves it by < 1e-5).
    Excluding the background would give 0.490415 + 3/7 = 0.918986; sigmoid instead of softmax another value."""
    module = NonLocalUNetModule(NonLocalUNet(2, 1, 2, filters=4), loss="dicece")
    logits = torch.tensor([[[[math.log(3), 0.0]], [[0.0, 0.0]]]])  # (B=1, K=2, 1, 2)
    target = torch.tensor([[[[0, 1]]]])  # (B=1, 1, 1, 2)
    ce = (-math.log(0.75) - math.log(0.5)) / 2
    dice = (1 / 3 + 3 / 7) / 2
    assert float(module.compute_loss(logits, target)) == pytest.approx(ce + dice, abs=2e-5)
    assert ce + dice == pytest.approx(0.871367, abs=1e-6)
    plain = NonLocalUNetModule(NonLocalUNet(2, 1, 2, filters=4), loss="ce")
    assert float(plain.compute_loss(logits, target)) == pytest.approx(ce, abs=1e-6)
