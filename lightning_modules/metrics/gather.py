"""Python objects gathered from every DDP rank, for evaluation states that are lists of records rather than tensors
(test predictions with their patient ids, detection (prediction, target) pairs)."""

from __future__ import annotations

import torch.distributed as dist


def all_gather_list(items: list) -> list:
    """``items`` of every rank concatenated in rank order (``items`` itself in a single process). A collective:
    every rank must call it. CPU objects only (``all_gather_object`` pickles them)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return list(items)
    shards: list = [None] * dist.get_world_size()
    dist.all_gather_object(shards, items)
    return [item for shard in shards for item in shard]
