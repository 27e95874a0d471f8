"""DC-MT stage 2 data: one fixed-length sequence of slice features per subject.

Input: the ``.npz`` written by ``callbacks.feature_export.SliceFeatureWriter`` during ``medattn predict``
with the stage-1 model (features, probabilities and names of every slice of every subject). Each subject's
slices are ordered by ``slice_index`` and centre-cropped or zero-padded to ``seq_len``
(:func:`networks.dcmt_subject.center_crop_or_pad`, dossier a.10).

``inputs`` chooses what each slice contributes: ``"features"`` (the reference: the stage-1 feature only; the
probabilities are loaded but unused), ``"probabilities"`` (the K stage-1 slice probabilities only) or
``"features+probabilities"`` (both, concatenated). The probabilities carry the slice-level supervision of stage 1
(every labeled *slice*), which the subject labels alone cannot give when few subjects are labeled; see the
DC-MT stage-2 results in docs/results.md for when that matters.

Subjects are **not split again**: the export records each subject's stage-1 role (``labeled``, ``unlabeled``,
``val``, ``test``) and fold (``subject_role``, ``subject_fold``, ``split_info``; see
:mod:`datamodules.subject_splits`), and that record *is* the stage-2 split, so a subject never changes role
between the stages (re-splitting could not know a ``fold`` column of the stage-1 subject table, nor later changes
of the split rules). A file without the record is an error naming it. The split arguments ``num_folds``,
``fold``, ``val_fraction``, ``label_ratio`` and ``labeled_subjects`` are optional checks: when given they must
equal what stage 1 used. The recorded split is checked again: each of train, val (unless stage 1 ran without a
validation split) and test must be non-empty, every split must hold ``min_per_class`` subjects of every class
(default: the threshold stage 1 checked, recorded in ``split_info``), and a fit needs labeled subjects; each
failure is an error naming the file. Unlabeled training subjects carry zero labels and an all-False
``label_mask``. Note
(dossier b.2): the training subjects' features come from a model that was trained on those slices.

``split="all"`` (``--data.init_args.split all``, external testing as in the other DataModules): every subject of
the file is the test split, exactly once (under DDP too). That is meaningful only for subjects that neither stage
trained or selected on, so it requires every subject's recorded stage-1 role to be ``test``: the file that
``medattn predict`` writes for another cohort with the stage-1 ``SliceStackDataModule(split="all")`` (every subject
recorded as ``test``). A file with ``labeled``, ``unlabeled`` or ``val`` subjects (an export of the training
cohort) is refused with an error that counts them: its held-out subjects are tested with the default
``split="patients"``. The split-argument checks are ignored (the note names those that were set), and
``min_per_class`` is not enforced (classes below it are named in the note and a warning).

Batch keys: ``features`` (B, T, D), ``features_teacher`` (same, independent noise when
``feature_noise > 0``, else identical, as the reference), ``sequence_mask`` bool (B, T), ``labels`` /
``label_mask`` (B, K), ``stream`` (B,), ``mean_probabilities`` (B, K) (the mean of the subject's slice
probabilities over all its slices: the mean-pooling baseline), ``subject_id`` list, ``num_slices`` (B,).
"""

from __future__ import annotations

from pathlib import Path
import json
import warnings
from typing import Literal, Sequence

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.batch import STREAM_LABEL, STREAM_UNLABELED
from datamodules.dataset import MixedStreamSampler, UnpaddedDistributedSampler, collate_samples, world_and_rank
from datamodules.manifest import DataError
from datamodules.split_all import check_split_choice, describe_evaluated, refuse_split_all_stage, split_all_note
from datamodules.subject_splits import check_subject_counts, split_from_roles
from networks.dcmt_subject import center_crop_or_pad

__all__ = ["read_slice_features", "SubjectFeatureDataset", "SubjectFeatureDataModule"]

INPUTS = ("features", "probabilities", "features+probabilities")
REQUIRED = ("features", "probabilities", "subject_id", "slice_index", "subject_label", "class_names")


def read_slice_features(path: str | Path) -> dict[str, np.ndarray]:
    """Load a slice-feature file (no pickle) and check its arrays."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"slice-feature file not found: {path}. Write it with `medattn predict` and "
                        "callbacks.feature_export.SliceFeatureWriter on the stage-1 checkpoint.")
    with np.load(path, allow_pickle=False) as f:
        data = {k: f[k] for k in f.files}
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise DataError(f"{path}: missing arrays {missing}; found {sorted(data)}")
    n = len(data["subject_id"])
    bad = [k for k in REQUIRED[:-1] if len(data[k]) != n]
    if bad:
        raise DataError(f"{path}: arrays {bad} do not have one row per slice ({n})")
    return data


class SubjectFeatureDataset(Dataset):
    def __init__(self, sequences: list[torch.Tensor], masks: list[torch.Tensor], labels: np.ndarray,
                 mean_probabilities: np.ndarray, subject_ids: Sequence[str], num_slices: np.ndarray,
                 streams: np.ndarray, num_classes: int, feature_noise: float = 0.0, two_views: bool = False) -> None:
        self.sequences, self.masks = sequences, masks
        self.labels, self.mean_probabilities = labels, mean_probabilities
        self.subject_ids, self.num_slices = list(subject_ids), num_slices
        self.streams, self.k = np.asarray(streams), num_classes
        self.feature_noise, self.two_views = feature_noise, two_views

    def __len__(self) -> int:
        return len(self.sequences)

    def _view(self, seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.feature_noise <= 0:
            return seq
        return seq + self.feature_noise * torch.randn_like(seq) * mask[:, None]

    def __getitem__(self, i: int) -> dict:
        stream = int(self.streams[i])
        known = stream != STREAM_UNLABELED and self.labels[i] >= 0
        labels = torch.zeros(self.k)
        if known:
            labels[int(self.labels[i])] = 1.0
        seq, mask = self.sequences[i], self.masks[i]
        sample = {"features": self._view(seq, mask), "sequence_mask": mask, "labels": labels,
                  "label_mask": torch.full((self.k,), bool(known)), "stream": torch.tensor(stream),
                  "mean_probabilities": torch.from_numpy(self.mean_probabilities[i]),
                  "num_slices": torch.tensor(int(self.num_slices[i])), "subject_id": self.subject_ids[i]}
        if self.two_views:
            sample["features_teacher"] = self._view(seq, mask)
        return sample


class SubjectFeatureDataModule(pl.LightningDataModule):
    """Subjects as slice-feature sequences, with labeled and unlabeled training streams.

    Args:
        features_file: the stage-1 export (``.npz``).
        seq_len: sequence length T (24).
        split: ``"patients"`` (default): stage 1's recorded split. ``"all"``: every subject of the file is tested;
            only for a file whose subjects stage 1 recorded as ``test`` (see the module doc); ``fit``/``validate``
            are refused with an error naming this option.
        num_folds, fold, val_fraction, label_ratio, labeled_subjects: optional checks against the split that
            stage 1 recorded in ``features_file`` (the split itself always comes from that record).
        seed: sampling seed of the training streams.
        labeled_batch_size, unlabeled_batch_size: per-rank subjects per training batch (16 + 48 in DC-MT).
        eval_batch_size: validation/test/predict batch size.
        feature_noise: σ of Gaussian noise added to each view's real slices in training (0: the reference,
            whose student and teacher see identical inputs and differ by dropout only).
        inputs: ``"features"`` (reference), ``"probabilities"`` or ``"features+probabilities"``; the
            aggregator's ``in_features`` must equal :attr:`num_features`.
        min_per_class: smallest number of subjects of each class in the train, val and test splits
            (:func:`datamodules.subject_splits.check_subject_counts`); ``None`` (default) takes the value stage 1
            checked, as recorded in ``features_file`` (10 when the record has none); ``0`` turns the check off.
    """

    def __init__(self, features_file: str | Path, seq_len: int = 24, split: Literal["patients", "all"] = "patients",
                 num_folds: int | None = None,
                 fold: int | None = None, val_fraction: float | None = None, label_ratio: float | None = None,
                 labeled_subjects: list[str] | None = None,
                 labeled_batch_size: int = 16, unlabeled_batch_size: int = 48, eval_batch_size: int = 64,
                 feature_noise: float = 0.0, inputs: str = "features", num_workers: int = 0, seed: int = 0,
                 min_per_class: int | None = None) -> None:
        super().__init__()
        if inputs not in INPUTS:
            raise ValueError(f"inputs must be one of {INPUTS}, got {inputs!r}")
        check_split_choice(type(self).__name__, split)
        self.save_hyperparameters()
        self.data: dict[str, np.ndarray] | None = None
        self.split: dict[str, list[str]] = {}
        self._subjects: pd.DataFrame | None = None
        self.test_note = ""  # how split="all" chose the test split (summary note, describe_split)

    def _ensure(self) -> dict[str, np.ndarray]:
        if self.data is None:
            self.data = read_slice_features(self.hparams.features_file)
        return self.data

    @property
    def class_names(self) -> list[str]:
        return [str(c) for c in self._ensure()["class_names"]]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_features(self) -> int:
        """Per-slice input size of the aggregator for the chosen ``inputs``."""
        return int(self._slice_inputs().shape[1])

    def _slice_inputs(self) -> np.ndarray:
        data, inputs = self._ensure(), self.hparams.inputs
        parts = {"features": [data["features"]], "probabilities": [data["probabilities"]],
                 "features+probabilities": [data["features"], data["probabilities"]]}[inputs]
        return np.concatenate([np.asarray(a, np.float32) for a in parts], axis=1)

    @property
    def task(self) -> str:
        return "multiclass"

    def setup(self, stage: str | None = None) -> None:
        refuse_split_all_stage(self.hparams.split, stage, f"subject of {Path(self.hparams.features_file).name}")
        if self.split:
            return
        hp, data = self.hparams, self._ensure()
        frame = pd.DataFrame({"subject_id": data["subject_id"].astype(str), "slice_index": data["slice_index"],
                              "subject_label": data["subject_label"], "row": np.arange(len(data["subject_id"]))})
        frame = frame.sort_values(["subject_id", "slice_index"])
        self.groups = {sid: g["row"].to_numpy() for sid, g in frame.groupby("subject_id", sort=True)}
        labels = frame.groupby("subject_id")["subject_label"].max()
        self._subjects = pd.DataFrame({"subject_id": labels.index, "subject_label": labels.to_numpy().astype(float),
                                       "fold": np.nan})
        self._subjects.loc[self._subjects["subject_label"] < 0, "subject_label"] = np.nan
        self.split = self._stage1_split(frame)

    def _stage1_split(self, frame: pd.DataFrame) -> dict[str, list[str]]:
        """The split recorded by the stage-1 export, checked against the optional split arguments."""
        hp, data, path = self.hparams, self._ensure(), Path(self.hparams.features_file).expanduser()
        if "subject_role" not in data or "split_info" not in data:
            raise DataError(f"{path}: no stage-1 subject roles (arrays 'subject_role', 'split_info'). Stage 2 must use "
                            "exactly stage 1's subjects: re-export the slice features with `medattn predict` and "
                            "callbacks.feature_export.SliceFeatureWriter on a SliceStackDataModule (it records them).")
        frame = frame.assign(role=data["subject_role"].astype(str)[frame["row"].to_numpy()],
                             fold=np.asarray(data.get("subject_fold", np.full(len(frame), -1)))[frame["row"].to_numpy()])
        per_subject = frame.groupby("subject_id")[["role", "fold"]].nunique()
        mixed = per_subject[(per_subject > 1).any(axis=1)]
        if len(mixed):
            raise DataError(f"{path}: subject {mixed.index[0]} has slices with different stage-1 roles or folds")
        roles = frame.drop_duplicates("subject_id")[["subject_id", "role", "fold"]]
        split = split_from_roles(roles, str(path))
        info = json.loads(str(data["split_info"]))
        if hp.split == "all":
            return self._split_all(roles, info, path)
        for name in ("num_folds", "fold", "val_fraction", "label_ratio"):
            given = getattr(hp, name)
            if given is not None and info.get(name) is not None and float(given) != float(info[name]):
                raise DataError(f"{path}: stage 1 used {name}={info[name]}, but stage 2 was given {name}={given}; "
                                f"stage 2 keeps stage 1's split: drop data.init_args.{name} or re-export")
        if hp.labeled_subjects is not None and sorted(map(str, hp.labeled_subjects)) != split["labeled"]:
            raise DataError(f"{path}: labeled_subjects differ from the {len(split['labeled'])} subjects labeled in "
                            "stage 1; stage 2 keeps stage 1's labeled subjects")
        if not split["train"] or not split["test"] or (not split["val"] and not info.get("no_validation_split")):
            raise DataError(f"{path}: the recorded split has {len(split['train'])} training, {len(split['val'])} "
                            f"validation and {len(split['test'])} test subjects; each must be non-empty")
        # Stage 1 checked these subjects already when its threshold was > 0; a stricter stage-2 value is checked here.
        threshold = hp.min_per_class if hp.min_per_class is not None else int(info.get("min_per_class", 10))
        check_subject_counts(self._subjects, split, self.class_names, threshold, str(path))
        self.split_info = info
        return split

    # the split checks that split="all" ignores (None: not given)
    _SPLIT_ARGS = {"num_folds": None, "fold": None, "val_fraction": None, "label_ratio": None, "labeled_subjects": None}

    def _split_all(self, roles: pd.DataFrame, info: dict, path: Path) -> dict[str, list[str]]:
        """split="all": every subject, provided that stage 1 recorded each of them as a test subject."""
        seen = roles[roles["role"] != "test"]
        if len(seen):
            counts = ", ".join(f"{n} {role}" for role, n in seen["role"].value_counts().sort_index().items())
            raise DataError(
                f"{path}: split='all' (--data.init_args.split all) tests every subject of the file, but stage 1 "
                f"recorded {counts} subject(s) (e.g. {seen['subject_id'].iloc[0]}), which the models were trained or "
                "selected on. For another cohort, export its features with the stage-1 checkpoint and "
                "--data.init_args.split all (every subject recorded as test); to test this file's held-out subjects "
                "use split='patients' (the default)")
        hp = self.hparams
        threshold = hp.min_per_class if hp.min_per_class is not None else int(info.get("min_per_class", 10))
        label = self._subjects["subject_label"].to_numpy(dtype=float)
        counts = {name: int((label == k).sum()) for k, name in enumerate(self.class_names)}
        self.test_note = split_all_note("subject", dict(hp), self._SPLIT_ARGS, counts, threshold)
        if "min_per_class" in self.test_note:
            warnings.warn(f"{path}, split='all': {self.test_note}", stacklevel=3)
        if self.trainer is None or self.trainer.is_global_zero:
            print(f"[medattn] subject split ({path}): {len(self.groups)} test subjects; {self.test_note}")
        self.split_info = info
        return {"train": [], "val": [], "test": sorted(self.groups), "labeled": []}

    def describe_split(self, split: str = "test") -> str:
        """Which subjects an evaluation of ``split`` ran on (``Test data: ...`` of ``medattn test``,
        summary.json), e.g. ``SubjectFeatureDataModule /runs/ext.npz, test split: every subject (split=all), 30
        subjects``."""
        self.setup("test" if split == "test" else None)
        how = self.test_note.split(";")[0] if self.hparams.split == "all" else "stage 1's recorded split"
        return describe_evaluated(type(self).__name__, str(self.hparams.features_file), split, how,
                                  f"{len(self.split[split])} subjects")

    def _dataset(self, subject_ids: Sequence[str], streams: np.ndarray, train: bool) -> SubjectFeatureDataset:
        hp, data = self.hparams, self._ensure()
        features = torch.from_numpy(self._slice_inputs())
        sequences, masks, mean_probs, counts = [], [], [], []
        for sid in subject_ids:
            rows = self.groups[sid]
            seq, mask = center_crop_or_pad(features[torch.from_numpy(rows.copy())], hp.seq_len)
            sequences.append(seq)
            masks.append(mask)
            mean_probs.append(data["probabilities"][rows].astype(np.float32).mean(0))
            counts.append(len(rows))
        labels = self._subjects.set_index("subject_id").loc[list(subject_ids), "subject_label"].fillna(-1).to_numpy()
        return SubjectFeatureDataset(sequences, masks, labels.astype(np.int64), np.stack(mean_probs), subject_ids,
                                     np.asarray(counts), streams, self.num_classes,
                                     hp.feature_noise if train else 0.0, two_views=train)

    def train_dataloader(self) -> DataLoader:
        refuse_split_all_stage(self.hparams.split, "fit", "subject of the features file")
        self.setup()
        hp = self.hparams
        ids = self.split["train"]
        if not self.split["labeled"] and hp.labeled_batch_size > 0:
            raise DataError(f"{Path(hp.features_file).expanduser()}: stage 1 recorded no labeled training subject, "
                            "so stage 2 has nothing to supervise; re-run stage 1 with label_ratio > 0 or "
                            "labeled_subjects")
        streams = np.where(np.isin(ids, self.split["labeled"]), STREAM_LABEL, STREAM_UNLABELED)
        sizes = {STREAM_LABEL: hp.labeled_batch_size, STREAM_UNLABELED: hp.unlabeled_batch_size}
        epoch_stream = STREAM_UNLABELED if hp.unlabeled_batch_size > 0 else STREAM_LABEL
        world, rank = world_and_rank(self.trainer)
        sampler = MixedStreamSampler(streams, sizes, epoch_stream, world, rank, hp.seed)
        return DataLoader(self._dataset(ids, streams, True), batch_size=sampler.batch_size, sampler=sampler,
                          drop_last=True, collate_fn=collate_samples, num_workers=hp.num_workers)

    def _eval_loader(self, ids: Sequence[str]) -> DataLoader:
        streams = np.full(len(ids), STREAM_LABEL)
        world, rank = world_and_rank(self.trainer)
        return DataLoader(self._dataset(ids, streams, False), batch_size=self.hparams.eval_batch_size,
                          sampler=UnpaddedDistributedSampler(len(ids), world, rank), collate_fn=collate_samples,
                          num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        refuse_split_all_stage(self.hparams.split, "validate", "subject of the features file")
        self.setup()
        if not self.split["val"]:  # stage 1 ran without a validation split: Lightning skips validation
            return []
        return self._eval_loader(self.split["val"])

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._eval_loader(self.split["test"])

    def predict_dataloader(self) -> DataLoader:
        self.setup()
        return self._eval_loader(sorted(self.groups))
