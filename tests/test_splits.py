"""Patient-level splits, stream assignment and mixed-batch composition (1 rank and 2 simulated ranks)."""

from __future__ import annotations

import numpy as np
import pytest

from datamodules.batch import STREAM_BOX, STREAM_LABEL, STREAM_UNLABELED
from datamodules.dataset import MixedStreamSampler, UnpaddedDistributedSampler
from datamodules.manifest import DataError
from datamodules.splits import assign_streams, kfold_by_patient, split_by_patient


def _patients(n_patients=50, seed=0):
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 6, n_patients)
    return np.repeat([f"p{i:03d}" for i in range(n_patients)], counts)


def test_split_is_patient_disjoint_complete_and_deterministic():
    pids = _patients()
    a = split_by_patient(pids, 0.2, 0.2, seed=3)
    b = split_by_patient(pids, 0.2, 0.2, seed=3)
    c = split_by_patient(pids, 0.2, 0.2, seed=4)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert any(not np.array_equal(a[n], c[n]) for n in a)
    sets = {name: set(pids[idx]) for name, idx in a.items()}
    assert not sets["train"] & sets["val"] and not sets["train"] & sets["test"] and not sets["val"] & sets["test"]
    assert sorted(np.concatenate(list(a.values()))) == list(range(len(pids)))
    # fractions are of patients: 50 patients -> 10 val, 10 test
    assert len(sets["val"]) == 10 and len(sets["test"]) == 10


def test_forced_test_takes_whole_patients():
    pids = _patients()
    forced = np.zeros(len(pids), bool)
    forced[[0, 7, 30]] = True
    split = split_by_patient(pids, 0.1, 0.0, seed=0, forced_test=forced)
    test_patients = set(pids[split["test"]])
    assert test_patients == set(pids[forced])
    assert all(pids[i] not in test_patients for i in np.concatenate([split["train"], split["val"]]))


def test_kfold_covers_every_patient_once():
    pids = _patients()
    held = [set(pids[kfold_by_patient(pids, 5, f, seed=1)[1]]) for f in range(5)]
    assert set().union(*held) == set(pids)
    assert sum(len(h) for h in held) == len(set(pids))


def test_stream_fractions_and_lists():
    n = 200
    ids = [f"im{i}" for i in range(n)]
    has_boxes = np.arange(n) % 3 == 0  # 67 images have boxes
    streams = assign_streams(ids, has_boxes, box_fraction=0.2, unlabeled_fraction=0.3, seed=0)
    assert (streams == STREAM_BOX).sum() == 40 and (streams == STREAM_UNLABELED).sum() == 60
    assert np.all(has_boxes[streams == STREAM_BOX])
    assert np.array_equal(streams, assign_streams(ids, has_boxes, 0.2, 0.3, seed=0))
    every_boxed = assign_streams(ids, has_boxes, box_fraction=None, unlabeled_fraction=0.0, seed=0)
    assert np.array_equal(every_boxed == STREAM_BOX, has_boxes)
    listed = assign_streams(ids, has_boxes, 0.2, 0.0, seed=0, box_images=["im0", "im3"], unlabeled_images=["im1"])
    assert list(np.flatnonzero(listed == STREAM_BOX)) == [0, 3] and list(np.flatnonzero(listed == STREAM_UNLABELED)) == [1]
    with pytest.raises(DataError, match="only 67 training images have boxes"):
        assign_streams(ids, has_boxes, box_fraction=0.5, unlabeled_fraction=0.0, seed=0)
    with pytest.raises(DataError, match="box_images lists images without boxes"):
        assign_streams(ids, has_boxes, 0.0, 0.0, seed=0, box_images=["im1"])


def _streams():
    return np.array([STREAM_BOX] * 20 + [STREAM_LABEL] * 64 + [STREAM_UNLABELED] * 37)


def _batches(sampler):
    order = list(sampler)
    return [order[i:i + sampler.batch_size] for i in range(0, len(order), sampler.batch_size)]


def test_mixed_batches_have_fixed_per_stream_counts_single_rank():
    streams = _streams()
    sampler = MixedStreamSampler(streams, {STREAM_BOX: 2, STREAM_LABEL: 8, STREAM_UNLABELED: 4}, STREAM_LABEL)
    batches = _batches(sampler)
    assert len(batches) == 8 == len(sampler) // sampler.batch_size  # 64 labeled / 8 per batch
    for batch in batches:
        assert list(streams[batch]) == [STREAM_BOX] * 2 + [STREAM_LABEL] * 8 + [STREAM_UNLABELED] * 4
    labeled = [i for b in batches for i in b if streams[i] == STREAM_LABEL]
    assert len(set(labeled)) == 64  # the epoch stream is seen exactly once
    sampler.set_epoch(1)
    assert _batches(sampler) != batches  # reshuffled every epoch


def test_mixed_batches_two_ranks_are_disjoint_and_equal_length():
    streams = _streams()
    sizes = {STREAM_BOX: 2, STREAM_LABEL: 8, STREAM_UNLABELED: 4}
    ranks = [MixedStreamSampler(streams, sizes, STREAM_LABEL, num_replicas=2, rank=r, seed=5) for r in range(2)]
    per_rank = [_batches(s) for s in ranks]
    assert len(per_rank[0]) == len(per_rank[1]) == 4  # 64 labeled / 2 ranks / 8 per batch
    for stream in (STREAM_BOX, STREAM_LABEL, STREAM_UNLABELED):
        seen = [{i for b in batches for i in b if streams[i] == stream} for batches in per_rank]
        # a cycling stream repeats within a rank, but the two ranks never share an image of any stream
        assert not seen[0] & seen[1], stream
    for batches in per_rank:
        for batch in batches:
            assert list(streams[batch]).count(STREAM_BOX) == 2 and list(streams[batch]).count(STREAM_UNLABELED) == 4


def test_eval_sampler_covers_everything_once_without_padding():
    shards = [list(UnpaddedDistributedSampler(11, 2, r)) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(11))
