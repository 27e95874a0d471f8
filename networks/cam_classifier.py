"""The CAM baseline network: a timm backbone, global average pooling and a linear head.

Zhou et al., "Learning Deep Features for Discriminative Localization", CVPR 2016 (arXiv:1512.04150). With GAP
and a linear head, the class activation map ``M_k = w_k · F + b_k`` averages exactly to the image logit, so the
maps are the model's own evidence rather than a post-hoc gradient method.

Example::

    net = CAMNet("test_resnet", num_classes=4)
    logits = net(torch.randn(2, 1, 64, 64))            # (2, 4)
    cams = net.attention_maps(torch.randn(2, 1, 64, 64))  # (2, 4, 2, 2) in [0, 1]
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from networks.backbones import create_backbone
from networks.cam_heads import minmax_normalize


class CAMNet(nn.Module):
    """timm backbone -> GAP -> dropout -> linear; ``attention_maps`` returns min-max normalised CAMs.

    Args:
        backbone: timm model name.
        num_classes: number of outputs.
        in_chans: input channels (1 for X-rays).
        pretrained, weights_file: see :func:`networks.backbones.create_backbone`.
        drop_rate: dropout before the linear head.
    """

    def __init__(self, backbone: str = "resnet18", num_classes: int = 4, in_chans: int = 1, pretrained: bool = False,
                 weights_file: str | Path | None = None, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone = create_backbone(backbone, pretrained=pretrained, weights_file=weights_file,
                                        in_chans=in_chans, num_classes=0, global_pool="")
        self.num_features = self.backbone.num_features
        self.dropout = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> feature map (B, C, h, w)."""
        return self.backbone.forward_features(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(features.mean(dim=(2, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def cam_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Class activation maps in logit units, (B, K, h, w); their spatial mean is the image logit."""
        return torch.einsum("bchw,kc->bkhw", features, self.head.weight) + self.head.bias[None, :, None, None]

    def forward_with_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.forward_features(x)
        return self.forward_head(features), self.cam_logits(features)

    def maps_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """Min-max normalised CAMs (B, K, h, w) in [0, 1] from a feature map."""
        return minmax_normalize(self.cam_logits(features.detach()))

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> torch.Tensor:
        return self.maps_from_features(self.forward_features(x))
