"""Probes of PCAM's heatmaps and of the CAM heads (issue 14 s7, unlisted components): removing or bending one of
them must turn a test red.

* PCAM's test step scores localisation on σ(logit map), the paper's probability map (ChestX-ray14 protocol:
  box where σ > 0.5, i.e. logit > 0). Feeding the raw logit map instead moves the threshold to logit 0.5.
* For spatially constant features every pool sees the same vector at every position, so the CAM equals the image
  logit everywhere. This holds for the concatenating pools too (AVG_MAX's pseudo-CAM Σ_e w_{k,e}ᵀ x_i + b_k);
  a pseudo-CAM built from one half of the weights breaks it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_modules.pcam import PCAMModule
from networks.cam_heads import CAMHeads
from networks.pooling import create_pool
from pcam_fixtures import BrightRegionNet, two_box_batch


def test_test_step_scores_the_probability_map_at_the_papers_threshold():
    """Oracle: the σ-map exceeds cam_threshold 0.5 exactly on the drawn box, so T(IoU) at 0.7 and T(IoBB) at 0.9 are 1.
    Scored on the raw logit map (clamped to [0, 1]: 0.4 inside), nothing exceeds 0.5 and both are 0."""
    # logit map +0.4 on the bright box, −3 elsewhere: σ = 0.599 inside, 0.047 outside
    module = PCAMModule(BrightRegionNet(0.4, -3.0), class_names=["a", "b"]).eval()
    batch = {**two_box_batch(), "image_id": ["i0", "i1"], "patient_id": ["p0", "p1"]}
    with pytest.warns(UserWarning, match="self.log"):  # no Trainer: Lightning drops the logged values
        module.test_step(batch, 0)  # the module's own path from logit maps to the metrics
    out = module.test_localization.compute()
    assert out["test/loc/iou@0.7"] == 1.0 and out["test/loc/iobb@0.9"] == 1.0
    assert out["test/loc/pointing"] == 1.0


@pytest.mark.parametrize("pool", ["avg", "max", "lse", "exp", "pcam", "avg_max", "avg_max_lse"])
def test_cam_equals_the_image_logit_on_constant_features(pool):
    """With x_i = v at every position, every pool returns v (or [v, v] for AVG_MAX), so z_k = Σ_e w_{k,e}ᵀ v + b_k
    and the CAM s_{k,i} is that same value at every i. Oracle written from the weights, not from CAMHeads."""
    torch.manual_seed(0)
    heads = CAMHeads(6, 3, create_pool(pool)).double()
    nn.init.normal_(heads.weight, std=0.5)
    nn.init.normal_(heads.bias, std=0.5)
    v = torch.rand(2, 6, dtype=torch.float64) + 0.1  # positive: LINEAR-style pools need x ≥ 0
    x = v[:, :, None, None].expand(2, 6, 4, 5).contiguous()
    z, s = heads(x)
    expand = heads.weight.shape[1] // 6
    oracle = v @ heads.weight.view(3, expand, 6).sum(1).T + heads.bias  # (B, K)
    torch.testing.assert_close(z, oracle, atol=1e-6, rtol=0)  # EXP: float32 softmax
    torch.testing.assert_close(s, oracle[:, :, None, None].expand_as(s), atol=1e-6, rtol=0)
