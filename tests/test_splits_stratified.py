"""Splits that can answer the question (issue 19 item 5): label-stratified patient splits, ``min_per_class``,
no silent random or empty test split for ``use_official_test_split``, and the ``test_fraction`` that a
hold-out ignores named in the split summary."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from datamodules.cxr import CXRDataModule
from datamodules.manifest import DataError, Manifest
from datamodules.splits import kfold_by_patient, split_by_patient

REPO = Path(__file__).resolve().parents[1]


def _cohort(n_patients=300, rare=30, seed=0):
    """Patients with 1-4 images each; ``rare`` patients hold a rare class. Returns (pids, multiclass one-hot
    labels (3 classes: common, middle, rare), the rare patients)."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 5, n_patients)
    pids = np.repeat([f"p{i:03d}" for i in range(n_patients)], counts)
    cls_of_patient = np.where(np.arange(n_patients) < rare, 2, np.where(np.arange(n_patients) < 3 * rare + rare, 1, 0))
    cls = np.repeat(cls_of_patient, counts)
    return pids, np.eye(3, dtype=np.float32)[cls], {f"p{i:03d}" for i in range(rare)}


def _patients_of(pids, split):
    return {name: set(pids[index]) for name, index in split.items()}


def test_stratified_split_gives_each_split_its_share_of_every_class():
    pids, labels, rare = _cohort()
    split = split_by_patient(pids, 0.15, 0.15, seed=3, labels=labels)
    sets = _patients_of(pids, split)
    assert not sets["train"] & sets["val"] and not sets["train"] & sets["test"] and not sets["val"] & sets["test"]
    assert sorted(np.concatenate(list(split.values()))) == list(range(len(pids)))
    # 30 rare patients * 0.15 = 4.5 -> 4 or 5 in each of val and test (a plain shuffle gives 0..10)
    for name in ("val", "test"):
        assert len(sets[name] & rare) in (4, 5), (name, len(sets[name] & rare))
    # the split sizes are those of the unstratified split: round(0.15 * 300) = 45 patients each
    plain = _patients_of(pids, split_by_patient(pids, 0.15, 0.15, seed=3))
    assert len(sets["val"]) == len(plain["val"]) == 45 and len(sets["test"]) == len(plain["test"]) == 45
    again = split_by_patient(pids, 0.15, 0.15, seed=3, labels=labels)
    assert all(np.array_equal(split[n], again[n]) for n in split)
    assert any(not np.array_equal(split[n], split_by_patient(pids, 0.15, 0.15, 4, labels=labels)[n]) for n in split)


def test_stratified_split_over_many_seeds_never_drops_a_rare_class():
    pids, labels, rare = _cohort(n_patients=120, rare=7)
    for seed in range(40):
        sets = _patients_of(pids, split_by_patient(pids, 0.15, 0.15, seed=seed, labels=labels))
        # 7 * 0.15 = 1.05 -> 1 or 2: never 0, which an unstratified split gives for many of these seeds
        assert all(1 <= len(sets[n] & rare) <= 2 for n in ("val", "test")), seed
    plain = [_patients_of(pids, split_by_patient(pids, 0.15, 0.15, seed=s)) for s in range(40)]
    assert any(not (p["test"] & rare) for p in plain)  # the failure stratification prevents


def test_multilabel_strata_are_the_rarest_positive_class():
    from datamodules.splits import patient_strata

    pids = np.array(["a", "a", "b", "c", "d"])
    labels = np.array([[1, 0, 0], [1, 0, 1], [1, 0, 0], [0, 0, 0], [np.nan, 1, 0]], np.float32)
    # positives per class: 3, 1, 1 -> rarity ranks: class1 = 0 (tie with class2, lower index), class2 = 1, class0 = 2
    assert patient_strata(pids, labels) == {"a": 1, "b": 2, "c": 3, "d": 0}


def test_stratified_kfold_spreads_every_class_over_the_folds():
    pids, labels, rare = _cohort(n_patients=100, rare=10)
    held = [set(pids[kfold_by_patient(pids, 5, f, seed=1, labels=labels)[1]]) for f in range(5)]
    assert set().union(*held) == set(pids) and sum(len(h) for h in held) == 100
    assert [len(h & rare) for h in held] == [2] * 5


class _Fixed:
    """A reader returning a fixed manifest (no image files: splits never read pixels)."""

    def __init__(self, manifest, **attrs):
        self.manifest = manifest
        self.__dict__.update(attrs)

    def load(self):
        return self.manifest


def _manifest(pids, labels, classes, task, official=None, boxed=(), folder: Path = Path(".")):
    """One image per row, ``folder/im<i>.png``; only the boxed images' files are written (8x8 PNGs: boxes are
    checked against the decoded image size), the splits never read the others."""
    records = pd.DataFrame({"image_id": [f"im{i}" for i in range(len(pids))],
                            "image_path": [str(folder / f"im{i}.png") for i in range(len(pids))], "patient_id": pids})
    if len(boxed):
        from PIL import Image

        for i in boxed:
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / f"im{i}.png")
    if official is not None:
        records["official_split"] = official
    boxes = pd.DataFrame({"image_id": [f"im{i}" for i in boxed], "class_index": 0, "x_min": 1.0, "y_min": 1.0,
                          "x_max": 5.0, "y_max": 5.0})
    return Manifest(records, labels, classes, boxes, task, "fixed.csv")


def test_min_per_class_error_names_split_class_and_counts():
    # 200 patients of "COVID-19", 12 of "Other", one image each: 15 % test -> 2 "Other" images in test
    pids = np.array([f"p{i}" for i in range(212)])
    labels = np.eye(2, dtype=np.float32)[[0] * 200 + [1] * 12]
    reader = _Fixed(_manifest(pids, labels, ["COVID-19", "Other"], "multiclass"))
    with pytest.raises(DataError, match=r"the test split has 2 examples of class 'Other', fewer than "
                                        r"min_per_class=10.*per split: test 2 of 32 images, val 2 of 32 images, train 8 of 148 images"):
        CXRDataModule(reader, val_fraction=0.15, test_fraction=0.15).setup("fit")
    dm = CXRDataModule(reader, val_fraction=0.15, test_fraction=0.15, min_per_class=2)
    dm.setup("fit")
    counts = dm.summary.set_index("split")
    assert counts.loc["val", "pos:Other"] == counts.loc["test", "pos:Other"] == 2  # 12 * 0.15 = 1.8 -> 2 each


def test_min_per_class_checks_multilabel_negatives_too():
    pids = np.array([f"p{i}" for i in range(100)])
    labels = np.ones((100, 1), np.float32)
    labels[:60] = 0  # 40 positives, 60 negatives: fine; then a class positive everywhere in test
    CXRDataModule(_Fixed(_manifest(pids, labels, ["A"], "multilabel")), min_per_class=5).setup("fit")
    labels[:] = 1
    labels[:3] = 0
    with pytest.raises(DataError, match="has [0-3] negatives of class 'A'"):
        CXRDataModule(_Fixed(_manifest(pids, labels, ["A"], "multilabel")), min_per_class=5).setup("fit")


def _nih_layout(root: Path, n_patients=400) -> None:
    rng = np.random.default_rng(0)
    findings = np.where(rng.random(n_patients) < 0.5, "Effusion", "No Finding")
    entry = pd.DataFrame({"Image Index": [f"{p:08d}_000.png" for p in range(n_patients)], "Finding Labels": findings,
                          "Patient ID": np.arange(n_patients)})
    root.mkdir(parents=True, exist_ok=True)
    entry.to_csv(root / "Data_Entry_2017.csv", index=False)
    (root / "BBox_List_2017.csv").write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n")


def _config_data(relative: str) -> dict:
    return yaml.safe_load((REPO / relative).read_text())["data"]["init_args"]


def test_official_test_split_without_list_files_is_an_error_naming_them(tmp_path):
    """experiments/configs/data/nih.yaml on a copy of NIH without train_val_list.txt / test_list.txt used to give
    an empty test split (train 101,274 / val 10,846 / test 0) and no warning."""
    from datamodules.readers.nih import NIHChestXray14

    _nih_layout(tmp_path)
    args = {k: v for k, v in _config_data("experiments/configs/data/nih.yaml").items() if k != "reader"}
    assert args["use_official_test_split"] is True and args["test_fraction"] == 0
    args.update(num_workers=0)
    dm = CXRDataModule(NIHChestXray14(tmp_path, classes=["Effusion"], require_images=False), **args)
    with pytest.raises(DataError, match=r"official test split.*train_val_list\.txt \(missing\); \S+/test_list\.txt "
                                        r"\(missing\)"):
        dm.setup("fit")
    # a list that names none of the records is reported with what it held
    (tmp_path / "test_list.txt").write_text("99999999_000.png\n")
    dm = CXRDataModule(NIHChestXray14(tmp_path, classes=["Effusion"], require_images=False), **args)
    with pytest.raises(DataError, match=r"test_list\.txt \(1 ids, 0 of them among the 400 records\)"):
        dm.setup("fit")
    # with real lists it is the official split, whatever test_fraction says
    names = [f"{p:08d}_000.png" for p in range(400)]
    (tmp_path / "test_list.txt").write_text("\n".join(names[:100]))
    dm = CXRDataModule(NIHChestXray14(tmp_path, classes=["Effusion"], require_images=False),
                       **{**args, "test_fraction": 0.3})
    dm.setup("fit")
    assert sorted(dm.splits["test"]) == list(range(100))
    assert "official test split (test_fraction=0.3 ignored)" in dm.summary.set_index("split").loc["test", "note"]


@pytest.mark.needs_shared_data
def test_chexpert_official_split_without_valid_csv_is_an_error(shared_data):
    from datamodules.readers.chexpert import CheXpert

    csv = shared_data / "chexpert-sample" / "chexpert_train.head100.csv"
    reader = CheXpert(shared_data / "chexpert-sample", csv=str(csv), require_images=False)
    dm = CXRDataModule(reader, use_official_test_split=True, val_fraction=0.1, test_fraction=0.0)
    with pytest.raises(DataError, match=r"no image of CheXpert is in its official test split.*valid\.csv \(missing, "
                                        r"not in csv="):
        dm.setup("fit")


def test_boxed_hold_out_says_it_ignores_test_fraction_and_needs_boxes(tmp_path):
    pids = np.array([f"p{i}" for i in range(400)])
    labels = np.eye(2, dtype=np.float32)[np.arange(400) % 2]
    manifest = _manifest(pids, labels, ["a", "b"], "multiclass", boxed=range(0, 400, 3), folder=tmp_path)
    dm = CXRDataModule(_Fixed(manifest), hold_out_boxed_for_test=True, test_fraction=0.4)
    dm.setup("fit")
    assert set(dm.splits["test"]) == set(range(0, 400, 3))  # the 134 boxed patients, not 40 % of 400
    note = dm.summary.set_index("split").loc["test", "note"]
    assert note == "every patient with a boxed image (test_fraction=0.4 ignored)"
    no_boxes = _manifest(pids, labels, ["a", "b"], "multiclass")
    with pytest.raises(DataError, match="hold_out_boxed_for_test=True but _Fixed .* has no image with a box"):
        CXRDataModule(_Fixed(no_boxes), hold_out_boxed_for_test=True).setup("fit")


def test_a_stage_on_an_empty_split_is_an_error():
    pids = np.array([f"p{i}" for i in range(200)])
    labels = np.eye(2, dtype=np.float32)[np.arange(200) % 2]
    dm = CXRDataModule(_Fixed(_manifest(pids, labels, ["a", "b"], "multiclass")), val_fraction=0.2,
                       test_fraction=0.0)
    dm.setup("fit")
    with pytest.raises(DataError, match="stage 'test' needs the test split, which is empty"):
        dm.setup("test")


@pytest.mark.needs_shared_data
@pytest.mark.parametrize("config", ["experiments/magsd/covid_cxr.yaml", "experiments/dcmt/covid_cxr.yaml",
                                    "experiments/magsd/covid_4class.yaml"])
def test_covid_configs_split_passes_their_min_per_class(shared_data, config):
    """covid-cxr-mini is small (34 non-COVID images): the default 10 per class fails on its test split (4
    non-COVID images before this fix), so each config sets min_per_class explicitly, and the split it gives
    must hold that many of every class; a config that turns the check off must have a class too small to split."""
    from datamodules.readers.covid import COVIDChestXray

    args = _config_data(config)
    reader_args = dict(args.pop("reader")["init_args"], root=shared_data / "covid-cxr-mini")
    assert "min_per_class" in args, f"{config} must set min_per_class (the default 10 does not fit covid-cxr-mini)"
    with pytest.raises(DataError, match="fewer than min_per_class=10"):
        CXRDataModule(COVIDChestXray(**reader_args), **{**args, "min_per_class": 10}).setup("fit")
    dm = CXRDataModule(COVIDChestXray(**reader_args), **args)
    dm.setup("fit")
    summary = dm.summary.set_index("split")
    if args["min_per_class"] == 0:
        assert dm.manifest.labels.sum(axis=0).min() < 3  # (4 classes: 1 Viral Pneumonia image in the sample)
        return
    for cls in dm.class_names:
        assert summary.loc[["val", "test"], f"pos:{cls}"].min() >= args["min_per_class"] >= 3, cls
