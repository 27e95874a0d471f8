"""Shared fixture of the Non-local U-Net sliding-window tests (``test_nonlocal_unet.py``,
``test_probe_nonlocal_inference.py``)."""

from __future__ import annotations

import torch
from torch import nn


class WindowRecorder(nn.Module):
    """A two-class 3D "network" for sliding-window tests: the input holds the axis-0 voxel index, and every call
    appends the first index of each window it sees to ``starts``. Subclasses give the logits of a window in
    :meth:`logits`; a zero parameter keeps the module trainable-looking (the optimiser and device moves need one)."""

    num_classes = 2

    def __init__(self) -> None:
        super().__init__()
        self.starts: list[int] = []
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        self.starts += [int(v) for v in x[:, 0, 0, 0, 0]]
        return self.logits(x) + self.dummy

    def logits(self, x):  # pragma: no cover - abstract
        raise NotImplementedError
