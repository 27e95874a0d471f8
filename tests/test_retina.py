"""RetinaNet from MONAI parts: dossier (g) oracles 3 and 5, the coordinate convention, matching, and learning."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from networks.retina import (BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS, DetectionSettings, RetinaNet, clip_boxes,
                             detection_losses, encode_targets, focal_loss, local_attention_map, match_anchors, smooth_l1)


def tiny(**kwargs) -> RetinaNet:
    torch.manual_seed(0)
    defaults = dict(num_classes=3, backbone="test_resnet", fpn_channels=16, head_depth=1)
    return RetinaNet(**{**defaults, **kwargs})


def fake_maps(net: RetinaNet, h: int, w: int) -> list[torch.Tensor]:
    """Stand-ins for the per-level maps: only their spatial sizes matter to the anchor generator."""
    return [torch.empty(1, 1, math.ceil(h / s), math.ceil(w / s)) for s in net.strides]


# ------------------------------------------------------------------------------------------- anchors (g.3)
def test_anchor_count_512_p2_p7():
    net = tiny()
    assert net.anchors((512, 512), fake_maps(net, 512, 512)).shape == (196_560, 4)


def test_first_anchor_size_and_centre():
    net = tiny()
    first = net.anchors((512, 512), fake_maps(net, 512, 512))[0]
    w, h = float(first[2] - first[0]), float(first[3] - first[1])
    assert w == pytest.approx(16 / math.sqrt(0.5), abs=1e-3) and w == pytest.approx(22.63, abs=5e-3)
    assert h == pytest.approx(16 * math.sqrt(0.5), abs=1e-3) and h == pytest.approx(11.31, abs=5e-3)
    assert ((first[:2] + first[2:]) / 2).tolist() == pytest.approx([2.0, 2.0])


def test_anchor_area_independent_of_ratio_and_order():
    net = tiny()
    cell = net.anchors((512, 512), fake_maps(net, 512, 512))[:9]  # first location of P2
    areas = ((cell[:, 2] - cell[:, 0]) * (cell[:, 3] - cell[:, 1])).view(3, 3)  # ratio-major, scale-minor
    for k, scale in enumerate((1.0, 2 ** (1 / 3), 2 ** (2 / 3))):
        assert areas[:, k].tolist() == pytest.approx([(16 * scale) ** 2] * 3, rel=1e-5)


def test_zero_deltas_decode_to_anchors():
    net = tiny()
    anchors = net.anchors((512, 512), fake_maps(net, 512, 512))
    decoded = net.decode(torch.zeros(2, len(anchors), 4), anchors, (512, 512))
    assert torch.allclose(decoded[1], clip_boxes(anchors, (512, 512)), atol=1e-4)


def test_x_is_column_on_a_wide_image():
    """Anchors span x in [0, W] and y in [0, H]; clipping uses (W, H) in MONAI's axis order."""
    net = tiny(fpn_levels=(3, 4, 5))
    anchors = net.anchors((64, 128), fake_maps(net, 64, 128))
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    assert float(centres[:, 0].max()) > 100 and float(centres[:, 1].max()) < 64
    # row-major order: the second location of P3 is one stride to the right (x), same row (y)
    assert (centres[9] - centres[0]).tolist() == pytest.approx([8.0, 0.0])
    clipped = clip_boxes(torch.tensor([[-5.0, -5.0, 200.0, 200.0]]), (64, 128))
    assert clipped.tolist() == [[0.0, 0.0, 128.0, 64.0]]


def test_head_starts_at_prior():
    net = tiny()
    out = net(torch.randn(2, 1, 64, 64))
    assert torch.allclose(torch.sigmoid(out["cls_logits"]), torch.tensor(0.01), atol=1e-6)
    assert torch.count_nonzero(out["box_deltas"]) == 0
    assert out["cls_logits"].shape[1] == net.anchors((64, 64), out["cls_maps"]).shape[0]


def test_levels_validated():
    with pytest.raises(ValueError, match="contiguous"):
        tiny(fpn_levels=(2, 4, 5))


# -------------------------------------------------------------------------------------- losses (g.5)
def logit(p: float) -> torch.Tensor:
    return torch.tensor([math.log(p / (1 - p))])


@pytest.mark.parametrize("p,target,expected", [(0.9, 1.0, 2.634e-4), (0.1, 0.0, 7.902e-4),
                                               (0.5, 1.0, 0.043322), (0.5, 0.0, 0.129965)])
def test_focal_values(p, target, expected):
    assert float(focal_loss(logit(p), torch.tensor([target]))) == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("x,expected", [(0.05, 0.01125), (1 / 9, 0.055556), (0.5, 0.444444)])
def test_smooth_l1_values(x, expected):
    assert float(smooth_l1(torch.tensor([x]), torch.zeros(1))) == pytest.approx(expected, abs=1e-6)


def test_matching_thresholds():
    anchors = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 20], [0, 0, 10, 23], [50, 50, 60, 60]])
    gt = torch.tensor([[0.0, 0, 10, 10]])
    # IoUs: 1.0, 0.5, 0.4348, 0
    assert match_anchors(anchors, gt).tolist() == [0, 0, BETWEEN_THRESHOLDS, BELOW_LOW_THRESHOLD]
    assert match_anchors(anchors, torch.zeros(0, 4)).tolist() == [BELOW_LOW_THRESHOLD] * 4


def test_detection_losses_per_image():
    net = tiny(fpn_levels=(3, 4, 5))
    anchors = net.anchors((64, 64), fake_maps(net, 64, 64))
    n = len(anchors)
    logits = torch.full((2, n, 3), math.log(0.01 / 0.99))
    deltas = torch.zeros(2, n, 4)
    boxes = [anchors[:1].clone(), torch.zeros(0, 4)]  # image 0: a box equal to the first anchor
    labels = [torch.tensor([2]), torch.zeros(0, dtype=torch.long)]
    matched = match_anchors(anchors, boxes[0])
    pos = (matched >= 0).nonzero().squeeze(1)
    assert 0 in pos.tolist() and len(pos) > 1
    deltas[0, pos] = encode_targets(net.box_coder, boxes[0][matched[pos]], anchors[pos])
    cls, reg = detection_losses(logits, deltas, anchors, boxes, labels, net.box_coder)
    assert float(reg[0]) == pytest.approx(0.0, abs=1e-6)  # predicted deltas equal the targets
    # image 0: positives get target 1 on class 2 only; the sum is divided by the number of positives
    targets = torch.zeros(n, 3)
    targets[pos, 2] = 1.0
    ignore = matched == BETWEEN_THRESHOLDS
    want = (focal_loss(logits[0], targets) * (~ignore)[:, None]).sum() / len(pos)
    assert float(cls[0]) == pytest.approx(float(want), rel=1e-5)
    # image 1: every anchor is a negative for every class, normaliser 1
    assert float(cls[1]) == pytest.approx(float(focal_loss(logits[1], torch.zeros(n, 3)).sum()), rel=1e-5)
    assert float(reg[1]) == 0.0
    cls_zero, _ = detection_losses(logits, deltas, anchors, boxes, labels, net.box_coder,
                                   DetectionSettings(empty_image_loss="zero"))
    assert float(cls_zero[1]) == 0.0 and float(cls_zero[0]) == pytest.approx(float(cls[0]))


@pytest.mark.parametrize("beta,per_delta", [(1 / 9, 0.5 * 0.05**2 * 9), (0.01, 0.05 - 0.01 / 2)])
def test_detection_losses_use_the_smooth_l1_beta_of_the_settings(beta, per_delta):
    """One positive anchor whose box is the anchor itself (target deltas 0) and predicted deltas 0.05: smooth-L1 is
    quadratic below β (0.5 x²/β) and linear above (|x| − β/2); regression = Σ over 4 deltas / (4 · 1 positive).
    (``smooth_l1_beta`` was once accepted and ignored: the regression always used β = 1/9.)"""
    net = tiny(fpn_levels=(3, 4, 5))
    anchors = torch.tensor([[0.0, 0.0, 32.0, 32.0]])
    _, reg = detection_losses(torch.zeros(1, 1, 3), torch.full((1, 1, 4), 0.05), anchors, [anchors.clone()],
                              [torch.tensor([0])], net.box_coder, DetectionSettings(smooth_l1_beta=beta))
    assert float(reg[0]) == pytest.approx(per_delta, rel=1e-5)


def test_detection_settings_are_the_networks_and_are_checked():
    settings = DetectionSettings(score_thresh=0.3, max_detections=7)
    assert tiny(detection=settings).detection is settings
    with pytest.raises(ValueError, match="empty_image_loss must be 'negative' or 'zero', got 'none'"):
        DetectionSettings(empty_image_loss="none")
    with pytest.raises(ValueError, match="bg_iou <= fg_iou"):
        DetectionSettings(fg_iou=0.4, bg_iou=0.5)


def test_encode_decode_roundtrip():
    net = tiny(fpn_levels=(3, 4, 5))
    anchors = torch.tensor([[10.0, 12.0, 30.0, 40.0]])
    box = torch.tensor([[14.0, 10.0, 36.0, 41.0]])
    back = net.decode(encode_targets(net.box_coder, box, anchors)[None], anchors, (64, 64))[0]
    assert torch.allclose(back, box, atol=1e-4)


# ------------------------------------------------------------------------------------- local attention
def test_level_selection_picks_the_peak_level():
    b, a, k = 1, 9, 2
    maps = [torch.full((b, a * k, s, s), -6.0) for s in (16, 8, 4, 2)]
    maps[2].view(b, a, k, 4, 4)[0, 3, 1, 1, 2] = 3.0  # class 1 peaks on the third level only
    got = local_attention_map(maps, k, (2, 2))
    level_map = torch.sigmoid(maps[2].view(b, a, k, 4, 4)).amax(dim=1)
    want = torch.nn.functional.interpolate(level_map, size=(2, 2), mode="bilinear", align_corners=True)
    assert torch.allclose(got[:, 1], want[:, 1])
    # class 0 is flat everywhere: ties go to the finest level
    finest = torch.nn.functional.interpolate(torch.sigmoid(maps[0].view(b, a, k, 16, 16)).amax(dim=1), size=(2, 2),
                                             mode="bilinear", align_corners=True)
    assert torch.allclose(got[:, 0], finest[:, 0])


# ------------------------------------------------------------------------------------------ learning
def test_overfits_one_box_and_postprocess_finds_it():
    torch.manual_seed(0)
    net = tiny(num_classes=2, fpn_levels=(3, 4, 5), anchor_size_factor=2.0)
    image = torch.zeros(1, 1, 64, 64)
    image[..., 20:36, 24:40] = 1.0  # a bright 16x16 square: x 24..40 (columns), y 20..36 (rows)
    box, label = torch.tensor([[24.0, 20.0, 40.0, 36.0]]), torch.tensor([1])
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        out = net(image)
        cls, reg = detection_losses(out["cls_logits"], out["box_deltas"], net.anchors((64, 64), out["cls_maps"]),
                                    [box], [label], net.box_coder)
        loss = cls.mean() + reg.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]
    net.eval()
    with torch.no_grad():
        det = net.postprocess(net(image), (64, 64))[0]
    assert int(det["labels"][0]) == 1
    from monai.data.box_utils import box_iou
    assert float(box_iou(det["boxes"][:1], box)) > 0.5


# ----------------------------------------------------------------------------------- module and box logger
def test_draw_boxes_colours_truth_and_predictions():
    from callbacks.box_logger import draw_boxes

    picture = np.asarray(draw_boxes(np.zeros((32, 32)), [(2, 2, 10, 10, 0)], [(15, 15, 30, 30, 0.9, 1)], ["a", "b"]))
    assert picture[2, 5].tolist() == [0, 255, 0]  # ground truth: green top edge, x = column 5, y = row 2
    assert picture[30, 20].tolist() not in ([0, 0, 0], [255, 255, 255])  # prediction: class colour, bottom edge


def test_tiny_module_trains_evaluates_and_logs_boxes(tmp_path):
    import lightning.pytorch as pl

    from callbacks.box_logger import BoxLogger
    from lightning_modules.registry import METHODS

    module, data = METHODS["retinanet"].tiny(tmp_path)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path, callbacks=[BoxLogger(num_images=2, min_score=0.0, max_boxes=3)])
    trainer.fit(module, data)
    assert {"val/map", "val/map_50", "val/map_75", "val/map_40", "val/auroc_local"} <= set(trainer.callback_metrics)
    assert len(list((tmp_path / "boxes" / "epoch_000").glob("*.png"))) == 2
    detections = module.detect(torch.zeros(2, 1, 64, 64))
    assert len(detections) == 2 and set(detections[0]) == {"boxes", "scores", "labels"}
    assert len(detections[0]["boxes"]) <= module.net.detection.max_detections
