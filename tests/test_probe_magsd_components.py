"""Probes of MAG-SD components the earlier tests let through (issue 14 s7, unlisted): removing or bending one of
them turns a test red.

* The ×100 logit scale: logits = 100 · W · PF with ‖PF‖ = 1 (dossier (a.3)); with the scale dropped every softmax is
  near uniform and the soft-distance target is always the smoothed one-hot.
* Every view of image b is built from image b's own attention: with two images attending to different blocks, the
  mix-up crops, the dimming dims and the patching copies each image's own block. A view built from another image's
  map (a batch index off by one) passes the closed-form test of ``test_magsd_views.py``, whose images share one map.
* ``sd_weight`` scales the soft-distance terms: the loss is CE + sd_weight · Σ SD. The other loss tests run at the
  default weight 1, where an ignored weight changes nothing.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_modules.magsd import MAGSDModule
from networks.attention_augment import magsd_augment
from networks.magsd import MAGSDNet

H = W = 40
# per image: the attended block (rows, cols) and its box padded by 0.1·40 = 4 px on each side, clipped
BLOCKS = [((14, 22), (10, 20)), ((2, 10), (26, 36))]
BOXES = [((10, 26), (6, 24)), ((0, 14), (22, 40))]


def _ramp(batch: int) -> torch.Tensor:
    """I(y, x) = 40·y + x + 1 (+ 5000 for image 1): linear, so a bilinear resize of a box is the ramp over the box."""
    y, x = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    return torch.stack([W * y + x + 1 + 5000 * b for b in range(batch)])[:, None]


def _attention() -> torch.Tensor:
    """Every one of the 3 maps of image b is the indicator of BLOCKS[b]: the region whatever the threshold or map."""
    attention = torch.zeros(2, 3, H, W)
    for b, ((r0, r1), (c0, c1)) in enumerate(BLOCKS):
        attention[b, :, r0:r1, c0:c1] = 1.0
    return attention


def test_each_view_is_built_from_its_own_images_attention():
    image = _ramp(2)
    mixup, dim, patch = magsd_augment(image, _attention(), torch.Generator().manual_seed(0))
    for b in range(2):
        (y0, y1), (x0, x1) = BOXES[b]
        # sample positions of the box resized to 40 x 40 (pixel centres), held inside the image (border padding)
        rows = (y0 + (torch.arange(H) + 0.5) * (y1 - y0) / H - 0.5).clamp(0, H - 1)
        cols = (x0 + (torch.arange(W) + 0.5) * (x1 - x0) / W - 0.5).clamp(0, W - 1)
        crop = W * rows[:, None] + cols[None, :] + 1 + 5000 * b
        torch.testing.assert_close(mixup[b, 0], 0.6 * image[b, 0] + 0.4 * crop, atol=1e-2, rtol=0,
                                   msg=f"image {b}: mix-up is not 0.6·I + 0.4·crop of its own attended box")
        (r0, r1), (c0, c1) = BLOCKS[b]
        expected = image[b].clone()
        expected[:, r0:r1, c0:c1] *= 0.001
        torch.testing.assert_close(dim[b], expected, msg=f"image {b}: dimming is not on its own attended block")
        source = image[b, 0, y0:y1, x0:x1]
        hits = [(t, l) for t in range(H - (y1 - y0) + 1) for l in range(W - (x1 - x0) + 1)
                if torch.equal(patch[b, 0, t:t + y1 - y0, l:l + x1 - x0], source)]
        assert hits, f"image {b}: the patching view holds no copy of its own padded box"


def test_logits_are_one_hundred_times_the_classifier_of_the_unit_norm_bap_feature():
    torch.manual_seed(0)
    net = MAGSDNet(num_classes=3, backbone="test_resnet", num_maps=4).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        features, attention = net.forward_features(x)
        # BAP written out (dossier (a.3)): per-map spatial mean of A_m ⊙ F, signed sqrt, L2 over all M·C entries
        a = F.interpolate(attention, size=features.shape[-2:], mode="bilinear", align_corners=False)
        pf = torch.einsum("bmhw,bchw->bmc", a, features).flatten(1) / features[0, 0].numel()
        pf = torch.sign(pf) * torch.sqrt(pf.abs() + 1e-12)
        pf = pf / pf.norm(dim=1, keepdim=True)
        torch.testing.assert_close(net(x), 100.0 * pf @ net.classifier.weight.T, atol=1e-4, rtol=1e-4)


def test_sd_weight_scales_the_soft_distance_terms():
    """Same network, batch, step and views (the augmentation seed is a function of step and batch index), so
    loss(w) = CE + w · S: loss(0) is the raw shot's cross-entropy and loss(0.5) − loss(0) = (loss(1) − loss(0)) / 2."""
    torch.manual_seed(0)
    module = MAGSDModule(MAGSDNet(num_classes=3, backbone="test_resnet", num_maps=4), augment_seed=0)
    module.log = lambda *a, **k: None  # no Trainer attached
    labels = torch.eye(3)  # 3 images, one per class
    batch = {"image": torch.rand(3, 1, 48, 48), "labels": labels, "label_mask": torch.ones(3, 3, dtype=torch.bool)}
    losses = {}
    with torch.no_grad():
        for w in (0.0, 0.5, 1.0):
            module.hparams.sd_weight = w
            losses[w] = float(module.training_step(batch, 0))
        ce = float(F.cross_entropy(module.forward_raw(batch["image"])[0], labels.argmax(1)))
    assert losses[0.0] == pytest.approx(ce, abs=1e-5)
    assert losses[1.0] - losses[0.0] > 1e-3  # the views disagree with the raw shot: S > 0
    assert losses[0.5] - losses[0.0] == pytest.approx((losses[1.0] - losses[0.0]) / 2, abs=1e-5)
