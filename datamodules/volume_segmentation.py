"""Volume segmentation: :class:`VolumeSegmentationDataModule` (the Non-local U-Net recipe, Wang et al., AAAI 2020).

  * training: ``patches_per_epoch`` random patches, each from a random training subject, its corner uniform so
    that the patch lies inside the bounding box of the foreground (``foreground_channel != 0``: the skull-stripped
    T1 in the reference); when the box is smaller than the patch along an axis, the patch covers the box.
    Each patch is z-scored per channel, ``(x - mean) / max(std, 1/sqrt(N))``
    (``tf.image.per_image_standardization`` of the reference);
  * evaluation: one item per subject, the foreground box cropped out, **raw** intensities: the sliding-window
    predictor z-scores every window the same way (``NonLocalUNetModule``), so training and inference see the
    same normalisation. Metrics are computed on the crop; outside it everything is background;
  * ``holdout="subject"``: train / validation / test by subject, three disjoint non-empty sets (default: the
    last subject is the test split and the one before it the validation split; ``val_subjects`` and
    ``test_subjects`` choose others, and overlapping lists are refused), so checkpoint selection never sees a
    test subject; ``holdout="hemisphere"``: one subject suffices: training patches stay
    strictly inside the low half of the foreground box along ``split_axis`` (for an RAS-oriented brain on axis
    0 that is the left hemisphere), and evaluation uses the other half, so no training voxel is evaluated.
    There validation and test are the same half: a smoke demo, not a generalisation measurement (a symmetric
    template's mirrored training labels already score high: ``experiments/nonlocal_unet/mirror_baseline.py``).
  * ``split="all"`` (``--data.init_args.split all``, as ``CXRDataModule``): every volume of the reader is the
    test split, once, whole foreground box, for testing a trained model on other subjects; no training split.

Batches follow the segmentation contract and evaluation sampling of :mod:`datamodules.segmentation`.
"""

from __future__ import annotations

from typing import Literal, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.dataset import KeyedSampler, SampleKey, collate_samples, run_seed, sample_seed, world_and_rank
from datamodules.manifest import DataError
from datamodules.segmentation import eval_sampler, zscore
from datamodules.split_all import check_split_choice, describe_evaluated, refuse_split_all_stage, split_all_note
from datamodules.volumes import Volume, VolumeReader

__all__ = ["foreground_box", "patch_start_range", "RandomPatchDataset", "CroppedVolumeDataset",
           "VolumeSegmentationDataModule"]

Box = tuple[tuple[int, int], ...]  # per axis (lo, hi), hi exclusive


def foreground_box(mask: np.ndarray, source: str = "") -> Box:
    """Bounding box ((lo, hi), ...) of the non-zero voxels (hi exclusive)."""
    nz = np.argwhere(mask)
    if nz.size == 0:
        raise DataError(f"{source}: the foreground channel is all zero; no foreground bounding box")
    return tuple((int(lo), int(hi) + 1) for lo, hi in zip(nz.min(0), nz.max(0)))


def patch_start_range(box: tuple[int, int], limit: tuple[int, int], patch: int) -> tuple[int, int]:
    """Inclusive range of patch starts along one axis: inside ``box`` when it is at least ``patch`` long,
    else covering it, and always inside ``limit`` (the allowed part of the volume)."""
    (b_lo, b_hi), (l_lo, l_hi) = box, limit
    if l_hi - l_lo < patch:
        raise DataError(f"the allowed extent {l_hi - l_lo} is smaller than the patch size {patch}")
    lo = max(l_lo, min(b_lo, b_hi - patch))
    hi = min(l_hi - patch, max(b_lo, b_hi - patch))
    if lo > hi:
        lo = hi = min(max(lo, l_lo), l_hi - patch)
    return lo, hi


class RandomPatchDataset(Dataset):
    """``length`` random patches; a draw is a function of ``seed_base`` and the sample's key (epoch, position,
    index: ``datamodules.dataset.sample_seed``), so DDP ranks draw different patches, every epoch draws new ones,
    and no draw depends on a worker's history (exact resume with any ``num_workers``).

    Args:
        volumes: loaded volumes (image (C, *S), label (*S)).
        regions: per volume, ``(box, limits)``: the foreground box to sample in and the extent the patch must
            stay inside.
    """

    def __init__(self, volumes: Sequence[Volume], regions: Sequence[tuple[Box, Box]], patch_size: Sequence[int],
                 length: int, seed_base: Sequence[int] = (0,)) -> None:
        self.volumes, self.patch_size, self.length = list(volumes), tuple(patch_size), int(length)
        self.seed_base = tuple(int(v) for v in seed_base)
        self.ranges = [
            [patch_start_range(b, l, p) for b, l, p in zip(box, limits, self.patch_size)] for box, limits in regions
        ]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, item: int | SampleKey) -> dict:
        rng = np.random.default_rng(sample_seed(self.seed_base, item))
        v = int(rng.integers(len(self.volumes)))
        vol = self.volumes[v]
        starts = [int(rng.integers(lo, hi + 1)) for lo, hi in self.ranges[v]]
        sl = tuple(slice(s, s + p) for s, p in zip(starts, self.patch_size))
        image = torch.from_numpy(np.ascontiguousarray(vol.image[(slice(None), *sl)]))
        label = torch.from_numpy(np.ascontiguousarray(vol.label[sl]))[None]
        return {"image": zscore(image), "label_map": label, "subject_id": vol.subject_id,
                "patch_start": torch.tensor(starts)}


class CroppedVolumeDataset(Dataset):
    """One item per volume: the ``box`` crop with raw intensities (the predictor normalises its windows)."""

    def __init__(self, volumes: Sequence[Volume], boxes: Sequence[Box]) -> None:
        self.volumes, self.boxes = list(volumes), list(boxes)

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, index: int) -> dict:
        vol, box = self.volumes[index], self.boxes[index]
        sl = tuple(slice(lo, hi) for lo, hi in box)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(vol.image[(slice(None), *sl)])),
            "label_map": torch.from_numpy(np.ascontiguousarray(vol.label[sl]))[None],
            "subject_id": vol.subject_id,
            "spacing": torch.tensor(vol.spacing, dtype=torch.float32),
            "box": torch.tensor(box),
        }



class VolumeSegmentationDataModule(pl.LightningDataModule):
    """Random foreground patches for training, whole cropped volumes for sliding-window evaluation.

    Args:
        reader: a :class:`~datamodules.volumes.VolumeReader` (``NiftiVolumes``, ``ISeg2017``, ``MNI152Tissue``,
            ``SyntheticVolumes``).
        patch_size: training patch (int or per-axis); reference 32.
        batch_size: patches per training batch (reference 5).
        patches_per_epoch: training patches per epoch (the reference draws one per subject per "epoch").
        split: ``"patients"`` (default): the subject split that ``holdout`` and the arguments below describe.
            ``"all"``: every volume of the reader is the test split, exactly once (under DDP too), whole foreground
            box, for testing a trained model on other subjects (``medattn test ... --ckpt_path <ckpt>
            --data.init_args.reader.init_args.root <folder> --data.init_args.split all``); ``holdout``,
            ``val_subjects`` and ``test_subjects`` are ignored (the split note names those that were set), and
            ``fit``/``validate`` are refused with an error naming this option.
        holdout: ``"subject"`` or ``"hemisphere"`` (see the module docstring).
        val_subjects: validation subject ids for ``"subject"`` (checkpoint selection); default the last
            subject that is not a test subject.
        test_subjects: test subject ids; default the last subject not in ``val_subjects``. Must not overlap
            ``val_subjects`` (DataError).
        split_axis: axis split by ``"hemisphere"``; ``train_side`` ``"low"`` or ``"high"`` half for training.
        foreground_channel: the channel whose non-zero voxels define the foreground box.
        num_workers: DataLoader workers (volumes are held in memory; 0 is fine).
    """

    def __init__(
        self,
        reader: VolumeReader,
        patch_size: int | Sequence[int] = 32,
        batch_size: int = 5,
        patches_per_epoch: int = 250,
        split: Literal["patients", "all"] = "patients",
        holdout: str = "subject",
        val_subjects: list[str] | None = None,
        test_subjects: list[str] | None = None,
        split_axis: int = 0,
        train_side: str = "low",
        foreground_channel: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if holdout not in ("subject", "hemisphere"):
            raise ValueError(f"holdout must be 'subject' or 'hemisphere', got {holdout!r}")
        if train_side not in ("low", "high"):
            raise ValueError(f"train_side must be 'low' or 'high', got {train_side!r}")
        check_split_choice(type(self).__name__, split)
        self.reader, self.split = reader, split
        self.patch_size = (patch_size,) * 3 if isinstance(patch_size, int) else tuple(patch_size)
        self.batch_size, self.patches_per_epoch, self.num_workers = batch_size, patches_per_epoch, num_workers
        self.holdout, self.split_axis, self.train_side = holdout, split_axis, train_side
        self.val_subjects, self.test_subjects = val_subjects, test_subjects
        self.foreground_channel = foreground_channel
        self.datasets: dict[str, Dataset] = {}
        self.notes: dict[str, str] = {}  # split -> how it was chosen (describe_split)

    @property
    def class_names(self) -> list[str]:
        return list(self.reader.class_names)

    @property
    def num_classes(self) -> int:
        return len(self.reader.class_names)

    @property
    def in_channels(self) -> int:
        return self.reader.in_channels

    @property
    def spatial_dims(self) -> int:
        return 3

    @property
    def roi_size(self) -> list[int]:
        """The sliding-window ROI of evaluation: the training patch (the network sees inputs of that size)."""
        return list(self.patch_size)

    def prepare_data(self) -> None:
        self.reader.prepare()

    def setup(self, stage: str | None = None) -> None:
        refuse_split_all_stage(self.split, stage, f"volume of {type(self.reader).__name__}")
        if self.datasets:
            return
        volumes = []
        for subject in self.reader.subjects():
            vol = self.reader.load(subject)
            if vol.label is None:
                raise DataError(f"subject {subject.subject_id} has no label map; segmentation training needs one")
            if self.foreground_channel >= vol.image.shape[0]:
                raise DataError(f"foreground_channel={self.foreground_channel} but subject {subject.subject_id} "
                                f"has {vol.image.shape[0]} channels")
            small = [s for s, p in zip(vol.image.shape[1:], self.patch_size) if s < p]
            if small:
                raise DataError(f"subject {subject.subject_id} ({subject.images[0]}): volume shape "
                                f"{vol.image.shape[1:]} is smaller than the patch size {self.patch_size}")
            volumes.append(vol)
        boxes = [foreground_box(v.image[self.foreground_channel] != 0, v.subject_id) for v in volumes]
        full = [tuple((0, s) for s in v.image.shape[1:]) for v in volumes]
        if self.split == "all":
            settings = {"holdout": self.holdout, "val_subjects": self.val_subjects, "test_subjects": self.test_subjects}
            self.notes["test"] = split_all_note("volume", settings, {"holdout": "subject", "val_subjects": None,
                                                                    "test_subjects": None})
            self.datasets["test"] = CroppedVolumeDataset(volumes, boxes)
            if self.trainer is None or self.trainer.is_global_zero:
                print(f"[medattn] split ({type(self.reader).__name__}): {len(volumes)} test volumes; {self.notes['test']}")
            return
        if self.holdout == "hemisphere":
            train_regions, eval_boxes = [], []
            for box, limits in zip(boxes, full):
                low, high = self._halves(box, limits)
                train_regions.append(low if self.train_side == "low" else high)
                eval_boxes.append((high if self.train_side == "low" else low)[0])
            self.datasets["train"] = RandomPatchDataset(volumes, train_regions, self.patch_size, self.patches_per_epoch)
            self.datasets["val"] = self.datasets["test"] = CroppedVolumeDataset(volumes, eval_boxes)
            side = "high" if self.train_side == "low" else "low"
            self.notes["val"] = self.notes["test"] = f"the {side} half along axis {self.split_axis} (holdout=hemisphere)"
            return
        ids = [v.subject_id for v in volumes]
        val_ids, test_ids = self.held_out(ids)
        train = [i for i, s in enumerate(ids) if s not in val_ids and s not in test_ids]
        if not train:
            raise DataError(f"no training subject left after holding out {sorted(set(val_ids + test_ids))}; with "
                            "a single subject use holdout='hemisphere'")
        pick = lambda keep: [i for i, s in enumerate(ids) if s in keep]  # noqa: E731
        self.datasets["train"] = RandomPatchDataset([volumes[i] for i in train], [(boxes[i], full[i]) for i in train],
                                                    self.patch_size, self.patches_per_epoch)
        for stage_name, keep in (("val", val_ids), ("test", test_ids)):
            idx = pick(keep)
            self.datasets[stage_name] = CroppedVolumeDataset([volumes[i] for i in idx], [boxes[i] for i in idx])
            self.notes[stage_name] = "held-out subjects (holdout=subject)"

    def describe_split(self, split: str = "test") -> str:
        """Which volumes an evaluation of ``split`` ran on (``medattn test`` prints it as ``Test data: ...`` and
        writes it to summary.json), e.g. ``NiftiVolumes /data/ext, test split: every volume (split=all), 3 volumes
        (sub-01, sub-02, sub-03)``."""
        self.setup("test" if split == "test" else None)
        ids = [v.subject_id for v in self.datasets[split].volumes]
        shown = ", ".join(ids[:10]) + (f", ... ({len(ids) - 10} more)" if len(ids) > 10 else "")
        return describe_evaluated(type(self.reader).__name__, getattr(self.reader, "root", None), split,
                                  self.notes[split].split(";")[0], f"{len(ids)} volumes ({shown})")

    def held_out(self, ids: list[str]) -> tuple[list[str], list[str]]:
        """(validation ids, test ids) for ``holdout="subject"``; disjoint, non-empty, all among ``ids``.

        Defaults: the test split is the last subject, the validation split the last subject before it that is
        not a test subject; so checkpoint selection (``val``) never sees a test subject."""
        for name, given in (("val_subjects", self.val_subjects), ("test_subjects", self.test_subjects)):
            if given is not None and len(given) == 0:
                raise DataError(f"{name} is an empty list; give at least one subject id or leave it unset "
                                f"(subjects: {ids})")
        test_ids = [str(s) for s in self.test_subjects] if self.test_subjects is not None else None
        val_ids = [str(s) for s in self.val_subjects] if self.val_subjects is not None else None
        if test_ids is None:
            test_ids = [s for s in ids if s not in (val_ids or [])][-1:]
        if val_ids is None:
            val_ids = [s for s in ids if s not in test_ids][-1:]
        for name, chosen in (("val_subjects", val_ids), ("test_subjects", test_ids)):
            unknown = sorted(set(chosen) - set(ids))
            if unknown:
                raise DataError(f"{name}: subject ids {unknown} are not among the reader's subjects {ids}")
            if not chosen:
                raise DataError(f"{name}: no subject left for this split (subjects: {ids}); with a single subject "
                                "use holdout='hemisphere'")
        overlap = sorted(set(val_ids) & set(test_ids))
        if overlap:
            raise DataError(f"val_subjects and test_subjects share {overlap}: checkpoint selection would see the "
                            f"test subjects; make the two lists disjoint (val {val_ids}, test {test_ids})")
        return val_ids, test_ids

    def _halves(self, box: Box, limits: Box) -> tuple[tuple[Box, Box], tuple[Box, Box]]:
        """Split box and limits at the middle of the box along ``split_axis``: ((box, limits) low, high)."""
        a = self.split_axis
        mid = (box[a][0] + box[a][1]) // 2
        def cut(b: Box, lo: int, hi: int) -> Box:
            return tuple((max(b[i][0], lo), min(b[i][1], hi)) if i == a else b[i] for i in range(len(b)))
        return (cut(box, 0, mid), cut(limits, 0, mid)), (cut(box, mid, 10**9), cut(limits, mid, 10**9))

    def train_dataloader(self) -> DataLoader:
        # patch draws = f(run seed, rank, epoch, position, index): exact resume with any number of workers
        refuse_split_all_stage(self.split, "fit", "volume")
        world, rank = world_and_rank(self.trainer)
        dataset = self.datasets["train"]
        dataset.seed_base = (run_seed(), rank)
        sampler = KeyedSampler(len(dataset), world, rank, shuffle=False, batch_size=self.batch_size)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, drop_last=True,
                          num_workers=self.num_workers, collate_fn=collate_samples, persistent_workers=self.num_workers > 0)

    def _eval_loader(self, stage: str) -> DataLoader:
        # Crops differ in size, so evaluation batches hold one volume.
        refuse_split_all_stage(self.split, "validate" if stage == "val" else stage, "volume")
        self.setup(stage)
        sampler = eval_sampler(self.split, len(self.datasets[stage]), self.trainer, f"the {stage} split", stage)
        return DataLoader(self.datasets[stage], batch_size=1, sampler=sampler, num_workers=0, collate_fn=collate_samples)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        """The test volumes (whole foreground crops; each item carries its ``box`` in the full volume)."""
        return self._eval_loader("test")
