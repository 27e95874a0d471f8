"""Non-local U-Net segmentation: patch training, sliding-window inference, Dice / HD95 / modified Hausdorff.

Z. Wang, N. Zou, D. Shen, S. Ji, "Non-local U-Nets for Biomedical Image Segmentation", AAAI 2020
(arXiv:1812.04103). The network (``networks.nonlocal_unet.NonLocalUNet``, or any segmentation net mapping
(B, C, *S) to (B, K, *S) logits with a ``num_classes`` attribute) is injected.

Recipe (reference code, ``method-nonlocal.md`` (b)-(c)):
  * loss: mean softmax cross-entropy over all voxels (``loss="ce"``, the reference) or MONAI ``DiceCELoss``
    (``loss="dicece"``); logits are cast to float32 first, so ``precision="bf16-mixed"`` is safe;
  * L2 on conv/linear *kernels only* (``kernel_weight_decay``, reference 2e-6 * ||W||^2 / 2 added to the
    loss): kernels go into an optimiser parameter group with ``weight_decay=kernel_weight_decay`` (coupled L2 in
    Adam, as TF's added loss term), biases and norm parameters into one with 0. Default optimiser Adam, lr 1e-3;
  * inference: MONAI ``SlidingWindowInferer`` with ``overlap=0.75``, which for 32^3 windows is the reference's
    stride 8, including its extra window flush with the far edge (starts 0, 8, ..., L-32). Softmax
    probabilities are averaged over the windows covering a voxel (``mode="constant"``). Each window is
    z-scored per channel before the network, exactly as training patches are. ``roi_size=None`` runs the whole
    image at once (2D X-rays);
  * metrics per foreground class: Dice (torchmetrics ``DiceScore``), HD95 (MONAI) and the modified Hausdorff
    distance of Dubuisson & Jain (ICPR 1994), MHD = max(mean_{a in A} d(a, B), mean_{b in B} d(b, A)) over the
    two *surfaces*, from MONAI's directed average surface distances, in physical units (``spacing``).
    Choice: the reference's ``MHD_3D`` (line-vector MHD, commented out there as too slow) is not reproduced.
    A class absent from both prediction and truth is skipped; absent from exactly one, its distance is the
    image diagonal (a bounded penalty instead of MONAI's nan/inf).

Logged keys: ``train/loss``, ``val/loss`` (NLL of the averaged probabilities), ``val/dice`` (mean over the
foreground classes), ``val/dice_<class>``, ``val/hd95``, ``val/mhd`` (and per class), likewise ``test/...``.

Example:
    >>> from networks.nonlocal_unet import NonLocalUNet
    >>> module = NonLocalUNetModule(NonLocalUNet(3, in_channels=2, num_classes=4, filters=8), roi_size=16)
    >>> module.predict_probs(torch.randn(1, 2, 20, 20, 20)).shape
    torch.Size([1, 4, 20, 20, 20])
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from monai.inferers import SlidingWindowInferer
from monai.losses import DiceCELoss
from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance
from torch import nn
from torchmetrics import Metric
from torchmetrics.segmentation import DiceScore

from datamodules.segmentation import zscore
from lightning_modules.base import MedAttnModule
from lightning_modules.registry import register_method
from lightning_modules.stage_metrics import for_stages, log_stage_metrics

__all__ = ["NonLocalUNetModule", "surface_distances", "PerClassMean", "SegmentationMetrics"]

PAPER = "Wang, Zou, Shen, Ji. Non-local U-Nets for Biomedical Image Segmentation. AAAI 2020 (arXiv:1812.04103)"


def adam(params) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-3)


def surface_distances(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                      spacing: Sequence[Sequence[float]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """HD95 and modified Hausdorff distance per sample and foreground class.

    Args:
        pred, target: int class maps (B, *S).
        spacing: per sample voxel spacing (len B), or None for unit spacing.

    Returns:
        (hd95, mhd), each float (B, num_classes - 1); nan where the class is absent from both maps, the image
        diagonal where it is absent from exactly one.
    """
    b, dims = pred.shape[0], pred.dim() - 1
    hd = torch.full((b, num_classes - 1), float("nan"))
    mhd = hd.clone()
    for i in range(b):
        sp = [float(s) for s in spacing[i]] if spacing is not None else [1.0] * dims
        diagonal = math.sqrt(sum((n * s) ** 2 for n, s in zip(pred.shape[1:], sp)))
        for c in range(1, num_classes):
            p = (pred[i] == c)[None, None].float()
            t = (target[i] == c)[None, None].float()
            has_p, has_t = bool(p.any()), bool(t.any())
            if not (has_p or has_t):
                continue
            if has_p != has_t:
                hd[i, c - 1] = mhd[i, c - 1] = diagonal
                continue
            with warnings.catch_warnings():  # MONAI's own use of a deprecated argument
                warnings.simplefilter("ignore", FutureWarning)
                hd[i, c - 1] = compute_hausdorff_distance(p, t, percentile=95, spacing=sp).item()
                forward = compute_average_surface_distance(p, t, symmetric=False, spacing=sp).item()
                backward = compute_average_surface_distance(t, p, symmetric=False, spacing=sp).item()
            mhd[i, c - 1] = max(forward, backward)
    return hd, mhd



def _show_progress() -> bool:
    """A per-volume tqdm bar over the sliding windows (a full-resolution volume takes minutes on a CPU), only on a
    terminal and never under pytest."""
    return sys.stderr.isatty() and "PYTEST_CURRENT_TEST" not in os.environ


class PerClassMean(Metric):
    """Mean over samples of a per-class value, ignoring non-finite entries (DDP: sums and counts all-reduce)."""

    full_state_update = False

    def __init__(self, num_values: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.zeros(num_values, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(num_values, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: torch.Tensor) -> None:
        values = values.to(self.total.device, torch.float64)
        finite = torch.isfinite(values)
        self.total += torch.where(finite, values, torch.zeros_like(values)).sum(0)
        self.count += finite.sum(0)

    def compute(self) -> torch.Tensor:
        return (self.total / self.count).float()  # nan for a class never seen


class SegmentationMetrics(nn.Module):
    """One stage's segmentation metrics over the foreground classes: Dice and, with ``distance_metrics``, HD95 and
    MHD (:func:`surface_distances`). ``compute()`` gives the mean over the classes (``dice``, ``hd95``, ``mhd``,
    NaN-skipping) and each class (``dice_<class>``...); ``class_names`` lists every class, background first."""

    def __init__(self, class_names: Sequence[str], distance_metrics: bool = True) -> None:
        super().__init__()
        k = len(class_names)
        self.class_names, self.distance_metrics = list(class_names), distance_metrics
        self.dice = DiceScore(k, include_background=False, average="none", input_format="index")
        self.hd95, self.mhd = PerClassMean(k - 1), PerClassMean(k - 1)

    def update(self, pred: torch.Tensor, target: torch.Tensor, spacing: torch.Tensor | None = None) -> None:
        """``pred``, ``target``: int class maps (B, *S); ``spacing``: (B, dims) voxel spacing, or None."""
        self.dice.update(pred, target)
        if self.distance_metrics:
            hd, mhd = surface_distances(pred.cpu(), target.cpu(), len(self.class_names),
                                        spacing.tolist() if spacing is not None else None)
            self.hd95.update(hd)
            self.mhd.update(mhd)

    def _members(self) -> dict[str, Metric]:
        return {"dice": self.dice, **({"hd95": self.hd95, "mhd": self.mhd} if self.distance_metrics else {})}

    def compute(self) -> dict[str, torch.Tensor]:
        out = {}
        for key, metric in self._members().items():
            values = metric.compute().float().reshape(-1)
            out[key] = values.nanmean()
            for name, value in zip(self.class_names[1:], values):
                out[f"{key}_{name}"] = value
        return out

    def reset(self) -> None:
        for metric in self._members().values():
            metric.reset()


class NonLocalUNetModule(MedAttnModule):
    """Supervised segmentation with sliding-window evaluation (Non-local U-Net recipe).

    Args:
        net: segmentation network with ``num_classes`` (``NonLocalUNet``).
        loss: ``"ce"`` (reference) or ``"dicece"`` (MONAI DiceCE, softmax, background included).
        class_names: K names, background first (default ``class0..``); used in log keys.
        roi_size: sliding-window size (int or per axis); None = whole-image inference.
        overlap: window overlap fraction; 0.75 = stride 8 for 32^3 windows (the reference). Used for test.
        val_overlap: overlap during validation (default ``overlap``); 0.5 makes the periodic validation of a
            training run about 5x cheaper (stride 16) while test keeps the reference stride.
        sw_batch_size: windows per network call.
        window_zscore: z-score each window per channel before the network (matches the training patches).
        kernel_weight_decay: L2 on kernels only (see the module docstring); None = one group, optimiser default.
        distance_metrics: compute HD95 and MHD (CPU distance transforms; turn off for fast validation).
        optimizer, scheduler, channels_last: see ``MedAttnModule``.
    """

    not_hyperparameters = ("net", "optimizer", "scheduler")

    def __init__(
        self,
        net: nn.Module,
        loss: str = "ce",
        class_names: list[str] | None = None,
        roi_size: int | Sequence[int] | None = 32,
        overlap: float = 0.75,
        val_overlap: float | None = None,
        sw_batch_size: int = 4,
        window_zscore: bool = True,
        kernel_weight_decay: float | None = 2e-6,
        distance_metrics: bool = True,
        optimizer: OptimizerCallable = adam,
        scheduler: LRSchedulerCallable | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__(optimizer=optimizer, scheduler=scheduler, channels_last=channels_last)
        self.net = net
        k = int(net.num_classes)
        self.num_classes = k
        self.class_names = list(class_names) if class_names is not None else [f"class{i}" for i in range(k)]
        if len(self.class_names) != k:
            raise ValueError(f"class_names has {len(self.class_names)} names but the network has {k} classes")
        if loss not in ("ce", "dicece"):
            raise ValueError(f"loss must be 'ce' or 'dicece', got {loss!r}")
        self.loss_name = loss
        self.dice_ce = DiceCELoss(to_onehot_y=True, softmax=True) if loss == "dicece" else None
        self.window_zscore, self.distance_metrics = window_zscore, distance_metrics
        self.kernel_weight_decay = kernel_weight_decay
        self.inferers: dict[str, SlidingWindowInferer] = {}
        if roi_size is not None:
            for stage, ov in (("test", overlap), ("val", overlap if val_overlap is None else val_overlap)):
                self.inferers[stage] = SlidingWindowInferer(roi_size=roi_size, sw_batch_size=sw_batch_size,
                                                            overlap=ov, mode="constant", progress=_show_progress())
        self.val_metrics, self.test_metrics = for_stages(
            lambda stage: SegmentationMetrics(self.class_names, distance_metrics), "val", "test")

    # ------------------------------------------------------------------------------------------ model
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image)

    def _window_probs(self, windows: torch.Tensor) -> torch.Tensor:
        if self.window_zscore:
            windows = zscore(windows, channel_dim=1)
        return torch.softmax(self.net(self.prepare_image(windows)).float(), dim=1)

    @torch.no_grad()
    def predict_probs(self, image: torch.Tensor, stage: str = "test") -> torch.Tensor:
        """Class probabilities (B, K, *S): softmax averaged over overlapping windows (or one whole-image pass).

        ``stage="val"`` uses ``val_overlap``."""
        if not self.inferers:
            return self._window_probs(image)
        return self.inferers[stage](image, self._window_probs)

    # channels_last for 3D nets too (the base class handles 4D tensors only)
    def setup(self, stage: str) -> None:
        if self.channels_last:
            three_d = getattr(self.net, "spatial_dims", 2) == 3
            self.net.to(memory_format=torch.channels_last_3d if three_d else torch.channels_last)

    def prepare_image(self, image: torch.Tensor) -> torch.Tensor:
        if self.channels_last and image.dim() == 5:
            return image.contiguous(memory_format=torch.channels_last_3d)
        return super().prepare_image(image)

    def attention_maps(self, image: torch.Tensor) -> torch.Tensor:
        """The class probability maps (B, K, *S) in [0, 1]: where the network puts each class."""
        return self.predict_probs(image)

    # --------------------------------------------------------------------------------------- training
    def compute_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.dice_ce is not None:
            return self.dice_ce(logits, target)
        return F.cross_entropy(logits, target[:, 0])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        image = self.prepare_image(batch["image"])
        loss = self.compute_loss(self.net(image), batch["label_map"])
        self.check_finite({"total": loss})
        self.log_losses("train", {"total": loss}, batch_size=image.shape[0])
        return loss

    # ------------------------------------------------------------------------------------- evaluation
    def _eval_step(self, stage: str, batch: dict) -> None:
        image, target = batch["image"], batch["label_map"][:, 0]
        probs = self.predict_probs(image, stage)
        nll = F.nll_loss(torch.log(probs.clamp_min(1e-8)), target)
        self.log(f"{stage}/loss", nll, on_epoch=True, batch_size=image.shape[0], sync_dist=True)
        getattr(self, f"{stage}_metrics").update(probs.argmax(dim=1), target, batch.get("spacing"))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step("val", batch)

    def on_validation_epoch_end(self) -> None:
        log_stage_metrics(self, "val", self.val_metrics, prog_bar=("dice",))

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step("test", batch)

    def on_test_epoch_end(self) -> None:
        log_stage_metrics(self, "test", self.test_metrics, prog_bar=("dice",))

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """Sliding-window segmentation of each item: ``segmentation`` (B, *S) uint8 class indices, ``probs``
        (B, K, *S) averaged softmax, plus whatever identifies the item (``subject_id`` and ``box``, the crop in
        the full volume, for volumes; ``image_id`` for 2D images)."""
        probs = self.predict_probs(batch["image"], "test")
        out = {"segmentation": probs.argmax(dim=1).to(torch.uint8), "probs": probs}
        out.update({k: batch[k] for k in ("subject_id", "image_id", "box", "spacing") if k in batch})
        return out

    # -------------------------------------------------------------------------------------- optimiser
    def configure_optimizers(self):
        if self.kernel_weight_decay is None:
            return super().configure_optimizers()
        # Kernels (conv / transposed-conv / linear weights, ndim > 1) get the L2; biases and norm affine do not.
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() > 1], "weight_decay": self.kernel_weight_decay},
                  {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}]
        optimizer = self.optimizer_factory(groups)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "epoch"}}


# ------------------------------------------------------------------------------------------ registry
register_method("nonlocal_unet", NonLocalUNetModule, paper=PAPER)
