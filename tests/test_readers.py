"""Readers on the real label files in ../shared/data (skipped when absent) and on small hand-made layouts.

Expected numbers come from shared/data/README.md or are recomputed here independently with plain pandas.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from datamodules.manifest import DataError
from datamodules.readers.chexpert import CHEXPERT_CLASSES, CheXpert
from datamodules.readers.covid import COVIDChestXray, match_finding
from datamodules.readers.csv_manifest import CSVManifest
from datamodules.readers.nih import NIH_CLASSES, NIHChestXray14

needs_data = pytest.mark.needs_shared_data  # tests that read ../shared/data (they skip when it is absent)


# ----------------------------------------------------------------------------------------------------------- NIH
@pytest.fixture(scope="module")
def nih(shared_data) -> Path:
    return shared_data / "nih-cxr14-sample"


@needs_data
def test_nih_head300(nih):
    manifest = NIHChestXray14(nih, data_entry="Data_Entry_2017_v2020.head300.csv", require_images=False).load()
    assert len(manifest) == 300
    assert manifest.records["patient_id"].nunique() == 69
    assert manifest.class_names == list(NIH_CLASSES) and manifest.labels.shape == (300, 14)
    assert manifest.task == "multilabel" and not np.isnan(manifest.labels).any()

    raw = pd.read_csv(nih / "Data_Entry_2017_v2020.head300.csv")
    no_finding = (raw["Finding Labels"] == "No Finding").to_numpy()
    assert no_finding.sum() > 0
    assert (manifest.labels[no_finding] == 0).all()
    assert (manifest.labels[~no_finding].sum(axis=1) >= 1).all()
    for k, name in enumerate(NIH_CLASSES):  # independent per-class count
        expected = raw["Finding Labels"].apply(lambda s: name in s.split("|")).sum()
        assert manifest.labels[:, k].sum() == expected, name
    assert manifest.records["patient_id"].tolist() == raw["Patient ID"].astype(str).tolist()
    assert (manifest.records["image_path"] == str(nih / "images") + "/" + raw["Image Index"]).all()
    # The head300 rows include one boxed image; the other 983 boxes have no record here.
    assert len(manifest.boxes) == 1


@needs_data
def test_nih_all_984_boxes(nih):
    reader = NIHChestXray14(nih, data_entry="Data_Entry_2017_v2020.bbox_images.csv", require_images=False)
    manifest = reader.load()
    boxes = manifest.boxes
    assert len(manifest) == 880 and len(boxes) == 984 and boxes["image_id"].nunique() == 880
    names = boxes["class_index"].map(dict(enumerate(manifest.class_names)))
    assert names.value_counts().to_dict() == {
        "Atelectasis": 180, "Effusion": 153, "Cardiomegaly": 146, "Infiltration": 123, "Pneumonia": 120,
        "Pneumothorax": 98, "Mass": 85, "Nodule": 79,
    }
    # First row of BBox_List by hand: 00013118_008.png, Atelectasis, x=225.084745762712 y=547.019216763771
    # w=86.7796610169491 h=79.1864406779661 -> x_max = 311.8644067796611, y_max = 626.2056574417371.
    first = boxes.iloc[0]
    assert first["image_id"] == "00013118_008.png" and manifest.class_names[first["class_index"]] == "Atelectasis"
    np.testing.assert_allclose(
        first[["x_min", "y_min", "x_max", "y_max"]].to_numpy(float),
        [225.084745762712, 547.019216763771, 311.8644067796611, 626.2056574417371], rtol=0, atol=1e-9,
    )
    assert (boxes["x_max"] <= 1024).all() and (boxes["y_max"] <= 1024).all()
    assert reader.report["boxes_label_not_positive"] == 0  # every box marks a finding of its image


@needs_data
def test_nih_filters_and_subsets(nih):
    entry = "Data_Entry_2017_v2020.head300.csv"
    pa = NIHChestXray14(nih, data_entry=entry, view_positions=["PA"], require_images=False)
    assert len(pa.load()) == 168 and pa.report["dropped_view"] == 132
    sub = NIHChestXray14(nih, data_entry=entry, classes=["Hernia", "Effusion"], require_images=False).load()
    assert sub.class_names == ["Hernia", "Effusion"]
    full = NIHChestXray14(nih, data_entry=entry, require_images=False).load()
    np.testing.assert_array_equal(sub.labels, full.labels[:, [13, 2]])
    boxed = NIHChestXray14(nih, data_entry=entry, box_images_only=True, require_images=False).load()
    assert len(boxed) == 1 and boxed.records["image_id"].iloc[0] == boxed.boxes["image_id"].iloc[0]
    # A class subset drops the boxes of the other classes and counts them.
    reader = NIHChestXray14(nih, data_entry="Data_Entry_2017_v2020.bbox_images.csv", classes=["Mass"], require_images=False)
    assert len(reader.load().boxes) == 85 and reader.report["boxes_dropped_class"] == 984 - 85


def _mini_nih(root: Path, n: int = 6) -> list[str]:
    """A tiny NIH layout: 6 images of 3 patients, one box, official lists; returns the image names."""
    names = [f"0000000{p}_00{f}.png" for p in (1, 2, 3) for f in (0, 1)][:n]
    labels = ["Cardiomegaly", "No Finding", "Effusion|Mass", "No Finding", "Hernia", "Nodule"][:n]
    entry = pd.DataFrame({
        "Image Index": names, "Finding Labels": labels, "Follow-up #": [0, 1] * (n // 2),
        "Patient ID": [int(x[:8]) for x in names], "Patient Age": 50, "Patient Gender": "M",
        "View Position": ["PA", "AP"] * (n // 2),
    })
    root.mkdir(parents=True, exist_ok=True)
    text = entry.to_csv(index=False).splitlines()
    text[0] += ",OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
    text[1:] = [line + ",2048,2048,0.14,0.14" for line in text[1:]]
    (root / "Data_Entry_2017.csv").write_text("\n".join(text) + "\n")
    (root / "BBox_List_2017.csv").write_text(
        "Image Index,Finding Label,Bbox [x,y,w,h],,,\n" f"{names[2]},Mass,10,20,30,40\n"
    )
    (root / "train_val_list.txt").write_text("\n".join(names[:4]) + "\n")
    (root / "test_list.txt").write_text("\n".join(names[4:]) + "\n")
    return names


def test_nih_layout_images_masks_official_split(tmp_path):
    names = _mini_nih(tmp_path)
    for i, name in enumerate(names):  # NIH's archive layout images_001/images, images_002/images
        folder = tmp_path / f"images_00{1 + i % 2}" / "images"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"")
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / names[0]).write_bytes(b"")
    reader = NIHChestXray14(tmp_path, image_dir="images_*/images", mask_dir="masks", attention_mask_dir="lesions")
    manifest = reader.load()
    assert manifest.records["image_path"].tolist() == [
        str(tmp_path / f"images_00{1 + i % 2}" / "images" / n) for i, n in enumerate(names)
    ]
    assert manifest.records["mask_path"].tolist() == [str(tmp_path / "masks" / names[0])] + [""] * 5
    assert (manifest.records["attention_mask_path"] == "").all()
    assert manifest.records["official_split"].tolist() == ["train_val"] * 4 + ["test"] * 2
    assert reader.official_test_ids == set(names[4:])
    box = manifest.boxes.iloc[0]
    assert box["image_id"] == names[2] and manifest.class_names[box["class_index"]] == "Mass"
    assert box[["x_min", "y_min", "x_max", "y_max"]].tolist() == [10, 20, 40, 60]
    np.testing.assert_array_equal(manifest.labels[2], [(c in ("Effusion", "Mass")) for c in NIH_CLASSES])
    assert reader.report["missing_images"] == 0


def test_nih_skip_missing_counts(tmp_path):
    names = _mini_nih(tmp_path)
    (tmp_path / "images").mkdir()
    for name in names[:4]:
        (tmp_path / "images" / name).write_bytes(b"")
    with pytest.raises(DataError, match=f"image file not found: .*{names[4]}.*2 of 6"):
        NIHChestXray14(tmp_path).load()
    reader = NIHChestXray14(tmp_path, skip_missing=True)
    manifest = reader.load()
    assert len(manifest) == 4 and reader.report["missing_images"] == 2
    assert manifest.records["image_id"].tolist() == names[:4]


def test_nih_image_size_original(tmp_path):
    _mini_nih(tmp_path)
    manifest = NIHChestXray14(tmp_path, image_size="original", require_images=False).load()
    assert len(manifest.boxes) == 1
    assert (manifest.records["original_width"] == 2048).all()


# ------------------------------------------------------------------------------------------------------ CheXpert
@pytest.fixture(scope="module")
def chexpert(shared_data) -> Path:
    return shared_data / "chexpert-sample"


CSV = "chexpert_train.head100.csv"


@pytest.fixture(scope="module")
def chexpert_raw(chexpert) -> pd.DataFrame:
    return pd.read_csv(chexpert / CSV)[list(CHEXPERT_CLASSES)]


def _chexpert(root, **kwargs):
    return CheXpert(root, csv=CSV, classes=list(CHEXPERT_CLASSES), require_images=False, **kwargs).load()


@needs_data
@pytest.mark.parametrize("policy, value", [("U-Ones", 1.0), ("U-Zeros", 0.0), ("U-Ignore", np.nan)])
def test_chexpert_uncertainty_policies(chexpert, chexpert_raw, policy, value):
    raw = chexpert_raw.to_numpy(float)
    uncertain = raw == -1
    assert uncertain.sum() == 48  # README
    labels = _chexpert(chexpert, uncertainty=policy).labels
    assert labels.shape == (100, 14)
    if np.isnan(value):
        assert np.array_equal(np.isnan(labels), uncertain)  # blanks are 0, so the only NaNs are the -1s
    else:
        assert (labels[uncertain] == value).all()
    for k, name in enumerate(CHEXPERT_CLASSES):  # per-class counts recomputed with pandas
        column = chexpert_raw[name]
        ones = (column == 1).sum() + (policy == "U-Ones") * (column == -1).sum()
        zeros = (column == 0).sum() + column.isna().sum() + (policy == "U-Zeros") * (column == -1).sum()
        assert (labels[:, k] == 1).sum() == ones, name
        assert (labels[:, k] == 0).sum() == zeros, name
        assert np.isnan(labels[:, k]).sum() == (policy == "U-Ignore") * (column == -1).sum(), name


@needs_data
def test_chexpert_blank_policies(chexpert, chexpert_raw):
    raw = chexpert_raw.to_numpy(float)
    blank = np.isnan(raw)
    assert blank.sum() == 1008  # README
    zero = _chexpert(chexpert, uncertainty="ones", blank="zero").labels
    ignore = _chexpert(chexpert, uncertainty="ones", blank="ignore").labels
    assert (zero[blank] == 0).all() and np.array_equal(np.isnan(ignore), blank)
    np.testing.assert_array_equal(zero[~blank], ignore[~blank])
    assert (ignore == 1).sum() == 211 + 48 and (ignore == 0).sum() == 133


@needs_data
def test_chexpert_pcam_preset_and_dict(chexpert, chexpert_raw):
    reader = CheXpert(chexpert, csv=CSV, uncertainty="pcam", require_images=False)
    manifest = reader.load()
    assert manifest.class_names == ["Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Pleural Effusion"]
    expected = {"Cardiomegaly": 0.0, "Edema": 1.0, "Consolidation": 0.0, "Atelectasis": 1.0, "Pleural Effusion": 0.0}
    for k, name in enumerate(manifest.class_names):
        uncertain = (chexpert_raw[name] == -1).to_numpy()
        assert uncertain.any(), name  # the sample exercises every class of the preset
        assert (manifest.labels[uncertain, k] == expected[name]).all(), name
    assert not np.isnan(manifest.labels).any()
    mixed = CheXpert(chexpert, csv=CSV, classes=["Edema", "Atelectasis"], uncertainty={"Edema": "U-Zeros"},
                     require_images=False).load()  # fmt: skip
    edema_u = (chexpert_raw["Edema"] == -1).to_numpy()
    atel_u = (chexpert_raw["Atelectasis"] == -1).to_numpy()
    assert (mixed.labels[edema_u, 0] == 0).all() and np.isnan(mixed.labels[atel_u, 1]).all()  # unspecified: ignore
    with pytest.raises(ValueError, match="pcam"):
        CheXpert(chexpert, csv=CSV, classes=["Fracture"], uncertainty="pcam")


@needs_data
def test_chexpert_records_frontal_patients(chexpert):
    manifest = CheXpert(chexpert, csv=CSV, require_images=False).load()
    raw = pd.read_csv(chexpert / CSV)
    assert manifest.records["patient_id"].nunique() == 31
    expected = raw["Path"].str.extract(r"(patient\d+)")[0]
    assert manifest.records["patient_id"].tolist() == expected.tolist()
    first = manifest.records.iloc[0]
    assert first["image_id"] == "train/patient00001/study1/view1_frontal.jpg"
    assert first["image_path"] == str(chexpert / "train/patient00001/study1/view1_frontal.jpg")
    assert first["study_id"] == "patient00001/study1" and first["official_split"] == "train_val"
    frontal = CheXpert(chexpert, csv=CSV, frontal_only=True, require_images=False)
    assert len(frontal.load()) == 71 and frontal.report["dropped_lateral"] == 29
    other = CheXpert(chexpert, csv=CSV, image_root="/data", require_images=False).load()
    assert other.records["image_path"].iloc[0] == "/data/CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"


@needs_data
def test_chexpert_two_csvs(chexpert, tmp_path):
    raw = pd.read_csv(chexpert / CSV)
    raw.iloc[:60].to_csv(tmp_path / "train.csv", index=False)
    valid = raw.iloc[60:].copy()
    valid["Path"] = valid["Path"].str.replace("/train/", "/valid/")
    valid.to_csv(tmp_path / "valid.csv", index=False)
    manifest = CheXpert(tmp_path, csv=["train.csv", "valid.csv"], require_images=False).load()
    assert len(manifest) == 100
    assert manifest.records["folder"].value_counts().to_dict() == {"train": 60, "valid": 40}
    assert manifest.records["official_split"].value_counts().to_dict() == {"train_val": 60, "test": 40}


# --------------------------------------------------------------------------------------------------------- COVID
@pytest.fixture(scope="module")
def covid(shared_data) -> Path:
    return shared_data / "covid-cxr-mini"


@needs_data
def test_covid_counts(covid):
    reader = COVIDChestXray(covid, finding_map="covid_binary")
    manifest = reader.load()
    assert len(manifest) == 119 and manifest.records["patient_id"].nunique() == 69
    assert manifest.task == "multiclass" and (manifest.labels.sum(axis=1) == 1).all()
    assert manifest.class_names == ["COVID-19", "Other"] and manifest.labels[:, 0].sum() == 85  # 78 + 7 with ARDS
    assert (manifest.records["mask_path"] != "").sum() == 85
    assert len(manifest.boxes) == 52 and manifest.boxes["image_id"].nunique() == 26
    assert set(manifest.boxes["region"]) == {"Right Lung", "Left Lung"}
    assert "331a" in set(manifest.records["patient_id"])  # string ids with a letter survive
    both = COVIDChestXray(covid, finding_map="covid_binary", fallback_mask_dir="masks_lungvae").load()
    assert (both.records["mask_path"] != "").sum() == 100  # README: at least one mask for 100 images
    assert (both.records["mask_source"] == "masks_lungvae").sum() == 15


@needs_data
def test_covid_magsd_preset(covid):
    reader = COVIDChestXray(covid)
    manifest = reader.load()
    assert manifest.class_names == ["COVID-19", "Viral Pneumonia", "Bacterial Pneumonia", "Normal"]
    # From the README table: COVID 78 + 7; viral: Influenza 1; bacterial: Streptococcus 5, Mycoplasma 4,
    # Klebsiella 2, Bacterial 2, Legionella 1; normal: No Finding 6. Unmapped: Pneumocystis 6, Pneumonia 3,
    # ARDS 2, Lipoid 2.
    np.testing.assert_array_equal(manifest.labels.sum(axis=0), [85, 1, 14, 6])
    assert reader.report["dropped_unmapped"] == 13
    with pytest.raises(DataError, match=r"row \d+ \(line \d+\), column 'finding': '(Pneumocystis|Pneumonia|ARDS|Lipoid)'"):
        COVIDChestXray(covid, strict=True).load()


def test_match_finding_hierarchical_and_flat():
    mapping = COVIDChestXray("unused").finding_map
    cases = {
        "COVID-19": "COVID-19", "COVID-19, ARDS": "COVID-19", "Pneumonia/Viral/COVID-19": "COVID-19",
        "Pneumonia/Viral/SARS": "Viral Pneumonia", "Pneumonia/Viral/Something New": "Viral Pneumonia",
        "Pneumonia/Bacterial/Staphylococcus/MRSA": "Bacterial Pneumonia", "Streptococcus": "Bacterial Pneumonia",
        "No Finding": "Normal", "Pneumonia/Fungal/Pneumocystis": None, "todo": None, "Pneumonia": None,
    }
    for finding, expected in cases.items():
        got = match_finding(finding, mapping)
        assert (got if got is None else got[0]) == expected, finding
    binary = COVIDChestXray("unused", finding_map="covid_binary").finding_map
    assert match_finding("Pneumonia/Fungal/Pneumocystis", binary) == ["Other"]
    assert match_finding("todo", binary) is None and match_finding("", binary) is None


@needs_data
def test_covid_hierarchical_metadata_gives_same_labels(covid, tmp_path):
    flat = COVIDChestXray(covid, finding_map="covid_binary", require_images=False).load()
    meta = pd.read_csv(covid / "metadata.csv", dtype=str)
    meta["finding"] = meta["finding"].replace({
        "COVID-19": "Pneumonia/Viral/COVID-19", "COVID-19, ARDS": "Pneumonia/Viral/COVID-19",
        "Streptococcus": "Pneumonia/Bacterial/Streptococcus", "Pneumocystis": "Pneumonia/Fungal/Pneumocystis",
    })
    meta.to_csv(tmp_path / "metadata.csv", index=False)
    hier = COVIDChestXray(tmp_path, finding_map="covid_binary", image_dir=str(covid / "images"),
                          mask_dir=str(covid / "masks"), boxes_csv=str(covid / "boxes.csv")).load()  # fmt: skip
    np.testing.assert_array_equal(hier.labels, flat.labels)
    assert len(hier.boxes) == 52


@needs_data
def test_covid_multilabel_dict_map(covid):
    reader = COVIDChestXray(
        covid, task="multilabel", classes=["COVID-19", "ARDS"],
        finding_map={"COVID-19, ARDS": ["COVID-19", "ARDS"], "COVID-19": "COVID-19", "ARDS": "ARDS", "*": []},
    )
    manifest = reader.load()
    assert len(manifest) == 119 and manifest.task == "multilabel"
    np.testing.assert_array_equal(manifest.labels.sum(axis=0), [85, 7 + 2])
    assert (manifest.labels.sum(axis=1) == 0).sum() == 119 - 78 - 7 - 2


@needs_data
def test_covid_images_masks_boxes_align(covid):
    from torchvision.io import decode_image, read_file

    manifest = COVIDChestXray(covid, finding_map="covid_binary", fallback_mask_dir="masks_lungvae").load()
    records = manifest.records.set_index("image_id")
    boxes_csv = pd.read_csv(covid / "boxes.csv")
    overlaps, checked = [], 0
    for image_id, group in manifest.boxes.groupby("image_id"):
        image = decode_image(read_file(records.loc[image_id, "image_path"]))
        h, w = image.shape[-2:]
        size = boxes_csv.loc[boxes_csv["filename"] == image_id, ["width", "height"]].iloc[0]
        assert (w, h) == (size["width"], size["height"])
        xyxy = group[["x_min", "y_min", "x_max", "y_max"]].to_numpy()
        assert (xyxy >= 0).all() and (xyxy[:, 2] <= w).all() and (xyxy[:, 3] <= h).all()
        right = group.loc[group["region"] == "Right Lung", "x_min"].iloc[0] + group.loc[group["region"] == "Right Lung", "x_max"].iloc[0]
        left = group.loc[group["region"] == "Left Lung", "x_min"].iloc[0] + group.loc[group["region"] == "Left Lung", "x_max"].iloc[0]
        assert right < left  # the patient's right lung is on the image's left
        if not records.loc[image_id, "mask_path"]:
            continue
        mask = decode_image(read_file(records.loc[image_id, "mask_path"]))[0] > 127
        assert tuple(mask.shape) == (h, w)
        checked += 1
        for x0, y0, x1, y1 in xyxy:
            crop = mask[int(y0): int(np.ceil(y1)), int(x0): int(np.ceil(x1))]
            overlaps.append(crop.float().mean().item())
    assert checked >= 20
    assert np.mean(overlaps) > 0.5, np.mean(overlaps)
    # Every mask (not only boxed images) matches its image's size: spot-check a few.
    for _, row in records[records["mask_path"] != ""].iloc[::10].iterrows():
        image = decode_image(read_file(row["image_path"]))
        mask = decode_image(read_file(row["mask_path"]))
        assert mask.shape[-2:] == image.shape[-2:]


# --------------------------------------------------------------------------------------------------------- CSV
@needs_data
def test_csv_manifest_round_trip_nih(nih, tmp_path):
    original = NIHChestXray14(nih, data_entry="Data_Entry_2017_v2020.bbox_images.csv", require_images=False).load()
    original.labels[0, 0] = np.nan  # an unknown label must survive the round trip
    CSVManifest.write(original, tmp_path / "images.csv", tmp_path / "boxes.csv")
    back = CSVManifest(
        tmp_path / "images.csv", label_columns=original.class_names, image_id_column="image_id",
        mask_column="mask_path", attention_mask_column="attention_mask_path", boxes_csv="boxes.csv",
        require_images=False,
    ).load()  # fmt: skip
    np.testing.assert_array_equal(back.labels, original.labels)
    assert back.class_names == original.class_names
    columns = ["image_id", "image_path", "patient_id", "mask_path", "attention_mask_path"]
    pd.testing.assert_frame_equal(back.records[columns], original.records[columns])
    box_columns = ["image_id", "class_index", "x_min", "y_min", "x_max", "y_max"]
    pd.testing.assert_frame_equal(back.boxes[box_columns], original.boxes[box_columns], check_dtype=False)


def test_csv_manifest_relative_paths_multiclass_and_uncertain(tmp_path):
    (tmp_path / "img").mkdir()
    for name in ("a.png", "b.png", "c.png", "m.png"):
        (tmp_path / "img" / name).write_bytes(b"")
    (tmp_path / "images.csv").write_text(
        "image_path,patient_id,cat,dog,mask\n"
        "img/a.png,p1,1,0,img/m.png\n"
        "img/b.png,p1,,1,\n"
        f"{tmp_path}/img/c.png,p2,,,\n"
    )
    manifest = CSVManifest(tmp_path / "images.csv", label_columns=["cat", "dog"], task="multiclass", mask_column="mask").load()
    assert manifest.records["image_path"].tolist() == [str(tmp_path / "img" / n) for n in ("a.png", "b.png", "c.png")]
    assert manifest.records["mask_path"].tolist() == [str(tmp_path / "img" / "m.png"), "", ""]
    np.testing.assert_array_equal(manifest.labels, [[1, 0], [0, 1], [np.nan, np.nan]])  # blank -> 0 when labelled
    assert manifest.records["image_id"].tolist() == ["img/a.png", "img/b.png", f"{tmp_path}/img/c.png"]
    (tmp_path / "u.csv").write_text("image_path,patient_id,cat\nimg/a.png,p1,-1\nimg/b.png,p2,1\n")
    for policy, value in (("ones", 1.0), ("zeros", 0.0)):
        labels = CSVManifest(tmp_path / "u.csv", label_columns=["cat"], uncertain_value=policy).load().labels
        np.testing.assert_array_equal(labels[:, 0], [value, 1.0])
    labels = CSVManifest(tmp_path / "u.csv", label_columns=["cat"], uncertain_value="ignore").load().labels
    assert np.isnan(labels[0, 0]) and labels[1, 0] == 1


def test_readers_without_box_files(tmp_path):
    """Box files are optional: absent (NIH, COVID) or header-only (CSV) give an empty box table; an absent NIH
    box file warns with its path (tests/test_readers_gzip.py), bbox_list=None is silent."""
    _mini_nih(tmp_path / "nih")
    (tmp_path / "nih" / "BBox_List_2017.csv").unlink()
    with pytest.warns(UserWarning, match="BBox_List_2017.csv"):
        manifest = NIHChestXray14(tmp_path / "nih", require_images=False).load()
    assert len(manifest) == 6 and len(manifest.boxes) == 0
    manifest = NIHChestXray14(tmp_path / "nih", bbox_list=None, require_images=False).load()
    assert len(manifest.boxes) == 0
    (tmp_path / "covid").mkdir()
    (tmp_path / "covid" / "metadata.csv").write_text("patientid,finding,view,modality,filename\n1,COVID-19,PA,X-ray,a.png\n")
    manifest = COVIDChestXray(tmp_path / "covid", require_images=False).load()
    assert len(manifest) == 1 and len(manifest.boxes) == 0
    (tmp_path / "images.csv").write_text("image_path,patient_id,a,w\nx.png,p,1,10\n")
    (tmp_path / "boxes.csv").write_text("image_id,class_name,x_min,y_min,x_max,y_max\n")
    manifest = CSVManifest(tmp_path / "images.csv", label_columns=["a"], boxes_csv="boxes.csv", width_column="w",
                           require_images=False).load()  # fmt: skip
    assert len(manifest) == 1 and len(manifest.boxes) == 0


# ------------------------------------------------------------------------------------------------------- VinBig
VINBIG_ROWS = """image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max
img1,Cardiomegaly,3,R1,100,200,300,260
img1,Cardiomegaly,3,R2,110,210,310,270
img1,No finding,14,R3,,,,
img2,No finding,14,R1,,,,
img2,No finding,14,R2,,,,
img2,No finding,14,R3,,,,
img3,Nodule/Mass,8,R1,10,10,20,20
img3,Nodule/Mass,8,R2,12,12,22,22
img3,Nodule/Mass,8,R3,14,14,24,24
img3,Aortic enlargement,0,R1,50,50,90,100
"""


def test_vinbig_labels_and_all_boxes(tmp_path):
    from datamodules.readers.vinbig import VINBIG_CLASSES, VinBigData

    (tmp_path / "train.csv").write_text(VINBIG_ROWS)
    reader = VinBigData(tmp_path, require_images=False)
    manifest = reader.load()
    assert manifest.records["image_id"].tolist() == ["img1", "img2", "img3"]
    assert manifest.records["patient_id"].tolist() == ["img1", "img2", "img3"]
    assert manifest.records["image_path"].iloc[0] == str(tmp_path / "train" / "img1.png")
    k = {c: i for i, c in enumerate(VINBIG_CLASSES)}
    positives = {(i, c) for i, c in zip(*np.nonzero(manifest.labels))}
    assert positives == {(0, k["Cardiomegaly"]), (2, k["Nodule/Mass"]), (2, k["Aortic enlargement"])}
    assert len(manifest.boxes) == 6 and set(manifest.boxes["rad_id"]) == {"R1", "R2", "R3"}
    # Majority: Cardiomegaly 2 of 3 readers (kept), Aortic enlargement 1 of 3 (dropped), Nodule/Mass 3 of 3.
    majority = VinBigData(tmp_path, label_rule="majority", require_images=False).load()
    positives = {(i, c) for i, c in zip(*np.nonzero(majority.labels))}
    assert positives == {(0, k["Cardiomegaly"]), (2, k["Nodule/Mass"])}
    sub = VinBigData(tmp_path, classes=["Nodule/Mass"], require_images=False).load()
    assert sub.labels[:, 0].tolist() == [0, 0, 1] and len(sub.boxes) == 3


def test_vinbig_wbf(tmp_path, monkeypatch):
    import importlib.machinery
    import sys
    import types

    from datamodules.readers.vinbig import VinBigData

    (tmp_path / "train.csv").write_text(VINBIG_ROWS)
    monkeypatch.setitem(sys.modules, "ensemble_boxes", None)  # not installed
    with pytest.raises(ImportError, match="pip install ensemble-boxes"):
        VinBigData(tmp_path, merge="wbf")

    calls = []

    def fake_wbf(boxes_list, scores_list, labels_list, iou_thr, skip_box_thr):
        """Stand-in for ensemble_boxes: one mean box per label (enough to test normalisation and plumbing)."""
        boxes, labels = np.concatenate(boxes_list), np.concatenate(labels_list)
        assert boxes.min() >= 0 and boxes.max() <= 1 and len(boxes_list) == len(scores_list)
        calls.append((len(boxes_list), iou_thr))
        out = sorted(set(labels.tolist()))
        return np.stack([boxes[labels == c].mean(0) for c in out]), np.ones(len(out)), np.array(out, dtype=float)

    module = types.ModuleType("ensemble_boxes")
    module.__spec__ = importlib.machinery.ModuleSpec("ensemble_boxes", None)
    module.weighted_boxes_fusion = fake_wbf
    monkeypatch.setitem(sys.modules, "ensemble_boxes", module)
    manifest = VinBigData(tmp_path, merge="wbf", wbf_iou=0.5, require_images=False).load()
    assert calls == [(2, 0.5), (3, 0.5)]  # img1: 2 radiologists with boxes; img3: 3
    boxes = manifest.boxes.set_index(["image_id", "class_index"])
    np.testing.assert_allclose(boxes.loc[("img1", 3), ["x_min", "y_min", "x_max", "y_max"]].to_numpy(float), [105, 205, 305, 265])
    np.testing.assert_allclose(boxes.loc[("img3", 8), ["x_min", "y_min", "x_max", "y_max"]].to_numpy(float), [12, 12, 22, 22])
    assert len(manifest.boxes) == 3
    (tmp_path / "sizes.csv").write_text("image_id,dim0,dim1\nimg1,300,400\nimg2,300,400\nimg3,300,400\n")
    sized = VinBigData(tmp_path, merge="wbf", size_csv="sizes.csv", require_images=False).load()
    frame = ["frame_width", "frame_height"]  # the DICOM size the boxes were drawn on (None without size_csv)
    pd.testing.assert_frame_equal(sized.boxes.drop(columns=frame), manifest.boxes.drop(columns=frame))
    assert (sized.boxes[frame].to_numpy() == [400, 300]).all() and manifest.boxes[frame].isna().all().all()
    (tmp_path / "sizes.csv").write_text("image_id,width,height\nimg1,200,300\nimg2,300,400\nimg3,300,400\n")
    with pytest.raises(DataError, match=r"train.csv: row 1 \(line 2\): bad box .*x_max is beyond the image width for an image of width 200"):
        VinBigData(tmp_path, size_csv="sizes.csv", require_images=False).load()


def test_reader_option_checks_name_the_reader_the_option_and_the_choices():
    from datamodules.readers import _common as C

    assert C.chosen_classes("R", None, ("a", "b")) == ["a", "b"]
    assert C.chosen_classes("R", None, ("a", "b", "c"), default=("c",)) == ["c"]
    with pytest.raises(ValueError, match=r"^R: unknown classes \['z'\]; choose from \['a', 'b'\]$"):
        C.chosen_classes("R", ["a", "z"], ("a", "b"))
    with pytest.raises(ValueError, match=r"R: unknown classes \[\]"):  # choosing none is refused too
        C.chosen_classes("R", [], ("a", "b"))
    C.check_choice("R", "merge", "wbf", ("all", "wbf"))
    with pytest.raises(ValueError, match=r"^R: merge must be 'all' or 'wbf', got 'x'$"):
        C.check_choice("R", "merge", "x", ("all", "wbf"))
