"""Per-sample 2D transforms that keep boxes, masks and attention masks aligned with the image.

Pipeline (``CXRTransform``):

1. *Letterbox*: resize so the longer side is ``image_size`` (uint8 antialiased resize from torchvision, which
   is bit-identical to PIL and 8-18x faster than MONAI's antialiased resize on this machine), then pad at the
   bottom/right to a square. Boxes are scaled by the same factor; padding at the end leaves them in place, so
   ``to_original_frame`` undoes it exactly with a crop and a resize.
2. *Geometry* (training only), drawn **once** per sample and shared by both views: MONAI's detection transforms
   ``RandZoomBoxd`` and ``RandFlipBoxd`` move image, masks and boxes together; ``ClipBoxToImaged`` drops boxes
   that leave the image.
3. *Photometry* (training only), drawn **independently** per view: MONAI ``RandAdjustContrast``,
   ``RandScaleIntensity``, ``RandGaussianNoise``.
4. Normalisation ``(x / 255 - mean) / std``.

MAG-SD's reference recipe (``experiments/magsd/reference.yaml``) swaps in three options: ``clahe_clip_limit``
(OpenCV CLAHE on the resized uint8 image, before any augmentation), ``augmentation="reference"``
(:class:`ReferenceAugment`, the reference code's torchvision list, instead of steps 2-3) and
``normalize="column"`` (:func:`column_standardize`, ``sklearn.preprocessing.scale`` of the 2-D image).

MONAI's box convention follows array axes (for a (C, H, W) tensor the first box coordinate is the row), while
medattn's boxes are ``xyxy`` with x = column as in every CSV; the swap happens only in ``_to_monai_boxes`` /
``_from_monai_boxes``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.apps.detection.transforms.dictionary import ClipBoxToImaged, RandFlipBoxd, RandZoomBoxd
from monai.transforms import Compose, RandAdjustContrast, RandGaussianNoise, RandScaleIntensity
from torchvision import tv_tensors
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

MASK_KEYS = ("mask", "attention_mask")


def _to_monai_boxes(boxes_xyxy: torch.Tensor) -> torch.Tensor:
    return boxes_xyxy[:, [1, 0, 3, 2]]


_from_monai_boxes = _to_monai_boxes  # the swap is its own inverse


def find_random_states(root) -> list[np.random.RandomState]:
    """Every ``numpy.random.RandomState`` inside ``root`` (MONAI transforms, ``Compose``, lists, dicts), each object
    once, in attribute order (so the same pipeline always lists them in the same order)."""
    found: list[np.random.RandomState] = []
    seen: set[int] = set()

    def visit(obj, depth: int) -> None:
        if depth > 8 or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, np.random.RandomState):
            found.append(obj)
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                visit(item, depth + 1)
        elif isinstance(obj, dict):
            for item in obj.values():
                visit(item, depth + 1)
        elif hasattr(obj, "__dict__") and type(obj).__module__.startswith(("monai.", "datamodules.")):
            for item in vars(obj).values():
                visit(item, depth + 1)

    visit(root, 0)
    return found


def reseed_random_states(states: Sequence[np.random.RandomState], seed: int) -> None:
    """Reseed each state in place from ``seed`` (independent child seeds). In place because it is ~50x faster than
    MONAI's ``set_random_state``, which builds new ``RandomState`` objects (2 ms per sample for ``CXRTransform``)."""
    if not states:
        return
    for state, child in zip(states, np.random.SeedSequence(int(seed) % (2**32)).generate_state(len(states))):
        state.seed(int(child))


def letterbox(image: torch.Tensor, size: int, *, is_mask: bool = False) -> tuple[torch.Tensor, float]:
    """Resize (C, H, W) so the longer side is ``size`` and pad bottom/right with zeros to (C, size, size)."""
    h, w = image.shape[-2:]
    scale = size / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    if (new_h, new_w) != (h, w):
        mode = TF.InterpolationMode.NEAREST if is_mask else TF.InterpolationMode.BILINEAR
        image = TF.resize(image, [new_h, new_w], interpolation=mode, antialias=not is_mask)
    image = F.pad(image, (0, size - new_w, 0, size - new_h))
    return image, scale


def to_original_frame(heatmap: torch.Tensor, frame: Sequence[float], mode: str = "bilinear") -> torch.Tensor:
    """Map a (K, h, w) heatmap computed on the letterboxed image back onto the original image (K, H0, W0).

    ``frame`` is the batch's ``(orig_h, orig_w, scale)``. The heatmap is first brought to the padded square size,
    the padding is cropped off, and the rest is resized to the original size.
    """
    orig_h, orig_w, scale = (float(v) for v in frame)
    corners = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    side = round(max(orig_h, orig_w) * scale)
    maps = F.interpolate(heatmap[None].float(), size=(side, side), mode=mode, **corners)[0]
    maps = maps[:, : max(1, round(orig_h * scale)), : max(1, round(orig_w * scale))]
    return F.interpolate(maps[None], size=(int(orig_h), int(orig_w)), mode=mode, **corners)[0]


def clahe(image: torch.Tensor, clip_limit: float = 4.0, tile_grid: int = 4) -> torch.Tensor:
    """OpenCV's CLAHE (``cv2.createCLAHE(clipLimit, (tile_grid, tile_grid))``, the MAG-SD reference's call) of a
    uint8 ``(1, H, W)`` image. OpenCV because the reference uses it: MONAI and torchvision have no CLAHE, and
    kornia's and scikit-image's differ from OpenCV's in how the clip limit is scaled."""
    try:
        import cv2
    except ImportError as error:  # pragma: no cover - cv2 is a dependency (pyproject)
        raise ImportError("clahe_clip_limit needs OpenCV: pip install opencv-python-headless") from error
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 1:
        raise ValueError(f"clahe: expected a uint8 (1, H, W) image, got {image.dtype} {tuple(image.shape)}")
    operator = cv2.createCLAHE(clipLimit=float(clip_limit), tileGridSize=(int(tile_grid), int(tile_grid)))
    return torch.from_numpy(operator.apply(np.ascontiguousarray(image[0].numpy())))[None]


def column_standardize(image: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-column z-score of a ``(C, H, W)`` image, as the MAG-SD reference's ``sklearn.preprocessing.scale`` of
    the 2-D image: each column (over its rows) gets mean 0 and population standard deviation 1 (``ddof=0``); a
    constant column (std < ``eps``, e.g. letterbox padding) becomes 0, as sklearn leaves its scale at 1.
    Computed in float64, returned as float32."""
    x = image.double()
    mean = x.mean(dim=-2, keepdim=True)
    std = x.std(dim=-2, correction=0, keepdim=True)
    return ((x - mean) / torch.where(std < eps, torch.ones_like(std), std)).float()


class ReferenceAugment:
    """The MAG-SD reference code's training augmentation, with torchvision v2 so masks and boxes move with the
    image: with probability ``p`` the whole list is applied (else nothing): ColorJitter(brightness 0.5,
    contrast 0.7), RandomRotation(±120°, nearest, fill 0), RandomResizedCrop(scale 0.6-1, ratio 3/4-4/3,
    bilinear, antialiased), horizontal flip and vertical flip (each p 0.5). Masks use nearest neighbours;
    boxes become the enclosing box of their rotated corners and boxes that vanish are dropped
    (``SanitizeBoundingBoxes``).

    Randomness: torchvision draws from torch's global generator, so each call draws its own seed from this
    object's generator (reseeded per sample by :meth:`set_random_state`) and runs under ``fork_rng``: the draw
    is a function of the sample seed and leaves the global generator untouched.
    """

    def __init__(self, size: int, p: float = 0.5, brightness: float = 0.5, contrast: float = 0.7,
                 degrees: float = 120.0, scale: tuple[float, float] = (0.6, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_prob: float = 0.5, seed: int = 0) -> None:
        self.transform = T.Compose([
            T.RandomApply([T.ColorJitter(brightness=brightness, contrast=contrast),
                           T.RandomRotation(degrees),
                           T.RandomResizedCrop(size, scale=tuple(scale), ratio=tuple(ratio)),
                           T.RandomHorizontalFlip(flip_prob),
                           T.RandomVerticalFlip(flip_prob)], p=p),
            T.SanitizeBoundingBoxes(labels_getter=lambda sample: sample["box_labels"]),
        ])  # fmt: skip
        self.generator = torch.Generator()
        self.set_random_state(seed)

    def set_random_state(self, seed: int) -> None:
        self.generator.manual_seed(int(seed) % 2**63)

    def __call__(self, image: torch.Tensor, masks: dict[str, torch.Tensor], boxes_xyxy: torch.Tensor,
                 box_labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """uint8 image (1, H, W), masks (1, H, W), boxes (N, 4) xyxy, labels (N,) -> the same, transformed."""
        size = tuple(image.shape[-2:])
        sample = {"image": tv_tensors.Image(image), **{k: tv_tensors.Mask(v) for k, v in masks.items()},
                  "boxes": tv_tensors.BoundingBoxes(boxes_xyxy, format="XYXY", canvas_size=size),
                  "box_labels": box_labels}
        seed = int(torch.randint(2**62, (1,), generator=self.generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = self.transform(sample)
        plain = {k: torch.as_tensor(v).as_subclass(torch.Tensor) for k, v in out.items()}
        return plain["image"], {k: plain[k] for k in masks}, plain["boxes"].float(), plain["box_labels"]


class CXRTransform:
    """Letterbox + shared random geometry + per-view photometry + normalisation for one 2D sample.

    Args:
        image_size: side of the square network input.
        train: apply the random geometry and photometry.
        two_views: also return ``image_teacher`` (same geometry, independent photometry).
        zoom: (min, max) random zoom; (1, 1) disables it.
        flip_prob: horizontal-flip probability. 0 by default: on chest X-rays a flip swaps anatomical sides.
        contrast_gamma / intensity_scale / noise_std: photometric strengths (0 disables each).
        mean, std: normalisation of the [0, 1] intensities (``normalize="global"``).
        clahe_clip_limit, clahe_tile_grid: OpenCV CLAHE (:func:`clahe`) of the resized image before any
            augmentation (train and evaluation alike); ``None`` (default) skips it. Only the image area is
            equalised, not the letterbox padding. MAG-SD reference: 4.0 and 4 (4x4 tiles).
        normalize: ``"global"`` (``(x - mean) / std``) or ``"column"`` (:func:`column_standardize`, per-column
            z-score of the network input, the MAG-SD reference; ``mean`` and ``std`` are then unused).
        augmentation: ``"monai"`` (steps 2-3 above) or ``"reference"`` (:class:`ReferenceAugment`, the MAG-SD
            reference list; ``zoom``, ``flip_prob`` and the photometric options are then unused, and
            ``two_views`` is not supported).
        seed: initial seed of the transform's random state. Training datasets reseed it per sample with
            :meth:`set_random_state` (``datamodules.dataset.sample_seed``), so a sample's draw does not depend
            on the worker or on what that worker transformed before.
    """

    def __init__(
        self,
        image_size: int = 256,
        train: bool = False,
        two_views: bool = False,
        zoom: tuple[float, float] = (0.9, 1.1),
        flip_prob: float = 0.0,
        contrast_gamma: tuple[float, float] = (0.8, 1.25),
        intensity_scale: float = 0.1,
        noise_std: float = 0.02,
        mean: float = 0.5,
        std: float = 0.25,
        seed: int = 0,
        clahe_clip_limit: float | None = None,
        clahe_tile_grid: int = 4,
        normalize: str = "global",
        augmentation: str = "monai",
    ) -> None:
        if normalize not in ("global", "column"):
            raise ValueError(f"CXRTransform: normalize must be 'global' or 'column', got {normalize!r}")
        if augmentation not in ("monai", "reference"):
            raise ValueError(f"CXRTransform: augmentation must be 'monai' or 'reference', got {augmentation!r}")
        if augmentation == "reference" and two_views and train:
            raise ValueError("CXRTransform: augmentation='reference' has no two-view mode (two_views=True)")
        if clahe_clip_limit is not None and not clahe_clip_limit > 0:
            raise ValueError(f"CXRTransform: clahe_clip_limit must be > 0 or None, got {clahe_clip_limit!r}")
        self.clahe = None if clahe_clip_limit is None else (float(clahe_clip_limit), int(clahe_tile_grid))
        self.normalize = normalize
        self.reference = ReferenceAugment(image_size, seed=seed) if (train and augmentation == "reference") else None
        if self.reference is not None:  # the reference list replaces MONAI's geometry and photometry
            zoom, flip_prob, contrast_gamma, intensity_scale, noise_std = (1.0, 1.0), 0.0, None, 0.0, 0.0
        self.image_size = image_size
        self.train = train
        self.two_views = two_views
        self.mean, self.std = mean, std
        keys = ["image", *MASK_KEYS]
        modes = ["bilinear", "nearest", "nearest"]
        geometric = []
        if train and tuple(zoom) != (1.0, 1.0):
            geometric.append(RandZoomBoxd(image_keys=keys, box_keys="boxes", box_ref_image_keys="image", prob=1.0,
                                          min_zoom=zoom[0], max_zoom=zoom[1], mode=modes, padding_mode="constant",
                                          keep_size=True))
        if train and flip_prob > 0:
            # spatial axis 1 of (C, H, W) is the column axis: a horizontal flip
            geometric.append(RandFlipBoxd(image_keys=keys, box_keys="boxes", box_ref_image_keys="image",
                                          prob=flip_prob, spatial_axis=1))
        if geometric:
            geometric.append(ClipBoxToImaged(box_keys="boxes", label_keys="box_labels", box_ref_image_keys="image",
                                             remove_empty=True))
        self.geometric = Compose(geometric) if geometric else None
        photometric = []
        if train and contrast_gamma and tuple(contrast_gamma) != (1.0, 1.0):
            photometric.append(RandAdjustContrast(prob=0.8, gamma=tuple(contrast_gamma)))
        if train and intensity_scale > 0:
            photometric.append(RandScaleIntensity(factors=intensity_scale, prob=0.8))
        if train and noise_std > 0:
            photometric.append(RandGaussianNoise(prob=0.5, std=noise_std))
        self.photometric = Compose(photometric) if photometric else None
        self._states = find_random_states([self.geometric, self.photometric])
        self.set_random_state(seed)

    def set_random_state(self, seed: int) -> None:
        """Reseed the geometric and photometric streams (one sample's draws are then a function of ``seed``: the
        geometry once, then the photometry of ``image`` and, with two views, of ``image_teacher``)."""
        reseed_random_states(self._states, seed)
        if getattr(self, "reference", None) is not None:
            self.reference.set_random_state(seed)

    def __call__(
        self,
        image: torch.Tensor,
        boxes: np.ndarray | None = None,
        mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Transform one sample.

        Args:
            image: uint8 (1, H0, W0).
            boxes: float (N, 5) rows ``x_min, y_min, x_max, y_max, class_index`` in original pixels.
            mask, attention_mask: uint8 {0, 1} (1, H0, W0) or None.
        Returns:
            dict with ``image`` (and ``image_teacher``), ``mask``, ``attention_mask`` (float, zeros when absent),
            ``boxes`` float (N', 4), ``box_labels`` long (N',), ``frame`` float (3,).
        """
        orig_h, orig_w = image.shape[-2:]
        size = self.image_size
        sample: dict[str, torch.Tensor] = {}
        sample["image"], scale = letterbox(image, size)
        if self.clahe is not None:  # on the image area only: padding would enter the tiles' histograms
            h, w = max(1, round(orig_h * scale)), max(1, round(orig_w * scale))
            sample["image"][:, :h, :w] = clahe(sample["image"][:, :h, :w].contiguous(), *self.clahe)
        if self.reference is not None:
            return self._reference_call(sample["image"], boxes, mask, attention_mask, scale, (orig_h, orig_w))
        sample["image"] = sample["image"].float().div_(255.0)
        for key, value in (("mask", mask), ("attention_mask", attention_mask)):
            # absent masks travel as zeros so every geometric transform sees the same keys
            sample[key] = (letterbox(value, size, is_mask=True)[0].float() if value is not None
                           else torch.zeros(1, size, size))
        boxes = np.zeros((0, 5), np.float32) if boxes is None else np.asarray(boxes, np.float32).reshape(-1, 5)
        sample["boxes"] = _to_monai_boxes(torch.from_numpy(boxes[:, :4] * scale))
        sample["box_labels"] = torch.from_numpy(boxes[:, 4]).long()

        if self.geometric is not None:
            sample = self.geometric(sample)
        out: dict[str, torch.Tensor] = {}
        views = ["image", "image_teacher"] if self.two_views else ["image"]
        base = torch.as_tensor(sample["image"]).as_subclass(torch.Tensor)
        for view in views:
            pixels = base.clone()
            if self.photometric is not None:
                pixels = torch.as_tensor(self.photometric(pixels)).as_subclass(torch.Tensor)
            out[view] = self._normalize(pixels.clamp_(0.0, 1.0))
        for key in MASK_KEYS:
            out[key] = torch.as_tensor(sample[key]).as_subclass(torch.Tensor).round().clamp_(0, 1)
        out["boxes"] = _from_monai_boxes(torch.as_tensor(sample["boxes"]).as_subclass(torch.Tensor).float()).reshape(-1, 4)
        out["box_labels"] = torch.as_tensor(sample["box_labels"]).as_subclass(torch.Tensor).long().reshape(-1)
        out["frame"] = torch.tensor([orig_h, orig_w, scale], dtype=torch.float32)
        return out

    def _normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """[0, 1] float image -> network input."""
        if self.normalize == "column":
            return column_standardize(pixels)
        return pixels.sub_(self.mean).div_(self.std)

    def _reference_call(self, image: torch.Tensor, boxes, mask, attention_mask, scale: float,
                        orig: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Training with :class:`ReferenceAugment` on the letterboxed (and equalised) uint8 image."""
        size = self.image_size
        masks = {key: (letterbox(value, size, is_mask=True)[0] if value is not None
                       else torch.zeros(1, size, size, dtype=torch.uint8))
                 for key, value in (("mask", mask), ("attention_mask", attention_mask))}
        boxes = np.zeros((0, 5), np.float32) if boxes is None else np.asarray(boxes, np.float32).reshape(-1, 5)
        image, masks, out_boxes, labels = self.reference(image, masks, torch.from_numpy(boxes[:, :4] * scale),
                                                         torch.from_numpy(boxes[:, 4]).long())
        out = {"image": self._normalize(image.float().div_(255.0))}
        out.update({key: value.float().round().clamp_(0, 1) for key, value in masks.items()})
        out["boxes"], out["box_labels"] = out_boxes.reshape(-1, 4), labels.long().reshape(-1)
        out["frame"] = torch.tensor([orig[0], orig[1], scale], dtype=torch.float32)
        return out
