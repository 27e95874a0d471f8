"""Boxes and masks follow every resize, zoom and flip; image decoding fails with clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.io import encode_png

from datamodules.io import read_gray_uint8, read_mask
from datamodules.manifest import DataError
from datamodules.transforms import CXRTransform, letterbox, to_original_frame


def _drawn_box_image(h=180, w=150, box=(30, 40, 90, 110)):
    image = torch.zeros(1, h, w, dtype=torch.uint8)
    x0, y0, x1, y1 = box
    image[0, y0:y1, x0:x1] = 255
    return image, np.array([[x0, y0, x1, y1, 1]], np.float32)


@pytest.mark.parametrize("seed", range(6))
def test_box_covers_the_same_pixels_after_training_transforms(seed):
    image, boxes = _drawn_box_image()
    transform = CXRTransform(96, train=True, zoom=(0.8, 1.2), flip_prob=0.5, noise_std=0.0, intensity_scale=0.0,
                             contrast_gamma=(1.0, 1.0), seed=seed)
    out = transform(image, boxes, mask=(image > 0).to(torch.uint8))
    (x0, y0, x1, y1), = out["boxes"].tolist()
    bright = out["image"][0] > 0  # normalised: background is -2, the drawn square is +2 (blurred edges in between)
    rows, cols = torch.nonzero(bright, as_tuple=True)
    # the transformed box and the transformed drawing agree to within 1.5 px on every side (two resamplings)
    assert abs(cols.min().item() - x0) <= 1.5 and abs(cols.max().item() + 1 - x1) <= 1.5
    assert abs(rows.min().item() - y0) <= 1.5 and abs(rows.max().item() + 1 - y1) <= 1.5
    # and the mask moved with them: box vs mask bounding box IoU
    mrows, mcols = torch.nonzero(out["mask"][0] > 0.5, as_tuple=True)
    mx0, my0, mx1, my1 = mcols.min().item(), mrows.min().item(), mcols.max().item() + 1, mrows.max().item() + 1
    inter = max(0, min(x1, mx1) - max(x0, mx0)) * max(0, min(y1, my1) - max(y0, my0))
    union = (x1 - x0) * (y1 - y0) + (mx1 - mx0) * (my1 - my0) - inter
    assert inter / union > 0.9
    assert out["box_labels"].tolist() == [1]


def test_letterbox_scale_and_padding_and_inverse():
    image, boxes = _drawn_box_image(h=200, w=100)
    padded, scale = letterbox(image, 64)
    assert padded.shape == (1, 64, 64) and scale == pytest.approx(0.32)
    assert padded[0, :, 32:].max() == 0  # right padding only
    out = CXRTransform(64)(image, boxes)
    np.testing.assert_allclose(out["boxes"][0].numpy(), boxes[0, :4] * 0.32, atol=1e-5)
    back = to_original_frame(out["image"], out["frame"], mode="nearest")
    assert back.shape == (1, 200, 100)
    agree = ((back[0] > 0) == (image[0] > 0)).float().mean()
    assert agree > 0.98


def test_two_views_share_geometry_not_noise():
    image, boxes = _drawn_box_image()
    out = CXRTransform(96, train=True, two_views=True, seed=1)(image, boxes)
    a, b = out["image"], out["image_teacher"]
    assert a.shape == b.shape and not torch.equal(a, b)
    # same geometry: the bright square sits on the same pixels in both views
    assert ((a[0] > 0.5) ^ (b[0] > 0.5)).float().mean() < 0.02


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_io_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="not found: .*missing.png"):
        read_gray_uint8(tmp_path / "missing.png")
    with pytest.raises(DataError, match="empty.*zero.png"):
        read_gray_uint8(_write(tmp_path / "zero.png", b""))
    png = encode_png(torch.full((1, 8, 8), 7, dtype=torch.uint8)).numpy().tobytes()
    with pytest.raises(DataError, match="cannot decode.*trunc.png"):
        read_gray_uint8(_write(tmp_path / "trunc.png", png[: len(png) // 2]))
    with pytest.raises(DataError, match="DICOM"):
        read_gray_uint8(_write(tmp_path / "scan.png", b"\0" * 128 + b"DICM" + b"\0" * 64))
    with pytest.raises(DataError, match="mask .*m.png has size"):
        read_mask(_write(tmp_path / "m.png", png), expected_hw=(9, 8))


def test_rgba_and_16bit_are_converted(tmp_path):
    from PIL import Image

    rgba = np.zeros((6, 5, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    gray = read_gray_uint8(tmp_path / "rgba.png")
    assert gray.shape == (1, 6, 5) and gray.dtype == torch.uint8 and 55 <= int(gray[0, 0, 0]) <= 65  # luma of red
    Image.fromarray(np.full((4, 4), 65535 // 2, np.uint16)).save(tmp_path / "deep.png")
    deep = read_gray_uint8(tmp_path / "deep.png")
    assert deep.dtype == torch.uint8 and int(deep[0, 0, 0]) == 127
