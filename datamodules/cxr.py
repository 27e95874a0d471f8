"""``CXRDataModule``: any 2D reader -> leak-free patient splits -> mixed-supervision training batches."""

from __future__ import annotations

import os
from pathlib import Path
import warnings
from typing import Literal, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader

from datamodules.batch import STREAM_BOX, STREAM_LABEL, STREAM_NAMES, STREAM_UNLABELED
from datamodules.batch_augment import BatchAugment, batch_seed
from datamodules.dataset import (CXRDataset, MixedStreamSampler, UnpaddedDistributedSampler, collate_cxr, run_seed,
                                 world_and_rank)
from datamodules.io import read_gray_uint8, read_mask
from datamodules.manifest import DataError, Manifest, Reader
from datamodules.prepared import PreparedCXRDataset, check_prepared, stored_settings
from datamodules.progress import progress
from datamodules.splits import all_images_split, assign_streams, build_splits, split_summary
from datamodules.transforms import CXRTransform

_STREAM_BY_NAME = {name: value for value, name in STREAM_NAMES.items()}
SPLITS = ("patients", "all")  # values of CXRDataModule(split=...)
# the splitting arguments that split="all" overrides, with the value at which each has no effect
_SPLIT_ARGS = {"val_fraction": 0, "test_fraction": 0, "hold_out_boxed_for_test": False,
               "use_official_test_split": False, "num_folds": 1}


def _read_id_list(value: Sequence[str] | str | None) -> list[str] | None:
    """An id list given inline or as a text file with one id per line."""
    if value is None or not isinstance(value, (str, os.PathLike)):
        return None if value is None else list(map(str, value))
    return [line.strip() for line in Path(value).read_text().splitlines() if line.strip()]


class CXRDataModule(pl.LightningDataModule):
    """Chest X-ray (or any 2D) images with box-annotated, image-label-only and unlabeled training streams.

    The reader (any object with ``load() -> Manifest``: NIH ChestX-ray14, CheXpert, the COVID-19 collection, a
    generic CSV, the built-in synthetic data) is injected, so the same module serves every dataset.

    Splits are by patient and deterministic for ``seed`` (see ``datamodules.splits``). Inside train, every image is
    assigned to one stream: ``box`` (boxes + labels), ``label`` (labels only) or ``unlabeled`` (nothing).

    Batches: each training batch holds exactly ``box_batch_size`` + ``labeled_batch_size`` + ``unlabeled_batch_size``
    images, in that stream order (``batch["stream"]`` tells them apart). Batch sizes are **per rank**: under DDP
    with W processes the global batch is W times larger and each rank draws a disjoint shard of every stream. The
    stream named by ``epoch_stream`` defines the epoch; the others cycle.

    Args:
        reader: dataset reader (``load() -> Manifest``).
        image_size: square network input side; images are letterboxed (see ``datamodules.transforms``).
        split: ``"patients"`` (default): the patient-level train/val/test split described by the arguments below.
            ``"all"``: every image of the reader is the test split, exactly once (under DDP too: the evaluation
            sampler shards without padding), for testing a trained model on another dataset
            (``medattn test ... --ckpt_path <ckpt> --data.init_args.split all``). No train/val split is built;
            ``val_fraction``, ``test_fraction``, ``hold_out_boxed_for_test``, ``use_official_test_split`` and
            ``num_folds`` are ignored (the split summary's note names those that were set); ``fit`` and
            ``validate`` are refused with an error naming this option. ``min_per_class`` does not stop the run
            (an external set is what it is): classes below it are named in the summary note and in a warning,
            and the AUROC policy reports a class without positives or negatives as NaN, outside the macro mean.
        val_fraction, test_fraction: fractions of patients; val and test are stratified by label (each patient's
            rarest class, see ``datamodules.splits``), so every split holds every class.
        hold_out_boxed_for_test: the test split is every patient with a boxed image (NIH localisation protocol);
            **``test_fraction`` is then ignored** (the split summary's ``note`` says so). Error if no image has a box.
        use_official_test_split: the test split is the reader's official one (``official_split == "test"``), plus
            the boxed patients if ``hold_out_boxed_for_test``; ``test_fraction`` is ignored. Error, naming the files
            the reader looked for, when the official test split is empty (never a random or empty test split).
        num_folds, fold: patient-level stratified k-fold; when ``num_folds > 1`` the fold is the test split and
            ``val_fraction`` of the remaining patients is validation.
        min_per_class: smallest number of examples of each class (multilabel: positives and negatives of each
            class) that every non-empty split must hold; fewer is an error naming the split, class and counts.
            Default 10; lower it only for small data (and say why in the config); 0 turns the check off.
        box_fraction: fraction of training images in the box stream (drawn among images with boxes);
            ``None`` = every training image that has boxes.
        unlabeled_fraction: fraction of training images whose labels are hidden.
        box_images, unlabeled_images: explicit image-id lists (inline or a text file), overriding the fractions.
        box_batch_size, labeled_batch_size, unlabeled_batch_size: per-rank images per stream per training batch.
            A stream with batch size 0 is left out of training batches (e.g. supervised-only baselines).
        epoch_stream: ``"box" | "label" | "unlabeled"``; default: ``"label"`` if it has a batch, else ``"box"``.
        eval_batch_size: batch size of validation, test and predict loaders (all images, labels and boxes).
        two_views: also return ``image_teacher`` (same geometry, independent photometry) for mean teachers.
        augment: random geometry/photometry for training; ``augment_kwargs`` go to ``CXRTransform``.
        num_workers: DataLoader workers. One worker decodes ~75 PNG/s at 512 px, far above what a CPU model
            consumes, and each worker takes a core from the model: keep it small on small machines.
        seed: split, stream and sampling seed.
        train_masks: decode the lung and attention masks for training batches. Only methods that train on
            them need it (DC-MT's attention losses); ``False`` skips the decoding (about a third of a 512² PNG
            sample's loading time, see ``experiments/benchmarks/dataloader.py``) and the masks travel as zeros
            with ``has_mask``/``has_attention_mask`` False. Evaluation loaders always read them (localisation
            metrics, CAM logging).
        augment_on: where training augmentation runs. ``"sample"`` (default): per sample in the loader workers
            (``CXRTransform``). ``"batch"``: the training loader yields letterboxed, un-augmented, un-normalised
            samples and :meth:`on_after_batch_transfer` applies ``datamodules.batch_augment.BatchAugment`` (same
            settings, same distributions) to the whole batch on the device it was moved to; seeded per batch from
            ``(seed, run seed, rank, epoch, batch index)`` (:func:`~datamodules.batch_augment.batch_seed`), so
            resume and DDP ranks draw reproducibly. Evaluation batches are never augmented (per-sample
            normalisation as today); ``augmentation="reference"`` (``augment_kwargs``) has no batch path.
        skip_corrupt: decode every image (and mask) once at setup, drop the unreadable ones and count them in
            ``self.report`` (without it, an unreadable image raises a ``DataError`` naming its path when loaded).
        prepared: a folder written by ``medattn prepare`` (``datamodules/prepared.py``): the pixels come from there
            (decoded and letterboxed once) instead of the image files; the manifest, split, streams and samplers
            still come from the reader, so batches are the same. Refused, naming the difference, when it was
            prepared with another ``image_size`` or CLAHE setting, another reader or another manifest. Training
            augmentation then runs on the batch (``augment_on="batch"``; with ``augment=False`` batches equal the
            unprepared path's).
    """

    def __init__(
        self,
        reader: Reader,
        image_size: int = 128,
        split: Literal["patients", "all"] = "patients",
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        hold_out_boxed_for_test: bool = False,
        use_official_test_split: bool = False,
        num_folds: int = 1,
        fold: int = 0,
        min_per_class: int = 10,
        box_fraction: float | None = 0.0,
        unlabeled_fraction: float = 0.0,
        box_images: list[str] | str | None = None,
        unlabeled_images: list[str] | str | None = None,
        box_batch_size: int = 0,
        labeled_batch_size: int = 16,
        unlabeled_batch_size: int = 0,
        epoch_stream: str | None = None,
        eval_batch_size: int = 32,
        two_views: bool = False,
        augment: bool = True,
        augment_kwargs: dict | None = None,
        num_workers: int = 0,
        seed: int = 0,
        train_masks: bool = True,
        skip_corrupt: bool = False,
        augment_on: Literal["sample", "batch"] = "sample",
        prepared: str | None = None,
    ) -> None:
        super().__init__()
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"CXRDataModule: image_size must be a positive int (the network input side in "
                             f"pixels), got {image_size!r}")
        if split not in SPLITS:
            raise ValueError(f"CXRDataModule: split must be one of {SPLITS} (--data.init_args.split), got {split!r}")
        if augment_on not in ("sample", "batch"):
            raise ValueError(f"CXRDataModule: augment_on must be 'sample' or 'batch' (--data.init_args.augment_on), "
                             f"got {augment_on!r}")
        if augment_on == "batch" and (augment_kwargs or {}).get("augmentation") == "reference":
            raise ValueError("CXRDataModule: augment_on='batch' cannot run augmentation='reference' "
                             "(augment_kwargs); use augment_on='sample' for the MAG-SD reference recipe")
        self.save_hyperparameters(ignore=["reader"])
        self.reader = reader
        self.manifest: Manifest | None = None
        self.splits: dict[str, np.ndarray] = {}
        self.train_streams = np.zeros(0, np.int64)
        self.summary = None
        self.report: dict[str, list[str]] = {"skipped_corrupt": []}
        self.prepared_meta: dict | None = None  # the prepared folder's record, once checked against the manifest

    # ------------------------------------------------------------------------------------ properties
    def _ensure_manifest(self) -> Manifest:
        if self.manifest is None:
            manifest = self.reader.load()
            if len(manifest) == 0:
                raise DataError(f"{type(self.reader).__name__} returned no images ({manifest.source})")
            if self.hparams.skip_corrupt:
                manifest = self._drop_corrupt(manifest)
            manifest.check_boxes_against_images()  # boxes vs the decoded sizes (file headers), before any epoch
            self.manifest = manifest
        return self.manifest

    def _drop_corrupt(self, manifest: Manifest) -> Manifest:
        keep = []
        rows = manifest.records.itertuples(index=False)
        for i, row in enumerate(progress(rows, total=len(manifest.records), desc="skip_corrupt: decoding images")):
            try:
                hw = tuple(read_gray_uint8(row.image_path).shape[1:])
                for path in (row.mask_path, row.attention_mask_path):
                    if path:
                        read_mask(path, hw)
                keep.append(i)
            except DataError as err:
                self.report["skipped_corrupt"].append(str(err))
        if self.report["skipped_corrupt"]:
            print(f"[medattn] skipped {len(self.report['skipped_corrupt'])} unreadable image(s); first: "
                  f"{self.report['skipped_corrupt'][0]}")
        if not keep:
            raise DataError(f"every image of {type(self.reader).__name__} is unreadable; first: "
                            f"{self.report['skipped_corrupt'][0]}")
        return manifest.subset(keep)

    @property
    def class_names(self) -> list[str]:
        return list(self._ensure_manifest().class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def task(self) -> str:
        return self._ensure_manifest().task

    @property
    def in_channels(self) -> int:
        return 1

    # ------------------------------------------------------------------------------------- splitting
    def prepare_data(self) -> None:
        # Readers that write data (the synthetic one) do it here, once per node, before setup on every rank.
        prepare = getattr(self.reader, "prepare", None)
        if callable(prepare):
            prepare()

    def setup(self, stage: str | None = None) -> None:
        if self.hparams.split == "all" and str(stage) in ("fit", "validate"):
            raise DataError(f"stage {stage!r} is not possible with split='all' (--data.init_args.split all): every "
                            f"image of {type(self.reader).__name__} is the test split, for testing a trained model "
                            "on this dataset (medattn test --ckpt_path <checkpoint> ... --data.init_args.split all); "
                            "train and validate with split='patients' (the default)")
        if not self.splits:
            self._build_splits()
        if self.hparams.prepared and self.prepared_meta is None:
            self.prepared_meta = check_prepared(self.hparams.prepared, self._ensure_manifest(), stored_settings(
                self.hparams.image_size, self.hparams.augment_kwargs), self.reader)
        # An evaluation stage on an empty split would log nothing (or a metric of nothing) without failing.
        for split in {"test": ["test"], "predict": ["test"], "validate": ["val"]}.get(str(stage), []):
            if len(self.splits[split]) == 0:
                raise DataError(f"stage {stage!r} needs the {split} split, which is empty (val_fraction="
                                f"{self.hparams.val_fraction}, test_fraction={self.hparams.test_fraction}, no "
                                f"official or boxed hold-out)")

    def _build_splits(self) -> None:
        hp = self.hparams
        manifest = self._ensure_manifest()
        if hp.split == "all":
            ignored = {k: hp[k] for k, neutral in _SPLIT_ARGS.items() if hp[k] != neutral}
            self.splits, notes = all_images_split(manifest, min_per_class=hp.min_per_class, ignored=ignored)
            self.train_streams = np.zeros(0, np.int64)
            self.summary = split_summary(manifest, self.splits, self.train_streams, notes)
            if "min_per_class" in notes["test"]:
                warnings.warn(f"{type(self.reader).__name__} ({manifest.source}), split='all': {notes['test']}",
                              stacklevel=2)
            self._print_summary()
            return
        splits, notes = build_splits(
            manifest, self.reader, val_fraction=hp.val_fraction, test_fraction=hp.test_fraction, seed=hp.seed,
            hold_out_boxed_for_test=hp.hold_out_boxed_for_test, use_official_test_split=hp.use_official_test_split,
            num_folds=hp.num_folds, fold=hp.fold, min_per_class=hp.min_per_class)
        has_boxes = manifest.records["image_id"].astype(str).isin(set(manifest.boxes["image_id"].astype(str))).to_numpy()
        train_ids = manifest.records["image_id"].astype(str).to_numpy()[splits["train"]]
        streams = assign_streams(train_ids, has_boxes[splits["train"]], hp.box_fraction, hp.unlabeled_fraction,
                                 hp.seed, _read_id_list(hp.box_images), _read_id_list(hp.unlabeled_images))
        self.splits, self.train_streams = splits, streams
        self.summary = split_summary(manifest, splits, streams, notes)
        self._print_summary()

    def _print_summary(self) -> None:
        if self.trainer is None or self.trainer.is_global_zero:
            print(f"[medattn] split summary ({type(self.reader).__name__}):\n{self.summary.to_string(index=False)}")

    def describe_split(self, split: str = "test") -> str:
        """Which data an evaluation of ``split`` ran on, for the end-of-test summary: the reader, its root (or
        the manifest's source), how the split was chosen (``split=all``: every image) and its size, e.g.
        ``COVIDChestXray /data/ext, test split: every image (split=all), 12 images of 7 patients``."""
        manifest = self._ensure_manifest()
        if not self.splits:
            self._build_splits()
        index = self.splits[split]
        root = getattr(self.reader, "root", None)
        root = Path(root).expanduser().resolve() if isinstance(root, (str, os.PathLike)) else manifest.source
        note = self.summary.set_index("split")["note"].get(split, "") if self.summary is not None else ""
        patients = manifest.records["patient_id"].iloc[index].nunique()
        how = note.split(";")[0] or ("patient-level split, seed " + str(self.hparams.seed))
        return f"{type(self.reader).__name__} {root}, {split} split: {how}, {len(index)} images of {patients} patients"

    # ---------------------------------------------------------------------------------- dataloaders
    def _transform(self, train: bool) -> CXRTransform:
        hp = self.hparams
        kwargs = dict(hp.augment_kwargs or {})
        rank = self.trainer.global_rank if self.trainer is not None else 0
        if train and hp.augment_on == "batch":  # letterbox (and CLAHE) only, [0, 1]: BatchAugment does the rest
            kwargs.update(normalize="global", mean=0.0, std=1.0)
            return CXRTransform(hp.image_size, train=False, seed=hp.seed + 1000 * rank, **kwargs)
        return CXRTransform(hp.image_size, train=train and hp.augment, two_views=hp.two_views and train,
                            seed=hp.seed + 1000 * rank, **kwargs)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """``augment_on="batch"``: augment a training batch on its device (Lightning calls this after
        ``batch_to_device``); everything else passes through."""
        trainer = self.trainer
        if self.hparams.augment_on != "batch" or trainer is None or not trainer.training:
            return batch
        if getattr(self, "_batch_augment", None) is None:
            hp = self.hparams
            self._batch_augment = BatchAugment.from_transform(CXRTransform(
                hp.image_size, train=hp.augment, two_views=hp.two_views, **dict(hp.augment_kwargs or {})))
        # this batch's index in the epoch: Lightning counts it "ready" right after this hook and restores the count
        # on resume (lightning.pytorch.loops.training_epoch_loop, checked with Lightning 2.6)
        index = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        seed = batch_seed((self.hparams.seed, run_seed(), trainer.global_rank), trainer.current_epoch, index)
        generator = torch.Generator(device=batch["image"].device).manual_seed(seed)
        return self._batch_augment(batch, generator)

    def _prepared_dataset(self, split: str, streams: np.ndarray, train: bool) -> PreparedCXRDataset:
        """The split's samples from the prepared folder, un-augmented; training samples with ``augment_on="batch"``
        un-normalised, because :meth:`on_after_batch_transfer` normalises them (and augments them when ``augment``)."""
        hp = self.hparams
        on_batch = train and hp.augment_on == "batch"
        if train and hp.augment and not on_batch:
            raise DataError(f"prepared={hp.prepared}: prepared samples are augmented on the batch; set "
                            "--data.init_args.augment_on batch (or --data.init_args.augment false)")
        ids = self.manifest.records["image_id"].to_numpy()[self.splits[split]]
        transform = CXRTransform(hp.image_size, two_views=hp.two_views and train, **dict(hp.augment_kwargs or {}))
        return PreparedCXRDataset(hp.prepared, self.splits[split], ids, streams, transform,
                                  load_masks=hp.train_masks or not train, raw=on_batch)

    def batch_sizes(self) -> dict[int, int]:
        hp = self.hparams
        return {STREAM_BOX: hp.box_batch_size, STREAM_LABEL: hp.labeled_batch_size,
                STREAM_UNLABELED: hp.unlabeled_batch_size}

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        hp = self.hparams
        manifest = self._ensure_manifest().subset(self.splits["train"])
        sizes = self.batch_sizes()
        for stream, size in sizes.items():
            if size > 0 and not np.any(self.train_streams == stream):
                raise DataError(f"{STREAM_NAMES[stream]}_batch_size={size} but the training split has no "
                                f"{STREAM_NAMES[stream]}-stream images (check box_fraction / unlabeled_fraction)")
        if hp.epoch_stream is not None:
            epoch_stream = _STREAM_BY_NAME[hp.epoch_stream]
        else:
            epoch_stream = STREAM_LABEL if sizes[STREAM_LABEL] > 0 else STREAM_BOX
        world, rank = world_and_rank(self.trainer)
        sampler = MixedStreamSampler(self.train_streams, sizes, epoch_stream, world, rank, hp.seed, keyed=True)
        if hp.prepared:
            dataset = self._prepared_dataset("train", self.train_streams, train=True)
        else:  # augmentation = f(data seed, run seed, rank, epoch, position, index): exact resume with any workers
            dataset = CXRDataset(manifest, self._transform(train=True), self.train_streams,
                                 load_masks=self.hparams.train_masks, seed_base=(hp.seed, run_seed(), rank))
        return DataLoader(dataset, batch_size=sampler.batch_size, sampler=sampler, drop_last=True,
                          collate_fn=collate_cxr, num_workers=hp.num_workers,
                          persistent_workers=hp.num_workers > 0, pin_memory=False)

    def _eval_dataloader(self, split: str) -> DataLoader:
        self.setup(split)
        hp = self.hparams
        manifest = self._ensure_manifest().subset(self.splits[split])
        # Evaluation images keep their labels and, where annotated, their boxes; they are never augmented.
        boxed = manifest.records["image_id"].astype(str).isin(set(manifest.boxes["image_id"].astype(str)))
        streams = np.where(boxed.to_numpy(), STREAM_BOX, STREAM_LABEL)
        dataset = (self._prepared_dataset(split, streams, train=False) if hp.prepared
                   else CXRDataset(manifest, self._transform(train=False), streams))
        world, rank = world_and_rank(self.trainer)
        sampler = UnpaddedDistributedSampler(len(dataset), world, rank, f"the {split} split")
        return DataLoader(dataset, batch_size=hp.eval_batch_size, sampler=sampler, collate_fn=collate_cxr,
                          num_workers=hp.num_workers, persistent_workers=hp.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return self._eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_dataloader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_dataloader("test")
