"""Slice stacks: subjects made of ordered 2D slices with slice-level and subject-level labels (DC-MT).

Slices are read by :mod:`datamodules.readers.slices` (:class:`~datamodules.readers.slices.H5SliceReader`,
:class:`~datamodules.readers.slices.NiftiSliceReader`, or any :class:`~datamodules.readers.slices.SliceReader`) and
shaped into samples by :mod:`datamodules.slice_dataset` (:class:`~datamodules.slice_dataset.SliceTransform`).

:class:`SliceStackDataModule` splits **by subject** (:mod:`datamodules.subject_splits`: the held-out fold is the
test split, ``val_fraction`` of the other subjects are validation subjects unless the config asks for the
reference protocol with ``no_validation_split: true``), checks that every split holds ``min_per_class`` subjects
of every class (default 10), makes ``label_ratio`` of the remaining
training subjects labeled (stratified by subject label) and returns batches that follow
``datamodules/batch.py``: every training batch holds ``labeled_batch_size`` labeled slices followed by
``unlabeled_batch_size`` unlabeled ones (``stream``), two views with shared geometry and independent
photometry (``image`` / ``image_teacher``), and the dilated-cartilage ``attention_mask``. Unlabeled slices
carry zero labels, an all-False ``label_mask`` and ``subject_label = -1``: the ground truth never reaches a
training step through them (the reference read unlabeled grades for its attention consistency, e.4).
Extra keys: ``subject_id``, ``slice_index``, ``subject_label``.
"""

from __future__ import annotations

import warnings
from typing import Literal

import lightning.pytorch as pl
import numpy as np
import pandas as pd
from torch.utils.data import DataLoader

from datamodules.batch import STREAM_LABEL, STREAM_UNLABELED
from datamodules.dataset import (MixedStreamSampler, UnpaddedDistributedSampler, collate_samples, run_seed,
                                 world_and_rank)
from datamodules.manifest import DataError
from datamodules.readers.slices import SliceReader, SliceTable
from datamodules.slice_dataset import SliceDataset, SliceTransform
from datamodules.split_all import check_split_choice, describe_evaluated, refuse_split_all_stage, split_all_note
from datamodules.subject_splits import (DEFAULT_VAL_FRACTION, ROLES, check_subject_counts, role_frame, split_subjects,
                                        subject_folds)


# ------------------------------------------------------------------------------------- datamodule
class SliceStackDataModule(pl.LightningDataModule):
    """Subject-split slice stacks with labeled and unlabeled training streams (see module doc).

    Args:
        reader: any object with ``load() -> SliceTable`` (:class:`datamodules.readers.slices.H5SliceReader`,
            :class:`datamodules.readers.slices.NiftiSliceReader`,
            :class:`datamodules.synthetic_slices.SyntheticSlices`); ``prepare()`` is called if present.
        image_size: network input side.
        split: ``"patients"`` (default): the subject split of the arguments below. ``"all"``: every subject (all
            its slices) is the test split, exactly once (under DDP too), for testing a trained model on another
            cohort (``medattn test ... --ckpt_path <ckpt> --data.init_args.reader.init_args.root <folder>
            --data.init_args.split all``); ``num_folds``, ``fold``, ``val_fraction``, ``label_ratio``,
            ``labeled_subjects`` and ``no_validation_split`` are ignored (the summary note names those that were
            set), ``min_per_class`` is not enforced (classes below it are named in the note and a warning), the
            checkpoint's saved split is not compared (it is another cohort's), and ``fit``/``validate`` are
            refused with an error naming this option. ``medattn predict`` with the feature writer then records
            every subject as ``test`` (``split_info["split"] = "all"``), which DC-MT stage 2 tests with its own
            ``split: all``.
        num_folds, fold, val_fraction, label_ratio, labeled_subjects, no_validation_split: see
            :func:`datamodules.subject_splits.split_subjects`. By default 15 % of the training subjects are
            validation subjects (stratified by subject label), so ``best.ckpt`` is never chosen on the test fold;
            the reference protocol (no validation split, the last epoch is tested) needs ``val_fraction: 0`` and
            ``no_validation_split: true``, and ``val_fraction: 0`` alone is an error.
            ``label_ratio`` is the single label-ratio knob (fraction of training subjects labeled).
        min_per_class: smallest number of **subjects** of each subject class in the train, val and test splits
            (default 10, as ``CXRDataModule``); fewer is an error naming the split, the class and the counts
            (:func:`datamodules.subject_splits.check_subject_counts`: subjects, because the split is drawn over
            subjects and the subject-level metrics are per subject). ``0`` turns the check off.
        labeled_batch_size, unlabeled_batch_size: per-rank slices of each stream per training batch (10 + 30
            in DC-MT). ``unlabeled_batch_size = 0`` trains on the labeled slices alone.
        epoch_stream: ``"unlabeled"`` (one pass over the unlabeled slices per epoch, as the reference) or
            ``"label"``; default: unlabeled when it has a batch.
        eval_batch_size: validation/test/predict batch size.
        two_views: add ``image_teacher``.
        augment, augment_kwargs: training augmentation and :class:`datamodules.slice_dataset.SliceTransform` options
            (e.g. ``attention_labels``, ``attention_dilation``, ``noise_std``).
        cache: keep decoded slices in memory (fast for small data; costs H·W·4 bytes per slice and worker).
        num_workers, seed: DataLoader workers and the split/sampling/augmentation seed.
    """

    def __init__(self, reader: SliceReader, image_size: int = 256, split: Literal["patients", "all"] = "patients",
                 num_folds: int = 5, fold: int = 0,
                 val_fraction: float = DEFAULT_VAL_FRACTION, label_ratio: float = 0.25,
                 labeled_subjects: list[str] | None = None,
                 labeled_batch_size: int = 10, unlabeled_batch_size: int = 30, epoch_stream: str | None = None,
                 eval_batch_size: int = 40, two_views: bool = True, augment: bool = True,
                 augment_kwargs: dict | None = None, cache: bool = False, num_workers: int = 0,
                 seed: int = 0, no_validation_split: bool = False, min_per_class: int = 10) -> None:
        super().__init__()
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"SliceStackDataModule: image_size must be a positive int, got {image_size!r}")
        check_split_choice(type(self).__name__, split)
        self.save_hyperparameters(ignore=["reader"])
        self.reader = reader
        self.table: SliceTable | None = None
        self.split: dict[str, list[str]] = {}
        self.test_note = ""  # how the test split was chosen, for split="all" (summary, describe_split)

    def _ensure_table(self) -> SliceTable:
        if self.table is None:
            self.table = self.reader.load()
        return self.table

    @property
    def class_names(self) -> list[str]:
        return list(self._ensure_table().class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def task(self) -> str:
        return "multiclass"

    @property
    def in_channels(self) -> int:
        return 1

    def prepare_data(self) -> None:
        prepare = getattr(self.reader, "prepare", None)
        if callable(prepare):
            prepare()

    def setup(self, stage: str | None = None) -> None:
        refuse_split_all_stage(self.hparams.split, stage, f"subject of {type(self.reader).__name__}")
        if self.split:
            return
        hp = self.hparams
        table = self._ensure_table()
        if hp.split == "all":
            self._split_all(table)
            return
        split = split_subjects(table.subjects, hp.num_folds, hp.fold, hp.val_fraction, hp.label_ratio,
                               hp.seed, hp.labeled_subjects, hp.no_validation_split)
        # checked before it is kept: a refused split must not be used by a later setup() call
        check_subject_counts(table.subjects, split, table.class_names, hp.min_per_class,
                             f"{type(self.reader).__name__} ({table.source})")
        self.split = split
        if self.trainer is None or self.trainer.is_global_zero:
            n = {k: len(v) for k, v in self.split.items()}
            train = table.slices["subject_id"].isin(set(self.split["train"]))
            lab = table.slices["subject_id"].isin(set(self.split["labeled"])) & table.slices["label"].notna()
            note = ("; no validation split (no_validation_split: true): no model selection, the last epoch is tested"
                    if not self.split["val"] else "")
            print(f"[medattn] slice split: {n} subjects; {int(train.sum())} training slices, {int(lab.sum())} labeled "
                  f"({lab.sum() / max(1, train.sum()):.1%}){note}")

    # the arguments split="all" ignores, with the value at which each would have no effect
    _SPLIT_ARGS = {"num_folds": 1, "fold": 0, "val_fraction": 0, "label_ratio": 0, "labeled_subjects": None,
                   "no_validation_split": False}

    def _split_all(self, table: SliceTable) -> None:
        """split="all": every subject is a test subject (see the class doc)."""
        hp = self.hparams
        ids = sorted(table.subjects["subject_id"].astype(str))
        if not ids:
            raise DataError(f"split='all': {table.source} holds no subjects")
        label = table.subjects["subject_label"].to_numpy(dtype=float)
        counts = {name: int((label == k).sum()) for k, name in enumerate(table.class_names)}
        self.test_note = split_all_note("subject", dict(hp), self._SPLIT_ARGS, counts, hp.min_per_class)
        if "min_per_class" in self.test_note:
            warnings.warn(f"{type(self.reader).__name__} ({table.source}), split='all': {self.test_note}", stacklevel=3)
        self.split = {"train": [], "val": [], "test": ids, "labeled": []}
        if self.trainer is None or self.trainer.is_global_zero:
            print(f"[medattn] slice split: {len(ids)} test subjects, {len(table.slices)} slices; {self.test_note}")

    def describe_split(self, split: str = "test") -> str:
        """Which subjects an evaluation of ``split`` ran on (``Test data: ...`` of ``medattn test``,
        summary.json), e.g. ``H5SliceReader /data/ext, test split: every subject (split=all), 30 subjects, 540
        slices``."""
        self.setup("test" if split == "test" else None)
        hp, ids = self.hparams, self.split[split]
        how = (self.test_note.split(";")[0] if hp.split == "all"
               else f"subject split, fold {hp.fold} of {hp.num_folds}, seed {hp.seed}")
        n_slices = int(self.table.slices["subject_id"].isin(set(ids)).sum())
        return describe_evaluated(type(self.reader).__name__, getattr(self.reader, "root", None) or self.table.source,
                                  split, how, f"{len(ids)} subjects, {n_slices} slices")

    def split_record(self) -> tuple[pd.DataFrame, dict]:
        """Each subject's role (labeled / unlabeled / val / test) and fold, and the split arguments: what the
        stage-1 feature export stores so that DC-MT stage 2 uses exactly these subjects."""
        self.setup()
        hp = self.hparams
        folds = (pd.Series(dtype=np.int64) if hp.split == "all"  # no folds: recorded as -1
                 else subject_folds(self.table.subjects, hp.num_folds, hp.seed))
        roles = role_frame(self.split, folds)
        info = {"split": str(hp.split), "num_folds": int(hp.num_folds), "fold": int(hp.fold),
                "val_fraction": float(hp.val_fraction),
                "label_ratio": float(hp.label_ratio), "seed": int(hp.seed),
                "no_validation_split": bool(hp.no_validation_split), "source": str(self.table.source),
                "min_per_class": int(hp.min_per_class)}
        return roles, info

    def state_dict(self) -> dict:
        """The subject split, saved in every checkpoint: a checkpoint used with another split is an error."""
        return {"split": {k: list(v) for k, v in self.split.items()}} if self.split else {}

    def load_state_dict(self, state_dict: dict) -> None:
        # Lightning calls this after setup() when a run restores a checkpoint (fit resume, test, predict): a
        # model must be tested and exported on the subjects it was trained with, never on another split's.
        saved = state_dict.get("split")
        self.setup()
        if saved is None or saved == self.split:
            return
        if self.hparams.split == "all":  # the checkpoint's split is over its training cohort, not this one
            seen = sorted(set(saved.get("train", [])) | set(saved.get("val", [])))
            overlap = sorted(set(self.split["test"]) & set(seen))
            if overlap:
                warnings.warn(f"split='all': {len(overlap)} of the {len(self.split['test'])} tested subjects have the "
                              f"ids of subjects this checkpoint was trained or validated on (e.g. {overlap[0]}); if "
                              "this is the training cohort, the result is not an external test", stacklevel=2)
            return
        def role(split: dict, subject: str) -> str:
            names = {"test": "test", "val": "val", "labeled": "labeled", "train": "unlabeled"}
            return next((v for k, v in names.items() if subject in split.get(k, ())), "absent")

        moved = sorted(s for k in saved for s in set(saved[k]) ^ set(self.split.get(k, [])))
        raise DataError(f"the checkpoint was trained on another subject split than this DataModule's: e.g. subject "
                        f"{moved[0]} is {role(saved, moved[0])} there and {role(self.split, moved[0])} here. Use the "
                        "training run's split arguments (num_folds, fold, val_fraction, label_ratio, labeled_subjects, "
                        "seed, no_validation_split)")

    @property
    def summary(self) -> pd.DataFrame | None:
        """Subjects and slices per role and subject class (``split_summary.csv`` via ``SplitSummaryLogger``); an
        absent validation split is a row that says so."""
        if not self.split:
            return None
        roles = self.split_record()[0]
        slices = self.table.slices.groupby("subject_id").size()
        label = self.table.subjects.set_index("subject_id")["subject_label"]
        rows = []
        for role in ROLES:
            ids = roles.loc[roles["role"] == role, "subject_id"]
            row = {"split": role, "subjects": len(ids), "slices": int(slices.reindex(ids).fillna(0).sum()), "note": ""}
            for k, name in enumerate(self.class_names):
                row[f"subjects {name}"] = int((label.reindex(ids) == k).sum())
            if role == "test" and self.hparams.split == "all":
                row["note"] = self.test_note
            elif role == "val" and not len(ids) and self.hparams.split != "all":
                row["note"] = "no validation split (no_validation_split: true): the last epoch is tested"
            rows.append(row)
        return pd.DataFrame(rows)

    def rows(self, split: str) -> np.ndarray:
        self.setup()
        return np.flatnonzero(self.table.slices["subject_id"].isin(set(self.split[split])).to_numpy())

    def train_streams(self) -> tuple[np.ndarray, np.ndarray]:
        rows = self.rows("train")
        slices = self.table.slices.iloc[rows]
        labeled = slices["subject_id"].isin(set(self.split["labeled"])).to_numpy() & slices["label"].notna().to_numpy()
        return rows, np.where(labeled, STREAM_LABEL, STREAM_UNLABELED)

    def _transform(self, train: bool) -> SliceTransform:
        hp = self.hparams
        rank = self.trainer.global_rank if self.trainer is not None else 0
        return SliceTransform(hp.image_size, train=train and hp.augment, two_views=hp.two_views and train,
                              seed=hp.seed + 1000 * rank, **(hp.augment_kwargs or {}))

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        refuse_split_all_stage(hp.split, "fit", f"subject of {type(self.reader).__name__}")
        rows, streams = self.train_streams()
        sizes = {STREAM_LABEL: hp.labeled_batch_size, STREAM_UNLABELED: hp.unlabeled_batch_size}
        if hp.epoch_stream is not None:
            epoch_stream = {"label": STREAM_LABEL, "unlabeled": STREAM_UNLABELED}[hp.epoch_stream]
        else:
            epoch_stream = STREAM_UNLABELED if hp.unlabeled_batch_size > 0 else STREAM_LABEL
        world, rank = world_and_rank(self.trainer)
        sampler = MixedStreamSampler(streams, sizes, epoch_stream, world, rank, hp.seed, keyed=True)
        # augmentation = f(data seed, run seed, rank, epoch, position, index): exact resume with any workers
        dataset = SliceDataset(self.table, rows, streams, self._transform(True), hp.cache,
                               seed_base=(hp.seed, run_seed(), rank))
        return DataLoader(dataset, batch_size=sampler.batch_size, sampler=sampler, drop_last=True,
                          collate_fn=collate_samples, num_workers=hp.num_workers,
                          persistent_workers=hp.num_workers > 0)

    def _eval_loader(self, rows: np.ndarray) -> DataLoader:
        hp = self.hparams
        streams = np.where(self.table.slices["label"].iloc[rows].notna().to_numpy(), STREAM_LABEL, STREAM_UNLABELED)
        dataset = SliceDataset(self.table, rows, streams, self._transform(False), hp.cache)
        world, rank = world_and_rank(self.trainer)
        return DataLoader(dataset, batch_size=hp.eval_batch_size, sampler=UnpaddedDistributedSampler(len(rows), world, rank),
                          collate_fn=collate_samples, num_workers=hp.num_workers, persistent_workers=hp.num_workers > 0)

    def val_dataloader(self) -> DataLoader | list:
        refuse_split_all_stage(self.hparams.split, "validate", f"subject of {type(self.reader).__name__}")
        self.setup()
        if not self.split["val"]:  # no_validation_split: Lightning skips validation for an empty list
            return []
        return self._eval_loader(self.rows("val"))

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.rows("test"))

    def predict_dataloader(self) -> DataLoader:
        """Every slice of every subject, in subject and slice order, labels visible (for feature export)."""
        self.setup()
        return self._eval_loader(np.arange(len(self.table.slices)))
