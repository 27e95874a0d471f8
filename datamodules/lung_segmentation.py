"""2D lung segmentation: :class:`LungSegmentationDataModule`, chest X-rays with lung masks in the
covid-chestxray-dataset layout (``metadata.csv`` + ``images/`` + ``masks/<stem>.png``), split by patient,
letterboxed to ``image_size``.

Batches follow the segmentation contract and evaluation sampling of :mod:`datamodules.segmentation`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal, Sequence

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from datamodules.dataset import (KeyedSampler, SampleKey, collate_samples, run_seed, sample_seed, split_key,
                                 world_and_rank)
from datamodules.io import read_gray_uint8, read_mask
from datamodules.manifest import DataError, Reader
from datamodules.readers.covid import DEFAULT_VIEWS, COVIDChestXray
from datamodules.segmentation import eval_sampler, zscore
from datamodules.split_all import check_split_choice, describe_evaluated, refuse_split_all_stage, split_all_note
from datamodules.splits import split_by_patient
from datamodules.transforms import letterbox

__all__ = ["LungDataset", "LungSegmentationDataModule"]


class LungDataset(Dataset):
    """Letterboxed uint8 images and masks held in memory; training adds a random affine + gamma jitter, drawn from
    ``seed_base`` and the sample's key (``datamodules.dataset.sample_seed``), never from a worker's history."""

    def __init__(self, images: torch.Tensor, masks: torch.Tensor, ids: list[str], patients: list[str],
                 augment: bool, seed_base: Sequence[int] = (0,)) -> None:
        self.images, self.masks, self.ids, self.patients, self.augment = images, masks, ids, patients, augment
        self.seed_base = tuple(int(v) for v in seed_base)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, item: int | SampleKey) -> dict:
        index = split_key(item)[0]
        image = self.images[index].float() / 255.0
        mask = self.masks[index].float()
        if self.augment:
            generator = torch.Generator().manual_seed(sample_seed(self.seed_base, item))
            image, mask = self._augment(image, mask, generator)
        return {"image": zscore(image), "label_map": (mask > 0.5).long(), "image_id": self.ids[index],
                "patient_id": self.patients[index]}

    @staticmethod
    def _augment(image: torch.Tensor, mask: torch.Tensor,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # One random similarity transform shared by image and mask (scale 0.85-1.15, +-10 degrees, +-8 % shift),
        # then a gamma jitter. No flips: the heart makes the two lungs differ.
        g = {"generator": generator}
        angle = math.radians(float(torch.empty(()).uniform_(-10, 10, **g)))
        scale = float(torch.empty(()).uniform_(0.85, 1.15, **g))
        tx, ty = (float(t) for t in torch.empty(2).uniform_(-0.08, 0.08, **g))
        cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
        theta = torch.tensor([[cos, -sin, tx], [sin, cos, ty]], dtype=torch.float32)[None]
        grid = F.affine_grid(theta, (1, 1, *image.shape[-2:]), align_corners=False)
        image = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
        mask = F.grid_sample(mask[None], grid, mode="nearest", padding_mode="zeros", align_corners=False)[0]
        gamma = float(torch.empty(()).uniform_(0.7, 1.4, **g))
        return image.clamp(0, 1) ** gamma, mask


class LungSegmentationDataModule(pl.LightningDataModule):
    """2D lung segmentation on frontal chest X-rays with lung masks.

    The images and masks come from a reader (any object with ``load() -> Manifest``, as ``CXRDataModule``): the
    images whose ``mask_path`` is set are used, the labels are not. By default the reader is
    :class:`~datamodules.readers.covid.COVIDChestXray` over ``root`` (covid-chestxray-dataset layout) with
    ``finding_map=None``: ``metadata.csv`` (``patientid``, ``filename``, ``view``, ``modality``), rows filtered
    on ``modality == "X-ray"`` and ``views``, masks ``<mask_dir>/<stem>.png`` (0/255; ``fallback_mask_dir`` is
    tried next, e.g. ``masks_lungvae``, whose masks are model-generated). In ``shared/data/covid-cxr-mini`` that
    is 85 images of 48 patients with manual v7labs masks. Images and masks are letterboxed to ``image_size``
    (longer side, then zero padding at the bottom/right), held in memory, and split by patient
    (``datamodules.splits``). Images are z-scored per image (as the volume patches). Classes: background, lung.

    Args:
        root: dataset folder of the default reader. metadata, image_dir, mask_dir, fallback_mask_dir, views: its
            arguments (``views`` empty or None: no view filter).
        reader: another reader instead (``root`` and the reader arguments above are then left unset).
        image_size: square side (divisible by 4 for the Non-local U-Net).
        split: ``"patients"`` (default): the patient split of ``val_fraction``/``test_fraction``. ``"all"``: every
            image with a mask is the test split, exactly once (under DDP too), for testing a trained model on
            another folder (``medattn test ... --ckpt_path <ckpt> --data.init_args.root <folder>
            --data.init_args.split all``); the fractions are ignored (named in the split note) and
            ``fit``/``validate`` are refused with an error naming this option.
        val_fraction, test_fraction: fractions of *patients*. batch_size / eval_batch_size: per step.
        augment: random similarity transform and gamma for training. seed: split seed.
    """

    class_names = ["background", "lung"]
    num_classes = 2
    in_channels = 1
    spatial_dims = 2  # no ``roi_size``: the model predicts whole images (the CLI links what is defined here)

    def __init__(
        self,
        root: str | Path | None = None,
        metadata: str = "metadata.csv",
        image_dir: str = "images",
        mask_dir: str = "masks",
        fallback_mask_dir: str | None = None,
        views: Sequence[str] | None = DEFAULT_VIEWS,
        reader: Reader | None = None,
        image_size: int = 128,
        split: Literal["patients", "all"] = "patients",
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        augment: bool = True,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 4 or image_size % 4:
            raise ValueError(f"LungSegmentationDataModule: image_size must be a positive multiple of 4, got {image_size!r}")
        check_split_choice(type(self).__name__, split)
        if reader is None:
            if root is None:
                raise ValueError("LungSegmentationDataModule: give root (the covid-chestxray-dataset folder) or reader")
            reader = COVIDChestXray(root, metadata, image_dir, finding_map=None, views=list(views) if views else None,
                                    mask_dir=mask_dir, fallback_mask_dir=fallback_mask_dir, boxes_csv=None)
        else:  # the default reader's arguments would be silently ignored
            given = {"root": (root, None), "metadata": (metadata, "metadata.csv"), "image_dir": (image_dir, "images"),
                     "mask_dir": (mask_dir, "masks"), "fallback_mask_dir": (fallback_mask_dir, None),
                     "views": (tuple(views) if views else views, DEFAULT_VIEWS)}
            set_ = [k for k, (value, default) in given.items() if value != default]
            if set_:
                raise ValueError(f"LungSegmentationDataModule: {set_} configure the default reader; with reader= "
                                 "give them to the reader instead")
        self.reader, self.split = reader, split
        self.root = getattr(reader, "root", None) or type(reader).__name__  # where the images are, for messages
        self.image_size, self.val_fraction, self.test_fraction = image_size, val_fraction, test_fraction
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.augment, self.num_workers, self.seed = augment, num_workers, seed
        self.records: pd.DataFrame | None = None
        self.datasets: dict[str, LungDataset] = {}
        self.notes: dict[str, str] = {}  # split -> how it was chosen (describe_split)

    def read_records(self) -> pd.DataFrame:
        """One row per image with a mask: ``image_id``, ``image_path``, ``mask_path``, ``patient_id``."""
        manifest = self.reader.load()
        records = manifest.records
        has_mask = records["mask_path"].fillna("").astype(str) != "" if "mask_path" in records else False
        records = records[has_mask]
        if records.empty:
            raise DataError(f"{manifest.source}: no image read by {type(self.reader).__name__} has a lung mask "
                            f"(under {self.root})")
        return records[["image_id", "image_path", "mask_path", "patient_id"]].reset_index(drop=True)

    def setup(self, stage: str | None = None) -> None:
        refuse_split_all_stage(self.split, stage, f"image with a lung mask in {self.root}")
        if self.datasets:
            return
        self.records = records = self.read_records()
        images, masks = [], []
        for r in records.itertuples(index=False):
            image = read_gray_uint8(r.image_path)
            mask = read_mask(r.mask_path, tuple(image.shape[1:]))
            images.append(letterbox(image, self.image_size)[0])
            masks.append(letterbox(mask, self.image_size, is_mask=True)[0])
        images_t, masks_t = torch.stack(images), torch.stack(masks)
        if self.split == "all":
            empty = np.zeros(0, np.int64)
            split = {"train": empty, "val": empty, "test": np.arange(len(records))}
            settings = {"val_fraction": self.val_fraction, "test_fraction": self.test_fraction}
            self.notes["test"] = split_all_note("image", settings, {"val_fraction": 0, "test_fraction": 0})
            if self.trainer is None or self.trainer.is_global_zero:
                print(f"[medattn] split ({self.root}): {len(records)} test images; {self.notes['test']}")
        else:
            split = split_by_patient(records["patient_id"].tolist(), self.val_fraction, self.test_fraction, self.seed)
            self.notes = {k: f"patient-level split, seed {self.seed}" for k in split}
        for name, idx in split.items():
            idx = torch.as_tensor(idx, dtype=torch.long)
            self.datasets[name] = LungDataset(
                images_t[idx], masks_t[idx], records["image_id"].iloc[idx.numpy()].tolist(),
                records["patient_id"].iloc[idx.numpy()].tolist(), augment=self.augment and name == "train")

    def describe_split(self, split: str = "test") -> str:
        """Which images an evaluation of ``split`` ran on (``Test data: ...`` of ``medattn test``, summary.json),
        e.g. ``LungSegmentationDataModule /data/ext, test split: every image (split=all), 12 images of 7
        patients``."""
        self.setup("test" if split == "test" else None)
        data = self.datasets[split]
        return describe_evaluated(type(self).__name__, self.root, split, self.notes[split].split(";")[0],
                                  f"{len(data)} images of {len(set(data.patients))} patients")

    def train_dataloader(self) -> DataLoader:
        # order = f(seed, epoch), augmentation = f(seed, run seed, rank, epoch, position, index): exact resume
        refuse_split_all_stage(self.split, "fit", f"image with a lung mask in {self.root}")
        world, rank = world_and_rank(self.trainer)
        dataset = self.datasets["train"]
        dataset.seed_base = (self.seed, run_seed(), rank)
        sampler = KeyedSampler(len(dataset), world, rank, seed=self.seed, shuffle=True, batch_size=self.batch_size)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, drop_last=True,
                          num_workers=self.num_workers, collate_fn=collate_samples, persistent_workers=self.num_workers > 0)

    def _eval_loader(self, stage: str) -> DataLoader:
        refuse_split_all_stage(self.split, "validate" if stage == "val" else stage, f"image in {self.root}")
        self.setup(stage)
        sampler = eval_sampler(self.split, len(self.datasets[stage]), self.trainer, f"the {stage} split", stage)
        return DataLoader(self.datasets[stage], batch_size=self.eval_batch_size, sampler=sampler,
                          num_workers=self.num_workers, collate_fn=collate_samples)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        """The test images (letterboxed; ``image_id`` names each one)."""
        return self._eval_loader("test")
