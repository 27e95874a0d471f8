"""Map-style dataset, mixed-stream sampler and collate function for 2D images."""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, get_worker_info

from datamodules.batch import STREAM_BOX, STREAM_UNLABELED
from datamodules.io import read_gray_uint8, read_mask
from datamodules.manifest import Manifest
from datamodules.transforms import CXRTransform


class CXRDataset(Dataset):
    """One sample per manifest row, shaped by the batch contract (``datamodules/batch.py``).

    ``streams`` gives each row's supervision stream. Rows of the unlabeled stream carry all-zero ``labels`` and
    an all-False ``label_mask`` so that no code path can read their ground truth (the DC-MT reference leaked
    labels of "unlabeled" slices into its attention-consistency term). Only box-stream rows carry boxes.
    ``load_masks=False`` never decodes the mask files: the masks travel as zeros, flagged absent.
    """

    def __init__(self, manifest: Manifest, transform: CXRTransform, streams: np.ndarray | int,
                 load_masks: bool = True) -> None:
        self.manifest = manifest
        self.load_masks = load_masks
        self.transform = transform
        self.streams = np.broadcast_to(np.asarray(streams, dtype=np.int64), (len(manifest),)).copy()
        self.records = manifest.records[["image_id", "image_path", "patient_id", "mask_path", "attention_mask_path"]]
        self._boxes = manifest.boxes_by_image()

    def __len__(self) -> int:
        return len(self.manifest)

    def __getitem__(self, index: int) -> dict:
        image_id, image_path, patient_id, mask_path, attention_path = self.records.iloc[index]
        stream = int(self.streams[index])
        image = read_gray_uint8(image_path)
        hw = tuple(image.shape[1:])
        mask = read_mask(mask_path, hw) if mask_path and self.load_masks else None
        attention = read_mask(attention_path, hw) if attention_path and self.load_masks else None
        boxes = self._boxes.get(str(image_id)) if stream == STREAM_BOX else None
        sample = self.transform(image, boxes, mask=mask, attention_mask=attention)
        labels = torch.from_numpy(self.manifest.labels[index].copy())
        known = ~torch.isnan(labels)
        if stream == STREAM_UNLABELED:
            known[:] = False
        sample["labels"] = torch.where(known, labels, torch.zeros_like(labels))
        sample["label_mask"] = known
        sample["stream"] = torch.tensor(stream)
        sample["has_boxes"] = torch.tensor(stream == STREAM_BOX)
        sample["has_mask"] = torch.tensor(mask is not None)
        sample["has_attention_mask"] = torch.tensor(attention is not None)
        sample["image_id"] = str(image_id)
        sample["patient_id"] = str(patient_id)
        return sample


_LIST_KEYS = ("boxes", "box_labels", "image_id", "patient_id")


def collate_cxr(samples: Sequence[dict]) -> dict:
    """Stack tensors; keep per-image variable-length boxes and the id strings as lists."""
    batch: dict = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        batch[key] = values if key in _LIST_KEYS else torch.stack(values)
    return batch


def seed_worker_transform(worker_id: int, rank: int = 0) -> None:
    """DataLoader ``worker_init_fn``: give each worker's MONAI transforms their own random state.

    ``torch.initial_seed()`` in a worker differs per worker and per epoch; mixing in the rank (bind it with
    ``functools.partial(seed_worker_transform, rank=global_rank)``) makes DDP ranks draw different augmentations
    too, because the base seed is the same on every rank.
    """
    info = get_worker_info()
    if info is not None and hasattr(info.dataset, "transform"):
        seed = np.random.SeedSequence([torch.initial_seed() % (2**32), rank]).generate_state(1)[0]
        info.dataset.transform.set_random_state(int(seed))


class MixedStreamSampler(DistributedSampler):
    """Yields indices so that every consecutive block of ``sum(batch_sizes)`` holds exactly ``batch_sizes[s]``
    images of stream ``s`` (in stream order), i.e. a DataLoader with ``batch_size=sum(batch_sizes)`` and
    ``drop_last=True`` produces fixed per-stream counts.

    The ``epoch_stream`` defines the epoch (each of its images is seen at most once per epoch); the other streams
    cycle, reshuffled on every pass. Under DDP every rank draws a disjoint shard of every stream (a seeded
    permutation shared by all ranks, then ``[rank::world_size]``); batch sizes are **per rank**, so the global
    batch is ``world_size * sum(batch_sizes)``. Subclassing ``DistributedSampler`` tells Lightning the sampler
    is already distributed and must not be replaced.
    """

    def __init__(
        self,
        streams: np.ndarray,
        batch_sizes: dict[int, int],
        epoch_stream: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
    ) -> None:
        # Deliberately not calling DistributedSampler.__init__: it needs a dataset and an initialised process group.
        self.streams = np.asarray(streams)
        self.batch_sizes = {s: b for s, b in batch_sizes.items() if b > 0}
        if epoch_stream not in self.batch_sizes:
            raise ValueError(f"epoch_stream {epoch_stream} has batch size 0")
        self.epoch_stream = epoch_stream
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.epoch = 0
        self.members = {s: np.flatnonzero(self.streams == s) for s in self.batch_sizes}
        for s, idx in self.members.items():
            if len(idx) < num_replicas * self.batch_sizes[s] and s == epoch_stream:
                raise ValueError(f"stream {s} has {len(idx)} images, fewer than one batch per rank "
                                 f"({self.batch_sizes[s]} x {num_replicas} ranks)")
            if len(idx) < num_replicas:
                raise ValueError(f"stream {s} has {len(idx)} images, fewer than {num_replicas} ranks")
        per_rank = len(self.members[epoch_stream]) // num_replicas
        self.num_batches = per_rank // self.batch_sizes[epoch_stream]
        self.batch_size = sum(self.batch_sizes.values())

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def _shard(self, stream: int, cycle: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch, stream, cycle])
        perm = rng.permutation(self.members[stream])
        usable = (len(perm) // self.num_replicas) * self.num_replicas
        return perm[:usable][self.rank::self.num_replicas]

    def _stream_iter(self, stream: int) -> Iterator[int]:
        cycle = 0
        while True:
            yield from self._shard(stream, cycle).tolist()
            cycle += 1

    def __iter__(self) -> Iterator[int]:
        iters = {s: self._stream_iter(s) for s in self.batch_sizes}
        for _ in range(self.num_batches):
            for s in sorted(self.batch_sizes):
                for _ in range(self.batch_sizes[s]):
                    yield next(iters[s])


class UnpaddedDistributedSampler(DistributedSampler):
    """Evaluation sampler: rank r takes positions ``r, r + world, ...`` with no padding, so every image is
    evaluated exactly once and epoch-level metrics equal a single-process run."""

    def __init__(self, length: int, num_replicas: int = 1, rank: int = 0) -> None:
        self.length, self.num_replicas, self.rank = length, num_replicas, rank
        self.epoch = 0

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.num_replicas))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


def num_batches(length: int, batch_size: int) -> int:
    return math.ceil(length / batch_size)
