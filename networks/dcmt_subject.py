"""DC-MT stage 2: a bidirectional-GRU network that grades a subject from its ordered slice features.

Huo et al., Medical Image Analysis 80:102508 (2022), arXiv:2108.02476; dossier
``../shared/research/method-dcmt.md`` §a.10 (the reference's "SimpleRNN").

With the paper's configuration (512-d features, 24 slices, embedding 256→128, 2-layer bi-GRU with
hidden 96, 3 classes) the network has exactly 1,937,344 trainable parameters:

1. per-slice embedding (the reference's 1×1 convs on a (B, 512, 24, 1) map, here ``Conv1d`` with
   kernel 1, identical parameters): Dropout → conv 512→256 → BN → ReLU → Dropout → conv 256→128 → BN → ReLU
   → Dropout. ``Dropout1d`` on (B, C, T) drops whole feature channels across all slices, as ``Dropout2d``
   on (B, C, T, 1) does;
2. skip path: a learned projection of the whole sequence, ``Conv1d(128, 192, kernel=T)`` (the reference's
   ``Conv2d`` with a (24, 1) kernel);
3. recurrent path: 2-layer bi-GRU (hidden 96) → ``Conv1d(192, 192, kernel=T)``;
4. ``logits = Linear(192 → K, no bias)(skip + recurrent)``.

The (T, 1) kernels fix the sequence length, so subjects are centre-cropped or zero-padded to
``seq_len`` first (:func:`center_crop_or_pad`, positions ⌊(T − n)/2⌋ onwards). The reference loads the
slice probabilities but never uses them; this network takes the features only.

Example:
    >>> import torch
    >>> net = BiGRUAggregator()
    >>> sum(p.numel() for p in net.parameters() if p.requires_grad)
    1937344
    >>> net(torch.randn(2, 24, 512)).shape
    torch.Size([2, 3])
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BiGRUAggregator", "center_crop_or_pad"]


def center_crop_or_pad(features: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre a subject's (n, D) slice sequence in ``length`` positions.

    ``n ≥ length``: keep slices ``⌊(n − length)/2⌋ …`` (the central ``length``); ``n < length``: zero-pad with
    the real slices starting at position ``⌊(length − n)/2⌋``. Returns the (length, D) sequence and a bool
    (length,) mask of real slices. E.g. 18 slices in 24 positions occupy 3–20; 30 slices keep slices 3–26.
    """
    n = features.shape[0]
    if n >= length:
        start = (n - length) // 2
        return features[start:start + length], torch.ones(length, dtype=torch.bool)
    out = features.new_zeros((length, *features.shape[1:]))
    mask = torch.zeros(length, dtype=torch.bool)
    start = (length - n) // 2
    out[start:start + n] = features
    mask[start:start + n] = True
    return out, mask


class BiGRUAggregator(nn.Module):
    """Subject-level classifier over a fixed-length sequence of slice features.

    Args:
        in_features: slice feature size (512).
        num_classes: subject classes (3).
        seq_len: sequence length T (24); inputs must have exactly this length.
        embed_channels: widths of the per-slice embedding (256, 128).
        hidden_size: GRU hidden size per direction (96).
        num_layers: GRU layers (2).
        dropout: dropout of the embedding and between GRU layers (0.5).
    """

    def __init__(self, in_features: int = 512, num_classes: int = 3, seq_len: int = 24,
                 embed_channels: tuple[int, int] = (256, 128), hidden_size: int = 96, num_layers: int = 2,
                 dropout: float = 0.5) -> None:
        super().__init__()
        self.in_features, self.seq_len, self.num_classes = in_features, seq_len, num_classes
        c1, c2 = embed_channels
        self.embed = nn.Sequential(
            nn.Dropout1d(dropout), nn.Conv1d(in_features, c1, 1, bias=False), nn.BatchNorm1d(c1), nn.ReLU(inplace=True),
            nn.Dropout1d(dropout), nn.Conv1d(c1, c2, 1, bias=False), nn.BatchNorm1d(c2), nn.ReLU(inplace=True),
            nn.Dropout1d(dropout),
        )
        width = 2 * hidden_size
        self.skip = nn.Conv1d(c2, width, kernel_size=seq_len)
        self.gru = nn.GRU(c2, hidden_size, num_layers=num_layers, batch_first=True, bidirectional=True,
                          dropout=dropout if num_layers > 1 else 0.0)
        self.recurrent_head = nn.Conv1d(width, width, kernel_size=seq_len)
        self.classifier = nn.Linear(width, num_classes, bias=False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, 2·hidden) subject embedding (skip + recurrent paths)."""
        if x.dim() != 3 or x.shape[1] != self.seq_len:
            raise ValueError(f"expected (B, {self.seq_len}, D) slice features, got {tuple(x.shape)}; "
                             "centre-crop or pad each subject with center_crop_or_pad first")
        e = self.embed(x.transpose(1, 2))  # (B, C, T)
        skip = self.skip(e).squeeze(-1)
        seq, _ = self.gru(e.transpose(1, 2).contiguous())  # (B, T, 2H)
        return skip + self.recurrent_head(seq.transpose(1, 2)).squeeze(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))
