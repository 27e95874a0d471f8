"""Image decoding with clear errors: an image loads as what it is, or not at all.

``torchvision.io`` decodes PNG/JPEG about 1.2x faster than PIL and 1.4-1.7x faster than MONAI's loader on this
class of machine (``../shared/research/performance.md`` §5), and it keeps the (H, W) orientation that CSV boxes
use (MONAI's ``PILReader`` transposes 2D images), so every 2D reader in medattn decodes here.

What decoding guarantees (each is refused with a :class:`DataError` naming the file, or corrected as stated):

* **Pixel limit.** The width and height are read from the PNG/JPEG header *before* decoding; an image of more
  than :data:`MAX_IMAGE_PIXELS` pixels (default 100 million, about 10000 x 10000; environment variable
  ``MEDATTN_MAX_IMAGE_PIXELS`` or ``datamodules.io.MAX_IMAGE_PIXELS = n``; ``0`` disables) is refused without
  allocating it, so a decompression bomb (a few kB of PNG that inflate to gigabytes) fails fast.
* **EXIF orientation** (a photo of a film taken sideways) is applied, as every image viewer does.
* **16-bit images** are scaled to 8 bits by their *bit depth*, not by 16 bits: the PNG ``sBIT`` chunk when the
  file declares its significant bits, else the smallest of 10, 12, 14 or 16 bits that holds the image's
  maximum (a 12-bit detector stored in a 16-bit PNG is scaled by 4095, keeping 256 grey levels instead of 16).
  The window is a fixed linear map per bit depth (not a per-image min-max stretch), so images of one detector
  stay comparable; :func:`read_gray` returns it in :class:`ImageInfo`.
* **Degenerate images** (a side under :data:`MIN_IMAGE_SIDE` pixels, or a single grey value) load but emit an
  :class:`ImageWarning` naming the file: they are almost always an export error.
* **Masks** (:func:`read_mask`): a pixel is foreground when any colour channel is non-zero (alpha is ignored),
  so a mask drawn in red on black loads as drawn. The mask must then be binary: 0 and *one* foreground value
  (0/1, 0/255, a palette index, pure red ...). A mask with more values (an anti-aliased or JPEG-compressed
  mask, a red drawing over the X-ray itself, a label map) is refused unless ``foreground_value`` says which
  value is foreground (e.g. 255 for the raw v7labs masks, whose 127 marks devices and text).
"""

from __future__ import annotations

import io as _io
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image, read_file

from datamodules.manifest import DataError

_DICOM_MAGIC_OFFSET = 128
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (C4 = DHT, C8 = JPG extension, CC = DAC are not frames).
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}

MAX_IMAGE_PIXELS = int(os.environ.get("MEDATTN_MAX_IMAGE_PIXELS", 100_000_000))
MIN_IMAGE_SIDE = 8


class ImageWarning(UserWarning):
    """An image that loads but is probably not what was meant (tiny or constant); the message names the file."""


@dataclass(frozen=True)
class ImageInfo:
    """How a file was decoded: ``size`` (H, W) after EXIF orientation, the source ``bit_depth`` (8 or the
    significant bits of a 16-bit file) and the linear ``window`` (low, high) that was mapped to 0..255."""

    size: tuple[int, int]
    bit_depth: int
    window: tuple[int, int]


def _jpeg_segments(data: bytes):
    """(marker, payload) of the JPEG header segments, up to and including the first start-of-frame."""
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            i += 1
            continue
        marker = data[i + 1]
        if marker in (0xD8, 0x01, 0xFF) or 0xD0 <= marker <= 0xD7:
            i += 1 if marker == 0xFF else 2
            continue
        length = struct.unpack(">H", data[i + 2:i + 4])[0]
        yield marker, data[i + 4:i + 2 + length]
        if marker in _JPEG_SOF or marker == 0xDA:  # frame header found, or scan data began
            return
        i += 2 + length


def _png_chunk(data: bytes, kind: bytes) -> bytes | None:
    """Payload of the first ``kind`` chunk before the image data of a PNG, if there is one."""
    i = 8
    while i + 8 <= len(data):
        length = struct.unpack(">I", data[i:i + 4])[0]
        name = data[i + 4:i + 8]
        if name == kind:
            return data[i + 8:i + 8 + length]
        if name in (b"IDAT", b"IEND"):
            return None
        i += 12 + length
    return None


def _header_size(data: bytes, path: Path) -> tuple[int, int] | None:
    """(width, height) from a PNG IHDR or a JPEG SOF marker without decoding; None if not found."""
    if data[:8] == _PNG_MAGIC and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data[:2] == b"\xff\xd8":
        for marker, payload in _jpeg_segments(data):
            if marker in _JPEG_SOF and len(payload) >= 5:
                height, width = struct.unpack(">HH", payload[1:5])
                return width, height
        return None
    try:  # another format decode_image knows (GIF, WebP ...): PIL reads its header lazily
        from PIL import Image

        with Image.open(_io.BytesIO(data)) as image:
            return image.size
    except Exception:  # noqa: BLE001 - let the decoder produce the error message
        return None


def _exif_orientation(data: bytes) -> int:
    """EXIF orientation tag (1 = as stored) of a PNG ``eXIf`` chunk or a JPEG APP1 segment."""
    raw = None
    if data[:8] == _PNG_MAGIC:
        raw = _png_chunk(data, b"eXIf")
    elif data[:2] == b"\xff\xd8":
        raw = next((p for m, p in _jpeg_segments(data) if m == 0xE1 and p[:6] == b"Exif\0\0"), None)
    if not raw:
        return 1
    from PIL import Image

    exif = Image.Exif()
    try:
        exif.load(raw)
        return int(exif.get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block: the decoder ignores it too
        return 1


def image_size(path: str | Path) -> tuple[int, int]:
    """(H, W) of an image as :func:`read_gray` would return it (EXIF orientation applied), from its header only;
    for checking annotations against many images without decoding them."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(65536)
        size = _header_size(head, path)
        if size is None and head[:2] == b"\xff\xd8":
            head += f.read()
            size = _header_size(head, path)
    if size is None:  # a format without a parsed header: decode it
        return tuple(read_gray(path)[0].shape[1:])
    width, height = size
    return (width, height) if _exif_orientation(head) in (5, 6, 7, 8) else (height, width)


def _png_significant_bits(data: bytes) -> int | None:
    """The grey (or largest colour) significant-bit count of a PNG's ``sBIT`` chunk, if it has one."""
    chunk = _png_chunk(data, b"sBIT")
    return max(chunk) if chunk else None


def _read_checked(path: Path) -> tuple[torch.Tensor, bytes]:
    if not path.is_file():
        raise DataError(f"image file not found: {path}")
    if path.stat().st_size == 0:
        raise DataError(f"image file is empty (0 bytes): {path}")
    data = read_file(str(path))
    head = data[:4096].numpy().tobytes()  # headers (IHDR, sBIT, SOF) sit in the first few hundred bytes
    if head[_DICOM_MAGIC_OFFSET:_DICOM_MAGIC_OFFSET + 4] == b"DICM":
        raise DataError(f"{path} is a DICOM file; medattn's 2D readers expect PNG or JPEG. Convert it first "
                        "(e.g. with pydicom + PIL) or point the reader at the exported PNGs.")
    size = _header_size(head, path)
    if size is None and head[:2] == b"\xff\xd8" and len(data) > len(head):  # SOF after a large EXIF/ICC block
        size = _header_size(data.numpy().tobytes(), path)
    limit = MAX_IMAGE_PIXELS
    if size is not None and limit > 0 and size[0] * size[1] > limit:
        raise DataError(f"{path}: {size[0]} x {size[1]} = {size[0] * size[1]:,} pixels exceeds the decoding limit "
                        f"of {limit:,} (a decompression bomb or a wrong file); raise datamodules.io.MAX_IMAGE_PIXELS "
                        "or the environment variable MEDATTN_MAX_IMAGE_PIXELS if the image is genuine")
    return data, head


def _decode(path: Path, data: torch.Tensor, mode: ImageReadMode) -> torch.Tensor:
    try:
        return decode_image(data, mode=mode, apply_exif_orientation=True)
    except (RuntimeError, ValueError) as err:
        raise DataError(f"cannot decode image {path} (corrupt or truncated, or not PNG/JPEG): {err}") from err


def _to_uint8(image: torch.Tensor, head: bytes, path: Path) -> tuple[torch.Tensor, int, tuple[int, int]]:
    if image.dtype == torch.uint8:
        return image, 8, (0, 255)
    if image.dtype != torch.uint16:
        raise DataError(f"{path}: unsupported pixel type {image.dtype}; expected 8- or 16-bit grayscale/RGB")
    # numpy, not torch, for the reductions here and below: torch's intra-op threads make a reduction of a
    # freshly decoded image cost several ms on a busy machine (measured 12 ms vs 0.5 ms for 512² uint8).
    wide = image.numpy().astype(np.int64)
    bits = _png_significant_bits(head) if head[:8] == _PNG_MAGIC else None
    if bits is None or not 8 < bits <= 16:
        peak = int(wide.max())
        bits = next(b for b in (10, 12, 14, 16) if peak < (1 << b))
    high = (1 << bits) - 1
    # Values above a declared sBIT depth would be a broken file; clamp rather than wrap.
    scaled = (np.clip(wide, 0, high) * 255 + high // 2) // high
    return torch.from_numpy(scaled.astype(np.uint8)), bits, (0, high)


def read_gray(path: str | Path) -> tuple[torch.Tensor, ImageInfo]:
    """Decode an image file to a uint8 tensor (1, H, W) and say how (:class:`ImageInfo`).

    RGB(A) and palette images are converted to luma (alpha dropped); EXIF orientation is applied; 16-bit images
    are scaled by their bit depth (module doc). Raises :class:`DataError` naming the path for a missing, empty,
    truncated, oversized or non-image file (DICOM is recognised and named); warns (:class:`ImageWarning`) for a
    tiny or constant image.
    """
    path = Path(path)
    data, head = _read_checked(path)
    image = _decode(path, data, ImageReadMode.GRAY)
    image, bits, window = _to_uint8(image, head, path)
    if image.dim() != 3 or image.shape[0] != 1 or min(image.shape[1:]) < 1:
        raise DataError(f"{path}: decoded to shape {tuple(image.shape)}; expected (1, H, W)")
    flat = image.numpy().reshape(-1)
    low, high = flat.min(), flat.max()
    if min(image.shape[1:]) < MIN_IMAGE_SIDE or low == high:
        what = (f"only {image.shape[2]} x {image.shape[1]} pixels" if min(image.shape[1:]) < MIN_IMAGE_SIDE
                else f"a single grey value ({int(low)})")
        warnings.warn(f"{path}: the image has {what}; it is probably an export error", ImageWarning, stacklevel=2)
    return image, ImageInfo((int(image.shape[1]), int(image.shape[2])), bits, window)


def read_gray_uint8(path: str | Path) -> torch.Tensor:
    """:func:`read_gray` without the :class:`ImageInfo`: a uint8 tensor (1, H, W)."""
    return read_gray(path)[0]


def read_mask(path: str | Path, expected_hw: tuple[int, int] | None = None,
              foreground_value: int | None = None) -> torch.Tensor:
    """Decode a binary mask to uint8 {0, 1} of shape (1, H, W) (the definition of a mask is in the module doc).

    ``foreground_value``: the one value (of any colour channel) that is foreground; other non-zero values are
    background. Without it the mask must hold 0 and at most one other value, else :class:`DataError`.
    ``expected_hw`` checks the mask has the image's size.
    """
    path = Path(path)
    data, _ = _read_checked(path)
    raw = _decode(path, data, ImageReadMode.UNCHANGED)
    colour = raw.numpy()[:3] if raw.shape[0] >= 3 else raw.numpy()[:1]  # drop alpha (channel 1 of LA, 3 of RGBA)
    value = colour.max(axis=0, keepdims=True)  # "any non-zero channel"
    if foreground_value is not None:
        mask = (colour == foreground_value).any(axis=0, keepdims=True)
    else:
        peak = value.max()
        if ((value != 0) & (value != peak)).any():
            found = np.unique(value)
            shown = ", ".join(str(int(v)) for v in found[:8]) + (", ..." if len(found) > 8 else "")
            raise DataError(f"mask {path} is not binary: it holds {len(found)} values ({shown}); a mask has 0 and "
                            "one foreground value in any colour channel (0/1, 0/255, red on black). Re-export it, "
                            "or name the foreground value (read_mask(..., foreground_value=255))")
        mask = value != 0
    mask = torch.from_numpy(mask.astype(np.uint8))
    if expected_hw is not None and tuple(mask.shape[1:]) != tuple(expected_hw):
        raise DataError(f"mask {path} has size {tuple(mask.shape[1:])} (H, W) but its image has {tuple(expected_hw)}")
    return mask
