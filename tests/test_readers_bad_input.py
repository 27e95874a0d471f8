"""Every reader rejects bad input with a DataError that says where (file, row, column or path) and what was expected.

All files are written here by hand; a row number in a message counts data rows from 1 ("row 3 (line 4)").
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from datamodules.manifest import DataError
from datamodules.readers.chexpert import CheXpert
from datamodules.readers.covid import COVIDChestXray
from datamodules.readers.csv_manifest import CSVManifest
from datamodules.readers.nih import NIHChestXray14

ENTRY_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
BBOX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,"


def write(path: Path, *lines: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def nih_root(tmp_path: Path, entry_rows: list[str] | None = None, bbox_rows: list[str] | None = None) -> Path:
    entry_rows = entry_rows or [
        "00000001_000.png,Cardiomegaly,0,1,57,M,PA,2682,2749,0.143,0.143",
        "00000001_001.png,No Finding,1,1,58,M,PA,2894,2729,0.143,0.143",
        "00000002_000.png,Mass|Nodule,0,2,60,F,AP,2500,2048,0.168,0.168",
    ]
    write(tmp_path / "Data_Entry_2017.csv", ENTRY_HEADER, *entry_rows)
    if bbox_rows is not None:
        write(tmp_path / "BBox_List_2017.csv", BBOX_HEADER, *bbox_rows)
    return tmp_path


def raises(match: str):
    return pytest.raises(DataError, match=match)


# ----------------------------------------------------------------------------------------------------------- NIH
def test_nih_missing_column_names_expected_and_found(tmp_path):
    write(tmp_path / "Data_Entry_2017.csv", "Image Index,Finding Labels,Age", "a.png,Mass,3")
    with raises(r"missing column\(s\) \['Patient ID'\].*Expected columns \['Image Index', 'Finding Labels', "
                r"'Patient ID'\]; found \['Image Index', 'Finding Labels', 'Age'\]"):
        NIHChestXray14(tmp_path, require_images=False).load()


def test_nih_bbox_missing_column(tmp_path):
    nih_root(tmp_path)
    write(tmp_path / "BBox_List_2017.csv", "Image Index,Finding Label,x,y,w,h", "00000001_000.png,Mass,1,2,3,4")
    with raises(r"BBox_List_2017.csv: missing column\(s\) \['Bbox \[x', 'h\]'\].*found \['Image Index', 'Finding Label', 'x'"):
        NIHChestXray14(tmp_path, require_images=False).load()


def test_nih_unknown_finding_names_row(tmp_path):
    nih_root(tmp_path, [
        "00000001_000.png,Cardiomegaly,0,1,57,M,PA,2682,2749,0.143,0.143",
        "00000001_001.png,Cardiomegaly|Pneumonitis,1,1,58,M,PA,2894,2729,0.143,0.143",
    ])  # fmt: skip
    with raises(r"Data_Entry_2017.csv: row 2 \(line 3\), column 'Finding Labels': unknown finding 'Pneumonitis'"):
        NIHChestXray14(tmp_path, require_images=False).load()


def test_nih_empty_finding_names_row(tmp_path):
    nih_root(tmp_path, ["00000001_000.png,,0,1,57,M,PA,2682,2749,0.143,0.143"])
    with raises(r"row 1 \(line 2\), column 'Finding Labels': empty"):
        NIHChestXray14(tmp_path, require_images=False).load()


@pytest.mark.parametrize(
    "box, reason",
    [
        ("1000,10,30,10", "x_max is beyond the image width"),  # 1030 > 1024 + 1
        ("10,1000,10,26", "y_max is beyond the image height"),  # 1026 > 1025
        ("-5,10,30,10", "a coordinate is negative"),
        ("10,10,0,10", "empty or inverted"),
        ("10,10,-3,10", "empty or inverted"),
    ],
)
def test_nih_bad_box_names_row(tmp_path, box, reason):
    nih_root(tmp_path, bbox_rows=["00000001_000.png,Cardiomegaly,10,10,30,30", f"00000002_000.png,Mass,{box}"])
    with raises(rf"BBox_List_2017.csv: row 2 \(line 3\): bad box .*{re.escape(reason)}"):
        NIHChestXray14(tmp_path, require_images=False).load()


def test_nih_box_within_tolerance_is_accepted(tmp_path):
    nih_root(tmp_path, bbox_rows=["00000002_000.png,Mass,1000,1000,24.9,24.9"])  # 1024.9: within 1 px
    assert len(NIHChestXray14(tmp_path, require_images=False).load().boxes) == 1


def test_nih_box_non_numeric_and_unknown_label(tmp_path):
    nih_root(tmp_path, bbox_rows=["00000002_000.png,Mass,10,ten,5,5"])
    with raises(r"row 1 \(line 2\), column 'y': expected a number, got 'ten'"):
        NIHChestXray14(tmp_path, require_images=False).load()
    nih_root(tmp_path, bbox_rows=["00000002_000.png,Mass,10,10,5,5", "00000002_000.png,Tumour,10,10,5,5"])
    with raises(r"row 2 \(line 3\), column 'Finding Label': unknown finding 'Tumour'"):
        NIHChestXray14(tmp_path, require_images=False).load()


def test_nih_missing_image_names_path(tmp_path):
    nih_root(tmp_path)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "00000001_000.png").write_bytes(b"")
    expected = re.escape(str(tmp_path / "images" / "00000001_001.png"))
    with raises(rf"image file not found: {expected} \(2 of 3 images missing"):
        NIHChestXray14(tmp_path).load()


def test_nih_empty_results_name_the_filter(tmp_path):
    nih_root(tmp_path)
    with raises(r"no rows left after the view filter view_positions=\['LL'\] \(3 rows before it\)"):
        NIHChestXray14(tmp_path, view_positions=["LL"], require_images=False).load()
    with raises(r"no rows left after box_images_only=True"):
        NIHChestXray14(tmp_path, box_images_only=True, require_images=False).load()
    with raises(r"no rows left after dropping missing image files \(first missing: .*00000001_000.png\)"):
        NIHChestXray14(tmp_path, skip_missing=True).load()


def test_nih_ambiguous_or_absent_data_entry(tmp_path):
    nih_root(tmp_path)
    write(tmp_path / "Data_Entry_2017_v2020.csv", ENTRY_HEADER)
    with raises(r"2 files match .*Data_Entry_2017\*\.csv.*Name one of them explicitly"):
        NIHChestXray14(tmp_path, require_images=False).load()
    with raises(r"no file matches .*nothing/Data_Entry_2017\*\.csv"):
        NIHChestXray14(tmp_path / "nothing", require_images=False).load()


def test_nih_bad_arguments():
    with pytest.raises(ValueError, match="unknown classes \\['Pneumonitis'\\]"):
        NIHChestXray14("x", classes=["Pneumonitis"])
    with pytest.raises(ValueError, match="image_size"):
        NIHChestXray14("x", image_size="big")


# ------------------------------------------------------------------------------------------------------ CheXpert
CHEXPERT_HEADER = "Path,Sex,Age,Frontal/Lateral,AP/PA,Cardiomegaly,Edema,Consolidation,Atelectasis,Pleural Effusion"


def chexpert_csv(tmp_path: Path, *rows: str) -> Path:
    return write(tmp_path / "train.csv", CHEXPERT_HEADER, *rows)


GOOD = "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,1.0,,0.0,-1.0,"


@pytest.mark.parametrize("cell, shown", [("2.0", "label 2 is not one of"), ("yes", "label 'yes' is not a number")])
def test_chexpert_bad_label_names_row_and_column(tmp_path, cell, shown):
    bad = f"CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg,Male,70,Frontal,AP,1.0,{cell},,,"
    chexpert_csv(tmp_path, GOOD, bad)
    with raises(rf"train.csv: row 2 \(line 3\), column 'Edema': {shown}"):
        CheXpert(tmp_path, require_images=False).load()


def test_chexpert_missing_column(tmp_path):
    write(tmp_path / "train.csv", "Path,Cardiomegaly", "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,1")
    with raises(r"missing column\(s\) \['Edema', 'Consolidation', 'Atelectasis', 'Pleural Effusion'\].*found \['Path', 'Cardiomegaly'\]"):
        CheXpert(tmp_path, require_images=False).load()


def test_chexpert_path_without_patient(tmp_path):
    chexpert_csv(tmp_path, GOOD, "CheXpert-v1.0-small/train/view1_frontal.jpg,Female,68,Frontal,AP,1.0,,,,")
    with raises(r"row 2 \(line 3\), column 'Path': .* has no '.../patientNNNNN/studyN/...' component"):
        CheXpert(tmp_path, require_images=False).load()


def test_chexpert_frontal_filter_keeps_nothing(tmp_path):
    chexpert_csv(tmp_path, GOOD.replace("Frontal,AP", "Lateral,"))
    with raises(r"no rows left after frontal_only=True"):
        CheXpert(tmp_path, frontal_only=True, require_images=False).load()


def test_chexpert_missing_image_and_bad_policies(tmp_path):
    chexpert_csv(tmp_path, GOOD)
    expected = re.escape(str(tmp_path / "train" / "patient00001" / "study1" / "view1_frontal.jpg"))
    with raises(rf"image file not found: {expected}"):
        CheXpert(tmp_path).load()
    with pytest.raises(ValueError, match="unknown uncertainty policy 'maybe'"):
        CheXpert(tmp_path, uncertainty="maybe")
    with pytest.raises(ValueError, match="blank must be"):
        CheXpert(tmp_path, blank="one")
    with pytest.raises(ValueError, match="not in classes"):
        CheXpert(tmp_path, uncertainty={"Fracture": "ones"})
    with raises(r"CheXpert CSV: file not found: .*valid.csv"):
        CheXpert(tmp_path, csv="valid.csv").load()


# --------------------------------------------------------------------------------------------------------- COVID
META_HEADER = "patientid,offset,sex,age,finding,view,modality,folder,filename"


def covid_root(tmp_path: Path, boxes: list[str] | None = None) -> Path:
    write(tmp_path / "metadata.csv", META_HEADER,
          "1,,M,50,COVID-19,PA,X-ray,images,a.png",
          "2,,F,60,Streptococcus,AP,X-ray,images,b.jpg",
          "3,,F,60,Pneumocystis,PA,X-ray,images,c.png",
          "4,,F,60,COVID-19,L,X-ray,images,d.png")  # fmt: skip
    (tmp_path / "images").mkdir(exist_ok=True)
    for name in "a.png", "b.jpg", "c.png", "d.png":
        (tmp_path / "images" / name).write_bytes(b"")
    if boxes is not None:
        write(tmp_path / "boxes.csv", "filename,patientid,label,x_min,y_min,x_max,y_max,width,height", *boxes)
    return tmp_path


def test_covid_bad_box_names_row(tmp_path):
    covid_root(tmp_path, ["a.png,1,Right Lung,10,10,100,150,200,160", "a.png,1,Left Lung,110,10,201.5,150,200,160"])
    with raises(r"boxes.csv: row 2 \(line 3\): bad box .*x_max is beyond the image width for an image of width 200"):
        COVIDChestXray(tmp_path).load()
    covid_root(tmp_path, ["a.png,1,Right Lung,10,150,100,10,200,160"])
    with raises(r"boxes.csv: row 1 \(line 2\): bad box .*inverted"):
        COVIDChestXray(tmp_path).load()


def test_covid_missing_column_unmapped_and_empty(tmp_path):
    covid_root(tmp_path)
    reader = COVIDChestXray(tmp_path)
    manifest = reader.load()
    assert manifest.records["image_id"].tolist() == ["a.png", "b.jpg"]
    assert reader.report["dropped_view"] == 1 and reader.report["dropped_unmapped"] == 1
    with raises(r"metadata.csv: row 3 \(line 4\), column 'finding': 'Pneumocystis' maps to no class"):
        COVIDChestXray(tmp_path, strict=True).load()
    with raises(r"no rows left after the view filter views=\['AP Erect'\]"):
        COVIDChestXray(tmp_path, views=["AP Erect"]).load()
    with raises(r"no rows left after mapping findings to classes"):
        COVIDChestXray(tmp_path, finding_map={"SARS": "SARS"}).load()
    write(tmp_path / "metadata.csv", "patientid,finding,view,modality,file_name", "1,COVID-19,PA,X-ray,a.png")
    with raises(r"missing column\(s\) \['filename'\].*found \['patientid', 'finding', 'view', 'modality', 'file_name'\]"):
        COVIDChestXray(tmp_path).load()


def test_covid_missing_image_and_duplicates(tmp_path):
    covid_root(tmp_path)
    (tmp_path / "images" / "b.jpg").unlink()
    with raises(rf"image file not found: {re.escape(str(tmp_path / 'images' / 'b.jpg'))}"):
        COVIDChestXray(tmp_path).load()
    reader = COVIDChestXray(tmp_path, skip_missing=True)
    assert len(reader.load()) == 1 and reader.report["missing_images"] == 1
    with open(tmp_path / "metadata.csv", "a") as f:
        f.write("5,,M,50,COVID-19,PA,X-ray,images,a.png\n")
    reader = COVIDChestXray(tmp_path, skip_missing=True)
    assert len(reader.load()) == 1 and reader.report["dropped_duplicate"] == 1
    with raises(r"row 5 \(line 6\), column 'filename': 'a.png' listed twice"):
        COVIDChestXray(tmp_path, finding_map="covid_binary", strict=True, skip_missing=True).load()


def test_covid_bad_arguments():
    with pytest.raises(ValueError, match="unknown finding_map preset"):
        COVIDChestXray("x", finding_map="four")
    with pytest.raises(ValueError, match="exactly one class"):
        COVIDChestXray("x", finding_map={"ARDS": ["A", "B"]})
    with pytest.raises(ValueError, match="not in classes"):
        COVIDChestXray("x", finding_map={"ARDS": "A"}, classes=["B"])


# --------------------------------------------------------------------------------------------------------- CSV
def csv_dataset(tmp_path: Path, *rows: str, header: str = "image_path,patient_id,opacity,effusion") -> Path:
    (tmp_path / "img").mkdir(exist_ok=True)
    for name in "a.png", "b.png", "c.png":
        (tmp_path / "img" / name).write_bytes(b"")
    return write(tmp_path / "images.csv", header, *rows)


ROWS = ("img/a.png,p1,1,0", "img/b.png,p1,,1", "img/c.png,p2,0,0")


@pytest.mark.parametrize("cell, shown", [("2", "label 2 is not one of"), ("yes", "label 'yes' is not a number"),
                                         ("-1", "label -1 is not one of"), ("0.5", "label 0.5 is not one of")])  # fmt: skip
def test_csv_bad_label_names_row_and_column(tmp_path, cell, shown):
    path = csv_dataset(tmp_path, ROWS[0], ROWS[1], f"img/c.png,p2,0,{cell}")
    with raises(rf"images.csv: row 3 \(line 4\), column 'effusion': {shown}"):
        CSVManifest(path, label_columns=["opacity", "effusion"]).load()


def test_csv_missing_column(tmp_path):
    path = csv_dataset(tmp_path, *ROWS)
    with raises(r"missing column\(s\) \['fracture'\]. Expected columns \['image_path', 'opacity', 'fracture', 'patient_id'\]; "
                r"found \['image_path', 'patient_id', 'opacity', 'effusion'\]"):
        CSVManifest(path, label_columns=["opacity", "fracture"]).load()


def test_csv_missing_image_mask_and_empty(tmp_path):
    path = csv_dataset(tmp_path, *ROWS, "img/d.png,p3,1,1")
    with raises(rf"image file not found: {re.escape(str(tmp_path / 'img' / 'd.png'))}"):
        CSVManifest(path, label_columns=["opacity"]).load()
    reader = CSVManifest(path, label_columns=["opacity"], skip_missing=True)
    assert len(reader.load()) == 3 and reader.report["missing_images"] == 1
    path = csv_dataset(tmp_path, "img/a.png,p1,1,0,img/nomask.png", header="image_path,patient_id,opacity,effusion,mask")
    with raises(rf"row 1 \(line 2\): mask file not found: {re.escape(str(tmp_path / 'img' / 'nomask.png'))}"):
        CSVManifest(path, label_columns=["opacity"], mask_column="mask").load()
    path = csv_dataset(tmp_path, "img/x.png,p1,1,0", "img/y.png,p1,1,0")
    with raises(r"no rows left after dropping missing image files"):
        CSVManifest(path, label_columns=["opacity"], skip_missing=True).load()
    path = csv_dataset(tmp_path)
    with raises(r"no rows left after reading"):
        CSVManifest(path, label_columns=["opacity"]).load()


def test_csv_structure_errors(tmp_path):
    path = csv_dataset(tmp_path, ROWS[0], "img/a.png,p2,0,1")
    with raises(r"row 2 \(line 3\): image id 'img/a.png' appears more than once"):
        CSVManifest(path, label_columns=["opacity"]).load()
    path = csv_dataset(tmp_path, ROWS[0], "img/b.png,,0,1")
    with raises(r"row 2 \(line 3\), column 'patient_id': empty patient id"):
        CSVManifest(path, label_columns=["opacity"]).load()
    path = csv_dataset(tmp_path, ROWS[0], "img/b.png,p1,1,1")
    with raises(r"row 2 \(line 3\): task='multiclass' needs exactly one 1 .* found 2"):
        CSVManifest(path, label_columns=["opacity", "effusion"], task="multiclass").load()
    path = csv_dataset(tmp_path, ROWS[0], "img/b.png,p1,0,0")
    with raises(r"row 2 \(line 3\): task='multiclass' needs exactly one 1 .* found 0"):
        CSVManifest(path, label_columns=["opacity", "effusion"], task="multiclass").load()


@pytest.mark.parametrize(
    "row, match",
    [
        ("img/b.png,effusion,10,10,70,40", None),
        ("img/b.png,effusion,10,10,70.9,40", None),  # 1 px tolerance
        ("img/b.png,effusion,10,10,72,40", r"row 2 \(line 3\): bad box .*x_max is beyond the image width for an image of width 70"),
        ("img/b.png,effusion,10,45,20,30", r"row 2 \(line 3\): bad box .*inverted"),
        ("img/b.png,effusion,-3,10,20,30", r"row 2 \(line 3\): bad box .*negative"),
        ("img/b.png,fracture,10,10,20,30", r"row 2 \(line 3\), column 'class_name': 'fracture' is not one of the classes"),
        ("img/z.png,effusion,10,10,20,30", r"row 2 \(line 3\), column 'image_id': image 'img/z.png' is not in"),
    ],
)
def test_csv_boxes(tmp_path, row, match):
    path = csv_dataset(tmp_path, "img/a.png,p1,1,0,100,50", "img/b.png,p1,,1,70,50",
                       header="image_path,patient_id,opacity,effusion,w,h")  # fmt: skip
    write(tmp_path / "boxes.csv", "image_id,class_name,x_min,y_min,x_max,y_max", "img/a.png,opacity,0,0,100,50", row)
    reader = CSVManifest(path, label_columns=["opacity", "effusion"], boxes_csv="boxes.csv", width_column="w", height_column="h")
    if match is None:
        boxes = reader.load().boxes
        assert boxes["class_index"].tolist() == [0, 1] and boxes["image_id"].tolist() == ["img/a.png", "img/b.png"]
    else:
        with raises(match):
            reader.load()


def test_csv_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="label_columns is empty"):
        CSVManifest("x.csv", label_columns=[])
    with pytest.raises(ValueError, match="uncertain_value"):
        CSVManifest("x.csv", label_columns=["a"], uncertain_value="maybe")
    with raises(r"CSV manifest: file not found: .*nothere.csv"):
        CSVManifest(tmp_path / "nothere.csv", label_columns=["a"]).load()
    write(tmp_path / "bad.csv", 'image_path,patient_id,a', '"img/a.png,p1,1')
    with raises(r"CSV manifest: cannot parse .*bad.csv"):
        CSVManifest(tmp_path / "bad.csv", label_columns=["a"]).load()


# ------------------------------------------------------------------------------------------------------- VinBig
def test_vinbig_bad_input(tmp_path):
    from datamodules.readers.vinbig import VinBigData

    header = "image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max"
    write(tmp_path / "train.csv", header, "a,Cardiomegaly,3,R1,1,2,30,40", "a,Heart,3,R2,1,2,30,40")
    with raises(r"train.csv: row 2 \(line 3\), column 'class_name': unknown class 'Heart'"):
        VinBigData(tmp_path, require_images=False).load()
    write(tmp_path / "train.csv", header, "a,Cardiomegaly,3,R1,1,2,30,40", "a,Cardiomegaly,3,R2,50,2,30,40")
    with raises(r"train.csv: row 2 \(line 3\): bad box .*inverted"):
        VinBigData(tmp_path, require_images=False).load()
    write(tmp_path / "train.csv", "image_id,class_name,x_min,y_min,x_max,y_max", "a,No finding,,,,")
    with raises(r"missing column\(s\) \['rad_id'\].*found \['image_id', 'class_name', 'x_min'"):
        VinBigData(tmp_path, require_images=False).load()
    write(tmp_path / "train.csv", header, "a,No finding,14,R1,,,,")
    with raises(rf"image file not found: {re.escape(str(tmp_path / 'train' / 'a.png'))}"):
        VinBigData(tmp_path).load()
    with pytest.raises(ValueError, match="merge must be"):
        VinBigData(tmp_path, merge="mean")
