"""Prepared 2D datasets: every image decoded and letterboxed **once**, stored with LitData, read by index.

``medattn prepare`` (``experiments/prepare.py``) writes, for each image of a reader's manifest, in manifest order:
the image, lung mask and lesion (attention) mask letterboxed to the training ``image_size`` as uint8 (after CLAHE
when the config asks for it: the pixels are exactly those the per-sample path feeds to its augmentation), the labels
(NaN = unknown), the boxes in the prepared frame (original pixels x ``scale``) with their class indices, the
``frame`` ``(orig h, orig w, scale)`` that maps back to the original image, and the patient and image ids. Beside
the data, ``medattn_prepared.json`` records the format version, the medattn version, the reader (class and init
arguments), the settings that decide the stored pixels (``image_size``, CLAHE) and SHA-256 hashes of the manifest
(records: ids, patients and image/mask paths relative to their common folder, so moving the data root keeps the
hash; labels; boxes). :func:`check_prepared` refuses a prepared folder whose settings or hashes differ from the
config's, naming the setting (prepared value vs config value) or the part of the manifest that changed.

Format: LitData (``litdata.optimize`` / ``StreamingDataset``), Lightning's own, rather than WebDataset or MosaicML
Streaming, because (1) it reads a local folder or object storage (S3, GCS, Azure) with the same code, (2) it shards
across ranks and nodes, (3) ``StreamingDataset`` gives **random access by index** (``dataset[i]``, memory-mapped;
about 2,700 samples/s of image + two masks at 512² on one core here, with ``batch_decode=False``), so medattn keeps
its map-style dataset and samplers (patient split, exact per-stream batch counts, unpadded evaluation sharding)
unchanged, where WebDataset is sequential tar streaming and cannot; and (4) ``optimize`` writes in parallel and
resumes an interrupted run from its checkpoints (``use_checkpoint=True``). MosaicML Streaming also reads by index,
but leaves parallel writing and resuming to the user (shards written separately, then ``merge_index``) and sits
outside the Lightning stack medattn builds on. The arrays are stored raw (no PNG): reading is a memory copy, so the
loader is bounded by the batch augmentation, not by decoding (``experiments/benchmarks/dataloader.py``).

:class:`PreparedCXRDataset` yields exactly what ``CXRDataset`` yields for an un-augmented sample (bit-identical
image, masks, boxes, labels, frame), or, for the batch-augmentation path (``raw=True``), the stored uint8 image and
masks, which ``datamodules.batch_augment.BatchAugment`` converts, augments and normalises on the whole batch.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.batch import STREAM_BOX, STREAM_UNLABELED
from datamodules.dataset import split_key
from datamodules.io import read_gray_uint8, read_mask
from datamodules.manifest import BOX_COLUMNS, DataError, Manifest
from datamodules.transforms import MASK_KEYS, CXRTransform, clahe, letterbox

FORMAT_VERSION = 1
META_NAME = "medattn_prepared.json"  # not "*index.json": litdata deletes those when it (re)starts a folder
CHUNK_BYTES = "64MB"
_COMPLETE, _WRITING, _FAILED = "complete", "writing", "failed"
_ERRORS = ".errors"
_EMPTY_MASK = np.zeros((0, 0, 0), np.uint8)  # an absent mask: no bytes stored


def stored_settings(image_size: int, augment_kwargs: dict | None) -> dict:
    """The DataModule settings that decide the stored pixels (nothing else is baked into a prepared dataset)."""
    kwargs = augment_kwargs or {}
    limit = kwargs.get("clahe_clip_limit")
    return {"image_size": int(image_size), "clahe_clip_limit": None if limit is None else float(limit),
            "clahe_tile_grid": None if limit is None else int(kwargs.get("clahe_tile_grid", 4))}


def _sha(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


def manifest_digest(manifest: Manifest) -> dict:
    """SHA-256 of the manifest's parts (see the module docstring) and its image count."""
    records = manifest.records
    columns = ["image_path", "mask_path", "attention_mask_path"]
    paths = [p for c in columns for p in records[c].astype(str) if p]
    root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths]) if paths else ""
    relative = {c: [os.path.relpath(os.path.abspath(p), root) if p else "" for p in records[c].astype(str)]
                for c in columns}
    rows = zip(records["image_id"].astype(str), records["patient_id"].astype(str), *relative.values())
    labels = np.nan_to_num(np.asarray(manifest.labels, np.float32), nan=-1.0)
    boxes = manifest.boxes[list(BOX_COLUMNS)].astype({"image_id": str}).sort_values(list(BOX_COLUMNS))
    parts = {"records": _sha("\n".join("\t".join(r) for r in rows)),
             "labels": _sha(json.dumps([manifest.task, list(manifest.class_names)]).encode() + labels.tobytes()),
             "boxes": _sha(boxes.to_csv(index=False, float_format="%.6g"))}
    return {"count": len(records), **parts, "manifest_sha256": _sha("".join(parts.values()))}


_PARTS = {"records": "image ids, patient ids or image/mask paths", "labels": "classes, task or labels",
          "boxes": "boxes"}


class _Decoder:
    """``row -> prepared sample`` for ``litdata.optimize`` (runs in its worker processes, one thread each)."""

    def __init__(self, manifest: Manifest, settings: dict, errors: Path) -> None:
        self.errors = errors
        self.records = manifest.records[["image_id", "image_path", "patient_id", "mask_path", "attention_mask_path"]]
        self.labels = np.asarray(manifest.labels, np.float32)
        self.boxes = manifest.boxes_by_image()
        self.size = settings["image_size"]
        limit = settings["clahe_clip_limit"]
        self.clahe = None if limit is None else (limit, settings["clahe_tile_grid"])
        self._threads_set = False

    def __call__(self, row: int) -> dict:
        if not self._threads_set:  # a worker process per core: torch's own threads would oversubscribe them
            torch.set_num_threads(1)
            self._threads_set = True
        try:
            return self._decode(row)
        except Exception as error:  # noqa: BLE001 - raised in a litdata worker, it leaves orphan processes behind
            self.errors.mkdir(exist_ok=True)
            (self.errors / f"row-{row}.txt").write_text(f"{type(error).__name__}: {error}")
            return {"row": int(row), "image_id": "", "patient_id": "", "image": _EMPTY_MASK,
                    **dict.fromkeys(MASK_KEYS, _EMPTY_MASK), "labels": self.labels[row],
                    "boxes": np.zeros((0, 4), np.float32), "box_labels": np.zeros(0, np.int64),
                    "frame": np.zeros(3, np.float32)}  # same structure as a sample; the run is then refused

    def _decode(self, row: int) -> dict:
        image_id, image_path, patient_id, mask_path, attention_path = self.records.iloc[row]
        image = read_gray_uint8(image_path)
        orig_h, orig_w = image.shape[1:]
        pixels, scale = letterbox(image, self.size)
        if self.clahe is not None:  # as CXRTransform: the image area only, never the padding
            h, w = max(1, round(orig_h * scale)), max(1, round(orig_w * scale))
            pixels[:, :h, :w] = clahe(pixels[:, :h, :w].contiguous(), *self.clahe)
        sample = {"row": int(row), "image_id": str(image_id), "patient_id": str(patient_id), "image": pixels.numpy()}
        for key, path in zip(MASK_KEYS, (mask_path, attention_path)):
            sample[key] = (letterbox(read_mask(path, (orig_h, orig_w)), self.size, is_mask=True)[0].numpy()
                           if path else _EMPTY_MASK)
        boxes = self.boxes.get(str(image_id), np.zeros((0, 5), np.float32))
        sample["labels"] = self.labels[row]
        sample["boxes"] = np.ascontiguousarray(boxes[:, :4] * scale, dtype=np.float32).reshape(-1, 4)
        sample["box_labels"] = boxes[:, 4].astype(np.int64)
        sample["frame"] = np.array([orig_h, orig_w, scale], np.float32)
        return sample


def read_meta(root: str | Path) -> dict | None:
    path = Path(root) / META_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def _write_meta(root: Path, meta: dict) -> None:
    tmp = root / (META_NAME + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, root / META_NAME)


def _index_count(root: Path) -> int | None:
    index = root / "index.json"
    return sum(c["chunk_size"] for c in json.loads(index.read_text())["chunks"]) if index.is_file() else None


def differences(meta: dict, settings: dict, digest: dict, reader_class: str | None = None) -> list[str]:
    """What differs between a prepared folder's record and the config: one line per setting or manifest part."""
    out = []
    if meta.get("format_version") != FORMAT_VERSION:
        out.append(f"format version: prepared {meta.get('format_version')!r}, this medattn reads {FORMAT_VERSION}")
    recorded_class = (meta.get("reader") or {}).get("class_path")
    if reader_class is not None and recorded_class != reader_class:
        out.append(f"reader: prepared with {recorded_class}, the config uses {reader_class}")
    for key, value in settings.items():
        if meta.get("settings", {}).get(key) != value:
            out.append(f"{key}: prepared {meta.get('settings', {}).get(key)!r}, the config has {value!r} "
                       f"(--data.init_args.{'image_size' if key == 'image_size' else 'augment_kwargs'})")
    recorded = meta.get("manifest", {})
    if recorded.get("manifest_sha256") != digest["manifest_sha256"]:
        parts = [f"{_PARTS[k]} (SHA-256 {recorded.get(k, '?')[:12]} prepared vs {digest[k][:12]} now)"
                 for k in _PARTS if recorded.get(k) != digest[k]]
        out.append(f"manifest hash mismatch: {recorded.get('count')} images prepared vs {digest['count']} in the "
                   f"reader's manifest now; differing: {'; '.join(parts) or 'hash'} (recorded reader arguments: "
                   f"{(meta.get('reader') or {}).get('init_args')})")
    return out


def _class_path(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def check_prepared(root: str | Path, manifest: Manifest, settings: dict, reader: object = None) -> dict:
    """The prepared folder's record, after checking that it is complete and was written from this manifest with
    these settings; else a :class:`DataError` naming every difference and what to do."""
    root = Path(root).expanduser()
    meta = read_meta(root)
    if meta is None:
        raise DataError(f"prepared={root}: no {META_NAME} there, so it is not a dataset written by `medattn "
                        "prepare`. Run: medattn prepare -c <this config> --out <folder>")
    if meta.get("status") != _COMPLETE or _index_count(root) != meta.get("manifest", {}).get("count"):
        raise DataError(f"prepared={root}: the preparation did not finish (status {meta.get('status')!r}, "
                        f"{_index_count(root)} of {meta.get('manifest', {}).get('count')} images indexed); run the "
                        "same `medattn prepare` command again, it resumes")
    found = differences(meta, settings, manifest_digest(manifest), None if reader is None else _class_path(reader))
    if found:
        raise DataError(f"prepared={root} does not match this config:\n  " + "\n  ".join(found)
                        + f"\nPrepare it again with this config (medattn prepare -c <config> --out <new folder>), "
                          "or use the settings it was prepared with")
    return meta


def _restart(root: Path) -> None:
    """Remove what this module and litdata wrote (never anything else) so a preparation starts afresh."""
    for path in root.iterdir():
        if path.name.startswith("chunk-") and path.suffix == ".bin" or path.name in ("index.json", META_NAME):
            path.unlink()
    for folder in (".checkpoints", _ERRORS):
        shutil.rmtree(root / folder, ignore_errors=True)


def _verify(root: Path, manifest: Manifest) -> None:
    """Counts equal the manifest's, and the first and last sample of every chunk are the manifest's rows there
    (the per-sample id check of :class:`PreparedCXRDataset` catches anything in between when it is read)."""
    count = _index_count(root)
    if count != len(manifest):
        raise DataError(f"{root}: {count} samples written, the manifest has {len(manifest)}; run the same "
                        "`medattn prepare` again with --overwrite")
    from litdata import StreamingDataset

    data, ids = StreamingDataset(str(root), batch_decode=False), manifest.records["image_id"].astype(str).to_numpy()
    start = 0
    for chunk in json.loads((root / "index.json").read_text())["chunks"]:
        for i in (start, start + chunk["chunk_size"] - 1):
            sample = data[i]
            if sample["row"] != i or sample["image_id"] != ids[i]:
                raise DataError(f"{root}/{chunk['filename']}: sample {i} holds row {sample['row']} "
                                f"({sample['image_id']!r}), expected {ids[i]!r}; run again with --overwrite")
        start += chunk["chunk_size"]


def _medattn_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("medattn")
    except PackageNotFoundError:  # run from a source tree without installing
        return "unknown"


def _resume_or_start(root: Path, meta: dict | None, found: list[str], overwrite: bool) -> dict | None:
    """The record to continue (None: start afresh, after removing what an earlier run wrote)."""
    if meta is None:
        if any(root.iterdir()):
            raise DataError(f"--out {root} holds files but no {META_NAME}: choose an empty or a new folder "
                            "(medattn prepare never deletes files it did not write)")
        return None
    if meta["status"] == _FAILED:  # nothing there is usable: the fixed manifest may differ from the failed one's
        print(f"[medattn] {root}: the last run stopped on unreadable images; starting again")
    elif found and not overwrite:
        raise DataError(f"--out {root} holds a dataset prepared differently:\n  " + "\n  ".join(found)
                        + "\nUse another --out, or --overwrite to replace it")
    elif not (found or overwrite) and _index_count(root) in (None, meta["manifest"]["count"]):
        return meta
    _restart(root)
    return None


def prepare(manifest: Manifest, out: str | Path, settings: dict, reader: object, reader_args: dict | None = None,
            num_workers: int = 1, overwrite: bool = False, chunk_bytes: str = CHUNK_BYTES) -> dict:
    """Write the prepared dataset of ``manifest`` into ``out``, or resume an interrupted run there (with that
    run's ``num_workers`` and ``chunk_bytes``: litdata's checkpoints are per worker); returns its record. A folder
    prepared with other settings or another manifest is refused unless ``overwrite``. An unreadable image stops
    the run after the others are done, with a :class:`DataError` naming it (the next run starts afresh)."""
    import litdata

    root = Path(out).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    digest, meta = manifest_digest(manifest), read_meta(root)
    found = [] if meta is None else differences(meta, settings, digest, _class_path(reader))
    meta = _resume_or_start(root, meta, found, overwrite)
    if meta is not None and meta["status"] == _COMPLETE:
        _verify(root, manifest)
        print(f"[medattn] {root} is already prepared ({digest['count']} images); nothing to do")
        return meta
    if meta is None:
        meta = {"format_version": FORMAT_VERSION, "medattn_version": _medattn_version(), "status": _WRITING,
                "reader": {"class_path": _class_path(reader), "init_args": reader_args}, "settings": settings,
                "manifest": digest, "num_workers": max(1, int(num_workers)), "chunk_bytes": chunk_bytes}
        _write_meta(root, meta)
    elif (meta["num_workers"], meta["chunk_bytes"]) != (max(1, int(num_workers)), chunk_bytes):
        print(f"[medattn] resuming with the interrupted run's num_workers={meta['num_workers']} and chunk_bytes="
              f"{meta['chunk_bytes']} (its checkpoints are per worker)")
    print(f"[medattn] preparing {digest['count']} images into {root} with {meta['num_workers']} worker(s)")
    start = time.perf_counter()
    if _index_count(root) is None:  # else the writing finished and only the record was not updated
        previous = multiprocessing.get_start_method(allow_none=True)
        fork = "fork" in multiprocessing.get_all_start_methods()  # as torch's DataLoader: no re-import per worker
        try:
            litdata.optimize(fn=_Decoder(manifest, settings, root / _ERRORS), inputs=list(range(len(manifest))),
                             output_dir=str(root), chunk_bytes=meta["chunk_bytes"], num_workers=meta["num_workers"],
                             use_checkpoint=True, keep_data_ordered=True, reorder_files=False,
                             start_method="fork" if fork else "spawn",
                             verbose=sys.stderr.isatty())  # the progress bar, on a terminal only (datamodules.progress)
        finally:  # litdata sets the process-wide start method; later DataLoaders must keep theirs
            multiprocessing.set_start_method(previous, force=True)
    errors = sorted((root / _ERRORS).glob("row-*.txt"), key=lambda p: int(p.stem[4:]))
    if errors:
        meta["status"] = _FAILED
        _write_meta(root, meta)
        rows = [int(p.stem[4:]) for p in errors]
        raise DataError(f"{len(errors)} image(s) could not be prepared, first manifest row {rows[0]} "
                        f"({manifest.records['image_id'].iloc[rows[0]]!r}): {errors[0].read_text()}. Fix or remove "
                        "them (or set skip_corrupt: true), then run medattn prepare again")
    _verify(root, manifest)
    meta["status"] = _COMPLETE
    _write_meta(root, meta)
    seconds = time.perf_counter() - start
    print(f"[medattn] prepared {digest['count']} images in {seconds:.1f} s ({digest['count'] / seconds:.1f} img/s): "
          f"{root}")
    return meta


class PreparedCXRDataset(Dataset):
    """``CXRDataset``'s samples, read from a prepared folder by index (see the module docstring).

    Args:
        root: the prepared folder (checked with :func:`check_prepared` by the DataModule).
        rows: manifest positions of this dataset's items (a split), ``image_ids`` their ids (each read is checked).
        streams: supervision stream per item, as for ``CXRDataset`` (unlabeled items hide their labels; only
            box-stream items carry boxes).
        transform: an evaluation ``CXRTransform`` (``train=False``): its normalisation and ``two_views``.
        load_masks: ``False`` returns the masks as zeros, flagged absent (``train_masks=False``).
        raw: return the image (0-255) and masks ({0, 1}) as the stored uint8 and no teacher view, for
            ``BatchAugment`` on the batch (it converts them on the device).
    """

    def __init__(self, root: str | Path, rows: Sequence[int], image_ids: Sequence[str], streams: np.ndarray | int,
                 transform: CXRTransform, load_masks: bool = True, raw: bool = False) -> None:
        if transform.train:
            raise ValueError("PreparedCXRDataset: prepared samples are augmented on the batch (BatchAugment), "
                             "so the transform must be an evaluation one (train=False)")
        self.root, self.transform, self.load_masks, self.raw = str(Path(root).expanduser()), transform, load_masks, raw
        self.rows = np.asarray(rows, np.int64)
        self.image_ids = np.asarray(list(map(str, image_ids)))
        self.streams = np.broadcast_to(np.asarray(streams, dtype=np.int64), (len(self.rows),)).copy()
        self._data = None  # opened lazily, once per DataLoader worker

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_data": None}

    def __getitem__(self, item) -> dict:
        if self._data is None:
            from litdata import StreamingDataset

            # batch_decode=False: one item per read (the default decodes a window of items around it, 40x slower
            # for random access)
            self._data = StreamingDataset(self.root, batch_decode=False)
        index = split_key(item)[0]
        stored = self._data[int(self.rows[index])]
        if stored["image_id"] != self.image_ids[index]:
            raise DataError(f"{self.root}: sample {self.rows[index]} is {stored['image_id']!r}, the manifest has "
                            f"{self.image_ids[index]!r} there; prepare the folder again")
        stream = int(self.streams[index])
        # raw: uint8 as stored (BatchAugment converts on the device): a quarter of the bytes that worker processes
        # pass through shared memory, which is what limits the loader with workers (0.43k vs 1.7k img/s in float)
        image = torch.from_numpy(stored["image"])
        sample = {"image": image if self.raw else self.transform._normalize(image.float().div_(255.0))}
        if self.transform.two_views and not self.raw:
            sample["image_teacher"] = sample["image"].clone()
        present = {}
        for key in MASK_KEYS:
            present[key] = stored[key].size > 0 and self.load_masks
            mask = torch.from_numpy(stored[key]) if present[key] else torch.zeros_like(image)
            sample[key] = mask if self.raw else mask.float()
        boxed = stream == STREAM_BOX
        sample["boxes"] = torch.from_numpy(stored["boxes"]) if boxed else torch.zeros(0, 4)
        sample["box_labels"] = torch.from_numpy(stored["box_labels"]) if boxed else torch.zeros(0, dtype=torch.long)
        sample["frame"] = torch.from_numpy(stored["frame"])
        labels = torch.from_numpy(stored["labels"])
        known = ~torch.isnan(labels) & (stream != STREAM_UNLABELED)  # unlabeled: no path can read the truth
        sample.update(labels=torch.where(known, labels, torch.zeros_like(labels)), label_mask=known,
                      stream=torch.tensor(stream), has_boxes=torch.tensor(boxed),
                      has_mask=torch.tensor(present["mask"]), has_attention_mask=torch.tensor(present["attention_mask"]),
                      image_id=stored["image_id"], patient_id=stored["patient_id"])
        return sample
