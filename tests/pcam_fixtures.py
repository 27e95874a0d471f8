"""Shared fixtures of the PCAM localisation tests (``test_pcam.py``, ``test_probe_pcam_cam.py``): a network whose
logit map is a fixed value on the bright pixels of the image, and a two-image batch with one drawn box each."""

from __future__ import annotations

import torch
from torch import nn


class BrightRegionNet(nn.Module):
    """Logit map = ``inside`` where the image is bright (> 0.5), ``outside`` elsewhere, for both classes, at input
    resolution; heatmaps are σ(logit map), like PCAM's."""

    num_classes = 2

    def __init__(self, inside: float, outside: float) -> None:
        super().__init__()
        self.inside, self.outside = inside, outside

    def forward_with_maps(self, x):
        s = torch.where(x > 0.5, self.inside, self.outside).repeat(1, 2, 1, 1)
        return s.mean((2, 3)), s

    def forward(self, x):
        return self.forward_with_maps(x)[0]

    def maps_to_heatmaps(self, s):
        return torch.sigmoid(s)


def two_box_batch() -> dict:
    """Two 32×32 images, each bright exactly on its one box (class a in image 0, class b in image 1), with the
    attention masks equal to the images and an identity letterbox frame."""
    image = torch.zeros(2, 1, 32, 32)
    image[0, 0, 4:12, 8:20] = 1
    image[1, 0, 20:30, 2:6] = 1
    return {
        "image": image, "labels": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "label_mask": torch.ones(2, 2, dtype=torch.bool),
        "boxes": [torch.tensor([[8.0, 4.0, 20.0, 12.0]]), torch.tensor([[2.0, 20.0, 6.0, 30.0]])],
        "box_labels": [torch.tensor([0]), torch.tensor([1])], "has_boxes": torch.tensor([True, True]),
        "attention_mask": image.clone(), "has_attention_mask": torch.tensor([True, True]),
        "frame": torch.tensor([[32.0, 32.0, 1.0], [32.0, 32.0, 1.0]]),
    }
