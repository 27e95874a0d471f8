"""The bad-input matrix: one table of malformed inputs across the readers and DataModules. Each row states what
must happen: a ``DataError`` whose message matches (naming the file, row or column and what was expected), a
counted skip (``CXRDataModule(skip_corrupt=True)`` -> ``report["skipped_corrupt"]``), or a documented conversion
that loads (16-bit and RGBA PNGs, extra columns, uncertainty policies, an all-zero mask). Nothing may crash deep
inside a DataLoader worker: the worker row decodes in a worker process and still surfaces a ``DataError`` naming
the file. Per-reader details live in ``tests/test_readers_bad_input.py``; this file is the cross-cutting table.

The last block is "an image loads as what it is, or not at all" (issue 18, item 4): bit depth, EXIF orientation,
what a mask is, NIfTI orientation and NaN voxels, boxes against the decoded size, degenerate images, one file
listed twice, slice/subject labels outside the class set, duplicated keys and ``image_size 0``, and the pixel
limit. The inputs are written by ``tests/bad_input_writers.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.io import read_gray_uint8
from datamodules.manifest import DataError
from datamodules.readers.csv_manifest import CSVManifest
from datamodules.readers.nih import NIHChestXray14

from bad_input_writers import (  # a helper module next to this file (tests/ is on sys.path)
    ALL, png, truncated_png, dicom, csv_dataset, datamodule, first_batch, one_corrupt, chexpert,
    load_volume, patch_datamodule, twelve_bit, exif_rotated, red_mask, red_over_xray, flipped_label,
    shifted_label, nan_voxels, box_setup, nih_resized, warns, bomb, pixel_limit_configurable, slices,
    nih_duplicate,
)


# ------------------------------------------------------------------------------------------------ checks
@dataclass(frozen=True)
class Case:
    id: str
    run: Callable[[Path], object]
    error: str | None = None  # regex of the DataError message
    exception: type = DataError  # an invalid argument is a ValueError naming it
    check: Callable[[object, Path], None] | None = None  # for inputs that must load / be skipped


def _skip_counted(dm, tmp: Path) -> None:
    assert len(dm.report["skipped_corrupt"]) == 1 and "img2.png" in dm.report["skipped_corrupt"][0]
    assert len(dm.manifest) == 3


def _skip_corrupt(writer):
    def run(tmp: Path):
        files = {f"img{i}.png": (writer if i == 2 else png) for i in range(4)}
        dm = datamodule(csv_dataset(tmp, files), skip_corrupt=True, labeled_batch_size=3)
        batch = first_batch(dm)
        assert batch["image"].shape[0] == 3
        return dm
    return run


def _labels(expected: list[float]):
    def check(labels, tmp):
        np.testing.assert_array_equal(np.isnan(labels), np.isnan(expected))
        np.testing.assert_array_equal(np.nan_to_num(labels, nan=-9), np.nan_to_num(np.array(expected), nan=-9))
    return check


def _sixteen_bit(batch, tmp):
    raw = read_gray_uint8(tmp / "img" / "img2.png")
    source = np.asarray(Image.open(tmp / "img" / "img2.png")).astype(np.int64)  # max 46463: a 16-bit image
    assert raw.dtype == torch.uint8 and torch.equal(raw[0].long(), torch.from_numpy((source * 255 + 32767) // 65535))
    assert batch["image"].shape == (4, 1, 16, 16) and bool(torch.isfinite(batch["image"]).all())


def _rgba(batch, tmp):
    assert read_gray_uint8(tmp / "img" / "img2.png").shape == (1, 24, 20)
    assert batch["image"].shape == (4, 1, 16, 16)


def _extra_columns(batch, tmp):
    assert batch["labels"].shape == (4, 2)


def _empty_mask(batch, tmp):
    assert batch["has_mask"].all()
    sums = {image_id: float(m.sum()) for image_id, m in zip(batch["image_id"], batch["mask"])}
    assert sums.pop("img/img2.png") == 0.0 and all(v > 0 for v in sums.values())


def _nan_masked(batch, tmp):
    known = batch["label_mask"]
    assert int((~known).sum()) == 1  # the blank cell is unknown: out of every loss


def _mask_rows(mask_of_image2: Callable[[Path], Path] | None):
    def run(tmp: Path):
        files = {f"img{i}.png": png for i in range(4)}
        csv_dataset(tmp, files)
        rows = []
        for i in range(4):
            mask = tmp / "mask" / f"m{i}.png"
            (mask_of_image2 if (i == 2 and mask_of_image2) else (lambda p: png(p, value=255)))(mask)
            rows.append(f"img/img{i}.png,p{i},{i % 2},{(i + 1) % 2},mask/m{i}.png")
        csv = csv_dataset(tmp, files, header="image_path,patient_id,a,b,mask_path", rows=rows)
        return first_batch(datamodule(csv, reader_kwargs={"mask_column": "mask_path"}))
    return run


def _boxes(row: str):
    def run(tmp: Path):
        csv = csv_dataset(tmp, {f"img{i}.png": png for i in range(2)}, header="image_path,patient_id,a,b,w,h",
                          rows=["img/img0.png,p0,1,0,24,20", "img/img1.png,p1,0,1,24,20"])
        (tmp / "boxes.csv").write_text("image_id,class_name,x_min,y_min,x_max,y_max\nimg/img0.png,a,1,1,10,10\n"
                                       f"{row}\n")
        return CSVManifest(csv, label_columns=ALL, boxes_csv="boxes.csv", width_column="w", height_column="h").load()
    return run


def _nih_renamed(tmp: Path):
    header = ("Image Index,Finding Labels,Follow-up #,PatientID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
    (tmp / "Data_Entry_2017.csv").write_text(header + "\n00000001_000.png,Mass,0,1,57,M,PA,2682,2749,0.143,0.143\n")
    return NIHChestXray14(tmp, require_images=False).load()


def _worker(tmp: Path):
    """Decoding in a DataLoader worker process: the DataError crosses the process boundary intact."""
    return one_corrupt(truncated_png, num_workers=1)(tmp)


def _empty_split(tmp: Path):
    csv = csv_dataset(tmp, {"img0.png": png, "img1.png": png},
                      rows=["img/img0.png,p0,1,0", "img/img1.png,p0,0,1"])  # one patient only
    dm = datamodule(csv, val_fraction=0.3, test_fraction=0.0)
    dm.setup("fit")


def _empty_table(tmp: Path):
    return CSVManifest(csv_dataset(tmp, {}, rows=[]), label_columns=ALL).load()


U = math.nan
CASES = [
    # images
    Case("truncated PNG", one_corrupt(truncated_png), r"cannot decode image .*img2\.png \(corrupt or truncated"),
    Case("truncated PNG in a worker process", _worker, r"cannot decode image .*img2\.png"),
    Case("truncated PNG, skip_corrupt=True", _skip_corrupt(truncated_png), check=_skip_counted),
    Case("zero-byte image", one_corrupt(lambda p: (p.parent.mkdir(parents=True, exist_ok=True), p.write_bytes(b""),
                                                   p)[-1]), r"image file is empty \(0 bytes\): .*img2\.png"),
    Case("16-bit PNG (converted to 8 bits)", one_corrupt(lambda p: png(p, "I;16")), check=_sixteen_bit),
    Case("RGBA PNG (converted to luma)", one_corrupt(lambda p: png(p, "RGBA")), check=_rgba),
    Case("DICOM named .png", one_corrupt(dicom), r"img2\.png is a DICOM file; .* expect PNG or JPEG"),
    Case("DICOM, skip_corrupt=True", _skip_corrupt(dicom), check=_skip_counted),
    Case("missing image file",
         lambda tmp: CSVManifest(csv_dataset(tmp, rows=["img/nothere.png,p0,1,0"]), label_columns=ALL).load(),
         r"image file not found: .*nothere\.png"),
    # columns
    Case("missing label column", lambda tmp: CSVManifest(csv_dataset(tmp), label_columns=["a", "c"]).load(),
         r"missing column\(s\) \['c'\]. Expected columns .*; found \['image_path', 'patient_id', 'a', 'b'\]"),
    Case("extra columns (ignored)", lambda tmp: first_batch(datamodule(csv_dataset(
        tmp, header="image_path,patient_id,a,b,comment,age",
        rows=[f"img/img{i}.png,p{i},{i % 2},{(i + 1) % 2},note,{50 + i}" for i in range(4)]))), check=_extra_columns),
    Case("renamed column (NIH 'Patient ID' -> 'PatientID')", _nih_renamed,
         r"missing column\(s\) \['Patient ID'\].*found \[.*'PatientID'"),
    Case("empty table", _empty_table, r"no rows left after reading"),
    # labels under each policy
    Case("-1 label without an uncertainty policy", lambda tmp: CSVManifest(csv_dataset(
        tmp, rows=["img/img0.png,p0,-1,0"] + [f"img/img{i}.png,p{i},0,1" for i in (1, 2, 3)]),
        label_columns=ALL).load(), r"images\.csv: row 1 \(line 2\), column 'a': label -1 is not one of"),
    Case("blank label -> NaN, masked out of the loss", lambda tmp: first_batch(datamodule(csv_dataset(
        tmp, rows=["img/img0.png,p0,,0"] + [f"img/img{i}.png,p{i},0,1" for i in (1, 2, 3)]))), check=_nan_masked),
    *[Case(f"CheXpert -1/blank, uncertainty={u}, blank={b}", lambda tmp, u=u, b=b: chexpert(tmp, u, b),
           check=_labels(expected))
      for u, b, expected in [
          ("ones", "zero", [1, 0, 1, 1, 0]), ("zeros", "zero", [0, 0, 1, 0, 0]), ("ignore", "zero", [U, 0, 1, U, 0]),
          ("ignore", "ignore", [U, U, 1, U, 0]), ("pcam", "zero", [0, 0, 1, 1, 0])]],
    Case("CSV -1 with uncertain_value=ignore", lambda tmp: CSVManifest(csv_dataset(
        tmp, rows=["img/img0.png,p0,-1,"]), label_columns=ALL, uncertain_value="ignore").load().labels[0],
        check=_labels([U, U])),
    # boxes
    Case("negative box", _boxes("img/img1.png,b,-3,1,10,10"), r"boxes\.csv: row 2 \(line 3\): bad box .*negative"),
    Case("inverted box", _boxes("img/img1.png,b,12,1,10,10"), r"boxes\.csv: row 2 \(line 3\): bad box .*inverted"),
    Case("box beyond the image", _boxes("img/img1.png,b,1,1,30,10"),
         r"boxes\.csv: row 2 \(line 3\): bad box .*x_max is beyond the image width for an image of width 24"),
    # masks
    Case("all-zero mask (no lesion: loads)", _mask_rows(lambda p: png(p, value=0)), check=_empty_mask),
    Case("zero-byte mask file", _mask_rows(lambda p: (p.parent.mkdir(parents=True, exist_ok=True), p.write_bytes(b""),
                                                      p)[-1]), r"image file is empty \(0 bytes\): .*m2\.png"),
    Case("mask of the wrong size", _mask_rows(lambda p: png(p, size=(10, 10), value=255)),
         r"mask .*m2\.png has size \(10, 10\) \(H, W\) but its image has \(24, 20\)"),
    # volumes
    Case("NIfTI label map of the wrong shape", lambda tmp: load_volume(tmp, label_shape=(12, 12, 10)),
         r"subject s0: label map .*s0_seg\.nii\.gz has shape \(12, 12, 10\) but the image .* has \(12, 12, 12\)"),
    Case("volume smaller than the patch", lambda tmp: patch_datamodule(tmp, patch=16),
         r"volume shape \(12, 12, 12\) is smaller than the patch size \(16, 16, 16\)"),
    # splits
    Case("empty validation split", _empty_split, r"the val split is empty: 1 patients"),
    # an image loads as what it is, or not at all (issue 18, item 4)
    Case("12-bit image in a 16-bit PNG (scaled by 4095, window recorded)", twelve_bit, check=lambda r, t: None),
    Case("EXIF orientation (applied)", exif_rotated, check=lambda r, t: None),
    Case("mask drawn in red on black (any non-zero channel)", red_mask, check=lambda r, t: None),
    Case("red drawing over an X-ray given as a mask", red_over_xray,
         r"mask .*over\.png is not binary: it holds \d+ values"),
    Case("NIfTI label map stored flipped (reoriented to RAS)", flipped_label, check=lambda r, t: None),
    Case("NIfTI label map on another grid", shifted_label,
         r"subject s0: label map .*s0_seg\.nii\.gz and the image .*s0_img\.nii\.gz lie on different grids"),
    Case("NaN voxel in a volume", nan_voxels, r"s0_img\.nii\.gz: 1 voxel\(s\) are NaN or infinite"),
    Case("box 25x the image width, no size columns", lambda tmp: box_setup(tmp, (20, 24), "1,1,600,10"),
         r"boxes\.csv: row 2 \(line 3\): box .* lies outside .*img1\.png, which decodes to 24 x 20"),
    Case("box frame (CSV width/height) differs from the decoded image", lambda tmp: box_setup(
        tmp, (20, 24), "1,1,10,10", ",48,40"),
         r"boxes\.csv: row 1 \(line 2\): box \(1, 1, 10, 10\) was drawn on a 48 x 40 \(W x H\) image, but "
         r".*img0\.png decodes to 24 x 20"),
    Case("NIH boxes (1024 px) on images resized to 256 px", nih_resized,
         r"BBox_List_2017\.csv: row 1 \(line 2\): box \(x_min, y_min, x_max, y_max\) = "
         r"\(600, 500, 720, 590\) lies outside .*00000001_000\.png, which decodes to 256 x 256"),
    Case("1x1 image (warns, naming the file)", warns(lambda p: png(p, size=(1, 1))), check=lambda r, t: None),
    Case("constant image (warns, naming the file)", warns(lambda p: png(p, value=90)), check=lambda r, t: None),
    Case("same file twice (img/x.png, ./img/x.png) under two patients", lambda tmp: CSVManifest(csv_dataset(
        tmp, rows=["img/img0.png,p0,1,0", "img/img1.png,p1,0,1", "./img/img0.png,p7,0,1"]), label_columns=ALL).load(),
         r"images\.csv: image file .*img0\.png is listed twice: row 1 \(line 2\) .*patient 'p0'.* and row 3 "
         r"\(line 4\) as '.*\./img/img0\.png'.*patient 'p7'"),
    *[Case(f"slice label {bad!r}", lambda tmp, bad=bad: slices(tmp, labels=("0", bad, "2")),
           rf"slices\.csv: row 2 \(line 3\), column 'label': slice label '{bad}' is not a class index; expected an "
           r"integer in \[0, 3\)") for bad in ("yes", "grade1", "3")],
    *[Case(f"subject label {bad!r} with 3 classes", lambda tmp, bad=bad: slices(
        tmp, subjects=f"subject_id,subject_label\ns0,1\ns1,{bad}\n"),
           rf"subjects\.csv: row 2 \(line 3\), column 'subject_label': subject label '{bad}' is not a class index")
      for bad in ("7", "high")],
    Case("NaN pixel in a NIfTI slice", lambda tmp: slices(tmp, nan=True).load_slice(2),
         r"v\.nii\.gz: slice s1_001 holds 1 NaN or infinite pixel\(s\)"),
    Case("duplicated subject row in subjects.csv", lambda tmp: slices(
        tmp, subjects="subject_id,subject_label\ns0,1\ns1,2\ns0,1\n"),
         r"subjects\.csv: row 3 \(line 4\): subject 's0' is listed again \(first at row 1\)"),
    Case("duplicated NIH Image Index", nih_duplicate,
         r"Data_Entry_2017\.csv: row 3 \(line 4\), column 'Image Index': 'a\.png' is listed again \(first at row 1\)"),
    Case("image_size 0", lambda tmp: first_batch(datamodule(csv_dataset(tmp), image_size=0)),
         r"CXRDataModule: image_size must be a positive int .* got 0", exception=ValueError),
    Case("decompression bomb (12000 x 12000 PNG of 150 kB)", bomb,
         r"bomb\.png: 12000 x 12000 = 144,000,000 pixels exceeds the decoding limit of 100,000,000"),
    Case("pixel limit is configurable", pixel_limit_configurable,
         r"x\.png: 20 x 24 = 480 pixels exceeds the decoding limit of 400"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path):
    if case.error is not None:
        with pytest.raises(case.exception, match=case.error) as info:
            case.run(tmp_path)
        print(f"[bad input] {case.id}: {case.exception.__name__}: {str(info.value).splitlines()[0][:200]}")
    else:
        result = case.run(tmp_path)
        case.check(result, tmp_path)
        print(f"[bad input] {case.id}: accepted as documented")


def test_matrix_is_large_enough():
    assert len(CASES) >= 50 and len({c.id for c in CASES}) == len(CASES)
