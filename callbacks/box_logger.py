"""``BoxLogger``: predicted and ground-truth boxes on validation images;
:class:`callbacks.image_logger.ImageLogger` (``auto`` dispatch: boxes for a module with ``detect``), PNGs in
``<run dir>/boxes/`` and W&B key ``val/boxes`` (kept for existing configs; a config that lists it turns the CLI's default ``ImageLogger`` off).

The module must provide ``detect(image) -> list[{"boxes" (M, 4) xyxy, "scores" (M,), "labels" (M,)}]`` (boxes in
input pixels, x = column) and ``class_names``; ``RetinaNetModule`` and ``OXnetModule`` do."""

from __future__ import annotations

from callbacks.image_logger import ImageLogger, draw_boxes

__all__ = ["BoxLogger", "draw_boxes"]


class BoxLogger(ImageLogger):
    def __init__(self, num_images: int = 8, every_n_epochs: int = 1, max_boxes: int = 10, min_score: float = 0.2,
                 key: str = "val/boxes", size: int = 256) -> None:
        super().__init__(num_images=num_images, every_n_epochs=every_n_epochs, kind="auto", size=size,
                         max_boxes=max_boxes, min_score=min_score, folder="boxes", key=key)
