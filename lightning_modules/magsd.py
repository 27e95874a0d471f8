"""MAG-SD: multiscale attention, attention-guided augmentation and soft-distance regularisation.

J. Li, Y. Wang, S. Wang, J. Wang, J. Liu, Q. Jin, L. Sun, "Multiscale Attention Guided Network for COVID-19
Diagnosis Using Chest X-Ray Images", IEEE JBHI 25(5), 2021 (arXiv:2012.02278). Code: StonHamA/MAG-SD.

One training step (``multi-shot training``), with one shared network in train mode:

1. raw shot ``P = f(I)``, which also yields the M attention maps ``A``;
2. three maps per image drawn with ``p ∝ sqrt(ΣA)``, and three views built from them: attention mix-up,
   dimming and patching (``networks.attention_augment``);
3. three augmented shots ``p_i = f(view_i)``;
4. ``L = CE(P, y) + Σ_i mean|q − softmax(p_i)|``, where ``q = softmax(P)`` detached, replaced by a smoothed
   one-hot target when the raw shot is wrong or less confident than 0.7
   (:func:`networks.magsd.soft_distance_target`, :func:`networks.magsd.soft_distance`).
   As in the reference code, the augmented shots get no cross-entropy (it is logged only).

Evaluation is deterministic and uses raw images only; prediction = raw logits.

Fixes of the reference code (dossier ``method-magsd.md`` (e)):
    * 3 attention scales by default (the paper), not the code's 2 (``net.num_scales`` picks 1, 2 or 3).
    * Validation and test images are never augmented (the DataModule does not augment evaluation images,
      and this module applies attention augmentation in ``training_step`` only); each image is scored exactly
      once instead of a fixed number of shuffled, cycled batches.
    * Specificity is TN / (TN + FP) per class, macro-averaged (torchmetrics); the reference passed the
      arguments swapped and reported TN / (TN + FN).
    * Splits are by patient and seeded (``CXRDataModule(seed=..., num_folds=..., fold=...)``); the
      reference seeded its split with the time of day and drew folds with unseeded ``random.sample``.
    * The augmentation randomness is a pure function of ``(augment_seed, global_step, batch_idx, rank)``.

Choices where paper and code are silent:
    * The smoothed target follows the code: ``t_y = 1 − K·ε``, ``t_k = ε``, which sums to ``1 − ε`` (0.99), not 1.
      ``normalized_target=True`` uses ``t_y = 1 − (K−1)·ε`` so that it sums to 1.
    * ``augmented_bn_stats=True`` (the reference): all four shots update the BN running statistics.
      ``False``: the augmented shots are normalised with their own batch statistics but leave the running
      statistics untouched, so evaluation-time BN reflects raw images only.
    * ``attention_maps`` (the callback contract, ``(B, K, h, w)`` in [0, 1]): ``attention_mode="mean"``
      repeats the max-normalised mean attention map (the map the paper uses for localisation) for every
      class; ``"class"`` weights the M maps by their positive contribution to each class logit
      (``MAGSDNet.part_logits``).
    * Macro AUROC follows the project policy (:mod:`lightning_modules.metrics.auroc`): the mean over
      classes that have both positives and negatives in the evaluated set (``<stage>/auroc_classes`` of them);
      an undefined class is logged as NaN instead of torchmetrics' 0.
    * ``<stage>/recall``, ``<stage>/specificity``, ``<stage>/precision`` and ``<stage>/f1`` are **macro** means over
      the classes. With two classes macro recall and macro specificity are both the balanced accuracy, so the
      one-vs-rest rates of every class are logged too: ``<stage>/sensitivity/<class>`` = TP/(TP+FN) and
      ``<stage>/specificity/<class>`` = TN/(TN+FP) (``test/sensitivity/COVID-19`` in the binary COVID-19 setup;
      NaN when the class has no positives, resp. no negatives).
    * At test time the per-image probabilities go to ``test_predictions.csv`` in the run directory and the
      patient-level bootstrap 95 % interval of the macro AUROC is logged (``test/auroc_ci_low``/``_high``,
      :mod:`lightning_modules.metrics.bootstrap`).
    * Localisation (``localization=True``) is evaluated at test time like every classification method, on the
      images with complete boxes or a lesion mask (:func:`lightning_modules.weak_localization.update_localization`,
      keys ``test/loc/iou@T``, ``iobb@T``, ``maxboxacc_v2``, ``maxboxacc_v2_raw``, ``pointing``, ``pxap``,
      ``pxap_raw`` ...). MAG-SD's attention is class-agnostic: the class heatmaps are ``attention_maps`` (with
      ``attention_mode="mean"`` the same max-normalised mean map for every class). MAG-SD's own protocol is
      logged too, on the mean map: ``test/loc/magsd_acc@0.3`` (fraction of images whose attention region, the
      boxes of the components of the min-max normalised map > 0.85, has IoU > 0.3 with the lesion mask, or
      the union of the boxes) and ``test/loc/magsd_miou``
      (:class:`lightning_modules.metrics.AttentionRegionAccuracy`). Data with neither boxes nor lesion masks
      logs none of these keys.

Example::

    net = MAGSDNet(num_classes=4, backbone="resnet50", num_scales=3)
    module = MAGSDModule(net)
    trainer.fit(module, datamodule=CXRDataModule(SyntheticCXR(single_label=True), image_size=224))
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm
from torchmetrics import MetricCollection
from torchmetrics.classification import (MulticlassAccuracy, MulticlassF1Score, MulticlassPrecision,
                                         MulticlassRecall, MulticlassSpecificity)

from lightning_modules.base import MedAttnModule
from lightning_modules.metrics import AttentionRegionAccuracy, localization_metrics
from lightning_modules.metrics.bootstrap import TestPredictions
from lightning_modules.metrics.auroc import DefinedMulticlassAUROC
from lightning_modules.metrics.one_vs_rest import OneVsRestRates
from lightning_modules.registry import register_method
from lightning_modules.stage_metrics import for_stages, log_stage_metrics, set_class_names
from lightning_modules.weak_localization import (attention_targets, has_localization_targets, update_localization,
                                                 valid_region)
from lightning_modules.data_check import check_data_classes
from networks.attention_augment import magsd_augment
from networks.magsd import soft_distance, soft_distance_target

VIEW_NAMES = ("mixup", "dim", "patch")

__all__ = ["MAGSDModule", "frozen_bn_stats", "magsd_metrics"]


# ------------------------------------------------------------------------------------------- pieces
@contextmanager
def frozen_bn_stats(module: nn.Module):
    """Inside: BN layers in training mode normalise with batch statistics but do not update running stats."""
    layers = [m for m in module.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    for m in layers:
        m.track_running_stats = False  # BN then passes no running buffers to F.batch_norm
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True


def magsd_metrics(num_classes: int, class_names: list[str] | None = None) -> MetricCollection:
    """Accuracy, macro precision / recall (sensitivity) / specificity / F1, AUROC (project policy, per class as
    ``auroc_per_class/<class>``), one-vs-rest ``sensitivity/<class>`` and ``specificity/<class>``."""
    k = num_classes
    return MetricCollection({
        "accuracy": MulticlassAccuracy(k, average="micro"),
        "precision": MulticlassPrecision(k, average="macro"),
        "recall": MulticlassRecall(k, average="macro"),
        "specificity": MulticlassSpecificity(k, average="macro"),
        "f1": MulticlassF1Score(k, average="macro"),
        "auroc": DefinedMulticlassAUROC(k, class_names, per_class_key="auroc_per_class"),
        "stats": OneVsRestRates(k, class_names),
    })  # fmt: skip


# ------------------------------------------------------------------------------------------- module
class MAGSDModule(MedAttnModule):
    """MAG-SD training and evaluation around an injected :class:`networks.magsd.MAGSDNet` (see module docstring).

    Args:
        net: a MAG-SD network (``forward_features``, ``forward_head``, ``forward``, ``attention_maps``).
        class_names: class names for per-class logs; default: the DataModule's.
        confidence, smoothing, normalized_target: soft-distance target (:func:`networks.magsd.soft_distance_target`).
        sd_weight: weight of each soft-distance term (1 in the reference).
        augmented_bn_stats: let the augmented shots update the BN running statistics (reference: True).
        attention_mode: ``"mean"`` or ``"class"`` (see ``attention_maps``).
        head_lr_scale: learning-rate multiplier of the bias-free BAP classifier (1 in the reference). Because
            its input has unit norm and is scaled by 100, an SGD step of size ``lr`` moves a logit by up to
            ``lr·10⁴``: the head tolerates the reference's lr = 1e-3 but diverges at the 1e-2 that suits a backbone
            trained from scratch; ``0.1`` with ``lr = 1e-2`` keeps the head at the reference's 1e-3.
        augment_seed: seed of the augmentation randomness; default ``torch.initial_seed()`` at construction, i.e. the
            ``seed_everything`` seed when built by the CLI.
        localization: evaluate weak localisation at test time (see the module docstring).
        cam_threshold: heatmap threshold of the shared ChestX-ray14 box protocol (``test/loc/iou@T``).
        **kwargs: ``optimizer``, ``scheduler``, ``channels_last`` of :class:`lightning_modules.base.MedAttnModule`.
    """

    not_hyperparameters = ("net", "optimizer", "scheduler")

    def __init__(
        self,
        net: nn.Module,
        class_names: list[str] | None = None,
        confidence: float = 0.7,
        smoothing: float = 0.01,
        normalized_target: bool = False,
        sd_weight: float = 1.0,
        augmented_bn_stats: bool = True,
        attention_mode: str = "mean",
        head_lr_scale: float = 1.0,
        augment_seed: int | None = None,
        localization: bool = True,
        cam_threshold: float = 0.5,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if attention_mode not in ("mean", "class"):
            raise ValueError(f"attention_mode must be 'mean' or 'class', got {attention_mode!r}")
        if augment_seed is None:
            augment_seed = torch.initial_seed() % 2**31
        self.augment_seed = self.hparams.augment_seed = int(augment_seed)
        self.net = net
        self.num_classes = int(net.num_classes)
        self.class_names = list(class_names) if class_names else [str(k) for k in range(self.num_classes)]
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class_names for a network with {self.num_classes} classes")
        self.val_metrics, self.test_metrics = for_stages(lambda stage: magsd_metrics(self.num_classes, self.class_names),
                                                         "val", "test")
        self.test_predictions = TestPredictions()
        self.test_localization = localization_metrics(self.num_classes, self.class_names, cam_threshold=cam_threshold,
                                                      prefix="test/loc/")
        self.test_attention_region = AttentionRegionAccuracy()
        self._generator: torch.Generator | None = None

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self._trainer, "datamodule", None)
        if datamodule is None:
            return
        task = getattr(datamodule, "task", "multiclass")
        if task != "multiclass":
            raise ValueError(f"MAG-SD is a single-label (multiclass) method; the data is {task!r}. "
                             "Use a multiclass reader (e.g. SyntheticCXR(single_label=True), COVIDChestXray).")
        check_data_classes(self, self.num_classes, set_names=not self.hparams.class_names)
        set_class_names([self.val_metrics, self.test_metrics, self.test_localization], self.class_names)

    def configure_optimizers(self):
        """One optimiser, two parameter groups: everything else, then the BAP classifier (``head_lr_scale``)."""
        head = [p for p in self.net.classifier.parameters() if p.requires_grad]
        head_ids = {id(p) for p in head}
        body = [p for p in self.parameters() if p.requires_grad and id(p) not in head_ids]
        optimizer = self.optimizer_factory([{"params": body}, {"params": head}])
        optimizer.param_groups[1]["lr"] *= self.hparams.head_lr_scale  # before the scheduler records initial_lr
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer), "interval": "epoch"}}

    # ---------------------------------------------------------------------------------------- pieces
    def forward(self, image: Tensor) -> Tensor:
        return self.net(self.prepare_image(image))

    def attention_maps(self, image: Tensor) -> Tensor:
        per_class = self.hparams.attention_mode == "class"
        maps = self.net.attention_maps(self.prepare_image(image), per_class=per_class)
        return maps if per_class else maps.expand(-1, self.num_classes, -1, -1)

    def step_generator(self, device: torch.device, batch_idx: int) -> torch.Generator:
        """The augmentation generator, reseeded every step from (seed, step, batch, rank): reproducible, resumable."""
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
        key = hash((self.augment_seed, int(self.global_step), int(batch_idx), int(self.global_rank)))
        return self._generator.manual_seed(key & 0x7FFF_FFFF_FFFF_FFFF)

    @staticmethod
    def targets(batch: dict) -> tuple[Tensor, Tensor]:
        """Class index per image and which images carry a label (rows with no known label are skipped)."""
        labels = batch["labels"]
        known = batch["label_mask"].any(dim=1) if "label_mask" in batch else torch.ones_like(labels[:, 0], dtype=torch.bool)
        return labels.argmax(dim=1), known

    # -------------------------------------------------------------------------------------- training
    def forward_raw(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """Raw shot: logits and the ``(B, M, h, w)`` attention maps the views are built from."""
        features, attention = self.net.forward_features(image)
        return self.net.forward_head(features, attention), attention

    def forward_augmented(self, image: Tensor, attention: Tensor, generator: torch.Generator) -> list[Tensor]:
        """Logits of the three attention-guided views (mix-up, dimming, patching)."""
        views = magsd_augment(image, attention, generator)
        bn = frozen_bn_stats(self.net) if not self.hparams.augmented_bn_stats else nullcontext()
        with bn:
            return [self.net(self.prepare_image(v)) for v in views]

    def forward_shots(self, image: Tensor, generator: torch.Generator) -> tuple[Tensor, list[Tensor]]:
        """Raw logits and the logits of the three attention-guided views."""
        logits, attention = self.forward_raw(image)
        return logits, self.forward_augmented(image, attention, generator)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        target, known = self.targets(batch)
        image = self.prepare_image(batch["image"])
        if not bool(known.all()):
            image, target = image[known], target[known]
        logits, attention = self.forward_raw(image)
        ce = F.cross_entropy(logits.float(), target)
        # Checked before the maps are sampled: diverged (NaN) attention would otherwise fail inside
        # torch.multinomial with an unhelpful message instead of naming the loss term and the step.
        self.check_finite({"ce": ce})
        augmented = self.forward_augmented(image, attention, self.step_generator(image.device, batch_idx))
        hp = self.hparams
        q = soft_distance_target(logits, target, hp.confidence, hp.smoothing, hp.normalized_target)
        terms = {"ce": ce}
        for name, p in zip(VIEW_NAMES, augmented):
            terms[f"sd_{name}"] = hp.sd_weight * soft_distance(q, p)
        terms = {"total": sum(terms.values()), **terms}
        self.check_finite({k: v for k, v in terms.items() if k != "ce"})
        batch_size = int(target.shape[0])
        self.log_losses("train", terms, batch_size)
        with torch.no_grad():  # logged only: the reference puts no cross-entropy on the augmented shots
            for name, p in zip(VIEW_NAMES, augmented):
                self.log(f"train/ce_{name}", F.cross_entropy(p.float(), target), on_step=False, on_epoch=True,
                         batch_size=batch_size)
            self.log("train/accuracy", (logits.argmax(1) == target).float().mean(), on_step=False, on_epoch=True,
                     batch_size=batch_size)
        return terms["total"]

    # ------------------------------------------------------------------------------------ evaluation
    def _eval_step(self, stage: str, batch: dict, batch_idx: int = 0) -> None:
        target, known = self.targets(batch)
        image = self.prepare_image(batch["image"])[known]
        target = target[known]
        if target.numel() == 0:
            return
        logits = self.net(image).float()
        self.log(f"{stage}/loss", F.cross_entropy(logits, target), on_epoch=True, batch_size=int(target.numel()),
                 sync_dist=True)
        probabilities = torch.softmax(logits, dim=1)
        getattr(self, f"{stage}_metrics").update(probabilities, target)
        if stage == "test":
            rows = known.nonzero().flatten().tolist()
            ids = batch.get("image_id") or [f"{batch_idx}_{i}" for i in rows]
            patients = batch.get("patient_id") or ids
            self.test_predictions.update([ids[i] for i in rows], [patients[i] for i in rows], probabilities,
                                         F.one_hot(target, self.num_classes))

    @torch.no_grad()
    def update_localization(self, batch: dict) -> None:
        """Shared localisation metrics from ``attention_maps`` and MAG-SD's own protocol from the mean map, on
        the images of ``batch`` with boxes or a lesion mask (nothing is computed for a batch without)."""
        if not has_localization_targets(batch):
            return
        image = self.prepare_image(batch["image"])
        mean = self.net.attention_maps(image, per_class=False).float()  # (B, 1, h, w), the paper's map
        per_class = (self.net.attention_maps(image, per_class=True).float() if self.hparams.attention_mode == "class"
                     else mean.expand(-1, self.num_classes, -1, -1))
        update_localization(self.test_localization, batch, per_class)
        targets, present = attention_targets(batch)
        if bool(present.any()):
            size = batch["image"].shape[-2:]
            maps = F.interpolate(mean, size=tuple(size), mode="bilinear", align_corners=False)
            region = valid_region(batch.get("frame"), size)
            self.test_attention_region.update(maps, targets, present, region)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step("test", batch, batch_idx)
        if self.hparams.localization:
            self.update_localization(batch)

    def on_validation_epoch_end(self) -> None:
        log_stage_metrics(self, "val", self.val_metrics)  # undefined rates are logged as NaN

    def on_test_epoch_end(self) -> None:
        log_stage_metrics(self, "test", self.test_metrics)
        self.test_predictions.finish(self, self.class_names)
        if self.hparams.localization:  # NaN (no boxes, no lesion masks) is left out of the log
            log_stage_metrics(self, "test", self.test_localization, drop_nan=True)
            log_stage_metrics(self, "test", self.test_attention_region, prefix="test/loc/", drop_nan=True)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        logits = self.net(self.prepare_image(batch["image"])).float()
        return {"image_id": batch.get("image_id"), "probs": torch.softmax(logits, dim=1)}


# ------------------------------------------------------------------------------------------ registry
register_method(
    "magsd",
    MAGSDModule,
    paper="Li et al., Multiscale Attention Guided Network for COVID-19 Diagnosis Using Chest X-Ray Images, "
    "IEEE JBHI 2021 (arXiv:2012.02278)",
)
