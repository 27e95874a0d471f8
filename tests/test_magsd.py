"""MAG-SD: network (BAP, multiscale attention), soft-distance loss, module, v7labs reader.

Oracle values are from the dossier ``shared/research/method-magsd.md`` section (g).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from datamodules.manifest import DataError
from datamodules.readers.v7labs import V7LabsLabels
from lightning_modules.magsd import MAGSDModule, frozen_bn_stats, magsd_metrics
from networks.attention_augment import sample_attention_maps
from networks.magsd import (MAGSDNet, MultiScaleAttention, bilinear_attention_pool, soft_distance,
                            soft_distance_target)


def tiny_net(**kwargs) -> MAGSDNet:
    torch.manual_seed(0)
    return MAGSDNet(**{"num_classes": 4, "backbone": "test_resnet", "num_maps": 8, **kwargs})


# ---------------------------------------------------------------------------------------------- BAP
# Tolerance of ||BAP(F, A)|| = 1 in float32, n = M·C = 65536 entries, unit roundoff u = 2^-24. F.normalize divides
# by fl(||x||), whose sum of n squares PyTorch's CPU kernel accumulates in float32 in an order that depends on the
# vector width (8 or 16 lanes, or 1), so no order-specific deterministic bound applies; the order-free worst case
# (n−1)·u ≈ 4e-3 is vacuous. The probabilistic bound for any summation order (Higham & Mary, SIAM J. Sci. Comput.
# 41(5), 2019, Thm 3.1: rounding errors independent, mean zero) gives a relative error of the sum ≤ λ·sqrt(n)·u
# with probability ≥ 1 − 2n·exp(−λ²/2); λ = 7 makes the failure probability < 3e-6 per row. The square root halves
# it, each division adds ≤ u, and the check itself is done in float64 (error ~1e-16), so
#     | ||out|| − 1 | ≤ λ·sqrt(n)·u/2 + 2u = (7·256/2 + 2)·u ≈ 5.3e-5.
# (Observed over 1000 seeds: ≤ 11u in float64; the old float32 check with 1e-6 ≈ 16.8u failed ~1 seed in 200
# because it added a second float32 norm of ~the same error.) A missing or wrong normalisation is off by O(1).
BAP_NORM_TOL = 7 * math.sqrt(2048 * 32) * 2.0**-24 / 2 + 2 * 2.0**-24


def bap_norm_error(seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    f, a = torch.rand(2, 2048, 7, 7, generator=g), torch.rand(2, 32, 7, 7, generator=g)
    out = bilinear_attention_pool(f, a)
    assert out.shape == (2, 65536) and (out >= 0).all()
    return float((out.double().norm(dim=1) - 1).abs().max())


def test_bap_shape_norm_and_sign_at_full_size():  # (g.1)
    assert bap_norm_error(0) <= BAP_NORM_TOL


def test_bap_toy_is_per_map_gap_then_sqrt_and_l2():  # (g.1), (g.2)
    f, a = torch.rand(3, 16, 5, 5), torch.rand(3, 4, 5, 5)
    out = bilinear_attention_pool(f, a)
    assert out.shape == (3, 64)
    pf = torch.stack([(a[:, m:m + 1] * f).mean(dim=(2, 3)) for m in range(4)], dim=1).flatten(1)
    expected = torch.sqrt(pf + 1e-12)
    torch.testing.assert_close(out, expected / expected.norm(dim=1, keepdim=True))
    ones = bilinear_attention_pool(f, torch.ones(3, 4, 5, 5))  # A ≡ 1: every block is GAP(F)
    gap = torch.sqrt(f.mean(dim=(2, 3)))
    torch.testing.assert_close(ones.view(3, 4, 16), (gap / (2 * gap.norm(dim=1, keepdim=True)))[:, None].expand(3, 4, 16))
    uniform = bilinear_attention_pool(torch.full((1, 16, 3, 3), 2.0), torch.full((1, 4, 3, 3), 0.5))
    torch.testing.assert_close(uniform, torch.full((1, 64), 0.125))  # 1 / sqrt(M·C)


def test_bap_signed_square_root():
    f = torch.tensor([-4.0, 9.0]).view(1, 2, 1, 1)
    out = bilinear_attention_pool(f, torch.ones(1, 1, 1, 1))
    torch.testing.assert_close(out, torch.tensor([[-2.0, 3.0]]) / math.sqrt(13.0))


def test_bap_resizes_attention_and_runs_in_float32_under_autocast():
    f, a = torch.rand(2, 8, 6, 6), torch.rand(2, 3, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bilinear_attention_pool(f.bfloat16(), a.bfloat16())
    assert out.dtype == torch.float32 and out.shape == (2, 24)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------- attention module
def test_multiscale_attention_is_the_sum_of_pooled_heads():
    torch.manual_seed(0)
    att = MultiScaleAttention([4, 6, 8], num_maps=5).eval()
    f1, f2, f3 = torch.rand(2, 4, 16, 16), torch.rand(2, 6, 8, 8), torch.rand(2, 8, 4, 4)
    heads = [h(x) for h, x in zip(att.heads, (f1, f2, f3))]
    expected = F.avg_pool2d(heads[0], 4) + F.avg_pool2d(heads[1], 2) + heads[2]
    torch.testing.assert_close(att([f1, f2, f3]), expected)
    assert (att([f1, f2, f3]) >= 0).all()
    assert att.heads[0][1].eps == 1e-3 and att.heads[0][0].bias is None


@pytest.mark.parametrize("num_scales", [1, 2, 3])
def test_network_shapes_per_number_of_scales(num_scales):
    net = tiny_net(num_scales=num_scales)
    assert len(net.attention.heads) == num_scales and net.num_scales == num_scales
    x = torch.randn(2, 1, 64, 64)
    features, attention = net.forward_features(x)
    assert features.shape == (2, 96, 2, 2) and attention.shape == (2, 8, 2, 2)
    assert net(x).shape == (2, 4) and net.classifier.bias is None
    assert net.classifier.in_features == 8 * 96


def test_default_is_three_scales_and_bad_scale_count_fails():
    assert tiny_net().num_scales == 3
    with pytest.raises(ValueError, match="num_scales"):
        tiny_net(num_scales=4)


def test_resnet50_shapes_at_224():  # (g.7)
    net = MAGSDNet(num_classes=4, backbone="resnet50").eval()
    x = torch.randn(1, 1, 224, 224)
    with torch.no_grad():
        f1, f2, f3 = net.backbone(x)
        features, attention = net.forward_features(x)
        logits = net.forward_head(features, attention)
    assert f1.shape == (1, 512, 28, 28) and f2.shape == (1, 1024, 14, 14) and f3.shape == (1, 2048, 7, 7)
    assert attention.shape == (1, 32, 7, 7) and logits.shape == (1, 4)
    assert sample_attention_maps(attention, 3).shape == (1, 3, 7, 7)
    assert net.attention_maps(x).shape == (1, 1, 7, 7)


def test_pretrained_conv1_is_adapted_not_discarded(tmp_path):
    import timm

    rgb = timm.create_model("test_resnet", in_chans=3)
    torch.save(rgb.state_dict(), tmp_path / "w.pth")
    net = tiny_net(weights_file=str(tmp_path / "w.pth"))
    w = net.backbone.state_dict()["conv1.0.weight"]
    torch.testing.assert_close(w, rgb.state_dict()["conv1.0.weight"].sum(dim=1, keepdim=True))


def test_part_logits_sum_to_logits_and_attention_maps_are_in_unit_range():
    net = tiny_net().eval()
    x = torch.randn(3, 1, 64, 64)
    features, attention = net.forward_features(x)
    torch.testing.assert_close(net.part_logits(features, attention).sum(-1), net.forward_head(features, attention),
                               atol=1e-4, rtol=1e-4)
    mean = net.attention_maps(x)
    per_class = net.attention_maps(x, per_class=True)
    assert mean.shape == (3, 1, 2, 2) and per_class.shape == (3, 4, 2, 2)
    for maps in (mean, per_class):
        assert maps.min() >= 0 and maps.max() <= 1 + 1e-6
    expected = attention.mean(1, keepdim=True)
    torch.testing.assert_close(mean, expected / expected.flatten(1).amax(1).view(3, 1, 1, 1))


# -------------------------------------------------------------------------------------- soft distance
def test_soft_target_smoothing():  # (g.3)
    logits = torch.tensor([[5.0, 0.0, 0.0, 0.0]])  # wrong for y = 2
    t = soft_distance_target(logits, torch.tensor([2]))
    torch.testing.assert_close(t, torch.tensor([[0.01, 0.01, 0.96, 0.01]]))
    assert abs(float(t.sum()) - 0.99) < 1e-6
    n = soft_distance_target(logits, torch.tensor([2]), normalized=True)
    torch.testing.assert_close(n, torch.tensor([[0.01, 0.01, 0.97, 0.01]]))


def test_soft_target_keeps_confident_correct_predictions():  # (g.3)
    logits = torch.tensor([[0.0, 0.0, 4.0, 0.0], [0.0, 0.0, 0.5, 0.0]])  # right; right but 0.35 < 0.7
    q = torch.softmax(logits, 1)
    t = soft_distance_target(logits, torch.tensor([2, 2]))
    torch.testing.assert_close(t[0], q[0])
    torch.testing.assert_close(t[1], torch.tensor([0.01, 0.01, 0.96, 0.01]))


def test_soft_distance_value_zero_and_no_gradient_to_raw_logits():  # (g.4)
    q = torch.tensor([[0.96, 0.01, 0.02, 0.01]])
    p = torch.log(torch.tensor([[0.5, 0.2, 0.2, 0.1]]))
    assert abs(float(soft_distance(q, p)) - 0.23) < 1e-6
    assert float(soft_distance(q, torch.log(q))) < 1e-7
    raw = torch.randn(4, 4, requires_grad=True)
    shots = [torch.randn(4, 4, requires_grad=True) for _ in range(3)]
    target = soft_distance_target(raw, torch.tensor([0, 1, 2, 3]))
    sd = sum(soft_distance(target, s) for s in shots)
    sd.backward()
    assert raw.grad is None and all(s.grad is not None and s.grad.abs().sum() > 0 for s in shots)


# ------------------------------------------------------------------------------------------- metrics
def test_specificity_is_tn_over_tn_plus_fp():
    # Per class (TN, FP, FN): class 0 (3, 0, 1), class 1 (3, 1, 1), class 2 (4, 1, 0).
    # Specificity TN/(TN+FP) = (1 + 0.75 + 0.8)/3 = 0.85; the reference's swapped TN/(TN+FN) = (0.75 + 0.75 + 1)/3.
    target = torch.tensor([0, 0, 0, 1, 1, 2])
    pred = torch.tensor([0, 0, 1, 1, 2, 2])
    metrics = magsd_metrics(3)
    metrics.update(F.one_hot(pred, 3).float(), target)
    values = metrics.compute()
    assert abs(float(values["specificity"]) - 0.85) < 1e-6
    assert abs(float(values["recall"]) - (2 / 3 + 1 / 2 + 1) / 3) < 1e-6
    assert abs(float(values["precision"]) - (1 + 1 / 2 + 1 / 2) / 3) < 1e-6
    assert abs(float(values["accuracy"]) - 4 / 6) < 1e-6


# -------------------------------------------------------------------------------------------- module
def batch(n: int = 4, size: int = 64) -> dict:
    torch.manual_seed(1)
    labels = F.one_hot(torch.arange(n) % 4, 4).float()
    return {"image": torch.randn(n, 1, size, size), "labels": labels, "label_mask": torch.ones(n, 4, dtype=torch.bool)}


def bn_buffers(net: nn.Module) -> list[torch.Tensor]:
    return [m.running_mean.clone() for m in net.modules() if isinstance(m, nn.BatchNorm2d)]


def test_frozen_bn_stats_uses_batch_stats_but_keeps_running_stats():
    net = tiny_net().train()
    x = torch.randn(4, 1, 64, 64)
    before = bn_buffers(net)
    with frozen_bn_stats(net):
        y = net(x)
    assert all(torch.equal(a, b) for a, b in zip(before, bn_buffers(net)))
    torch.testing.assert_close(y, net(x))  # same output as a normal train-mode pass (batch statistics)
    assert not all(torch.equal(a, b) for a, b in zip(before, bn_buffers(net)))


@pytest.mark.parametrize("augmented_bn_stats", [True, False])
def test_augmented_shots_and_bn_statistics(augmented_bn_stats):
    module = MAGSDModule(tiny_net(), augmented_bn_stats=augmented_bn_stats).train()
    raw_only = copy.deepcopy(module.net)
    b = batch()
    logits, augmented = module.forward_shots(b["image"], module.step_generator(torch.device("cpu"), 0))
    raw_only(b["image"])
    assert logits.shape == (4, 4) and len(augmented) == 3 and all(p.shape == (4, 4) for p in augmented)
    same = all(torch.equal(a, c) for a, c in zip(bn_buffers(module.net), bn_buffers(raw_only)))
    assert same is (not augmented_bn_stats)


def test_training_step_loss_is_ce_plus_three_soft_distances_and_is_reproducible():
    module = MAGSDModule(tiny_net())
    module.log = lambda *a, **k: None  # no Trainer attached
    b = batch()
    state = copy.deepcopy(module.state_dict())
    loss = module.training_step(b, 0)
    module.load_state_dict(state)
    again = module.training_step(b, 0)
    assert torch.equal(loss, again)  # same seed, step and batch index -> same views
    gen = module.step_generator(torch.device("cpu"), 0)
    module.load_state_dict(state)
    logits, augmented = module.forward_shots(b["image"], gen)
    target = b["labels"].argmax(1)
    q = soft_distance_target(logits, target)
    expected = F.cross_entropy(logits, target) + sum(soft_distance(q, p) for p in augmented)
    torch.testing.assert_close(loss, expected)
    expected.backward()
    assert all(p.grad is not None for p in module.net.parameters() if p.requires_grad)


def test_evaluation_is_deterministic_and_raw_only():
    module = MAGSDModule(tiny_net()).eval()
    module.log = module.log_dict = lambda *a, **k: None
    b = batch(8)
    for _ in range(2):
        module.validation_step(b, 0)
    preds = module.val_metrics["auroc"].preds
    torch.testing.assert_close(preds[0], preds[1])
    torch.testing.assert_close(preds[0], torch.softmax(module.net(b["image"]), 1))


def test_macro_auroc_ignores_classes_without_positives():
    module = MAGSDModule(tiny_net(), class_names=["a", "b", "c", "d"])
    logged = {}
    module.log_dict = lambda d, **k: logged.update(d)
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.6, 0.2, 0.1, 0.1], [0.2, 0.6, 0.1, 0.1]])
    module.val_metrics.update(probs, torch.tensor([0, 1, 0, 1]))
    module.on_validation_epoch_end()
    assert float(logged["val/auroc_per_class/a"]) == 1.0 and float(logged["val/auroc_per_class/b"]) == 1.0
    assert math.isnan(float(logged["val/auroc_per_class/c"])) and math.isnan(float(logged["val/auroc_per_class/d"]))
    assert float(logged["val/auroc"]) == 1.0


def test_attention_maps_contract():
    net = tiny_net()
    for mode in ("mean", "class"):
        maps = MAGSDModule(net, attention_mode=mode).eval().attention_maps(torch.randn(2, 1, 64, 64))
        assert maps.shape == (2, 4, 2, 2) and maps.min() >= 0 and maps.max() <= 1 + 1e-6
    with pytest.raises(ValueError):
        MAGSDModule(net, attention_mode="max")


# The learning test (it needs the soft distance) is in tests/test_magsd_views.py.


# -------------------------------------------------------------------------------------- v7labs reader
def write_v7labs(root, rows, patients=None):
    (root / "images").mkdir(parents=True, exist_ok=True)
    for name, _ in rows:
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "images" / name, format="PNG")
    table = pd.DataFrame(rows, columns=["id", "annotations"])
    if patients is not None:
        table["pid"] = patients
    table.to_csv(root / "labels_csv.csv", index=False)


def test_v7labs_reader_keeps_the_four_classes_in_reference_order(tmp_path):
    rows = [("a.png", "COVID-19"), ("b.png", "Healthy"), ("c.png", "Viral Pneumonia"),
            ("d.png", "Bacterial Pneumonia"), ("e.png", "Fungal Pneumonia")]
    write_v7labs(tmp_path, rows)
    (tmp_path / "meta.csv").write_text("patientid,filename\n7,a.png\n7,b.png\n9,c.png\n")
    reader = V7LabsLabels(tmp_path, metadata_csv="meta.csv")
    m = reader.load()
    assert m.class_names == ["Viral Pneumonia", "Bacterial Pneumonia", "COVID-19", "Healthy"]
    assert m.task == "multiclass" and len(m) == 4 and reader.report["dropped_unmapped"] == 1
    assert m.labels.argmax(1).tolist() == [2, 3, 0, 1] and (m.labels.sum(1) == 1).all()
    assert m.records["patient_id"].tolist() == ["7", "7", "9", "img:d.png"]
    assert reader.report["own_patient"] == 1


def test_v7labs_reader_errors_name_the_row(tmp_path):
    write_v7labs(tmp_path, [("a.png", "COVID-19"), ("a.png", "Healthy")])
    with pytest.raises(DataError, match=r"row 2.*'a.png' listed twice"):
        V7LabsLabels(tmp_path).load()
    write_v7labs(tmp_path, [("a.png", "COVID-19"), ("b.png", "Normal")])
    with pytest.raises(DataError, match=r"row 2.*'Normal'"):
        V7LabsLabels(tmp_path, strict=True).load()
    assert V7LabsLabels(tmp_path, annotation_map={"Normal": "Healthy"}).load().labels.argmax(1).tolist() == [2, 3]
    with pytest.raises(DataError, match="annotations"):
        pd.DataFrame({"id": ["a.png"]}).to_csv(tmp_path / "labels_csv.csv", index=False)
        V7LabsLabels(tmp_path).load()


# ------------------------------------------------------------------------------------ configs (crossval: test_suite_presets)
CONFIGS = ["synthetic.yaml", "synthetic.yaml+resnet50.yaml", "covid_cxr.yaml", "covid_4class.yaml"]  # + = overlay


@pytest.mark.parametrize("name", CONFIGS)
def test_experiment_configs_parse_and_build(name, tmp_path):
    from pathlib import Path

    from experiments.cli import MedAttnCLI

    configs = [Path(__file__).resolve().parents[1] / "experiments" / "magsd" / n for n in name.split("+")]
    cli = MedAttnCLI(args=[*(a for c in configs for a in ("-c", str(c))), "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}",
                           "--model.init_args.net.init_args.backbone=test_resnet"], run=False)
    assert cli.model.net.num_classes in (2, 4)
    if "resnet50" not in name:
        assert isinstance(cli.model, MAGSDModule) and cli.model.net.num_scales == 3
    assert cli.datamodule.hparams.seed == 0


def test_head_lr_scale_gives_the_classifier_its_own_learning_rate():
    module = MAGSDModule(tiny_net(), head_lr_scale=0.1, optimizer=lambda p: torch.optim.SGD(p, lr=0.01),
                         scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=4))
    config = module.configure_optimizers()
    body, head = config["optimizer"].param_groups
    assert body["lr"] == 0.01 and abs(head["lr"] - 0.001) < 1e-12
    assert head["params"] == [module.net.classifier.weight]
    assert len(body["params"]) + 1 == len(list(module.parameters()))
    config["lr_scheduler"]["scheduler"].step()
    assert config["optimizer"].param_groups[1]["lr"] < 0.001  # the schedule scales both groups


def test_training_step_under_bf16_autocast_and_channels_last():
    module = MAGSDModule(tiny_net(), channels_last=True)
    module.setup("fit")  # converts the model to channels_last
    module.log = lambda *a, **k: None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module.training_step(batch(), 0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in module.net.parameters() if p.grad is not None)
