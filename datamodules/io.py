"""Image decoding with clear errors.

``torchvision.io`` decodes PNG/JPEG about 1.2x faster than PIL and 1.4-1.7x faster than MONAI's loader on this
class of machine (``../shared/research/performance.md`` §5), and it keeps the (H, W) orientation that CSV boxes
use (MONAI's ``PILReader`` transposes 2D images), so every 2D reader in medattn decodes here.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_image, read_file

from datamodules.manifest import DataError

_DICOM_MAGIC_OFFSET = 128


def read_gray_uint8(path: str | Path) -> torch.Tensor:
    """Decode an image file to a uint8 tensor (1, H, W).

    RGB(A) and palette images are converted to luma (alpha dropped); 16-bit images are rescaled to 8 bits by
    their full range (``x >> 8``). Raises :class:`DataError` naming the path for a missing, empty, truncated
    or non-image file (DICOM is recognised and named).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file not found: {path}")
    if path.stat().st_size == 0:
        raise DataError(f"image file is empty (0 bytes): {path}")
    data = read_file(str(path))
    head = bytes(data[: _DICOM_MAGIC_OFFSET + 4].tolist())
    if head[_DICOM_MAGIC_OFFSET:_DICOM_MAGIC_OFFSET + 4] == b"DICM":
        raise DataError(f"{path} is a DICOM file; medattn's 2D readers expect PNG or JPEG. Convert it first "
                        "(e.g. with pydicom + PIL) or point the reader at the exported PNGs.")
    try:
        image = decode_image(data, mode=ImageReadMode.GRAY)
    except (RuntimeError, ValueError) as err:
        raise DataError(f"cannot decode image {path} (corrupt or truncated, or not PNG/JPEG): {err}") from err
    if image.dtype == torch.uint16:  # 16-bit PNG: keep the top byte, a full-range linear rescale
        image = (image.to(torch.int32) >> 8).to(torch.uint8)
    elif image.dtype != torch.uint8:
        raise DataError(f"{path}: unsupported pixel type {image.dtype}; expected 8- or 16-bit grayscale/RGB")
    if image.dim() != 3 or image.shape[0] != 1 or min(image.shape[1:]) < 1:
        raise DataError(f"{path}: decoded to shape {tuple(image.shape)}; expected (1, H, W)")
    return image


def read_mask(path: str | Path, expected_hw: tuple[int, int] | None = None) -> torch.Tensor:
    """Decode a binary mask (0/255 or 0/1 PNG) to uint8 {0, 1} of shape (1, H, W).

    Pixels >= 128 (or == 1 for a 0/1 mask) are foreground. ``expected_hw`` checks the mask has the image's size.
    """
    mask = read_gray_uint8(path)
    foreground = mask >= 128 if int(mask.max()) > 1 else mask > 0
    mask = foreground.to(torch.uint8)
    if expected_hw is not None and tuple(mask.shape[1:]) != tuple(expected_hw):
        raise DataError(f"mask {path} has size {tuple(mask.shape[1:])} (H, W) but its image has {tuple(expected_hw)}")
    return mask
