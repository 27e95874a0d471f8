"""Probes of the Non-local U-Net's sliding-window inference (issue 14 s7, unlisted components).

* Blending: the reference averages the softmax of every window that covers a voxel with equal weight (MONAI
  ``mode="constant"``). The existing stride test gives every window the same per-voxel output, so any weighting
  (e.g. MONAI's ``"gaussian"``) passes it; here each window predicts its own value.
* Stages: validation slides with ``val_overlap`` (cheap periodic validation), test with ``overlap`` (the reference
  stride 8). Swapping them would report test Dice at the coarse stride without any error.
"""

from __future__ import annotations

import math

import torch

from lightning_modules.nonlocal_unet import NonLocalUNetModule
from nonlocal_fixtures import WindowRecorder


class _WindowNet(WindowRecorder):
    """Every window predicts class-1 logit = (its first index) / 16 at all voxels, class-0 logit 0, and records
    its start."""

    def logits(self, x):
        start = x[:, :1, :1, :1, :1]  # (B, 1, 1, 1, 1): first voxel of each window
        one = (start / 16).expand(-1, 1, *x.shape[2:])
        return torch.cat([torch.zeros_like(one), one], 1)


def _axis_image(length: int) -> torch.Tensor:
    return torch.arange(length, dtype=torch.float32).view(1, 1, length, 1, 1).expand(1, 1, length, 4, 4).contiguous()


def test_overlapping_windows_are_averaged_with_equal_weights():
    """Length 48, window 32, overlap 0.5: windows start at 0 and 16. Oracle P(class 1): σ(0) = 0.5 on voxels 0-15
    (first window only), (σ(0) + σ(1)) / 2 = 0.615529 on 16-31 (both), σ(1) = 0.731059 on 32-47 (second only)."""
    net = _WindowNet()
    module = NonLocalUNetModule(net, roi_size=(32, 4, 4), overlap=0.5, window_zscore=False, sw_batch_size=8)
    probs = module.predict_probs(_axis_image(48))[0, 1]  # (48, 4, 4): every voxel, not one line (a weighting
    assert sorted(set(net.starts)) == [0, 16]            # can be flat along one line, e.g. at a window's corner)
    sigmoid = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    expected = torch.tensor([0.5] * 16 + [(sigmoid(0) + sigmoid(1)) / 2] * 16 + [sigmoid(1)] * 16)
    torch.testing.assert_close(probs, expected[:, None, None].expand(48, 4, 4), atol=1e-6, rtol=0)


def test_validation_uses_val_overlap_and_test_uses_overlap():
    net = _WindowNet()
    module = NonLocalUNetModule(net, roi_size=(32, 4, 4), overlap=0.75, val_overlap=0.5, window_zscore=False)
    image = _axis_image(64)
    module.predict_probs(image, stage="val")
    assert sorted(set(net.starts)) == [0, 16, 32]  # stride 16
    net.starts.clear()
    module.predict_probs(image, stage="test")
    assert sorted(set(net.starts)) == [0, 8, 16, 24, 32]  # stride 8, the reference's
    net.starts.clear()
    module.predict_step({"image": image}, 0)  # prediction slides like test
    assert sorted(set(net.starts)) == [0, 8, 16, 24, 32]
