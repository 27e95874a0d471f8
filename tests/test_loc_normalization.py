"""One normalisation rule for the threshold sweeps (issue 14 s1), PixelAP's valid mask (s7): hand-made cases.

Choe et al. (CVPR 2020) min-max normalise every score map before MaxBoxAccV2 and PxAP sweep their thresholds;
the raw-map sweeps are logged as ``*_raw``. Every expected value below is worked out by hand in the comments.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_modules.cam_baseline import CAMClassifierModule
from lightning_modules.metrics import MaxBoxAccV2, PixelAP, localization_metrics
from lightning_modules.pcam import PCAMModule
from lightning_modules.weak_localization import update_localization

pytestmark = [pytest.mark.filterwarnings("ignore:.*was called before the ``update`` method"),
              pytest.mark.filterwarnings("ignore:.*self.log.*")]

GT = [torch.tensor([[8.0, 8.0, 24.0, 24.0]]), torch.tensor([[40.0, 40.0, 56.0, 56.0]])]


def two_peaks() -> torch.Tensor:
    """(2, 1, 64, 64) raw maps with different peaks.

    Image 0: ring 0.155 on [0, 32)², core 0.305 on its GT box. Raw: τ ∈ [0.155, 0.305) gives exactly the box
    (IoU 1); below, the ring's box [0, 32)² has IoU 256/1024 = 0.25, a miss at every δ. Normalised (÷ 0.305)
    the ring is 0.508, so the box is found for τ ∈ [0.51, 0.99].
    Image 1: 0.455 on its GT box with a 2×2 spot of 0.905. Raw: τ < 0.455 gives the box; above it only the
    spot (IoU 4/256). Normalised (÷ 0.905) the box is 0.503: found for τ ∈ [0, 0.50].
    Raw: one τ (0.16 … 0.30) serves both images, MaxBoxAccV2 1.0. Normalised: the ranges are disjoint,
    every τ finds one image of two, MaxBoxAccV2 0.5 (first best τ: 0).
    """
    hm = torch.zeros(2, 1, 64, 64)
    hm[0, 0, 0:32, 0:32] = 0.155
    hm[0, 0, 8:24, 8:24] = 0.305
    hm[1, 0, 40:56, 40:56] = 0.455
    hm[1, 0, 47:49, 47:49] = 0.905
    return hm


def test_maxboxacc_normalized_vs_raw_hand_case():
    labels = [torch.tensor([0]), torch.tensor([0])]
    norm, raw = MaxBoxAccV2(1), MaxBoxAccV2(1, normalize=False)
    norm.update(two_peaks(), GT, labels)
    raw.update(two_peaks(), GT, labels)
    n, r = norm.compute(), raw.compute()
    for d in ("0.3", "0.5", "0.7"):
        assert float(n[f"maxboxacc@{d}"]) == 0.5 and float(n[f"threshold@{d}"]) == 0.0
        assert float(r[f"maxboxacc_raw@{d}"]) == 1.0 and float(r[f"threshold_raw@{d}"]) == pytest.approx(0.16)
    assert float(n["maxboxacc_v2"]) == 0.5 and float(r["maxboxacc_v2_raw"]) == 1.0
    assert float(n["maxboxacc_v2/0"]) == 0.5 and float(r["maxboxacc_v2_raw/0"]) == 1.0
    taus = torch.tensor(norm.cam_thresholds)
    expected = ((taus <= 0.5).float() + (taus >= 0.51).float()) / 2  # image 1 below 0.503, image 0 from 0.508
    torch.testing.assert_close(norm.hits[0, :, 0] / 2, expected)
    assert "maxboxacc_v2_raw" not in n and "maxboxacc_v2" not in r


def test_normalization_uses_the_valid_region_and_zeroes_constant_maps():
    from lightning_modules.metrics import normalize_heatmaps

    hm = torch.tensor([[[[0.2, 0.4, 0.0], [0.3, 0.9, 0.0]]], [[[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]]]])
    region = torch.tensor([[[True, True, False], [True, False, False]]] * 2)
    out = normalize_heatmaps(hm, region)
    # image 0: min 0.2, max 0.4 over the region (0.9 and the zero padding lie outside it)
    torch.testing.assert_close(out[0, 0], torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.0]]))
    assert out[1].eq(0).all()  # constant on its region: no foreground at any τ ≥ 0
    torch.testing.assert_close(normalize_heatmaps(hm[:1]), torch.tensor([[[[2 / 9, 4 / 9, 0], [1 / 3, 1, 0]]]]))


def pxap_case() -> tuple[torch.Tensor, torch.Tensor]:
    """Two 1×4 maps, lesion = first pixel. Raw scores: image 0 [0.405, 0.105, 0, 0], image 1 [0.905, 0.605, 0, 0].
    Raw, pooled: 0.905 (lesion), 0.605 (not), 0.405 (lesion): AP = ½·1 + ½·⅔ = 5/6.
    Normalised: both lesion pixels score 1, every other pixel less: AP = 1."""
    hm = torch.tensor([[[[0.405, 0.105, 0.0, 0.0]]], [[[0.905, 0.605, 0.0, 0.0]]]])
    mask = torch.tensor([[[[1.0, 0.0, 0.0, 0.0]]]] * 2)
    return hm, mask


def test_pxap_normalized_vs_raw_hand_case():
    hm, mask = pxap_case()
    norm, raw = PixelAP(), PixelAP(normalize=False)
    norm.update(hm, mask)
    raw.update(hm, mask)
    assert float(norm.compute()) == pytest.approx(1.0, abs=1e-6)
    assert float(raw.compute()) == pytest.approx(5 / 6, abs=1e-6)


def valid_case() -> tuple[torch.Tensor, torch.Tensor]:
    """Image 1 has no real mask (its all-zero mask is a placeholder); its map peaks off that mask."""
    hm = torch.tensor([[[[0.8, 0.2, 0.0, 0.0]]], [[[0.0, 0.0, 0.9, 0.9]]]])
    mask = torch.tensor([[[[1.0, 0.0, 0.0, 0.0]]], [[[0.0, 0.0, 0.0, 0.0]]]])
    return hm, mask


def test_pxap_honours_valid():
    """With valid: image 0 only, [1, 0.25, 0, 0] normalised ([0.8, 0.2, 0, 0] raw) vs lesion [1, 0, 0, 0]:
    AP 1. Without: image 1's two negatives score at least as high as the lesion (1 vs 1 normalised, 0.9 vs 0.8
    raw), so whenever the lesion is predicted they are too: precision ⅓ at recall 1, AP = 1/3 either way.
    Valid as (B,) and as (B, K) alike."""
    hm, mask = valid_case()
    for valid in (torch.tensor([True, False]), torch.tensor([[True], [False]])):
        m = PixelAP()
        m.update(hm, mask, valid=valid)
        assert float(m.compute()) == pytest.approx(1.0, abs=1e-6)
    m = PixelAP()
    m.update(hm, mask)
    assert float(m.compute()) == pytest.approx(1 / 3, abs=1e-6)
    m = PixelAP()  # valid False for every map: nothing scored, NaN (never a silent 0 or 1)
    m.update(hm, mask, valid=torch.tensor([False, False]))
    assert torch.isnan(m.compute())


def test_pxap_scores_only_the_region_and_images_with_a_class():
    hm, mask = valid_case()
    m = PixelAP()  # the same, but the last two columns are letterbox padding: not scored
    m.update(hm, mask, region=torch.tensor([[[True, True, False, False]]] * 2))
    assert float(m.compute()) == pytest.approx(1.0, abs=1e-6)
    m = PixelAP()  # class-agnostic form: image 1 has no positive class, so it is skipped like valid=False
    m.update(hm, mask, classes=torch.tensor([[True], [False]]))
    assert float(m.compute()) == pytest.approx(1.0, abs=1e-6)


def test_pxap_normalizes_each_class_before_the_max():
    """Lesion = pixel 0; class 0 map [0.2, 0, 0.1, 0], class 1 map [0, 0.9, 0, 0.3], both classes positive.
    Each class normalised, then the max: [1, 1, 0.5, 0.33]; at τ = 1 the lesion ties with one negative: AP ½.
    The max of the raw maps, [0.2, 0.9, 0.1, 0.3], ranks two negatives above the lesion: AP ⅓ (the raw reading,
    and what normalising after the max would give)."""
    hm = torch.tensor([[[[0.2, 0.0, 0.1, 0.0]], [[0.0, 0.9, 0.0, 0.3]]]])  # (1, 2, 1, 4)
    mask = torch.tensor([[[[1.0, 0.0, 0.0, 0.0]]]])
    both = torch.tensor([[True, True]])
    m = PixelAP()
    m.update(hm, mask, classes=torch.tensor([[True, False]]))  # only class 0 positive: its map alone, AP 1
    assert float(m.compute()) == pytest.approx(1.0, abs=1e-6)
    m = PixelAP()
    m.update(hm, mask, classes=both)
    assert float(m.compute()) == pytest.approx(0.5, abs=1e-6)
    m = PixelAP(normalize=False)
    m.update(hm, mask, classes=both)
    assert float(m.compute()) == pytest.approx(1 / 3, abs=1e-6)


def box_batch(hm: torch.Tensor) -> dict:
    k = hm.shape[1]
    return {"image": torch.zeros(2, 1, 64, 64), "labels": torch.ones(2, k), "label_mask": torch.ones(2, k, dtype=torch.bool),
            "boxes": GT, "box_labels": [torch.tensor([0]), torch.tensor([0])], "has_boxes": torch.tensor([True, True]),
            "stream": torch.zeros(2, dtype=torch.long), "image_id": ["a", "b"], "patient_id": ["a", "b"]}


class _PCAMStub(nn.Module):
    """Returns fixed heatmaps: the PCAM module path with maps known by hand."""

    num_classes = 2  # the AUROC of both modules needs two classes; class 1 has no box and an all-zero map

    def __init__(self, maps: torch.Tensor) -> None:
        super().__init__()
        self.maps = torch.cat([maps, torch.zeros_like(maps)], 1)

    def forward_with_maps(self, x):
        return torch.zeros(len(x), 2), self.maps

    def forward(self, x):
        return torch.zeros(len(x), 2)

    def maps_to_heatmaps(self, s):
        return s


class _CAMStub(_PCAMStub):
    def forward_features(self, x):
        return x

    def forward_head(self, f):
        return torch.zeros(len(f), 2)

    def maps_from_features(self, f):
        return self.maps


def test_pcam_and_cam_baseline_share_the_normalization():
    hm = two_peaks()
    outs = []
    names = ["x", "y"]
    for module in (PCAMModule(_PCAMStub(hm), class_names=names), CAMClassifierModule(_CAMStub(hm), class_names=names)):
        module.test_step(box_batch(module.net.maps), 0)
        outs.append({k: float(v) for k, v in module.test_localization.compute().items() if not v.isnan()})
    assert outs[0] == outs[1]
    out = outs[0]
    assert out["test/loc/maxboxacc_v2"] == 0.5 and out["test/loc/maxboxacc_v2_raw"] == 1.0
    assert out["test/loc/maxboxacc_v2/x"] == 0.5 and out["test/loc/maxboxacc_v2_raw/x"] == 1.0
    assert out["test/loc/threshold_raw@0.5"] == pytest.approx(0.16)
    # the fixed-threshold protocol reads the raw map at 0.5: image 0 has nothing above it, image 1 only its spot
    assert out["test/loc/iou@0.1"] == 0.0 and out["test/loc/iobb@0.9"] == 0.5


def test_update_localization_normalizes_over_the_letterbox_region():
    """The letterbox padding (right half, zero) must not enter the min: a map 0.5 on the left half except a
    0.9 square on the GT box normalises to 0 / 1, so the box is found at every τ; taking the min over the
    padding (0) would leave 0.5/0.9 = 0.56 on the left half and lose the box for τ < 0.56."""
    hm = torch.zeros(1, 1, 64, 64)
    hm[0, 0, :, :32] = 0.5
    hm[0, 0, 8:24, 8:24] = 0.9
    col = localization_metrics(1, prefix="loc/")
    batch = box_batch(hm)
    batch = {k: v[:1] for k, v in batch.items()}
    batch["frame"] = torch.tensor([[64.0, 32.0, 1.0]])  # 64×32 image, padded to 64×64 on the right
    update_localization(col, batch, hm)
    m = col["maxboxacc"]
    assert m.hits[:, :, 0].eq(1).all()  # every δ, every τ
    assert float(col.compute()["loc/maxboxacc_v2_raw"]) == 1.0
