"""What the segmentation DataModules share: per-channel z-scoring and the evaluation sampler.

The DataModules live in their own modules: random 3D patches from volumes in :mod:`datamodules.volume_segmentation`
(``VolumeSegmentationDataModule``), 2D lung masks on chest X-rays in :mod:`datamodules.lung_segmentation`
(``LungSegmentationDataModule``).

Batches follow the segmentation contract of ``datamodules/batch.py``: ``image`` float (B, C, *S) and
``label_map`` long (B, 1, *S), plus ``subject_id`` / ``image_id`` and ``patient_id`` lists, and for evaluation
volumes ``spacing`` float (B, spatial_dims).

Both DataModules evaluate through :func:`eval_sampler` (:class:`~datamodules.dataset.UnpaddedDistributedSampler`):
under DDP every subject (image) of the test split is evaluated exactly once, never padded with a repeat (Lightning's
sampler would repeat one when the split does not divide evenly, counting that subject twice in the test Dice). A test split with fewer
items than ranks is refused (a rank with nothing to do would wait for the others). A validation split with fewer
items than ranks (one validation subject on two GPUs) keeps Lightning's padded sampler, with a warning when the
repeats make some subjects count more than others; validation only selects the checkpoint.
"""

from __future__ import annotations

import math
import warnings
import torch

from datamodules.dataset import UnpaddedDistributedSampler, world_and_rank

__all__ = ["zscore", "eval_sampler"]


def zscore(x: torch.Tensor, channel_dim: int = 0) -> torch.Tensor:
    """Per-channel standardisation ``(x - mean) / max(std, 1/sqrt(N))`` over all other non-batch dims.

    ``channel_dim=0`` for a sample (C, *S); ``channel_dim=1`` for a batch (B, C, *S) (each sample separately).
    """
    dims = tuple(range(channel_dim + 1, x.dim()))
    n = math.prod(x.shape[channel_dim + 1:])
    mean = x.mean(dim=dims, keepdim=True)
    std = x.std(dim=dims, keepdim=True, unbiased=False).clamp_min(1.0 / math.sqrt(n))
    return (x - mean) / std


def eval_sampler(split: str, length: int, trainer, what: str, stage: str = "test") -> UnpaddedDistributedSampler | None:
    """The unpadded evaluation sampler (each item on exactly one DDP rank), or ``None`` (Lightning's padded one) for a
    validation split smaller than the number of ranks (see the module docstring)."""
    world, rank = world_and_rank(trainer)
    if split == "all" or stage != "val" or length >= world:
        return UnpaddedDistributedSampler(length, world, rank, what)
    if length and world % length:
        warnings.warn(f"{what} has {length} item(s) for {world} DDP ranks: Lightning's sampler repeats some of them, "
                      "so they weigh more in the validation metrics that select the checkpoint. Use a validation "
                      "split of at least as many items as ranks, or a multiple of its size in ranks.", stacklevel=2)
    return None
