"""The bad-input matrix: one table of malformed inputs across the readers and DataModules. Each row states what
must happen: a ``DataError`` whose message matches (naming the file, row or column and what was expected), a
counted skip (``CXRDataModule(skip_corrupt=True)`` -> ``report["skipped_corrupt"]``), or a documented conversion
that loads (16-bit and RGBA PNGs, extra columns, uncertainty policies, an all-zero mask). Nothing may crash deep
inside a DataLoader worker: the worker row decodes in a worker process and still surfaces a ``DataError`` naming
the file. Per-reader details live in ``tests/test_readers_bad_input.py``; this file is the cross-cutting table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.cxr import CXRDataModule
from datamodules.io import read_gray_uint8
from datamodules.manifest import DataError
from datamodules.readers.chexpert import CheXpert
from datamodules.readers.csv_manifest import CSVManifest
from datamodules.readers.nih import NIHChestXray14

ALL = ["a", "b"]  # label columns of the small CSV datasets


# ----------------------------------------------------------------------------------------------- writers
def png(path: Path, mode: str = "L", size=(24, 20), value: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = size
    if mode == "I;16":
        array = (np.arange(h * w, dtype=np.uint16).reshape(h, w) * 97).astype(np.uint16)
        Image.fromarray(array).save(path)  # PIL writes uint16 arrays as 16-bit grayscale PNG
        return path
    array = np.full((h, w), 128 if value is None else value, np.uint8)
    image = Image.fromarray(array, "L")
    (image.convert(mode) if mode != "L" else image).save(path)
    return path


def truncated_png(path: Path) -> Path:
    png(path, size=(64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def dicom(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00" + b"\0" * 64)
    return path


def csv_dataset(tmp: Path, images: dict[str, Callable[[Path], Path]] | None = None, header: str | None = None,
                rows: list[str] | None = None) -> Path:
    """``images.csv`` with image_path, patient_id, a, b (one patient per image) and the given image writers."""
    images = images or {f"img{i}.png": png for i in range(4)}
    for name, writer in images.items():
        writer(tmp / "img" / name)
    lines = [header or "image_path,patient_id,a,b"]
    lines += rows if rows is not None else [f"img/{name},p{i},{i % 2},{(i + 1) % 2}" for i, name in enumerate(images)]
    (tmp / "images.csv").write_text("\n".join(lines) + "\n")
    return tmp / "images.csv"


def datamodule(csv: Path, **kwargs) -> CXRDataModule:
    reader = CSVManifest(csv, label_columns=kwargs.pop("label_columns", ALL), **kwargs.pop("reader_kwargs", {}))
    defaults = dict(image_size=16, val_fraction=0.0, test_fraction=0.0, labeled_batch_size=4, eval_batch_size=4,
                    augment=False, min_per_class=0)  # 4-image tables: class counts are not what these tests check
    return CXRDataModule(reader, **{**defaults, **kwargs})


def first_batch(dm: CXRDataModule) -> dict:
    dm.prepare_data()
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def one_corrupt(writer: Callable[[Path], Path], **kwargs):
    """A 4-image dataset whose image 2 is written by ``writer``, read through the DataModule's first batch."""
    def run(tmp: Path):
        files = {f"img{i}.png": (writer if i == 2 else png) for i in range(4)}
        return first_batch(datamodule(csv_dataset(tmp, files), **kwargs))
    return run


def chexpert(tmp: Path, uncertainty: str, blank: str) -> np.ndarray:
    header = "Path,Sex,Age,Frontal/Lateral,AP/PA,Cardiomegaly,Edema,Consolidation,Atelectasis,Pleural Effusion"
    row = "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,Female,68,Frontal,AP,-1.0,,1.0,-1.0,0.0"
    (tmp / "train.csv").write_text(f"{header}\n{row}\n")
    return CheXpert(tmp, uncertainty=uncertainty, blank=blank, require_images=False).load().labels[0]


def nifti(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4)), str(path))
    return path


def volumes(tmp: Path, image_shape=(12, 12, 12), label_shape=None, n: int = 2):
    from datamodules.volumes import NiftiVolumes

    rng = np.random.default_rng(0)
    for i in range(n):
        nifti(tmp / f"s{i}_img.nii.gz", rng.random(image_shape).astype(np.float32) + 0.1)
        nifti(tmp / f"s{i}_seg.nii.gz", (rng.random(label_shape or image_shape) > 0.5).astype(np.uint8))
    return NiftiVolumes(tmp, images=["*_img.nii.gz"], label="*_seg.nii.gz")


def load_volume(tmp: Path, **kwargs):
    reader = volumes(tmp, **kwargs)
    return reader.load(reader.subjects()[0])


def patch_datamodule(tmp: Path, patch: int):
    from datamodules.segmentation import VolumeSegmentationDataModule

    dm = VolumeSegmentationDataModule(volumes(tmp), patch_size=patch, batch_size=1, patches_per_epoch=2)
    dm.setup("fit")
    return dm


# ------------------------------------------------------------------------------------------------ checks
@dataclass(frozen=True)
class Case:
    id: str
    run: Callable[[Path], object]
    error: str | None = None  # regex of the DataError message
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
    source = np.asarray(Image.open(tmp / "img" / "img2.png")).astype(np.int64)
    assert raw.dtype == torch.uint8 and torch.equal(raw[0].long(), torch.from_numpy(source >> 8))
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
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path):
    if case.error is not None:
        with pytest.raises(DataError, match=case.error) as info:
            case.run(tmp_path)
        print(f"[bad input] {case.id}: DataError: {str(info.value).splitlines()[0][:200]}")
    else:
        result = case.run(tmp_path)
        case.check(result, tmp_path)
        print(f"[bad input] {case.id}: accepted as documented")


def test_matrix_is_large_enough():
    assert len(CASES) >= 20 and len({c.id for c in CASES}) == len(CASES)
