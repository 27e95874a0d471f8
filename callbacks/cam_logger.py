"""``CAMLogger``: attention-map overlays of validation images; :class:`callbacks.image_logger.ImageLogger` (its
``auto`` dispatch, so a CAMLogger left in a segmentation or detector config still logs the right overlays), PNGs in
``<run dir>/cams/`` and W&B key ``val/cam`` (kept for existing configs; a config that lists it turns the CLI's default ``ImageLogger`` off, so nothing is logged twice)."""

from __future__ import annotations

from callbacks.image_logger import ImageLogger, image_dir, overlay

__all__ = ["CAMLogger", "image_dir", "overlay"]


class CAMLogger(ImageLogger):
    def __init__(self, num_images: int = 8, every_n_epochs: int = 1, key: str = "val/cam", size: int = 256) -> None:
        super().__init__(num_images=num_images, every_n_epochs=every_n_epochs, kind="auto", size=size, folder="cams",
                         key=key)
