"""Attention-guided augmentations (networks/attention_augment.py): dossier method-magsd.md (a.3, a.4, g.5, g.6)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from networks.attention_augment import (
    attention_crop,
    attention_dim,
    attention_drop,
    attention_mixup,
    attention_patch,
    attention_sampling_probs,
    crop_and_resize,
    draw_thresholds,
    magsd_augment,
    mask_boxes,
    region_mask,
    sample_attention_maps,
)

H = W = 32


def ramp(batch: int = 1) -> torch.Tensor:
    """I[y, x] = x + 100·y: bilinear resampling of it is exact, so crops have closed-form values."""
    y, x = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    return (x + 100 * y).expand(batch, 1, H, W).clone()


def square_map(y0=8, y1=24, x0=8, x1=24, batch: int = 1) -> torch.Tensor:
    """A full-resolution map that is 1 on [y0, y1) × [x0, x1) and 0 elsewhere (no upsampling involved)."""
    m = torch.zeros(batch, 1, H, W)
    m[:, :, y0:y1, x0:x1] = 1.0
    return m


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------- map sampling
def test_sampling_probabilities_are_sqrt_of_mass():  # dossier (g.5)
    attention = torch.tensor([4.0, 1.0, 0.0, 9.0]).view(1, 4, 1, 1)
    probs = attention_sampling_probs(attention)[0]
    torch.testing.assert_close(probs[[0, 1, 3]], torch.tensor([1 / 3, 1 / 6, 1 / 2]), atol=1e-6, rtol=0)
    assert 1e-7 < probs[2] < 3e-7  # 1e-6 / 6.000001


def test_sampled_maps_follow_the_distribution_and_are_reproducible():
    attention = torch.tensor([4.0, 1.0, 0.0, 9.0]).view(1, 4, 1, 1).expand(4000, 4, 1, 1).clone()
    a = sample_attention_maps(attention, 3, generator=gen(1))
    b = sample_attention_maps(attention, 3, generator=gen(1))
    assert a.shape == (4000, 3, 1, 1)
    assert torch.equal(a, b)
    freq = torch.stack([(a == v).float().mean() for v in (4.0, 1.0, 0.0, 9.0)])
    torch.testing.assert_close(freq, torch.tensor([1 / 3, 1 / 6, 0.0, 1 / 2]), atol=0.02, rtol=0)
    assert not torch.equal(a, sample_attention_maps(attention, 3, generator=gen(2)))


def test_sampled_maps_belong_to_their_own_image_and_are_detached():
    attention = torch.rand(5, 6, 3, 3, requires_grad=True)
    maps = sample_attention_maps(attention, 2, generator=gen())
    assert not maps.requires_grad
    for b in range(5):
        for k in range(2):
            assert any(torch.equal(maps[b, k], attention[b, m].detach()) for m in range(6))


def test_thresholds_lie_in_range():
    u = draw_thresholds(1000, 0.4, 0.6, gen(), torch.device("cpu"))
    assert u.dtype == torch.float32 and u.min() >= 0.4 and u.max() < 0.6 and u.std() > 0.04


# ------------------------------------------------------------------------------------------- regions
def test_mask_boxes_are_tight_padded_and_clipped():
    mask = torch.zeros(3, H, W, dtype=torch.bool)
    mask[0, 8:24, 10:12] = True
    mask[1, 0:2, 30:32] = True
    # mask[2] empty -> whole image
    boxes = mask_boxes(mask, padding=0.0)
    assert boxes.tolist() == [[8, 10, 24, 12], [0, 30, 2, 32], [0, 0, H, W]]
    padded = mask_boxes(mask, padding=0.1)  # 3.2 px each side, outward rounding, clipped
    assert padded.tolist() == [[4, 6, 28, 16], [0, 26, 6, 32], [0, 0, H, W]]


def test_region_mask_threshold_is_relative_to_each_maps_max():
    maps = torch.stack([torch.linspace(0, 1, 10), torch.linspace(0, 10, 10)])[:, None, :]  # (2, 1, 10)
    mask = region_mask(maps, torch.tensor([0.5, 0.5]))
    assert torch.equal(mask[0], mask[1]) and mask[0].sum() == 5


# --------------------------------------------------------------------------------------- augmentations
def test_crop_and_resize_matches_the_closed_form_on_a_ramp():
    out = crop_and_resize(ramp(), torch.tensor([[8, 8, 24, 24]]))
    # Output pixel j samples x = 8 + (j + 0.5)·16/32 - 0.5 = 7.75 + 0.5·j (align_corners=False).
    grid = 7.75 + 0.5 * torch.arange(32.0)
    torch.testing.assert_close(out[0, 0], grid[None, :] + 100 * grid[:, None], atol=1e-3, rtol=0)
    # Inside the crop it equals resizing the cropped array with F.interpolate (the reference's operation).
    ref = F.interpolate(ramp()[..., 8:24, 8:24], size=(H, W), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], atol=1e-3, rtol=0)


def test_mixup_formula():  # 0.6·I + 0.4·crop(I)
    images = ramp(2)
    maps = torch.cat([square_map(), square_map(0, 16, 16, 32)])
    out = attention_mixup(images, maps, theta=0.5, padding=0.0)
    boxes = torch.tensor([[8, 8, 24, 24], [0, 16, 16, 32]])
    expected = 0.6 * images + 0.4 * crop_and_resize(images, boxes)
    torch.testing.assert_close(out, expected)
    grid = 7.75 + 0.5 * torch.arange(32.0)
    torch.testing.assert_close(out[0, 0], 0.6 * images[0, 0] + 0.4 * (grid[None, :] + 100 * grid[:, None]),
                               atol=1e-3, rtol=0)


def test_mixup_and_patch_are_identity_when_the_region_is_the_whole_image():  # dossier (g.6)
    images = torch.randn(3, 2, H, W)
    maps = torch.rand(3, 7, 7) + 1.0  # every pixel ≥ θ = 0
    torch.testing.assert_close(attention_mixup(images, maps, theta=0.0), images, atol=1e-5, rtol=0)
    torch.testing.assert_close(attention_crop(images, maps, theta=0.0), images, atol=1e-5, rtol=0)
    assert torch.equal(attention_patch(images, maps, generator=gen(), theta=0.0), images)
    zero = torch.zeros(3, 7, 7)  # all-zero attention: θ = 0 -> whole image (reference behaviour)
    torch.testing.assert_close(attention_mixup(images, zero, generator=gen()), images, atol=1e-5, rtol=0)


def test_dimming_acts_only_inside_the_thresholded_region():
    images = torch.randn(2, 3, H, W)
    maps = square_map(batch=2)
    maps[1] *= 5.0
    out = attention_dim(images, maps, theta=0.5)
    inside = maps.expand_as(images) > 0
    torch.testing.assert_close(out[inside], images[inside] * 0.001)
    assert torch.equal(out[~inside], images[~inside])  # outside: bit-identical
    ref = attention_dim(images, maps, theta=0.5, keep_scale=1.001)  # the reference's I·(keep + 0.001)
    torch.testing.assert_close(ref[~inside], images[~inside] * 1.001)
    zero = attention_dim(images, torch.zeros(2, 1, 4, 4), theta=0.3)  # all-zero map: whole image dimmed
    torch.testing.assert_close(zero, images * 0.001)


def test_random_dimming_threshold_is_within_its_range():
    images = torch.ones(64, 1, H, W)
    maps = torch.linspace(0, 1, W).expand(64, 1, H, W)  # column x has value x / 31
    out = attention_dim(images, maps, generator=gen(3))
    first_dimmed = (out[:, 0, 0] < 0.5).float().argmax(dim=1).float() / (W - 1)  # ≈ θ / max
    assert first_dimmed.min() >= 0.2 - 1 / 31 and first_dimmed.max() <= 0.5 + 1 / 31
    assert first_dimmed.std() > 0  # drawn per image


def test_drop_zeroes_exactly_the_region():
    images = torch.randn(2, 1, H, W)
    maps = square_map(batch=2)
    out = attention_drop(images, maps, theta=0.5)
    inside = maps > 0
    assert torch.all(out[inside] == 0) and torch.equal(out[~inside], images[~inside])


def test_patching_preserves_patch_content_at_a_given_corner():
    images = torch.randn(2, 2, H, W)
    maps = torch.cat([square_map(8, 16, 4, 10), square_map(20, 32, 20, 32)])
    corner = torch.tensor([[0, 20], [3, 1]])
    out = attention_patch(images, maps, theta=0.5, padding=0.0, corner=corner)
    for b, ((y0, y1, x0, x1), (ty, tx)) in enumerate(zip([(8, 16, 4, 10), (20, 32, 20, 32)], corner.tolist())):
        h, w = y1 - y0, x1 - x0
        assert torch.equal(out[b, :, ty:ty + h, tx:tx + w], images[b, :, y0:y1, x0:x1])
        outside = torch.ones(H, W, dtype=torch.bool)
        outside[ty:ty + h, tx:tx + w] = False
        assert torch.equal(out[b][:, outside], images[b][:, outside])


def test_random_patching_pastes_the_patch_somewhere_it_fits():
    images = torch.randn(4, 1, H, W)
    maps = square_map(4, 12, 6, 11, batch=4)
    out = attention_patch(images, maps, generator=gen(5), theta=0.5, padding=0.0)
    patch = images[:, :, 4:12, 6:11]
    corners = set()
    for b in range(4):
        hits = [(ty, tx) for ty in range(H - 8 + 1) for tx in range(W - 5 + 1)
                if torch.equal(out[b, :, ty:ty + 8, tx:tx + 5], patch[b])]
        changed = (out[b] != images[b]).any(dim=0)
        # Exactly one placement explains every changed pixel: the patch sits there and nothing else moved.
        explained = []
        for ty, tx in hits:
            outside = changed.clone()
            outside[ty:ty + 8, tx:tx + 5] = False
            if not outside.any():
                explained.append((ty, tx))
        assert len(explained) >= 1, "patch content not found, or pixels changed outside it"
        corners.add(explained[0])
    assert len(corners) > 1  # positions are drawn per image


def test_batched_equals_per_image():
    images, maps = torch.randn(4, 1, H, W), torch.rand(4, 1, 5, 5)
    theta = torch.tensor([0.4, 0.5, 0.55, 0.6])
    for fn in (attention_mixup, attention_dim, attention_crop, attention_drop):
        batched = fn(images, maps, theta=theta)
        single = torch.cat([fn(images[i:i + 1], maps[i:i + 1], theta=theta[i:i + 1]) for i in range(4)])
        torch.testing.assert_close(batched, single)


def test_same_seed_same_views_and_bf16_autocast():
    images, attention = torch.randn(3, 1, 48, 48), torch.rand(3, 8, 3, 3)
    a = magsd_augment(images, attention, gen(7))
    b = magsd_augment(images, attention, gen(7))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert any(not torch.equal(x, y) for x, y in zip(a, magsd_augment(images, attention, gen(8))))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        c = magsd_augment(images, attention.bfloat16(), gen(7))
    for x, y in zip(a, c):
        assert y.dtype == torch.float32 and y.shape == x.shape
        assert torch.isfinite(y).all()
    bf = magsd_augment(images.bfloat16(), attention, gen(7))
    assert all(x.dtype == torch.bfloat16 for x in bf)


@pytest.mark.parametrize("size", [(224, 224), (50, 70)])
def test_views_keep_the_image_shape(size):
    images, attention = torch.randn(2, 1, *size), torch.rand(2, 32, 7, 7)
    for view in magsd_augment(images, attention, gen()):
        assert view.shape == images.shape


def test_attention_crop_is_crop_and_resize_of_the_padded_box():
    images = ramp(2)
    maps = torch.cat([square_map(), square_map(0, 16, 16, 32)])
    out = attention_crop(images, maps, theta=0.5, padding=0.1)
    boxes = torch.tensor([[4, 4, 28, 28], [0, 12, 20, 32]])  # ±3.2 px, outward rounding, clipped
    torch.testing.assert_close(out, crop_and_resize(images, boxes))
