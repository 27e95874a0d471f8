"""Subject splits that can answer the question (issue 19 item 5, the DC-MT subject/slice path).

``SliceStackDataModule`` refuses a split with fewer than ``min_per_class`` *subjects* of a grade (default 10, as
``CXRDataModule``), naming the split, the grade and every split's counts; ``SubjectFeatureDataModule`` (stage 2)
checks the split stage 1 recorded the same way and refuses an empty split naming the file. The tables are built
in memory (no slice is read: the split needs only the subject table), so each test takes well under a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from datamodules.manifest import DataError
from datamodules.readers.slices import SliceTable
from datamodules.slices import SliceStackDataModule
from datamodules.subject_features import SubjectFeatureDataModule

GRADES = ["grade_0", "grade_1", "grade_2"]
ROOT = Path(__file__).resolve().parents[1]


class _TableReader:
    """A reader whose subjects and fixed folds are given: fold 0 (the test fold) holds ``test[g]`` subjects of grade
    ``g``, folds 1-4 together ``train[g]``; every subject has ``slices`` slices of its own grade."""

    def __init__(self, test: tuple[int, int, int], train: tuple[int, int, int], slices: int = 3) -> None:
        rows, slice_rows = [], []
        for fold, counts in ((0, test), (None, train)):
            for grade, n in enumerate(counts):
                for _ in range(n):
                    sid = f"s{len(rows):04d}"
                    rows.append({"subject_id": sid, "subject_label": float(grade),
                                 "fold": float(fold if fold is not None else 1 + len(rows) % 4)})
                    slice_rows += [{"image_id": f"{sid}_{i:03d}", "subject_id": sid, "slice_index": i,
                                    "label": float(grade), "path": "", "mask_path": "", "kind": "h5"}
                                   for i in range(slices)]
        self.subjects, self.slices = pd.DataFrame(rows), pd.DataFrame(slice_rows)

    def load(self) -> SliceTable:
        return SliceTable(self.slices.copy(), self.subjects.copy(), list(GRADES), source="in-memory table")


# 80 training subjects per grade: the stratified 15 % validation draw holds 12 of each, the rest 68.
TRAIN = (80, 80, 80)


def test_two_subjects_of_a_grade_in_test_is_an_error_naming_split_grade_and_counts():
    """Default min_per_class (10): 2 grade-2 test subjects are refused, though they hold 60 grade-2 slices: the
    unit is the subject. Before the fix the split was accepted silently."""
    dm = SliceStackDataModule(_TableReader(test=(12, 12, 2), train=TRAIN, slices=30), image_size=32)
    expected = (r"_TableReader \(in-memory table\): the test split has 2 examples of class 'grade_2', fewer than "
                r"min_per_class=10.*per split: test 2 of 26 subjects, val 12 of 36 subjects, train 68 of 204 subjects")
    with pytest.raises(DataError, match=expected):
        dm.setup("fit")
    with pytest.raises(DataError, match="the test split has 2 examples"):  # a refused split is never kept
        dm.setup("test")
    assert dm.split == {}


def test_validation_split_short_of_a_grade_is_named():
    """15 % of 200 training subjects = 30 validation subjects, stratified: 12 + 12 + 6 (40 of the 200 are grade 2)."""
    dm = SliceStackDataModule(_TableReader(test=(12, 12, 12), train=(80, 80, 40)), image_size=32)
    with pytest.raises(DataError, match=r"the val split has 6 examples of class 'grade_2'.*test 12 of 36 subjects, "
                                        r"val 6 of 30 subjects, train 34 of 170 subjects"):
        dm.setup("fit")


def test_enough_subjects_pass_and_the_threshold_is_configurable():
    SliceStackDataModule(_TableReader(test=(10, 10, 10), train=TRAIN), image_size=32).setup("fit")
    few = _TableReader(test=(12, 12, 2), train=TRAIN)
    SliceStackDataModule(few, image_size=32, min_per_class=0).setup("fit")  # 0 turns the check off
    SliceStackDataModule(few, image_size=32, min_per_class=2).setup("fit")
    with pytest.raises(DataError, match="fewer than min_per_class=3"):
        SliceStackDataModule(few, image_size=32, min_per_class=3).setup("fit")
    with pytest.raises(DataError, match="the train split has 9 examples of class 'grade_0'"):  # train counts too
        SliceStackDataModule(_TableReader(test=(12, 12, 12), train=(9, 80, 80)), image_size=32, val_fraction=0.0,
                             no_validation_split=True).setup("fit")


def test_no_validation_split_is_not_counted():
    """The reference protocol has an empty validation split on purpose: only train and test are checked."""
    dm = SliceStackDataModule(_TableReader(test=(10, 10, 10), train=(10, 10, 10)), image_size=32, val_fraction=0.0,
                              no_validation_split=True)
    dm.setup("fit")
    assert dm.split["val"] == [] and dm.split_record()[1]["min_per_class"] == 10


@pytest.mark.parametrize("config", ["experiments/dcmt/synthetic.yaml"])  # the labeled_only overlay keeps its split
def test_synthetic_configs_pass_their_min_per_class_on_every_fold(config):
    """The built-in 120 subjects hold 4-9 of a grade per validation/test split, never the default 10: each config
    sets min_per_class explicitly, and every fold passes it (grades from the generator's plan, no file written)."""
    from datamodules.subject_splits import check_subject_counts, split_subjects
    from datamodules.synthetic_slices import SyntheticSlices, plan_subject

    args = yaml.safe_load((ROOT / config).read_text())["data"]["init_args"]
    assert "min_per_class" in args, f"{config} must set min_per_class (120 subjects cannot hold 10 per grade)"
    cfg = SyntheticSlices(cache_dir="/nonexistent", **args["reader"]["init_args"]).config
    subjects = pd.DataFrame({"subject_id": [f"s{i:04d}" for i in range(cfg.n_subjects)], "fold": np.nan,
                             "subject_label": [float(plan_subject(cfg, i)["grade"]) for i in range(cfg.n_subjects)]})
    for fold in range(args["num_folds"]):
        split = split_subjects(subjects, args["num_folds"], fold, args["val_fraction"], args["label_ratio"], args["seed"],
                               no_validation_split=args["no_validation_split"])
        check_subject_counts(subjects, split, GRADES, args["min_per_class"], config)
        with pytest.raises(DataError, match="fewer than min_per_class=10"):
            check_subject_counts(subjects, split, GRADES, 10, config)


# ------------------------------------------------------------------------------------------------ stage 2
def _features_file(path: Path, roles: dict[str, list[int]], info: dict) -> Path:
    """A stage-1 export: ``roles[role]`` lists the grades of that role's subjects (two slices each)."""
    ids, grades, role_of = [], [], []
    for role, subject_grades in roles.items():
        for g in subject_grades:
            sid = f"s{len(set(ids)):04d}"
            ids += [sid, sid]
            grades += [g, g]
            role_of += [role, role]
    n = len(ids)
    np.savez(path, features=np.zeros((n, 4), np.float32), probabilities=np.full((n, 3), 1 / 3, np.float32),
             subject_id=np.array(ids), slice_index=np.tile([0, 1], n // 2), subject_label=np.array(grades),
             class_names=np.array(GRADES), subject_role=np.array(role_of), subject_fold=np.zeros(n, np.int64),
             split_info=np.asarray(json.dumps({"num_folds": 5, "fold": 0, "no_validation_split": False, **info})))
    return path


def _roles(test_grade_2: int) -> dict[str, list[int]]:
    return {"labeled": [0, 1, 2] * 10, "unlabeled": [0, 1, 2] * 10, "val": [0, 1, 2] * 10,
            "test": [0] * 10 + [1] * 10 + [2] * test_grade_2}


def test_stage2_checks_the_recorded_split_with_stage1s_threshold(tmp_path):
    path = _features_file(tmp_path / "f.npz", _roles(test_grade_2=2), {"min_per_class": 10})
    with pytest.raises(DataError, match=rf"{path}: the test split has 2 examples of class 'grade_2'.*test 2 of 22 subjects"):
        SubjectFeatureDataModule(path, seq_len=4).setup("fit")
    SubjectFeatureDataModule(path, seq_len=4, min_per_class=2).setup("fit")  # an explicit value wins
    lenient = _features_file(tmp_path / "g.npz", _roles(test_grade_2=2), {"min_per_class": 0})
    SubjectFeatureDataModule(lenient, seq_len=4).setup("fit")  # stage 1 ran with the check off: so does stage 2
    with pytest.raises(DataError, match="fewer than min_per_class=3"):
        SubjectFeatureDataModule(lenient, seq_len=4, min_per_class=3).setup("fit")


@pytest.mark.parametrize("empty", ["test", "val", "labeled"])
def test_stage2_refuses_an_empty_split_it_needs_naming_the_file(tmp_path, empty):
    roles = {**_roles(test_grade_2=10), empty: []}
    path = _features_file(tmp_path / f"no_{empty}.npz", roles, {"min_per_class": 0})
    dm = SubjectFeatureDataModule(path, seq_len=4)
    with pytest.raises(DataError, match=str(path)):
        dm.setup("fit")
        dm.train_dataloader()  # no labeled subject: only a fit needs them
