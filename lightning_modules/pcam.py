"""``PCAMModule``: multi-task classifier with Probabilistic-CAM pooling (or any pool of the zoo).

W. Ye, J. Yao, H. Xue, Y. Li, "Weakly Supervised Lesion Localization With Probabilistic-CAM Pooling",
arXiv:2005.14480. Reference code: ``jfhealthcare/Chexpert`` (read, not copied; see
``../shared/research/method-pcam.md``).

The network is injected (:class:`networks.cam_heads.PoolingClassifier`: backbone by config, one 1×1 head per
task, selectable pooling). The module adds the loss, AUROC and, at test time, weak localisation on the
images that have boxes (and PxAP where lesion masks exist).

Choices where the reference is wrong or silent (dossier section e):
  * **Loss** (b, e.7; :func:`networks.pcam_loss.pcam_bce`): per-task BCE-with-logits, **summed** over tasks
    (``task_reduction="sum"``, as the reference; "mean" divides by K). With ``batch_weight=True`` each task's
    positives are weighted by pos_weight_k = (N_k − P_k) / P_k, counted over the batch entries whose label is
    known (``label_mask``: CheXpert U-Ignore and unlabeled images never count). A task with **no positive** in the
    batch (``no_positive="zero"``, the reference) contributes exactly 0 and no gradient that step; "unweighted"
    uses pos_weight 1 instead. A task whose batch entries are all positive gets pos_weight 0, so also 0.
    ``batch_weight=False`` uses the static ``pos_weight`` list (default 1).
  * **Validation/test loss is unweighted** masked BCE: the batch weight would make it depend on batch
    composition and size (e.7), which is useless for model selection. It is accumulated over the epoch
    (:class:`MaskedBCEMean`): per task, the mean over every image whose label is known, summed over tasks. With
    unknown labels (U-Ignore) a batch-size-weighted mean of per-batch values would still depend on the batch size.
  * **Heatmaps** (a.6): σ(logit map) for PCAM, an absolute probability thresholded directly by the
    ChestX-ray14 protocol (``cam_threshold=0.5`` ⇔ logit 0, the paper's rule); min-max normalised CAMs for
    the other pools (the net's ``heatmap`` setting). They are upsampled bilinearly to the network input, the
    letterbox padding is zeroed (``frame``), and boxes are compared in that frame: IoU and IoBB are invariant
    to the uniform letterbox scale, so this equals the original frame up to interpolation.
  * **Threshold sweeps** (MaxBoxAccV2, PxAP) min-max normalise every (image, class) map over its valid region
    first, for PCAM as for every other pool and method (Choe et al., CVPR 2020), so PCAM and GAP are swept on
    one scale; the sweeps of the raw σ-map are logged as ``test/loc/maxboxacc_v2_raw`` and ``test/loc/pxap_raw``.
  * **PxAP** uses the class-agnostic lesion mask (``attention_mask``): the heatmap is the max over the
    image's positive classes; images without a positive or without a mask are skipped.
  * Checkpoint selection in the reference keeps the "last 3 improvements" (e.8); use Lightning's
    ``ModelCheckpoint(monitor="val/auroc", save_top_k=k)`` for a true top-k.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric

from lightning_modules.base import MedAttnModule
from lightning_modules.classification_metrics import record_test_predictions
from lightning_modules.metrics import MaskedMultilabelAUROC, localization_metrics
from lightning_modules.metrics.bootstrap import TestPredictions
from lightning_modules.registry import register_method
from lightning_modules.stage_metrics import for_stages, log_stage_metrics, set_class_names
from lightning_modules.weak_localization import update_localization
from lightning_modules.data_check import check_data_classes
from networks.pcam_loss import pcam_bce

__all__ = ["MaskedBCEMean", "PCAMModule"]


class MaskedBCEMean(Metric):
    """Epoch evaluation loss: Σ_k (Σ_i m_ik BCE(z_ik, y_ik)) / Σ_i m_ik over every image of the epoch (m = label_mask;
    a task with no known label adds 0), i.e. :func:`networks.pcam_loss.pcam_bce` with ``batch_weight=False`` on the whole epoch at once,
    whatever the batch size. States are sums, so DDP reduces them exactly."""

    full_state_update = False

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        self.add_state("loss_sum", torch.zeros(num_tasks, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("known", torch.zeros(num_tasks, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor, label_mask: torch.Tensor) -> None:
        valid = label_mask.float()
        raw = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
        self.loss_sum += (raw * valid).sum(0).double()
        self.known += valid.sum(0).double()

    def compute(self) -> torch.Tensor:
        return (self.loss_sum / self.known.clamp_min(1)).sum().float()


class PCAMModule(MedAttnModule):
    """Weakly supervised multi-label classification with (P)CAM pooling heads.

    Args:
        net: network with ``forward_with_maps(x) -> (logits (B, K), logit maps (B, K, h, w))`` and
            ``maps_to_heatmaps(logit maps) -> [0, 1] maps``, e.g. :class:`networks.cam_heads.PoolingClassifier`.
        class_names: names for metric keys; replaced by the DataModule's names when trained through it.
        batch_weight, pos_weight, no_positive, task_reduction: the loss, see :func:`networks.pcam_loss.pcam_bce`.
        cam_threshold: heatmap threshold for the ChestX-ray14 box protocol (probability space for PCAM).
        localization: evaluate weak localisation at test time (images with boxes / lesion masks).
        pointing_tolerance: pointing-game tolerance in input pixels.
        **kwargs: ``optimizer``, ``scheduler``, ``channels_last`` of :class:`lightning_modules.base.MedAttnModule`.

    Logged: ``train/loss``, ``val/loss``, ``{val,test}/auroc`` (macro over classes with both outcomes, the project
    policy of :mod:`lightning_modules.metrics.auroc`), ``auroc_classes`` (how many) and
    ``auroc/<class>``; at test ``test/auroc_ci_low``/``_high`` (patient-level bootstrap 95 % interval, from the
    per-image probabilities written to ``test_predictions.csv`` in the run directory), ``test/loc/iou@T``,
    ``test/loc/iobb@T``, ``test/loc/maxboxacc_v2``, ``test/loc/maxboxacc@δ``, ``test/loc/threshold@δ``,
    ``test/loc/pointing``, ``test/loc/pxap``, the raw-map sweeps ``test/loc/maxboxacc_v2_raw``,
    ``test/loc/maxboxacc_raw@δ``, ``test/loc/threshold_raw@δ``, ``test/loc/pxap_raw`` (and per class).

    Example::

        net = PoolingClassifier("resnet34", num_classes=14, pool="pcam")
        module = PCAMModule(net, class_names=names)
    """

    def __init__(
        self,
        net: nn.Module,
        class_names: list[str] | None = None,
        batch_weight: bool = True,
        pos_weight: list[float] | None = None,
        no_positive: str = "zero",
        task_reduction: str = "sum",
        cam_threshold: float = 0.5,
        localization: bool = True,
        pointing_tolerance: float = 0.0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        pcam_bce(torch.zeros(1, 1), torch.zeros(1, 1), no_positive=no_positive, task_reduction=task_reduction)
        self.net = net
        k = int(net.num_classes)
        self.class_names = list(class_names) if class_names else [f"class_{i}" for i in range(k)]
        if len(self.class_names) != k:
            raise ValueError(f"{len(self.class_names)} class names for a network with {k} outputs")
        self.loss_kwargs = dict(batch_weight=batch_weight, pos_weight=pos_weight, no_positive=no_positive,
                                task_reduction=task_reduction)
        self.train_metrics, self.val_metrics, self.test_metrics = for_stages(
            lambda stage: MaskedMultilabelAUROC(k, self.class_names), "train", "val", "test")
        self.val_loss = MaskedBCEMean(k)
        self.test_loss = MaskedBCEMean(k)
        self.test_predictions = TestPredictions()
        self.localization = localization
        self.test_localization = localization_metrics(k, self.class_names, cam_threshold=cam_threshold,
                                                      pointing_tolerance=pointing_tolerance, prefix="test/loc/")

    # ------------------------------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = check_data_classes(self, self.net.num_classes)
        if datamodule is None:
            return
        if getattr(datamodule, "task", "multilabel") != "multilabel":
            raise ValueError(f"PCAMModule is multi-label (one binary head per task); the data task is {datamodule.task!r}")
        set_class_names([self.train_metrics, self.val_metrics, self.test_metrics, self.test_localization],
                        self.class_names)

    # ---------------------------------------------------------------------------------------- forward
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(self.prepare_image(image))

    def forward_with_maps(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net.forward_with_maps(self.prepare_image(image))

    @torch.no_grad()
    def attention_maps(self, image: torch.Tensor) -> torch.Tensor:
        """(B, K, h, w) in [0, 1]: σ(logit map) for PCAM, min-max normalised CAMs for other pools."""
        return self.net.maps_to_heatmaps(self.forward_with_maps(image)[1])

    # ------------------------------------------------------------------------------------------ steps
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self(batch["image"])
        loss, _ = pcam_bce(logits, batch["labels"], batch["label_mask"], **self.loss_kwargs)
        self.check_finite({"total": loss})
        self.log_losses("train", {"total": loss}, batch_size=len(logits))
        self.train_metrics.update(logits, batch["labels"], batch["label_mask"])
        return loss

    def _eval_step(self, batch: dict, stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        logits, logit_maps = self.forward_with_maps(batch["image"])
        epoch_loss = getattr(self, f"{stage}_loss")  # the epoch value, not a mean of per-batch values
        epoch_loss.update(logits, batch["labels"], batch["label_mask"])
        self.log(f"{stage}/loss", epoch_loss, on_step=False, on_epoch=True, prog_bar=True)
        getattr(self, f"{stage}_metrics").update(logits, batch["labels"], batch["label_mask"])
        return logits, logit_maps

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        logits, logit_maps = self._eval_step(batch, "test")
        targets = torch.where(batch["label_mask"], batch["labels"].long(), torch.full_like(batch["labels"], -1).long())
        record_test_predictions(self.test_predictions, batch, torch.sigmoid(logits.detach().float()), targets)
        if self.localization:
            self.update_localization(batch, self.net.maps_to_heatmaps(logit_maps))

    def update_localization(self, batch: dict, heatmaps: torch.Tensor) -> None:
        """Feed the test localisation metrics with (B, K, h, w) heatmaps of ``batch`` (the procedure shared by
        every classification method, :func:`lightning_modules.weak_localization.update_localization`)."""
        update_localization(self.test_localization, batch, heatmaps)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        return {"image_id": batch["image_id"], "probabilities": torch.sigmoid(self(batch["image"]).float())}

    # ---------------------------------------------------------------------------------- epoch ends
    # NaN values are left out of the log, except the macro AUROC (a monitored key is always there)
    def on_train_epoch_end(self) -> None:
        log_stage_metrics(self, "train", self.train_metrics, drop_nan=True, keep_nan=("auroc",))

    def on_validation_epoch_end(self) -> None:
        log_stage_metrics(self, "val", self.val_metrics, drop_nan=True, keep_nan=("auroc",))

    def on_test_epoch_end(self) -> None:
        log_stage_metrics(self, "test", self.test_metrics, drop_nan=True, keep_nan=("auroc",))
        self.test_predictions.finish(self, self.class_names)
        if self.localization:
            log_stage_metrics(self, "test", self.test_localization, drop_nan=True)


register_method("pcam", PCAMModule,
                paper="Ye et al., Weakly supervised lesion localization with probabilistic-CAM pooling, "
                      "arXiv:2005.14480")
