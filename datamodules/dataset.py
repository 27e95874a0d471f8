"""Map-style dataset, mixed-stream sampler and collate function for 2D images, and per-sample random keys.

Augmentation randomness is a function of the sample's *key*, never of a worker's history: a training sampler
built with ``keyed=True`` yields :class:`SampleKey` ``(index, epoch, position)`` (``position`` = the sample's place
in this rank's epoch stream), and the dataset seeds the sample's transforms with :func:`sample_seed` of
``(seed, run seed, rank, epoch, position, index)`` before applying them. The sampler lives in the main process
and gets ``set_epoch`` from Lightning, so the epoch reaches persistent workers through the index they are handed
(the dataset object itself is pickled into them once). Consequences: the augmentation of a sample does not depend
on ``num_workers``, on ``persistent_workers``, on which worker decoded it or on what was decoded before, so a run
resumed from a checkpoint draws exactly what the uninterrupted run draws; and a keyed sampler can start an epoch
at any batch (:meth:`MixedStreamSampler.skip_batches`), which makes mid-epoch resume exact as well.
"""

from __future__ import annotations

import math
import os
from typing import Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from datamodules.batch import STREAM_BOX, STREAM_UNLABELED
from datamodules.io import read_gray_uint8, read_mask
from datamodules.manifest import DataError, Manifest
from datamodules.transforms import CXRTransform


class SampleKey(NamedTuple):
    """What a keyed training sampler hands the dataset instead of a bare index."""

    index: int
    epoch: int
    position: int


def split_key(item) -> tuple[int, int, int]:
    """``(index, epoch, position)`` of a :class:`SampleKey`; a bare index ``i`` is the key ``(i, 0, i)`` (direct
    ``dataset[i]`` access: deterministic, the same as epoch 0 at position ``i``)."""
    if isinstance(item, tuple):
        index, epoch, position = item
        return int(index), int(epoch), int(position)
    return int(item), 0, int(item)


def world_and_rank(trainer) -> tuple[int, int]:
    """``(world size, global rank)`` of the DataModule's trainer; ``(1, 0)`` before it is attached (direct use)."""
    return (1, 0) if trainer is None else (trainer.world_size, trainer.global_rank)


def run_seed() -> int:
    """The run's global seed (``seed_everything`` / ``--seed_everything`` stores it in ``PL_GLOBAL_SEED``), so runs
    with different seeds augment differently; 0 when no global seed was set."""
    value = os.environ.get("PL_GLOBAL_SEED", "")
    try:
        return int(value) % (2**32)
    except ValueError:
        return 0


def hashed_seed(*values: int) -> int:
    """A 32-bit seed hashed (``numpy.random.SeedSequence``) from integers: different tuples give independent streams."""
    return int(np.random.SeedSequence([int(v) % (2**32) for v in values]).generate_state(1)[0])


def sample_seed(base: Sequence[int], item) -> int:
    """Seed of one sample's augmentation: a hash of ``base`` (data seed, run seed, rank) and the sample's
    ``(epoch, position, index)``; independent streams for different keys."""
    index, epoch, position = split_key(item)
    return hashed_seed(*base, epoch, position, index)


class CXRDataset(Dataset):
    """One sample per manifest row, shaped by the batch contract (``datamodules/batch.py``).

    ``streams`` gives each row's supervision stream. Rows of the unlabeled stream carry all-zero ``labels`` and
    an all-False ``label_mask`` so that no code path can read their ground truth (the DC-MT reference leaked
    labels of "unlabeled" slices into its attention-consistency term). Only box-stream rows carry boxes.
    ``load_masks=False`` never decodes the mask files: the masks travel as zeros, flagged absent.
    ``seed_base``: with a random (training) transform, each sample's transform is seeded from ``seed_base`` and
    the sample's key (see the module docstring) before it is applied.
    """

    def __init__(self, manifest: Manifest, transform: CXRTransform, streams: np.ndarray | int,
                 load_masks: bool = True, seed_base: Sequence[int] = (0,)) -> None:
        self.manifest = manifest
        self.seed_base = tuple(int(v) for v in seed_base)
        self.load_masks = load_masks
        self.transform = transform
        self.streams = np.broadcast_to(np.asarray(streams, dtype=np.int64), (len(manifest),)).copy()
        self.records = manifest.records[["image_id", "image_path", "patient_id", "mask_path", "attention_mask_path"]]
        self._boxes = manifest.boxes_by_image()

    def __len__(self) -> int:
        return len(self.manifest)

    def __getitem__(self, item: int | SampleKey) -> dict:
        index = split_key(item)[0]
        image_id, image_path, patient_id, mask_path, attention_path = self.records.iloc[index]
        stream = int(self.streams[index])
        image = read_gray_uint8(image_path)
        hw = tuple(image.shape[1:])
        mask = read_mask(mask_path, hw) if mask_path and self.load_masks else None
        attention = read_mask(attention_path, hw) if attention_path and self.load_masks else None
        boxes = self._boxes.get(str(image_id)) if stream == STREAM_BOX else None
        if self.transform.train:
            self.transform.set_random_state(sample_seed(self.seed_base, item))
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


def collate_samples(samples: Sequence[dict]) -> dict:
    """Stack tensors; keep strings (ids) as lists: the batches of slices, subject features and segmentation."""
    return {k: [s[k] for s in samples] if isinstance(samples[0][k], str) else torch.stack([s[k] for s in samples])
            for k in samples[0]}


class MixedStreamSampler(DistributedSampler):
    """Yields indices so that every consecutive block of ``sum(batch_sizes)`` holds exactly ``batch_sizes[s]``
    images of stream ``s`` (in stream order), i.e. a DataLoader with ``batch_size=sum(batch_sizes)`` and
    ``drop_last=True`` produces fixed per-stream counts.

    The ``epoch_stream`` defines the epoch (each of its images is seen at most once per epoch); the other streams
    cycle, reshuffled on every pass. Under DDP every rank draws a disjoint shard of every stream (a seeded
    permutation shared by all ranks, then ``[rank::world_size]``); batch sizes are **per rank**, so the global
    batch is ``world_size * sum(batch_sizes)``. Subclassing ``DistributedSampler`` tells Lightning the sampler
    is already distributed and must not be replaced.

    ``keyed=True`` yields :class:`SampleKey` ``(index, epoch, position)`` instead of bare indices, for datasets that
    seed each sample's augmentation from its key. :meth:`skip_batches` makes the next iteration start at a given
    batch of the epoch (mid-epoch resume); the order is a function of ``(seed, epoch)`` alone, so the batches that
    follow are the uninterrupted run's.
    """

    def __init__(
        self,
        streams: np.ndarray,
        batch_sizes: dict[int, int],
        epoch_stream: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        keyed: bool = False,
    ) -> None:
        # Deliberately not calling DistributedSampler.__init__: it needs a dataset and an initialised process group.
        self.streams = np.asarray(streams)
        self.batch_sizes = {s: b for s, b in batch_sizes.items() if b > 0}
        if epoch_stream not in self.batch_sizes:
            raise ValueError(f"epoch_stream {epoch_stream} has batch size 0")
        self.epoch_stream = epoch_stream
        self.num_replicas, self.rank, self.seed, self.keyed = num_replicas, rank, seed, keyed
        self.epoch = 0
        self._skip = 0
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

    def skip_batches(self, count: int) -> None:
        """Start the next ``iter`` (only that one) after the first ``count`` batches of the epoch."""
        self._skip = int(count)

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

    def __iter__(self) -> Iterator[int] | Iterator[SampleKey]:
        skip, self._skip = self._skip * self.batch_size, 0
        return self._iterate(skip)

    def _iterate(self, skip: int) -> Iterator:
        iters = {s: self._stream_iter(s) for s in self.batch_sizes}
        position = 0
        for _ in range(self.num_batches):
            for s in sorted(self.batch_sizes):
                for _ in range(self.batch_sizes[s]):
                    index = next(iters[s])
                    if position >= skip:
                        yield SampleKey(index, self.epoch, position) if self.keyed else index
                    position += 1


class KeyedSampler(DistributedSampler):
    """Training sampler of a plain map-style dataset that yields :class:`SampleKey` (see the module docstring).

    Rank ``r`` of ``num_replicas`` takes positions ``r, r + W, ...`` of the epoch's order (a permutation drawn from
    ``(seed, epoch)`` when ``shuffle``, else ``0..length-1``), padded by wrapping to the same count on every rank as
    ``DistributedSampler`` does. ``batch_size`` lets :meth:`skip_batches` skip whole batches.
    """

    def __init__(self, length: int, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True,
                 batch_size: int = 1) -> None:
        # Not calling DistributedSampler.__init__: it needs an initialised process group.
        if length < 1:
            raise ValueError(f"KeyedSampler needs at least one sample, got length={length}")
        self.length, self.num_replicas, self.rank = int(length), num_replicas, rank
        self.seed, self.shuffle, self.batch_size = seed, shuffle, int(batch_size)
        self.epoch, self._skip = 0, 0
        self.per_rank = math.ceil(self.length / num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_batches(self, count: int) -> None:
        """Start the next ``iter`` (only that one) after the first ``count`` batches of the epoch."""
        self._skip = int(count)

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[SampleKey]:
        skip, self._skip = self._skip * self.batch_size, 0
        order = (np.random.default_rng([self.seed, self.epoch]).permutation(self.length) if self.shuffle
                 else np.arange(self.length))
        for position in range(skip, self.per_rank):
            index = int(order[(self.rank + position * self.num_replicas) % self.length])
            yield SampleKey(index, self.epoch, position)


class UnpaddedDistributedSampler(DistributedSampler):
    """Evaluation sampler: rank r takes positions ``r, r + world, ...`` with no padding, so every image is
    evaluated exactly once and epoch-level metrics equal a single-process run."""

    def __init__(self, length: int, num_replicas: int = 1, rank: int = 0, what: str = "an evaluation split") -> None:
        # Every rank knows ``length``, so every rank refuses together. Without this check the ranks that get no
        # item fail in Lightning ("DataLoader ... has zero length") while the others wait for them in a collective
        # until the process-group timeout (30 minutes by default).
        if 0 < length < num_replicas:
            raise DataError(f"{what} has {length} item(s), fewer than the {num_replicas} DDP ranks, so rank(s) "
                            f"{length}..{num_replicas - 1} would evaluate nothing and the ranks would wait for each "
                            "other. Use fewer devices, or a larger split.")
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
