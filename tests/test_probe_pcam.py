"""Probes of PCAMModule's evaluation (issue 14 s7): the validation loss is the per-image mean of the *unweighted*
BCE over the whole epoch, not the mean of per-batch means and not the training loss's batch-weighted BCE."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_modules.pcam import PCAMModule


def _bce(z: float, y: float) -> float:
    """Plain BCE-with-logits by hand: ln(1 + e^-z) for y = 1, ln(1 + e^z) for y = 0."""
    return math.log1p(math.exp(-z)) if y == 1 else math.log1p(math.exp(z))


class _FixedLogitNet(nn.Module):
    """Logit map = the image itself (2 channels = 2 classes), so each image's logits are the channel means, chosen
    by the test. No parameters: the loss depends on the data only."""

    num_classes = 2

    def forward_with_maps(self, x):
        return x.mean((2, 3)), x

    def forward(self, x):
        return self.forward_with_maps(x)[0]

    def maps_to_heatmaps(self, s):
        return torch.sigmoid(s)


# Five images, evaluated in batches of 3 and 2 (unequal on purpose). Logits (z0, z1) and labels (y0, y1):
LOGITS = [(2.0, -1.0), (0.0, 0.0), (-1.0, 1.0), (3.0, 2.0), (0.0, -2.0)]
LABELS = [(1, 0), (0, 1), (0, 0), (1, 1), (0, 1)]


def _dataset() -> list[dict]:
    return [{"image": torch.tensor(z).view(2, 1, 1).expand(2, 2, 2).clone(), "labels": torch.tensor(y, dtype=torch.float32),
             "label_mask": torch.ones(2, dtype=torch.bool)} for z, y in zip(LOGITS, LABELS)]


def test_validation_loss_is_the_per_image_mean_over_the_epoch():
    # Oracle: per image, the unweighted BCE summed over the 2 tasks (PCAM's task_reduction="sum"); the epoch value is
    # the mean over the 5 images:
    #   img0: ln(1+e^-2) + ln(1+e^-1) = 0.126928 + 0.313262 = 0.440190
    #   img1: ln 2 + ln 2                                      = 1.386294
    #   img2: ln(1+e^-1) + ln(1+e^1)  = 0.313262 + 1.313262 = 1.626523
    #   img3: ln(1+e^-3) + ln(1+e^-2) = 0.048587 + 0.126928 = 0.175515
    #   img4: ln 2 + ln(1+e^2)        = 0.693147 + 2.126928 = 2.820075
    #   per-image mean = 6.448598 / 5 = 1.289720
    # The wrong readings: mean of the two batch means = (3.453008/3 + 2.995590/2) / 2 = 1.324399; and the training
    # loss's batch weighting (pos_weight (N−P)/P per task and batch) gives yet another value (task 1 of batch 2 is all
    # positive, so its weight is 0).
    per_image = [sum(_bce(z, y) for z, y in zip(zs, ys)) for zs, ys in zip(LOGITS, LABELS)]
    oracle = sum(per_image) / len(per_image)
    assert abs(oracle - 1.289720) < 1e-5
    batch_means = (sum(per_image[:3]) / 3 + sum(per_image[3:]) / 2) / 2
    assert abs(oracle - batch_means) > 0.03  # the two readings are far apart on this data

    module = PCAMModule(_FixedLogitNet(), class_names=["a", "b"])
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    loader = torch.utils.data.DataLoader(_dataset(), batch_size=3, shuffle=False)
    result = trainer.validate(module, dataloaders=loader, verbose=False)[0]
    assert abs(result["val/loss"] - oracle) < 1e-5, (result["val/loss"], oracle)



# Unknown labels (CheXpert U-Ignore, label_mask False): the same five images, some labels hidden, so that the batches
# hold different numbers of known labels per task.
MASK = [(True, False), (True, True), (False, True), (True, True), (False, False)]


def _validate(batch_size: int, mask=MASK) -> float:
    data = _dataset()
    for item, m in zip(data, mask):
        item["label_mask"] = torch.tensor(m)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    return trainer.validate(PCAMModule(_FixedLogitNet(), class_names=["a", "b"]), dataloaders=loader,
                            verbose=False)[0]["val/loss"]


def test_validation_loss_with_unknown_labels_is_the_per_label_mean_whatever_the_batch_size():
    # "Unweighted masked BCE" over the epoch: per task, the mean over every image whose label is known; summed over
    # the tasks (as the training loss). Task 0 known for images 0, 1, 3; task 1 for images 1, 2, 3:
    #   task 0: (ln(1+e^-2) + ln 2 + ln(1+e^-3)) / 3 = (0.126928 + 0.693147 + 0.048587) / 3 = 0.289554
    #   task 1: (ln 2 + ln(1+e^1) + ln(1+e^-2)) / 3 = (0.693147 + 1.313262 + 0.126928) / 3 = 0.711112
    #   val/loss = 1.000666, for batches of 3 + 2, 5, or 2 + 2 + 1. (Weighting the per-batch masked means by each
    #   batch's image count, Lightning's batch_size weighting, gives 0.918151 for 3 + 2 and 0.748747 for 2 + 2 + 1.)
    per_task = []
    for k in range(2):
        known = [i for i in range(5) if MASK[i][k]]
        per_task.append(sum(_bce(LOGITS[i][k], LABELS[i][k]) for i in known) / len(known))
    oracle = sum(per_task)
    assert abs(oracle - 1.000666) < 1e-5
    for batch_size in (3, 5, 2):
        assert abs(_validate(batch_size) - oracle) < 1e-5, batch_size


def test_pcam_pooled_logit_by_hand():
    """Shared-classifier identity with an independent oracle (replaces reading the weights from pcam_weights):
    2 channels, 2 positions, 2 heads (float64).
      x at position 0: (ln 3, 2); at position 1: (0, −1).
      head 0: w = (1, 0), b = 0 -> s = (ln 3, 0), σ(s) = (3/4, 1/2), ω = σ/Σσ = (0.6, 0.4),
              f = 0.6·x0 + 0.4·x1 = (0.6 ln 3, 0.8), z = w·f + b = 0.6 ln 3 = 0.659167.
      head 1: w = (0, 1), b = 1 -> s = (3, 0), ω = (σ(3), 1/2)/(σ(3) + 1/2), z = 3 σ(3)/(σ(3) + 1/2) = 1.967350.
    Average pooling would give z0 = ln 3 / 2 = 0.549306, softmax weights 0.75 ln 3 = 0.823959."""
    from networks.cam_heads import CAMHeads

    heads = CAMHeads(2, 2, "pcam").double()
    with torch.no_grad():
        heads.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        heads.bias.copy_(torch.tensor([0.0, 1.0]))
    x = torch.tensor([[math.log(3), 0.0], [2.0, -1.0]], dtype=torch.float64).view(1, 2, 1, 2)
    z, s = heads(x)
    torch.testing.assert_close(s, torch.tensor([[[[math.log(3), 0.0]], [[3.0, 0.0]]]], dtype=torch.float64))
    sig3 = 1 / (1 + math.exp(-3))
    assert z[0, 0].item() == pytest.approx(0.6 * math.log(3), abs=1e-12)
    assert z[0, 1].item() == pytest.approx(3 * sig3 / (sig3 + 0.5), abs=1e-12)
    assert z[0, 1].item() == pytest.approx(1.967350, abs=1e-6)


def test_pcam_pooled_logit_is_the_sigmoid_weighted_mean_of_the_cam():
    """Random case, oracle written from the definition ω_i = σ(s_i) / Σ_j σ(s_j) (not the project's pcam_weights)."""
    from networks.cam_heads import CAMHeads

    torch.manual_seed(0)
    heads = CAMHeads(16, 4, "pcam").double()
    torch.nn.init.normal_(heads.weight, std=0.5)
    torch.nn.init.normal_(heads.bias, std=0.5)
    x = torch.rand(3, 16, 6, 7, dtype=torch.float64)
    z, s = heads(x)
    manual_s = torch.einsum("kc,bchw->bkhw", heads.weight, x) + heads.bias[None, :, None, None]
    torch.testing.assert_close(s, manual_s)
    sig = 1 / (1 + torch.exp(-manual_s))
    omega = sig / sig.sum((2, 3), keepdim=True)
    torch.testing.assert_close(z, (omega * manual_s).sum((2, 3)), atol=1e-10, rtol=0)
    assert not torch.allclose(z, manual_s.mean((2, 3)), atol=1e-3)  # not plain average pooling
