"""``medattn prepare`` and ``CXRDataModule(prepared=...)``: the prepared path gives the unprepared path's batches
(augmentation off), and a prepared folder of other settings, another reader or another manifest is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from datamodules.batch_augment import BatchAugment
from datamodules.cxr import CXRDataModule
from datamodules.manifest import DataError, Manifest
from datamodules.prepared import META_NAME, PreparedCXRDataset, prepare, read_meta, stored_settings
from datamodules.synthetic import SyntheticCXR
from datamodules.transforms import CXRTransform
from experiments.cli import main

ROOT = Path(__file__).resolve().parents[1]
PCAM = ROOT / "experiments" / "pcam" / "synthetic.yaml"
SIZE = 40  # the prepared side; the synthetic images are 64 px


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def tiny(cache) -> list[str]:
    """pcam/synthetic.yaml shrunk to 120 images of 64 px, prepared at 40 px (min_per_class 0: counts not the point)."""
    return ["--data.init_args.reader.init_args.n_images", "120", "--data.init_args.reader.init_args.image_size", "64",
            "--data.init_args.reader.init_args.cache_dir", str(cache), "--data.init_args.image_size", str(SIZE),
            "--data.init_args.min_per_class", "0", "--data.init_args.labeled_batch_size", "8",
            "--data.init_args.eval_batch_size", "16", "--data.init_args.num_workers", "0"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny) -> Path:
    """``medattn prepare`` on the synthetic data, through the CLI, with two decoding processes."""
    out = tmp_path_factory.mktemp("prepared") / "pcam"
    main(["prepare", "-c", str(PCAM), *tiny, "--out", str(out), "--num_workers", "2"])
    return out


@pytest.fixture(scope="module")
def reader(cache) -> SyntheticCXR:
    return SyntheticCXR(cache_dir=cache, n_images=120, image_size=64, seed=0)


def _module(reader, **kwargs) -> CXRDataModule:
    """Every stream in use, two views, masks: the richest batch the DataModule makes."""
    args = dict(image_size=SIZE, min_per_class=0, box_fraction=0.1, unlabeled_fraction=0.3, box_batch_size=2,
                labeled_batch_size=4, unlabeled_batch_size=3, two_views=True, augment=False, eval_batch_size=16, seed=3)
    return CXRDataModule(reader, **{**args, **kwargs})


def _assert_same_batches(first, second) -> int:
    count = 0
    for a, b in zip(first, second, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if isinstance(a[key], list):
                assert len(a[key]) == len(b[key])
                for x, y in zip(a[key], b[key]):
                    assert x == y if isinstance(x, str) else torch.equal(x, y), key
            else:
                assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
        count += 1
    return count


def test_prepare_writes_every_image_and_records_what_it_was_made_from(prepared, reader):
    meta = read_meta(prepared)
    assert meta["status"] == "complete" and meta["manifest"]["count"] == 120
    assert meta["settings"] == {"image_size": SIZE, "clahe_clip_limit": None, "clahe_tile_grid": None}
    assert meta["reader"]["class_path"] == "datamodules.synthetic.SyntheticCXR"
    assert meta["reader"]["init_args"]["n_images"] == 120 and meta["num_workers"] == 2
    index = json.loads((prepared / "index.json").read_text())
    assert sum(c["chunk_size"] for c in index["chunks"]) == 120 and len(index["chunks"]) == 2  # one per worker
    # in manifest order, ids and frames as the manifest says
    from litdata import StreamingDataset

    data, manifest = StreamingDataset(str(prepared), batch_decode=False), reader.load()
    for row in (0, 59, 60, 119):
        sample = data[row]
        assert sample["row"] == row and sample["image_id"] == manifest.records["image_id"].iloc[row]
        assert sample["image"].dtype == np.uint8 and sample["image"].shape == (1, SIZE, SIZE)
        assert sample["frame"].tolist() == [64, 64, SIZE / 64]


def test_first_epoch_equals_the_unprepared_path(prepared, reader):
    """The acceptance check: augmentation off, every training batch of epoch 0 (ids, streams, labels, label masks,
    boxes, masks, frames, both views) and every evaluation batch is identical, pixels included (the stored uint8
    letterbox is the one the per-sample path computes)."""
    plain, fast = _module(reader), _module(reader, prepared=str(prepared))
    for dm in (plain, fast):
        dm.setup("fit")
    assert all(np.array_equal(plain.splits[k], fast.splits[k]) for k in ("train", "val", "test"))
    assert np.array_equal(plain.train_streams, fast.train_streams)
    assert isinstance(fast.train_dataloader().dataset, PreparedCXRDataset)
    batches = _assert_same_batches(plain.train_dataloader(), fast.train_dataloader())
    assert batches == plain.train_dataloader().sampler.num_batches > 0
    first = next(iter(fast.train_dataloader()))
    assert first["stream"].tolist() == [0, 0, 1, 1, 1, 1, 2, 2, 2]  # the exact per-stream counts
    assert first["has_boxes"][:2].all() and sum(len(b) for b in first["boxes"][:2]) > 0
    assert not first["label_mask"][-3:].any()  # the unlabeled stream hides its labels
    assert first["has_attention_mask"].all() and first["attention_mask"].sum() > 0
    for split in ("val", "test"):
        loader = getattr(plain, f"{split}_dataloader")
        assert _assert_same_batches(loader(), getattr(fast, f"{split}_dataloader")()) > 0


def test_train_masks_false_and_unnormalised_samples_for_the_batch_augmentation(prepared, reader):
    plain, fast = _module(reader, train_masks=False), _module(reader, train_masks=False, prepared=str(prepared))
    _assert_same_batches(plain.train_dataloader(), fast.train_dataloader())
    batch = next(iter(fast.train_dataloader()))
    assert not batch["has_mask"].any() and batch["mask"].abs().sum() == 0
    fast.setup("fit")
    raw = PreparedCXRDataset(prepared, fast.splits["train"], fast.manifest.records["image_id"].iloc[fast.splits["train"]],
                             1, fast._transform(train=False), raw=True)[0]
    normalised = fast.train_dataloader().dataset[0]
    assert "image_teacher" not in raw and raw["image"].dtype == raw["mask"].dtype == torch.uint8
    assert torch.allclose((raw["image"] / 255 - 0.5) / 0.25, normalised["image"])  # CXRTransform's default mean, std


@pytest.mark.parametrize("augment", [False, True])
def test_batch_path_gets_the_same_unnormalised_samples_prepared_or_not(prepared, reader, augment):
    """With ``augment_on="batch"`` the training loader yields [0, 1] letterboxed samples that
    ``on_after_batch_transfer`` normalises (and augments when ``augment``): the prepared folder must yield the same,
    also with augmentation off (it once yielded normalised samples there, which the hook normalised a second time)."""
    plain = _module(reader, augment=augment, augment_on="batch")
    fast = _module(reader, augment=augment, augment_on="batch", prepared=str(prepared))
    batch = next(iter(fast.train_dataloader()))
    # the prepared folder ships uint8 (a quarter of the bytes between worker processes); BatchAugment converts
    assert batch["image"].dtype == batch["mask"].dtype == torch.uint8 and batch["image"].max() > 128
    as_unit = ({k: (v.float() / 255 if k == "image" else v.float()) if k in ("image", "mask", "attention_mask") else v
                for k, v in b.items()} for b in fast.train_dataloader())
    assert _assert_same_batches(plain.train_dataloader(), as_unit) > 0
    # and the device-side hook gives the same augmented batch from either
    plain_batch, fast_batch = next(iter(plain.train_dataloader())), batch
    augment_ = BatchAugment.from_transform(CXRTransform(SIZE, train=augment, two_views=True))
    a = augment_(plain_batch, torch.Generator().manual_seed(0))
    b = augment_(fast_batch, torch.Generator().manual_seed(0))
    assert torch.allclose(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])


def test_training_augmentation_needs_the_batch_path(prepared, reader):
    dm = _module(reader, augment=True, prepared=str(prepared))
    with pytest.raises(DataError, match="augmented on the batch; set --data.init_args.augment_on batch"):
        dm.train_dataloader()


def test_ddp_evaluation_sees_every_image_exactly_once(prepared, reader):
    dm = _module(reader, prepared=str(prepared))
    dm.setup("fit")
    seen = []
    for rank in range(3):
        dm.trainer = SimpleNamespace(world_size=3, global_rank=rank, is_global_zero=rank == 0)
        seen += [i for batch in dm.val_dataloader() for i in batch["image_id"]]
    dm.trainer = None
    assert sorted(seen) == sorted(dm.manifest.records["image_id"].iloc[dm.splits["val"]])  # once each, none padded


class _Edited:
    """The synthetic reader with its manifest edited by ``edit`` (a changed or removed image)."""

    def __init__(self, reader, edit) -> None:
        self.reader, self.edit = reader, edit

    def load(self) -> Manifest:
        return self.edit(self.reader.load())


def _flip_label(manifest: Manifest) -> Manifest:
    manifest.labels[5, 0] = 1 - manifest.labels[5, 0]
    return manifest


@pytest.mark.parametrize("change, message", [
    (dict(image_size=48), r"image_size: prepared 40, the config has 48 \(--data.init_args.image_size\)"),
    (dict(augment_kwargs={"clahe_clip_limit": 2.0}), "clahe_clip_limit: prepared None, the config has 2.0"),
])
def test_a_settings_change_is_refused_naming_it(prepared, reader, change, message):
    with pytest.raises(DataError, match=message):
        _module(reader, prepared=str(prepared), **change).setup("fit")


@pytest.mark.parametrize("edit, message", [
    (_flip_label, r"120 images prepared vs 120 .* differing: classes, task or labels"),
    (lambda m: m.subset(np.arange(1, 120)), r"120 images prepared vs 119 .* differing: image ids"),
])
def test_a_manifest_change_is_refused_naming_the_part(prepared, reader, edit, message):
    with pytest.raises(DataError, match="manifest hash mismatch: " + message):
        _module(_Edited(reader, edit), prepared=str(prepared)).setup("fit")
    with pytest.raises(DataError, match="reader: prepared with datamodules.synthetic.SyntheticCXR, the config uses"):
        _module(_Edited(reader, lambda m: m), prepared=str(prepared)).setup("fit")


def test_prepare_refuses_a_foreign_or_different_folder_and_verifies_a_finished_one(prepared, reader, tiny, tmp_path,
                                                                                   capsys):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        main(["prepare", "-c", str(PCAM), *tiny, "--out", str(tmp_path)])
    assert "holds files but no medattn_prepared.json" in capsys.readouterr().err
    main(["prepare", "-c", str(PCAM), *tiny, "--out", str(prepared)])
    assert "already prepared (120 images); nothing to do" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["prepare", "-c", str(PCAM), *tiny, "--out", str(prepared), "--data.init_args.image_size", "32"])
    assert "image_size: prepared 40, the config has 32" in capsys.readouterr().err
    # an unfinished folder is refused by the DataModule
    meta = read_meta(prepared)
    (prepared / META_NAME).write_text(json.dumps({**meta, "status": "writing"}))
    try:
        with pytest.raises(DataError, match="the preparation did not finish"):
            _module(reader, prepared=str(prepared)).setup("fit")
    finally:
        (prepared / META_NAME).write_text(json.dumps(meta))


def test_an_unreadable_image_stops_prepare_naming_it_and_the_next_run_starts_afresh(reader, tmp_path):
    manifest = reader.load()
    broken = manifest.records["image_path"].iloc[7]
    manifest.records.loc[7, "image_path"] = str(tmp_path / "missing.png")
    settings = stored_settings(SIZE, None)
    with pytest.raises(DataError, match=r"1 image\(s\) could not be prepared, first manifest row 7 .*missing.png"):
        prepare(manifest, tmp_path / "out", settings, reader, num_workers=2)
    assert read_meta(tmp_path / "out")["status"] == "failed"
    manifest.records.loc[7, "image_path"] = broken
    assert prepare(manifest, tmp_path / "out", settings, reader, num_workers=2)["status"] == "complete"
    assert not (tmp_path / "out" / ".errors").exists()


def test_medattn_fit_trains_on_the_prepared_folder(prepared, tiny, tmp_path, monkeypatch):
    """The issue's acceptance command: ``medattn prepare -c experiments/pcam/synthetic.yaml --out <dir>`` (the
    ``prepared`` fixture) then ``medattn fit -c experiments/pcam/synthetic.yaml --data.init_args.prepared <dir>``."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MEDATTN_RUN_DIR", raising=False)
    main(["fit", "-c", str(PCAM), *tiny, "--data.init_args.prepared", str(prepared), "--data.init_args.augment", "false",
          "--model.init_args.net.init_args.backbone", "test_resnet", "--trainer.max_epochs", "1",
          "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--test_after_fit", "false",
          "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]"])
    (run,) = (tmp_path / "runs").glob("*/*")
    metrics = (run / "metrics.csv").read_text()
    assert "train/loss_epoch" in metrics.splitlines()[0] and len(metrics.splitlines()) > 1
    assert f"prepared: {prepared}" in (run / "config.yaml").read_text()


_SLOW_PREPARE = """
import sys, time
from datamodules import prepared
from datamodules.synthetic import SyntheticCXR

decode = prepared._Decoder._decode
prepared._Decoder._decode = lambda self, row: (time.sleep(0.1), decode(self, row))[1]  # 10 images/s per worker
reader = SyntheticCXR(cache_dir=sys.argv[1], n_images=120, image_size=64, seed=0)
prepared.prepare(reader.load(), sys.argv[2], prepared.stored_settings(int(sys.argv[3]), None), reader, num_workers=2,
                 chunk_bytes="20KB")
"""


@pytest.mark.slow
def test_an_interrupted_prepare_resumes_where_it_stopped(prepared, reader, cache, tmp_path, monkeypatch):
    """``medattn prepare`` killed (SIGKILL to its process group, as a scheduler does) after a few chunks; the next
    run keeps the checkpointed chunks, decodes only the rest, and the result equals an uninterrupted preparation."""
    out = tmp_path / "out"
    job = subprocess.Popen([sys.executable, "-c", _SLOW_PREPARE, str(cache), str(out), str(SIZE)], cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while len(list((out / ".checkpoints").glob("checkpoint-*.json"))) < 2 or len(list(out.glob("chunk-*"))) < 6:
            assert job.poll() is None and time.monotonic() < deadline, "the preparation ended before it was killed"
            time.sleep(0.1)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    assert read_meta(out)["status"] == "writing" and not (out / "index.json").exists()
    chunks = [c for f in (out / ".checkpoints").glob("checkpoint-*.json") for c in json.loads(f.read_text())["chunks"]]
    kept, kept_images = {c["filename"] for c in chunks}, sum(c["chunk_size"] for c in chunks)
    stamps = {name: (out / name).stat().st_mtime_ns for name in kept}
    assert kept

    decoded = tmp_path / "decoded"
    decoded.mkdir()
    from datamodules import prepared as module

    decode = module._Decoder._decode
    monkeypatch.setattr(module._Decoder, "_decode", lambda self, row: ((decoded / str(row)).touch(), decode(self, row))[1])
    meta = prepare(reader.load(), out, stored_settings(SIZE, None), reader, num_workers=1)  # resumes with 2 workers
    assert meta["status"] == "complete" and meta["num_workers"] == 2
    again = {int(p.name) for p in decoded.iterdir()}
    assert len(again) == 120 - kept_images > 0, "the checkpointed images were decoded again"
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == stamps  # the kept chunks were not rewritten
    from litdata import StreamingDataset

    resumed, reference = (StreamingDataset(str(p), batch_decode=False) for p in (out, prepared))
    for row in range(120):
        a, b = resumed[row], reference[row]
        assert a["image_id"] == b["image_id"] and np.array_equal(a["image"], b["image"])
        assert np.array_equal(a["attention_mask"], b["attention_mask"]) and np.array_equal(a["boxes"], b["boxes"])


def test_the_benchmark_table_shows_the_prepared_loader_and_prepare_throughput():
    from experiments.benchmarks import report

    rates = {"medattn/png/w2": {"median": 47.0}, "plain/png/w2": {"median": 120.0},
             "prepared_loader/png/w2": {"median": 480.0}, "prepared/png/w2": {"median": 94.0},
             "prepared_loader/png/w10": {"median": 500.0}, "batch_augment/cpu": {"median": 100.0},
             "prepare/covid-cxr-mini/w2": {"median": 60.5}}
    table = report.dataloader_table({"images_per_second": rates})
    assert "| 2 | 480.0 | 94.0 | 47.0 | 10.2×, 2.0× |" in table
    assert table.index("| 2 | 480.0") < table.index("| 10 | 500.0 | – | – | –, – |")  # sorted by workers, not text
    assert "BatchAugment alone: cpu 100.0 img/s." in table and "| covid-cxr-mini | 2 | 60.5 |" in table
    assert "prepared" not in report.dataloader_table({"images_per_second": {"medattn/png/w0": {"median": 1.0}}})
    only_prepare = report.dataloader_table({"images_per_second": {"prepare/synthetic-png/w1": {"median": 9.0}}})
    assert "| synthetic-png | 1 | 9.0 |" in only_prepare and "prepared loader" not in only_prepare
