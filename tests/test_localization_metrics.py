"""Weak-localisation metrics on hand-made heatmaps and boxes with known answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_modules.metrics import (
    LocalizationAccuracy, MaxBoxAccV2, PixelAP, PointingGame, box_iobb, box_iou, heatmap_to_boxes,
    localization_metrics,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*was called before the ``update`` method")


def blob(h: int, w: int, *boxes: tuple[int, int, int, int], value: float = 1.0) -> torch.Tensor:
    """(H, W) map with ``value`` inside each xyxy pixel box."""
    m = torch.zeros(h, w)
    for x0, y0, x1, y1 in boxes:
        m[y0:y1, x0:x1] = value
    return m


def T(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


def L(*labels) -> torch.Tensor:
    return torch.tensor(labels, dtype=torch.long)


# --------------------------------------------------------------------------------- boxes and overlap
def test_heatmap_to_boxes_components_and_pixel_convention():
    m = blob(20, 30, (2, 3, 6, 5), (10, 10, 12, 15))
    m[15, 12] = 1  # touches (14, 11) diagonally: same 8-connected component
    boxes = heatmap_to_boxes(m, 0.5)
    assert sorted(map(tuple, boxes.tolist())) == [(2.0, 3.0, 6.0, 5.0), (10.0, 10.0, 13.0, 16.0)]
    assert heatmap_to_boxes(torch.zeros(5, 5), 0.0).shape == (0, 4)  # strict '>': empty map, no box
    assert heatmap_to_boxes(np.full((4, 6), 0.5), 0.5).shape == (0, 4)
    assert heatmap_to_boxes(np.full((4, 6), 0.5), 0.49).tolist() == [[0, 0, 6, 4]]


def test_iou_and_iobb_values():
    a, b = np.array([[0, 0, 10, 10]]), np.array([[5, 5, 15, 15]])
    assert box_iou(a, b)[0, 0] == pytest.approx(25 / 175)
    assert box_iobb(a, b)[0, 0] == pytest.approx(25 / 100)
    inner, outer = np.array([[2, 2, 4, 4]]), np.array([[0, 0, 10, 10]])
    assert box_iou(inner, outer)[0, 0] == pytest.approx(0.04)
    assert box_iobb(inner, outer)[0, 0] == pytest.approx(1.0)
    assert box_iobb(outer, inner)[0, 0] == pytest.approx(0.04)
    assert box_iou(a, np.array([[20, 20, 30, 30]]))[0, 0] == 0.0
    assert box_iou(np.zeros((0, 4)), b).shape == (0, 1)


# ---------------------------------------------------------------------------- ChestX-ray14 protocol
def make_two_class_case():
    hm = torch.zeros(3, 2, 64, 64)
    hm[0, 0] = blob(64, 64, (8, 8, 24, 16))  # upper half of GT 0: IoU 0.5, IoBB 1
    hm[0, 1] = blob(64, 64, (48, 48, 64, 64))  # shifted by 8 px: IoU 64/448, IoBB 0.25
    hm[2, 0] = blob(64, 64, (0, 0, 64, 64), value=0.4)  # below the 0.5 threshold: no box at all
    boxes = [T([8, 8, 24, 24], [40, 40, 56, 56]), T(), T([8, 8, 24, 24])]
    labels = [L(0, 1), L(), L(0)]
    return hm, boxes, labels


def test_localization_accuracy_known_answers():
    m = LocalizationAccuracy(2, cam_threshold=0.5, class_names=["a", "b"])
    m.update(*make_two_class_case())
    out = m.compute()
    # class a: 2 boxes, one with IoU 0.5 / IoBB 1, one missed; class b: IoU 1/7, IoBB 0.25
    assert out["iou@0.1/a"] == pytest.approx(0.5) and out["iou@0.1/b"] == pytest.approx(1.0)
    assert out["iou@0.4/a"] == pytest.approx(0.5) and out["iou@0.4/b"] == 0
    assert out["iou@0.5/a"] == 0  # strict '>' at IoU exactly 0.5
    assert out["iou@0.1"] == pytest.approx(0.75) and out["iou@0.3"] == pytest.approx(0.25)
    assert out["iobb@0.1"] == pytest.approx(0.75)
    assert out["iobb@0.25"] == pytest.approx(0.25)  # IoBB exactly 0.25 is not > 0.25
    assert out["iobb@0.9"] == pytest.approx(0.25)
    assert set(k for k in out if "/" not in k) == {f"iou@{t:g}" for t in m.iou_thresholds} | {
        f"iobb@{t:g}" for t in m.iobb_thresholds}


def test_localization_accuracy_threshold_and_perfect_map():
    hm = blob(32, 32, (4, 4, 12, 20), value=0.7).reshape(1, 1, 32, 32)
    for thr, expected in ((0.5, 1.0), (0.7, 0.0)):
        m = LocalizationAccuracy(1, cam_threshold=thr)
        m.update(hm, [T([4, 4, 12, 20])], [L(0)])
        assert m.compute()["iou@0.7"] == pytest.approx(expected)


def test_classes_without_boxes_are_left_out_of_the_mean():
    m = LocalizationAccuracy(3, class_names=["a", "b", "c"])
    hm = torch.zeros(1, 3, 16, 16)
    hm[0, 1] = blob(16, 16, (2, 2, 8, 8))
    m.update(hm, [T([2, 2, 8, 8])], [L(1)])
    out = m.compute()
    assert out["iou@0.7"] == 1.0 and "iou@0.7/a" not in out and out["iou@0.7/b"] == 1.0


def test_input_validation():
    m = LocalizationAccuracy(2)
    with pytest.raises(ValueError, match=r"\(B, 2, H, W\)"):
        m.update(torch.zeros(1, 3, 8, 8), [T([0, 0, 1, 1])], [L(0)])
    with pytest.raises(ValueError, match="out of range"):
        m.update(torch.zeros(1, 2, 8, 8), [T([0, 0, 1, 1])], [L(2)])
    with pytest.raises(ValueError, match="length B"):
        m.update(torch.zeros(2, 2, 8, 8), [T([0, 0, 1, 1])], [L(0)])


# ----------------------------------------------------------------------------------- MaxBoxAccV2
def test_maxboxacc_perfect_and_empty_maps():
    gt = [T([10, 20, 30, 40])]
    perfect = blob(64, 64, (10, 20, 30, 40)).reshape(1, 1, 64, 64)
    m = MaxBoxAccV2(1)
    m.update(perfect, gt, [L(0)])
    out = m.compute()
    assert out["maxboxacc_v2"] == 1.0 and all(out[f"maxboxacc@{d}"] == 1.0 for d in (0.3, 0.5, 0.7))
    m = MaxBoxAccV2(1)
    m.update(torch.zeros(1, 1, 64, 64), gt, [L(0)])
    assert m.compute()["maxboxacc_v2"] == 0.0


def test_maxboxacc_partial_overlap_and_best_threshold():
    half = blob(64, 64, (8, 8, 24, 16)).reshape(1, 1, 64, 64)  # IoU 0.5 with its GT
    m = MaxBoxAccV2(1)
    m.update(half, [T([8, 8, 24, 24])], [L(0)])
    out = m.compute()
    assert out["maxboxacc@0.3"] == 1 and out["maxboxacc@0.5"] == 1 and out["maxboxacc@0.7"] == 0
    assert out["maxboxacc_v2"] == pytest.approx(2 / 3)
    # core 0.8 on the GT, ring 0.3 around it: on the raw map only thresholds in [0.3, 0.8) recover the box;
    # min-max normalised (÷ 0.8) the ring is 0.375 and the core 1, so thresholds in [0.375, 1) do
    ring = blob(64, 64, (20, 20, 40, 40), value=0.3)
    ring[26:34, 26:34] = 0.8
    for normalize, key, lo, hi in ((False, "threshold_raw@0.7", 0.3, 0.8), (True, "threshold@0.7", 0.375, 1.0)):
        m = MaxBoxAccV2(1, normalize=normalize)
        m.update(ring.reshape(1, 1, 64, 64), [T([26, 26, 34, 34])], [L(0)])
        out = m.compute()
        assert out[f"maxboxacc_v2{m.key_suffix}"] == 1.0 and out[key] == pytest.approx(round(lo + 0.004, 2))
        curve = m.hits[2, :, 0]
        taus = torch.tensor(m.cam_thresholds)
        assert torch.equal(curve.bool(), (taus >= lo) & (taus < hi))


def test_maxboxacc_uses_every_component_and_pools_pairs():
    hm = blob(64, 64, (0, 0, 40, 30), (50, 50, 58, 58)).reshape(1, 1, 64, 64)  # big spurious + right small
    m = MaxBoxAccV2(2, class_names=["a", "b"])
    hm2 = torch.cat([hm, torch.zeros(1, 1, 64, 64)], 1)
    m.update(hm2, [T([50, 50, 58, 58], [4, 4, 8, 8])], [L(0, 1)])
    out = m.compute()
    assert out["maxboxacc_v2/a"] == 1.0 and out["maxboxacc_v2/b"] == 0.0
    assert out["maxboxacc_v2"] == pytest.approx(0.5)  # 2 (image, class) pairs, one correct


# ----------------------------------------------------------------------------------- pointing game
def test_pointing_game():
    hm = torch.zeros(4, 1, 32, 32)
    hm[0, 0, 10, 10] = 1  # inside [8, 8, 16, 16]
    hm[1, 0, 2, 2] = 1  # far outside
    hm[2, 0, 10, 20] = 1  # centre (20.5, 10.5): 4.5 px right of the box
    boxes = [T([8, 8, 16, 16])] * 4
    m = PointingGame(1)
    m.update(hm, boxes, [L(0)] * 4)  # image 3: all-zero map points nowhere
    assert m.compute()["pointing"] == pytest.approx(0.25)
    m = PointingGame(1, tolerance=5)
    m.update(hm, boxes, [L(0)] * 4)
    assert m.compute()["pointing"] == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------ PxAP
def test_pixel_ap():
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, 4:8, 4:12] = 1
    m = PixelAP()
    m.update(mask.clone(), mask)
    assert m.compute() == pytest.approx(1.0)
    m = PixelAP()
    m.update(torch.full_like(mask, 0.5), mask)  # uninformative map: AP = prevalence
    assert m.compute() == pytest.approx(mask.mean().item(), abs=1e-6)
    m = PixelAP()
    m.update(1 - mask, mask)
    assert m.compute() < 0.2
    m = PixelAP()  # the second map has no real mask: excluded
    m.update(torch.stack([mask[0], torch.rand(1, 16, 16)]), torch.stack([mask[0], torch.zeros(1, 16, 16)]),
             valid=torch.tensor([True, False]))
    assert m.compute() == pytest.approx(1.0)
    assert torch.isnan(PixelAP().compute())


# --------------------------------------------------------------------------- collection and merging
def test_collection_takes_keywords_and_flattens():
    hm, boxes, labels = make_two_class_case()
    col = localization_metrics(2, class_names=["a", "b"], prefix="test/loc_")
    col.update(heatmaps=hm, boxes=boxes, box_labels=labels)
    col.update(heatmaps=hm[:, :1], masks=(hm[:, :1] > 0.5).float())
    out = col.compute()
    for key in ("iou@0.3", "iobb@0.5", "maxboxacc_v2", "maxboxacc@0.5", "pointing", "pointing/a", "pxap"):
        assert f"test/loc_{key}" in out, key
    assert out["test/loc_iou@0.3"] == pytest.approx(0.25)


def test_states_are_sums_so_shards_merge_exactly():
    hm, boxes, labels = make_two_class_case()
    for cls in (lambda: LocalizationAccuracy(2), lambda: MaxBoxAccV2(2), lambda: PointingGame(2)):
        whole, a, b = cls(), cls(), cls()
        whole.update(hm, boxes, labels)
        a.update(hm[:1], boxes[:1], labels[:1])
        b.update(hm[1:], boxes[1:], labels[1:])
        a.merge_state(b)
        for key, value in whole.compute().items():
            torch.testing.assert_close(a.compute()[key], value, equal_nan=True)


def _ddp_worker(rank: int, world: int, init_file: str, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    hm, boxes, labels = make_two_class_case()
    m = localization_metrics(2, pixel_ap=False)
    idx = [0] if rank == 0 else [1, 2]
    m.update(heatmaps=hm[idx], boxes=[boxes[i] for i in idx], box_labels=[labels[i] for i in idx])
    out = {k: float(v) for k, v in m.compute().items()}
    queue.put((rank, out))
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_sync_matches_single_process(tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    init = str(tmp_path / "pg")
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, init, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
    single = localization_metrics(2, pixel_ap=False)
    hm, boxes, labels = make_two_class_case()
    single.update(heatmaps=hm, boxes=boxes, box_labels=labels)
    expected = {k: float(v) for k, v in single.compute().items()}
    assert results[0] == pytest.approx(expected, nan_ok=True) and results[1] == results[0]
