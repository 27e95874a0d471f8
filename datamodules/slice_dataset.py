"""Slice stacks as samples of the batch contract (``datamodules/batch.py``): the slice transform (letterbox,
dilated attention mask, shared geometry and per-view photometry) and the dataset over rows of a
:class:`datamodules.readers.slices.SliceTable` (batched by :func:`datamodules.dataset.collate_samples`), used by
:class:`datamodules.slices.SliceStackDataModule`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import (Compose, RandAffined, RandFlipd, RandGaussianNoise, RandGaussianSmooth,
                              RandScaleIntensity, RandShiftIntensity)
from torch.utils.data import Dataset

from datamodules.batch import STREAM_UNLABELED
from datamodules.dataset import SampleKey, sample_seed, split_key
from datamodules.readers.slices import SliceTable
from datamodules.transforms import find_random_states, letterbox, reseed_random_states


# --------------------------------------------------------------------------------------- transform
class SliceTransform:
    """Letterbox to ``image_size``, dilated attention mask, shared geometry, per-view photometry.

    Geometry (training): horizontal flip and a small affine (±``rotate_deg``, ±``shift``, ±``scale``), drawn
    **once** per sample and applied to the image and both masks, so the student and teacher views (and their
    CAMs) align pixel for pixel. The reference drew them per view and compared misaligned maps (e.5).
    Photometry (training, drawn per view): brightness/contrast, Gaussian blur, Gaussian noise (the
    reference's GaussNoise reaches σ = 0.32, too strong for MR; here ``noise_std`` bounds a uniform σ).
    Then ``(x − mean) / std``.

    ``attention_labels``: label values of the segmentation that form the attention target (2 = femoral
    cartilage); ``None`` = every non-zero label. ``attention_dilation``: diameter of the elliptical
    dilation in pixels *of a 256-pixel image* (18 in DC-MT), scaled to ``image_size``.
    """

    def __init__(self, image_size: int = 256, train: bool = False, two_views: bool = False,
                 flip_prob: float = 0.5, affine_prob: float = 0.5, rotate_deg: float = 3.0, shift: float = 0.01,
                 scale: float = 0.01, brightness: float = 0.05, contrast: float = 0.05, blur_prob: float = 0.5,
                 noise_std: float = 0.05, mean: float = 0.5, std: float = 0.25,
                 attention_labels: Sequence[int] | None = (2,), attention_dilation: float = 18.0,
                 seed: int = 0) -> None:
        self.image_size, self.train, self.two_views = image_size, train, two_views
        self.mean, self.std = mean, std
        self.attention_labels = None if attention_labels is None else list(attention_labels)
        diameter = int(round(attention_dilation * image_size / 256.0)) | 1  # odd, centred
        r = (diameter - 1) / 2
        yy, xx = torch.meshgrid(torch.arange(diameter) - r, torch.arange(diameter) - r, indexing="ij")
        self.kernel = ((yy**2 + xx**2) <= max(r, 0.5) ** 2 + 1e-6).float()[None, None]
        keys = ["image", "attention_mask", "mask"]
        geometric = []
        if train and flip_prob > 0:
            geometric.append(RandFlipd(keys, prob=flip_prob, spatial_axis=1))
        if train and affine_prob > 0:
            geometric.append(RandAffined(keys, prob=affine_prob, rotate_range=(np.deg2rad(rotate_deg),),
                                         translate_range=(shift * image_size, shift * image_size),
                                         scale_range=(scale, scale), mode=["bilinear", "nearest", "nearest"],
                                         padding_mode="zeros"))
        self.geometric = Compose(geometric) if geometric else None
        photometric = []
        if train:
            photometric += [RandShiftIntensity(offsets=brightness, prob=0.9), RandScaleIntensity(factors=contrast, prob=0.9)]
            if blur_prob > 0:
                photometric.append(RandGaussianSmooth(sigma_x=(0.25, 0.75), sigma_y=(0.25, 0.75), prob=blur_prob))
            if noise_std > 0:
                photometric.append(RandGaussianNoise(prob=1.0, std=noise_std, sample_std=True))
        self.photometric = Compose(photometric) if photometric else None
        self._states = find_random_states([self.geometric, self.photometric])
        self.set_random_state(seed)

    def set_random_state(self, seed: int) -> None:
        """Reseed geometry and photometry in place (training datasets do it per sample, from the sample's key)."""
        reseed_random_states(self._states, seed)

    def dilate(self, mask: torch.Tensor) -> torch.Tensor:
        if self.kernel.shape[-1] <= 1:
            return mask
        pad = self.kernel.shape[-1] // 2
        return (F.conv2d(mask[None], self.kernel, padding=pad)[0] > 0).float()

    def __call__(self, image: np.ndarray, seg: np.ndarray | None) -> dict[str, torch.Tensor]:
        h0, w0 = image.shape
        sample: dict[str, torch.Tensor] = {}
        sample["image"], scale = letterbox(torch.from_numpy(np.ascontiguousarray(image))[None], self.image_size)
        if seg is not None:
            seg_t, _ = letterbox(torch.from_numpy(np.asarray(seg, np.int64))[None], self.image_size, is_mask=True)
            target = (seg_t > 0) if self.attention_labels is None else torch.isin(seg_t, torch.tensor(self.attention_labels))
            sample["attention_mask"] = self.dilate(target.float())
            sample["mask"] = (seg_t > 0).float()
        else:
            sample["attention_mask"] = sample["mask"] = torch.zeros(1, self.image_size, self.image_size)
        if self.geometric is not None:
            sample = {k: torch.as_tensor(v).as_subclass(torch.Tensor) for k, v in self.geometric(sample).items()}
        out = {"attention_mask": sample["attention_mask"].round(), "mask": sample["mask"].round()}
        for view in (["image", "image_teacher"] if self.two_views else ["image"]):
            pixels = sample["image"].clone()
            if self.photometric is not None:
                pixels = torch.as_tensor(self.photometric(pixels)).as_subclass(torch.Tensor)
            out[view] = pixels.clamp_(0.0, 1.0).sub_(self.mean).div_(self.std)
        out["frame"] = torch.tensor([h0, w0, scale], dtype=torch.float32)
        return out


# ----------------------------------------------------------------------------------------- dataset
class SliceDataset(Dataset):
    """Rows ``index`` of a :class:`SliceTable` shaped by the batch contract.

    ``streams[i]`` is the stream of row ``index[i]``; unlabeled rows hide their slice and subject labels.
    ``cache=True`` keeps decoded, intensity-normalised slices in memory (per worker process).
    ``seed_base``: a training transform is reseeded per sample from it and the sample's key
    (``datamodules.dataset.sample_seed``), so augmentation does not depend on workers or their history.
    """

    def __init__(self, table: SliceTable, index: np.ndarray, streams: np.ndarray, transform: SliceTransform,
                 cache: bool = False, seed_base: Sequence[int] = (0,)) -> None:
        self.seed_base = tuple(int(v) for v in seed_base)
        self.table, self.index = table, np.asarray(index, np.int64)
        self.streams = np.asarray(streams, np.int64)
        self.transform = transform
        self.cache: dict[int, tuple] | None = {} if cache else None
        self.k = len(table.class_names)
        self.subject_labels = table.subjects.set_index("subject_id")["subject_label"]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, item: int | SampleKey) -> dict:
        i = split_key(item)[0]
        row_index = int(self.index[i])
        if self.cache is not None and row_index in self.cache:
            image, seg = self.cache[row_index]
        else:
            image, seg = self.table.load_slice(row_index)
            if self.cache is not None:
                self.cache[row_index] = (image, seg)
        if self.transform.train:
            self.transform.set_random_state(sample_seed(self.seed_base, item))
        sample = self.transform(image, seg)
        row = self.table.slices.iloc[row_index]
        stream = int(self.streams[i])
        known = stream != STREAM_UNLABELED and not np.isnan(row["label"])
        labels = torch.zeros(self.k)
        if known:
            labels[int(row["label"])] = 1.0
        subject_label = self.subject_labels.get(row["subject_id"], np.nan)
        sample.update({
            "labels": labels, "label_mask": torch.full((self.k,), known),
            "stream": torch.tensor(stream), "has_boxes": torch.tensor(False),
            "has_mask": torch.tensor(seg is not None), "has_attention_mask": torch.tensor(seg is not None),
            "slice_index": torch.tensor(int(row["slice_index"])),
            "subject_label": torch.tensor(-1 if stream == STREAM_UNLABELED or np.isnan(subject_label)
                                          else int(subject_label)),
            "image_id": str(row["image_id"]), "patient_id": str(row["subject_id"]), "subject_id": str(row["subject_id"]),
        })
        return sample
