"""Writers of malformed inputs for ``tests/test_bad_input_matrix.py`` (the table of cases lives there): small
images, CSV tables, NIfTI volumes and slice tables written by hand, and the runners of the "an image loads as what
it is, or not at all" cases (issue 18, item 4). Not a test module: pytest collects nothing here.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.cxr import CXRDataModule
from datamodules.io import read_gray_uint8
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
    # default: a gradient (a constant image now warns, see "constant image")
    array = (np.add.outer(np.arange(h), np.arange(w)) * 5 % 256 if value is None else np.full((h, w), value)).astype(np.uint8)
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
    from datamodules.volume_segmentation import VolumeSegmentationDataModule

    dm = VolumeSegmentationDataModule(volumes(tmp), patch_size=patch, batch_size=1, patches_per_epoch=2)
    dm.setup("fit")
    return dm


# ------------------------------------------------------- an image loads as what it is (issue 18, item 4)
def gray(path: Path, array: np.ndarray, **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **save)
    return path


def twelve_bit(tmp: Path):
    source = (np.arange(40 * 40).reshape(40, 40) * 41 % 4096).astype(np.uint16)  # 12-bit detector, 16-bit PNG
    image = read_gray_uint8(gray(tmp / "x.png", source))
    expected = (source.astype(np.int64) * 255 + 2047) // 4095
    assert torch.equal(image[0].long(), torch.from_numpy(expected)) and len(torch.unique(image)) == 256
    from datamodules.io import read_gray

    assert read_gray(tmp / "x.png")[1].window == (0, 4095)  # the window is recorded


def exif_rotated(tmp: Path):
    from PIL import ImageOps

    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": a film photographed sideways
    path = gray(tmp / "film.png", (np.arange(20 * 40).reshape(20, 40) % 251).astype(np.uint8), exif=exif)
    upright = np.asarray(ImageOps.exif_transpose(Image.open(path)))
    assert upright.shape == (40, 20) and np.array_equal(read_gray_uint8(path)[0].numpy(), upright)


def red_mask(tmp: Path):
    from datamodules.io import read_mask

    rgb = np.zeros((24, 20, 3), np.uint8)
    rgb[5:15, 4:12, 0] = 255  # drawn in red on black
    assert int(read_mask(gray(tmp / "m.png", rgb)).sum()) == 80


def red_over_xray(tmp: Path):
    from datamodules.io import read_mask

    rgb = np.repeat((np.arange(24 * 20).reshape(24, 20, 1) % 200 + 20).astype(np.uint8), 3, axis=2)
    rgb[5:15, 4:12] = (255, 0, 0)  # red outline drawn over the X-ray itself: not a mask
    read_mask(gray(tmp / "over.png", rgb))


def flipped_label(tmp: Path):
    image = np.zeros((12, 12, 12), np.float32)
    image[:4] = 1.0  # the object sits at low x
    nifti(tmp / "s0_img.nii.gz", image)
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = 11.0  # voxel i of the file lies at x = 11 - i: the same world grid, stored flipped
    nib.save(nib.Nifti1Image((image[::-1] > 0).astype(np.uint8), flip), str(tmp / "s0_seg.nii.gz"))
    reader = volume_reader(tmp)
    vol = reader.load(reader.subjects()[0])
    assert vol.label[vol.image[0] > 0].mean() == 1.0 and vol.label.sum() == (vol.image[0] > 0).sum()


def shifted_label(tmp: Path):
    nifti(tmp / "s0_img.nii.gz", np.ones((12, 12, 12), np.float32))
    shifted = np.eye(4)
    shifted[:3, 3] = 5.0
    nib.save(nib.Nifti1Image(np.ones((12, 12, 12), np.uint8), shifted), str(tmp / "s0_seg.nii.gz"))
    reader = volume_reader(tmp)
    reader.load(reader.subjects()[0])


def volume_reader(tmp: Path):
    from datamodules.volumes import NiftiVolumes

    return NiftiVolumes(tmp, images=["*_img.nii.gz"], label="*_seg.nii.gz")


def nan_voxels(tmp: Path):
    image = np.ones((12, 12, 12), np.float32)
    image[3, 4, 5] = np.nan
    nifti(tmp / "s0_img.nii.gz", image)
    nifti(tmp / "s0_seg.nii.gz", np.zeros((12, 12, 12), np.uint8))
    reader = volume_reader(tmp)
    reader.load(reader.subjects()[0])


def box_setup(tmp: Path, image_size: tuple[int, int], box: str, sizes: str = ""):
    """Two images of ``image_size`` (H, W) and a boxes.csv row for img1 (``sizes`` adds width,height cells)."""
    files = {f"img{i}.png": (lambda p: png(p, size=image_size)) for i in range(2)}
    csv = csv_dataset(tmp, files, rows=["img/img0.png,p0,1,0", "img/img1.png,p1,0,1"])
    header = "image_id,class_name,x_min,y_min,x_max,y_max" + (",width,height" if sizes else "")
    (tmp / "boxes.csv").write_text(f"{header}\nimg/img0.png,a,1,1,10,10{sizes}\nimg/img1.png,b,{box}{sizes}\n")
    CXRDataModule(CSVManifest(csv, label_columns=ALL, boxes_csv="boxes.csv"), image_size=16, val_fraction=0.0,
                  test_fraction=0.0, min_per_class=0).setup("fit")


def nih_resized(tmp: Path):
    """NIH boxes are in pixels of the 1024-px release; the images on disk were resized to 256 px."""
    header = "Image Index,Finding Labels,Follow-up #,Patient ID"
    (tmp / "Data_Entry_2017.csv").write_text(f"{header}\n00000001_000.png,Mass,0,1\n00000002_000.png,No Finding,0,2\n")
    (tmp / "BBox_List_2017.csv").write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
                                            "00000001_000.png,Mass,600,500,120,90,,,\n")
    for name in ("00000001_000.png", "00000002_000.png"):
        png(tmp / "images" / name, size=(256, 256))
    CXRDataModule(NIHChestXray14(tmp), image_size=16, val_fraction=0.0, test_fraction=0.0, min_per_class=0).setup()


def warns(writer):
    def run(tmp: Path):
        with pytest.warns(UserWarning, match=r"x\.png: the image has"):
            return read_gray_uint8(writer(tmp / "x.png"))
    return run


def bomb(tmp: Path):
    """A 12000 x 12000 grey PNG (144 MB decoded) in ~150 kB: refused from its header, before any allocation."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    side, packer = 12000, zlib.compressobj(9)
    row = b"\0" * (side + 1)  # filter byte + pixels
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    (tmp / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                                   + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    read_gray_uint8(tmp / "bomb.png")


def pixel_limit_configurable(tmp: Path):
    import datamodules.io as image_io

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(image_io, "MAX_IMAGE_PIXELS", 400)
        read_gray_uint8(png(tmp / "x.png"))  # 24 x 20 = 480 pixels


def slices(tmp: Path, labels=("0", "1", "2"), subjects="subject_id,subject_label\ns0,1\ns1,2\n", nan=False):
    from datamodules.readers.slices import NiftiSliceReader

    volume = np.random.default_rng(0).random((8, 8, 3)).astype(np.float32)
    volume[2, 3, 1] = np.nan if nan else volume[2, 3, 1]
    nifti(tmp / "v.nii.gz", volume)
    rows = [f"s{i % 2},v.nii.gz,{i},{label}" for i, label in enumerate(labels)]
    (tmp / "slices.csv").write_text("subject_id,image_path,slice_index,label\n" + "\n".join(rows) + "\n")
    (tmp / "subjects.csv").write_text(subjects)
    return NiftiSliceReader(tmp, num_classes=3).load()  # 00a25c0 loaded all of these; a duplicate raised later


def nih_duplicate(tmp: Path):
    header = "Image Index,Finding Labels,Follow-up #,Patient ID"
    (tmp / "Data_Entry_2017.csv").write_text(f"{header}\na.png,Mass,0,1\nb.png,No Finding,0,2\na.png,Mass,1,1\n")
    (tmp / "BBox_List_2017.csv").write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\na.png,Mass,6,5,12,9,,,\n")
    return NIHChestXray14(tmp, require_images=False).load()
