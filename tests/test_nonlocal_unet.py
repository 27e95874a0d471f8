"""Non-local U-Net network, sliding-window inference, metrics and a short learning run."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_modules.nonlocal_unet import NonLocalUNetModule, PerClassMean, surface_distances
from networks.global_aggregation import GlobalAggregation
from networks.nonlocal_unet import NonLocalUNet
from nonlocal_fixtures import WindowRecorder


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------------- network
def test_reference_parameter_count_and_its_parts():
    net = NonLocalUNet(3, in_channels=2, num_classes=4, filters=32)
    assert _count(net) == 1_760_452  # method-nonlocal.md (a.3), recomputed from the reference code
    parts = {  # the dossier's per-part table
        "stem": 1_728, "input_block": 56_448, "down1": 168_128, "down2": 672_128, "bottom": 256 + 66_048,
        "dec1": 221_440, "up2": 55_296, "dec2": 55_424,
    }
    for name, expected in parts.items():
        assert _count(getattr(net, name)) == expected, name
    assert _count(net.up1.pre) == 256 and _count(net.up1.deconv) == 221_184 and _count(net.up1.ga) == 241_920
    assert _count(net.head_act) + _count(net.head) == 64 + 132
    assert _count(NonLocalUNet(2, in_channels=2, num_classes=4)) == 653_380
    # the plain baseline drops the bottom block (BN + GA) and GA_up, nothing else
    plain = NonLocalUNet(3, in_channels=2, num_classes=4, global_aggregation=False)
    assert _count(plain) == 1_760_452 - 66_304 - 241_920 == 1_452_228
    assert not any(isinstance(m, GlobalAggregation) for m in plain.modules())
    heads = [m.num_heads for m in net.modules() if isinstance(m, GlobalAggregation)]
    assert heads == [2, 1]


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_shapes_and_batch_independence(spatial_dims):
    net = NonLocalUNet(spatial_dims, in_channels=2, num_classes=3, filters=4).eval()
    x = torch.randn(3, 2, *(16,) * spatial_dims)
    with torch.no_grad():
        y = net(x)
        assert y.shape == (3, 3, *(16,) * spatial_dims)
        assert net.forward_features(x).shape == (3, 4, *(16,) * spatial_dims)
        x2 = x.clone()
        x2[1] = torch.randn_like(x[1])
        assert torch.equal(net(x2)[0], y[0])
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.randn(1, 2, *(18,) * spatial_dims))


def test_activation_and_norm_are_swappable():
    relu = NonLocalUNet(2, 1, 2, filters=4, act_layer=nn.ReLU)
    assert not any(isinstance(m, nn.ReLU6) for m in relu.modules())
    assert sum(isinstance(m, nn.ReLU) for m in relu.modules()) == 13
    default = NonLocalUNet(2, 1, 2, filters=4)
    assert sum(isinstance(m, nn.ReLU6) for m in default.modules()) == 13
    bns = [m for m in NonLocalUNet(2, 1, 2, filters=4, bn_momentum=0.003).modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.momentum == 0.003 for m in bns)
    gn = NonLocalUNet(2, 1, 2, filters=4, norm_layer=lambda dims, c: nn.GroupNorm(2, c))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in gn.modules())


# ---------------------------------------------------------------------------------------- inference
class _Probe(WindowRecorder):
    """Records the first coordinate of every window and predicts class 1."""

    def logits(self, x):
        return torch.stack([x[:, 0] * 0, x[:, 0] * 0 + (x[:, 0] % 3)], 1)  # varies per voxel


def test_sliding_window_matches_reference_stride_and_averages_probabilities():
    probe = _Probe()
    module = NonLocalUNetModule(probe, roi_size=(32, 8, 8), overlap=0.75, window_zscore=False, sw_batch_size=16)
    image = torch.arange(100, dtype=torch.float32).view(1, 1, 100, 1, 1).expand(1, 1, 100, 8, 8).contiguous()
    probs = module.predict_probs(image)
    # stride 8 = 32 * (1 - 0.75); starts 0, 8, ..., 64 and the extra window flush with the end (68)
    assert sorted(set(probe.starts)) == [0, 8, 16, 24, 32, 40, 48, 56, 64, 68]
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 100, 8, 8))
    # averaging softmax of identical per-voxel logits gives that softmax
    expected = torch.softmax(torch.stack([image[:, 0] * 0, image[:, 0] % 3], 1), 1)
    torch.testing.assert_close(probs, expected)


def test_window_zscore_is_applied_per_window():
    seen = []

    class Net(nn.Module):
        num_classes = 2

        def forward(self, x):
            seen.append(x)
            return torch.zeros(x.shape[0], 2, *x.shape[2:])

    module = NonLocalUNetModule(Net(), roi_size=8, overlap=0.5)
    module.predict_probs(torch.rand(1, 2, 16, 16, 16) * 100 + 50)
    windows = torch.cat(seen)
    torch.testing.assert_close(windows.mean(dim=(2, 3, 4)), torch.zeros(windows.shape[:2]), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------- metrics
def test_surface_distance_oracles():
    target = torch.zeros(1, 9, 9, dtype=torch.long)
    target[0, 0, 0] = target[0, 0, 4] = 1  # two separate voxels of class 1
    pred = torch.zeros_like(target)
    pred[0, 0, 0] = 1
    hd, mhd = surface_distances(pred, target, num_classes=3)
    # directed means: pred->target 0, target->pred (0 + 4) / 2 = 2 -> MHD 2 (the Hausdorff distance would be 4)
    assert mhd[0, 0].item() == pytest.approx(2.0)
    assert hd[0, 0].item() == pytest.approx(0.95 * 4)  # 95th percentile of {0, 4}, linear interpolation
    assert math.isnan(mhd[0, 1].item())  # class 2 absent from both maps: skipped
    hd, mhd = surface_distances(pred, target, 2, spacing=[(1.0, 2.5)])  # along axis 1: 4 voxels * 2.5 mm
    assert mhd[0, 0].item() == pytest.approx(5.0)
    empty = torch.zeros_like(target)
    hd, mhd = surface_distances(empty, target, 2)
    assert mhd[0, 0].item() == pytest.approx(math.hypot(9, 9))  # missing prediction: the image diagonal
    metric = PerClassMean(2)
    metric.update(torch.tensor([[1.0, float("nan")], [3.0, 4.0]]))
    torch.testing.assert_close(metric.compute(), torch.tensor([2.0, 4.0]))


def test_dice_oracles_exclude_background():
    module = NonLocalUNetModule(NonLocalUNet(2, 1, 3, filters=4), class_names=["bg", "a", "b"], roi_size=None)
    t = torch.zeros(1, 8, 8, dtype=torch.long)
    t[0, :4] = 1
    t[0, 4:6] = 2
    module.val_metrics.dice.update(t, t)
    torch.testing.assert_close(module.val_metrics.dice.compute(), torch.tensor([1.0, 1.0]))
    module.val_metrics.dice.reset()
    disjoint = torch.zeros_like(t)
    disjoint[0, 6:] = 1  # class 1 where truth is background, class 2 missing
    module.val_metrics.dice.update(disjoint, t)
    torch.testing.assert_close(module.val_metrics.dice.compute(), torch.tensor([0.0, 0.0]))


def test_loss_choices_and_kernel_only_weight_decay():
    net = NonLocalUNet(2, 1, 3, filters=4)
    logits, target = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 1, 8, 8))
    ce = NonLocalUNetModule(net, loss="ce").compute_loss(logits, target)
    torch.testing.assert_close(ce, nn.functional.cross_entropy(logits, target[:, 0]))
    dicece = NonLocalUNetModule(net, loss="dicece").compute_loss(logits, target)
    assert dicece > ce  # Dice term added (Dice loss > 0 for random logits)
    with pytest.raises(ValueError, match="loss must be"):
        NonLocalUNetModule(net, loss="focal")
    opt = NonLocalUNetModule(net, kernel_weight_decay=2e-6).configure_optimizers()
    decayed, free = opt.param_groups
    assert decayed["weight_decay"] == 2e-6 and free["weight_decay"] == 0.0
    assert all(p.dim() > 1 for p in decayed["params"]) and all(p.dim() == 1 for p in free["params"])
    assert len(decayed["params"]) + len(free["params"]) == len(list(net.parameters()))


# ------------------------------------------------------------------------------------------ learning
@pytest.mark.slow  # about 6-10 s on 2 cores
def test_learns_tiny_synthetic_volumes(tmp_path):
    """30 steps on 16^3 patches of 24^3 synthetic volumes take the held-out Dice from chance to > 0.7."""
    from datamodules.volume_segmentation import VolumeSegmentationDataModule
    from datamodules.synthetic_volumes import SyntheticVolumes

    pl.seed_everything(0)
    reader = SyntheticVolumes(cache_dir=tmp_path, num_subjects=3, shape=(24, 24, 24))
    data = VolumeSegmentationDataModule(reader, patch_size=16, batch_size=4, patches_per_epoch=4 * 30)
    net = NonLocalUNet(3, 2, 4, filters=8, attn_drop=0.0, drop=0.0)
    module = NonLocalUNetModule(net, class_names=list(reader.class_names), roi_size=16, overlap=0.5,
                                distance_metrics=False, optimizer=lambda p: torch.optim.Adam(p, lr=3e-3))
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    before = trainer.validate(module, data, verbose=False)[0]["val/dice"]
    trainer.fit(module, data)
    after = float(trainer.callback_metrics["val/dice"])
    assert before < 0.4 and after > 0.7, (before, after)


def test_registered_tiny_fits_validates_and_tests(tmp_path):
    from lightning_modules import METHODS

    spec = METHODS["nonlocal_unet"]
    assert "1812.04103" in spec.paper
    module, data = spec.tiny(tmp_path)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=tmp_path)
    trainer.fit(module, data)
    assert any(not torch.equal(p, before[n]) for n, p in module.named_parameters())
    assert {"train/loss", "val/loss", "val/dice", "val/dice_GM", "val/hd95", "val/mhd"} <= set(trainer.callback_metrics)
    results = trainer.test(module, data, verbose=False)[0]
    assert {"test/dice", "test/dice_WM", "test/hd95_CSF", "test/mhd"} <= set(results)
    assert module.class_names == data.class_names
    # predict: one whole-volume segmentation per test subject, equal to the argmax of the averaged softmax
    predictions = trainer.predict(module, data)
    item = data.datasets["test"][0]
    assert len(predictions) == len(data.datasets["test"])
    first = predictions[0]
    assert first["subject_id"] == [item["subject_id"]]
    assert first["segmentation"].dtype == torch.uint8
    assert first["segmentation"].shape == item["label_map"].shape  # (1, D, H, W): batch of one volume
    assert torch.equal(first["box"][0], item["box"])
    module.eval()
    expected = module.predict_probs(item["image"][None]).argmax(dim=1)
    assert torch.equal(first["segmentation"].long(), expected)
    # behaviour, not keys: the logged test Dice is the hand-computed 2|P & G| / (|P| + |G|) of the predicted
    # segmentation of the (only) test subject, per foreground class, and the mean over the classes present
    pred, truth = first["segmentation"][0].long(), item["label_map"][0]
    hand = {}
    for k, name in enumerate(data.class_names[1:], start=1):
        p, g = pred == k, truth == k
        if p.any() or g.any():
            hand[name] = 2.0 * float((p & g).sum()) / float(p.sum() + g.sum())
            assert results[f"test/dice_{name}"] == pytest.approx(hand[name], abs=1e-5), name
    assert results["test/dice"] == pytest.approx(sum(hand.values()) / len(hand), abs=1e-5)
    torch.testing.assert_close(first["probs"].sum(1), torch.ones_like(first["probs"][:, 0]))
    # the checkpoint-selection subject is not the test subject
    assert {v.subject_id for v in data.datasets["val"].volumes}.isdisjoint(
        v.subject_id for v in data.datasets["test"].volumes)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_channels_last_gives_the_same_probabilities(spatial_dims):
    import copy

    torch.manual_seed(0)
    net = NonLocalUNet(spatial_dims, 1, 3, filters=4).eval()
    plain = NonLocalUNetModule(copy.deepcopy(net), roi_size=16, overlap=0.5)
    fast = NonLocalUNetModule(copy.deepcopy(net), roi_size=16, overlap=0.5, channels_last=True)
    fast.setup("fit")
    fmt = torch.channels_last_3d if spatial_dims == 3 else torch.channels_last
    assert fast.net.stem.weight.is_contiguous(memory_format=fmt)
    x = torch.randn(1, 1, *(24,) * spatial_dims)
    torch.testing.assert_close(fast.predict_probs(x), plain.predict_probs(x), atol=1e-5, rtol=0)
