"""Oracles of the masked classification losses (:mod:`networks.masked_loss`) used by the CAM baseline and DC-MT."""

from __future__ import annotations

import math

import pytest
import torch

from networks.masked_loss import masked_bce, masked_ce


def test_masked_bce_averages_the_known_entries_only():
    """Known: (logit 0, label 1) -> ln 2 and (logit 2, label 0) -> ln(1 + e^2) = 2.126928; the third entry is
    unknown and must not count (with it the mean would be (ln 2 + 2.126928 + ln(1 + e)) / 3)."""
    logits = torch.tensor([[0.0, 2.0, -1.0]])
    labels = torch.tensor([[1.0, 0.0, 1.0]])
    mask = torch.tensor([[True, True, False]])
    expected = (math.log(2) + math.log(1 + math.e ** 2)) / 2
    assert float(masked_bce(logits, labels, mask)) == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(1.410038, abs=1e-6)


def test_masked_bce_pos_weight_scales_the_positive_term():
    loss = masked_bce(torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]), torch.ones(1, 2, dtype=torch.bool),
                      pos_weight=torch.tensor([3.0, 3.0]))
    assert float(loss) == pytest.approx((3 * math.log(2) + math.log(2)) / 2, rel=1e-6)


def test_masked_ce_skips_images_without_a_label():
    """Image 0: logits (ln 3, 0), class 0 -> −ln(3/4) = 0.287682; image 1 has no known label (with it: + ln 2, / 2)."""
    logits = torch.tensor([[math.log(3), 0.0], [0.0, 0.0]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    mask = torch.tensor([[True, True], [False, False]])
    assert float(masked_ce(logits, labels, mask)) == pytest.approx(-math.log(0.75), rel=1e-6)


@pytest.mark.parametrize("loss", [masked_bce, masked_ce])
def test_nothing_known_gives_zero_with_a_gradient_path(loss):
    logits = torch.randn(3, 4, requires_grad=True)
    labels = torch.nn.functional.one_hot(torch.tensor([0, 1, 2]), 4).float()
    value = loss(logits, labels, torch.zeros(3, 4, dtype=torch.bool))
    assert float(value) == 0.0
    value.backward()  # an unlabeled-only batch must not break the optimiser step
    assert logits.grad is not None and float(logits.grad.abs().sum()) == 0.0
