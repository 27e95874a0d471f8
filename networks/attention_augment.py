"""Attention-guided data augmentation on image batches (MAG-SD and WS-DAN).

Pure, batched tensor functions: no per-sample Python loops, no numpy, no ``.item()``. Each one takes an image
batch ``(B, C, H, W)`` and **one** attention map per image ``(B, h, w)`` or ``(B, 1, h, w)`` at any resolution,
upsamples the map bilinearly (``align_corners=False``) to the image size and thresholds it at
``θ_b = u_b · max(Â_b)`` with ``u_b ~ U(low, high)`` drawn per image.

* :func:`attention_mixup` (MAG-SD): ``0.6·I + 0.4·resize(I[bbox(Â ≥ θ)])``, ``u ~ U(0.4, 0.6)``.
* :func:`attention_dim` (MAG-SD): ``I`` scaled by ``0.001`` where ``Â ≥ θ``, unchanged elsewhere, ``u ~ U(0.2, 0.5)``.
* :func:`attention_patch` (MAG-SD): ``I[bbox(Â ≥ θ)]`` pasted into a copy of ``I`` at a uniformly random
  top-left corner, ``u ~ U(0.4, 0.6)``.
* :func:`attention_crop` / :func:`attention_drop` (WS-DAN): crop-and-resize / zero the salient region.

Which map each image uses is drawn by :func:`sample_attention_maps` with probability ``∝ sqrt(Σ_hw A_m)``.

References:
    J. Li et al., "Multiscale Attention Guided Network for COVID-19 Diagnosis Using Chest X-Ray Images",
    IEEE JBHI 25(5), 2021 (arXiv:2012.02278). T. Hu et al., "See Better Before Looking Closer: Weakly
    Supervised Data Augmentation Network for Fine-Grained Visual Classification", arXiv:1901.09891.

Reproducibility: every random draw takes an optional ``torch.Generator`` (on the images' device); the same
seed gives the same output. Under ``torch.autocast`` (e.g. bf16) all sampling, thresholds and resampling run
in float32 and the result is cast back to the input dtype.

Where we differ from the reference code, on purpose:
    * Boxes are half-open pixel ranges ``[y0, y1)`` that *include* the last mask pixel (the reference's exclusive
      end drops it), expanded by ``padding·H`` (``·W``) on each side and clipped to the image.
    * Crop-and-resize samples the original image with ``grid_sample`` (bilinear, ``align_corners=False``), which
      equals ``interpolate(crop)`` except within half a pixel of the crop border, where it reads the true
      neighbour instead of repeating the edge.
    * Dimming leaves pixels outside the region unchanged; the reference multiplies them by 1.001
      (``I·(keep + 0.001)``). Pass ``keep_scale=1.001`` to reproduce it.
    * Edge case kept from the reference: an all-zero map gives ``θ = 0``, so the region is the whole image
      (mix-up is the identity, patching is the identity, dimming scales the whole image).

Example:
    >>> images, attention = torch.randn(2, 1, 64, 64), torch.rand(2, 32, 2, 2)
    >>> g = torch.Generator().manual_seed(0)
    >>> maps = sample_attention_maps(attention, 3, generator=g)
    >>> attention_mixup(images, maps[:, 0], generator=g).shape
    torch.Size([2, 1, 64, 64])
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "attention_sampling_probs",
    "sample_attention_maps",
    "draw_thresholds",
    "upsample_maps",
    "region_mask",
    "mask_boxes",
    "crop_and_resize",
    "attention_mixup",
    "attention_dim",
    "attention_patch",
    "attention_crop",
    "attention_drop",
    "magsd_augment",
]


@contextmanager
def _float32(reference: Tensor):
    """Turn autocast off: thresholds and resampling must not be rounded to bf16."""
    with torch.autocast(device_type=reference.device.type, enabled=False):
        yield


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    return torch.rand(shape, generator=generator, device=device, dtype=torch.float32)


# ------------------------------------------------------------------------------------------ map sampling
def attention_sampling_probs(attention: Tensor, eps: float = 1e-12) -> Tensor:
    """``(B, M, h, w) -> (B, M)``: ``p_m ∝ sqrt(Σ_hw A_m + eps)``, the WS-DAN / MAG-SD map-selection weights."""
    with _float32(attention):
        mass = attention.detach().float().sum(dim=(-2, -1)).clamp_min(0)
        weights = torch.sqrt(mass + eps)
        return weights / weights.sum(dim=1, keepdim=True)


def sample_attention_maps(
    attention: Tensor, num_samples: int, generator: torch.Generator | None = None, eps: float = 1e-12
) -> Tensor:
    """Draw ``num_samples`` maps per image, with replacement, ``p ∝ sqrt(ΣA)``: ``(B, M, h, w) -> (B, n, h, w)``.

    The draw is independent per image and per sample (two augmentations may share a map, as in the reference).
    The result is detached: augmentations carry no gradient.
    """
    if attention.dim() != 4:
        raise ValueError(f"attention must be (B, M, h, w), got shape {tuple(attention.shape)}")
    probs = attention_sampling_probs(attention, eps)
    index = torch.multinomial(probs, num_samples, replacement=True, generator=generator)  # (B, n)
    batch = torch.arange(attention.shape[0], device=attention.device)[:, None]
    return attention.detach()[batch, index]


def draw_thresholds(
    batch_size: int, low: float, high: float, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """``u_b ~ U(low, high)``, one per image, float32 ``(B,)``: the threshold as a fraction of each map's max."""
    return low + (high - low) * _rand((batch_size,), generator, device)


# ----------------------------------------------------------------------------------------- map → region
def upsample_maps(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """``(B, h, w)`` or ``(B, 1, h, w)`` -> float32 ``(B, H, W)`` (bilinear, ``align_corners=False``)."""
    if maps.dim() == 3:
        maps = maps[:, None]
    if maps.dim() != 4 or maps.shape[1] != 1:
        raise ValueError(f"expected one map per image, (B, h, w) or (B, 1, h, w); got {tuple(maps.shape)}")
    maps = maps.detach().float()
    if tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    return maps[:, 0]


def region_mask(maps: Tensor, fraction: Tensor) -> Tensor:
    """``Â_b ≥ fraction_b · max(Â_b)`` as bool ``(B, H, W)``. Never empty (``fraction ≤ 1``)."""
    peak = maps.flatten(1).amax(dim=1)
    return maps >= (fraction * peak)[:, None, None]


def mask_boxes(mask: Tensor, padding: float = 0.0) -> Tensor:
    """Tight box around the True pixels of each mask, padded and clipped: long ``(B, 4)`` ``(y0, x0, y1, x1)``,
    half-open (``y1``, ``x1`` exclusive). An empty mask gives the whole image."""
    batch, height, width = mask.shape
    rows, cols = mask.any(dim=2), mask.any(dim=1)  # (B, H), (B, W)

    def extent(hit: Tensor, length: int) -> tuple[Tensor, Tensor]:
        index = torch.arange(length, device=hit.device)
        first = torch.where(hit, index, length).amin(dim=1)
        last = torch.where(hit, index, -1).amax(dim=1)
        empty = last < 0
        first, last = torch.where(empty, 0, first), torch.where(empty, length - 1, last)
        pad = padding * length
        start = torch.floor(first.float() - pad).clamp_min(0).long()
        stop = torch.ceil(last.float() + 1 + pad).clamp_max(length).long()
        return start, stop

    y0, y1 = extent(rows, height)
    x0, x1 = extent(cols, width)
    return torch.stack([y0, x0, y1, x1], dim=1)


def crop_and_resize(images: Tensor, boxes: Tensor) -> Tensor:
    """Resample each image's box ``(y0, x0, y1, x1)`` (pixels, half-open) to the full image size, bilinear."""
    batch, _, height, width = images.shape
    y0, x0, y1, x1 = boxes.float().unbind(dim=1)
    # Box edges in grid_sample's normalised coordinates (align_corners=False: -1 and 1 are the outer pixel edges).
    theta = torch.zeros(batch, 2, 3, device=images.device, dtype=torch.float32)
    theta[:, 0, 0] = (x1 - x0) / width
    theta[:, 0, 2] = (x0 + x1) / width - 1
    theta[:, 1, 1] = (y1 - y0) / height
    theta[:, 1, 2] = (y0 + y1) / height - 1
    grid = F.affine_grid(theta, [batch, 1, height, width], align_corners=False)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


def _thresholds(theta: Tensor | None, theta_range, generator, images: Tensor) -> Tensor:
    if theta is not None:
        return torch.as_tensor(theta, dtype=torch.float32, device=images.device).expand(images.shape[0])
    return draw_thresholds(images.shape[0], theta_range[0], theta_range[1], generator, images.device)


def _salient(images, maps, theta, theta_range, generator) -> Tensor:
    upsampled = upsample_maps(maps, tuple(images.shape[-2:]))
    return region_mask(upsampled, _thresholds(theta, theta_range, generator, images))


# --------------------------------------------------------------------------------------- augmentations
def attention_crop(
    images: Tensor,
    maps: Tensor,
    generator: torch.Generator | None = None,
    theta: Tensor | float | None = None,
    theta_range: tuple[float, float] = (0.4, 0.6),
    padding: float = 0.1,
) -> Tensor:
    """WS-DAN attention crop: the padded box around ``Â ≥ θ``, resized to the full image size."""
    with _float32(images):
        boxes = mask_boxes(_salient(images, maps, theta, theta_range, generator), padding)
        return crop_and_resize(images, boxes).to(images.dtype)


def attention_drop(
    images: Tensor,
    maps: Tensor,
    generator: torch.Generator | None = None,
    theta: Tensor | float | None = None,
    theta_range: tuple[float, float] = (0.2, 0.5),
) -> Tensor:
    """WS-DAN attention drop: ``I · 1[Â < θ]`` (exact zeros in the salient region)."""
    with _float32(images):
        keep = ~_salient(images, maps, theta, theta_range, generator)
        return images * keep[:, None].to(images.dtype)


def attention_mixup(
    images: Tensor,
    maps: Tensor,
    generator: torch.Generator | None = None,
    theta: Tensor | float | None = None,
    theta_range: tuple[float, float] = (0.4, 0.6),
    padding: float = 0.1,
    weight: float = 0.6,
) -> Tensor:
    """MAG-SD attention mix-up: ``weight·I + (1 - weight)·crop(I)`` with the attention crop of ``I``."""
    with _float32(images):
        boxes = mask_boxes(_salient(images, maps, theta, theta_range, generator), padding)
        mixed = weight * images.float() + (1.0 - weight) * crop_and_resize(images, boxes)
        return mixed.to(images.dtype)


def attention_dim(
    images: Tensor,
    maps: Tensor,
    generator: torch.Generator | None = None,
    theta: Tensor | float | None = None,
    theta_range: tuple[float, float] = (0.2, 0.5),
    dim_scale: float = 0.001,
    keep_scale: float = 1.0,
) -> Tensor:
    """MAG-SD attention dimming: multiply the salient region ``Â ≥ θ`` by ``dim_scale`` and the rest by
    ``keep_scale`` (1: unchanged; the reference code uses 1.001)."""
    with _float32(images):
        salient = _salient(images, maps, theta, theta_range, generator)
        scale = torch.where(salient, dim_scale, keep_scale)[:, None]
        return (images.float() * scale).to(images.dtype)


def attention_patch(
    images: Tensor,
    maps: Tensor,
    generator: torch.Generator | None = None,
    theta: Tensor | float | None = None,
    theta_range: tuple[float, float] = (0.4, 0.6),
    padding: float = 0.1,
    corner: Tensor | None = None,
) -> Tensor:
    """MAG-SD attention patching: copy the padded box around ``Â ≥ θ`` and paste it, unscaled, into a copy of
    the image at a top-left corner drawn uniformly among the positions where it fits (it may overlap its
    origin). ``corner`` (long ``(B, 2)``, ``(y, x)``) fixes the corner instead, for tests."""
    with _float32(images):
        batch, channels, height, width = images.shape
        boxes = mask_boxes(_salient(images, maps, theta, theta_range, generator), padding)
        y0, x0, y1, x1 = boxes.unbind(dim=1)
        patch_h, patch_w = y1 - y0, x1 - x0
        if corner is None:
            u = _rand((batch, 2), generator, images.device)
            top = torch.floor(u[:, 0] * (height - patch_h + 1).float()).long()
            left = torch.floor(u[:, 1] * (width - patch_w + 1).float()).long()
        else:
            top, left = corner.to(images.device).long().unbind(dim=1)
        rows = torch.arange(height, device=images.device)[None, :]  # (1, H)
        cols = torch.arange(width, device=images.device)[None, :]
        inside_r = (rows >= top[:, None]) & (rows < (top + patch_h)[:, None])  # (B, H)
        inside_c = (cols >= left[:, None]) & (cols < (left + patch_w)[:, None])  # (B, W)
        src_r = (rows - top[:, None] + y0[:, None]).clamp(0, height - 1)
        src_c = (cols - left[:, None] + x0[:, None]).clamp(0, width - 1)
        b = torch.arange(batch, device=images.device)[:, None, None]
        source = images.permute(0, 2, 3, 1)[b, src_r[:, :, None], src_c[:, None, :]].permute(0, 3, 1, 2)
        inside = (inside_r[:, :, None] & inside_c[:, None, :])[:, None]
        return torch.where(inside, source, images)


def magsd_augment(
    images: Tensor, attention: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The three MAG-SD views of a batch: ``(mix-up, dimming, patching)``, each from its own sampled map.

    ``attention`` is the raw ``(B, M, h, w)`` map stack of the network; three maps per image are drawn with
    :func:`sample_attention_maps` (one each, with replacement, as in the reference).
    """
    maps = sample_attention_maps(attention, 3, generator=generator)
    return (
        attention_mixup(images, maps[:, 0], generator=generator),
        attention_dim(images, maps[:, 1], generator=generator),
        attention_patch(images, maps[:, 2], generator=generator),
    )
