"""``MeanTeacherModule``: DC-MT, a self-ensembling mean teacher with dual (classification + attention)
consistency and attention supervision from masks.

J. Huo et al., "Automatic Grading Assessments for Knee MRI Cartilage Defects via Self-ensembling
Semi-supervised Learning with Dual-Consistency", Medical Image Analysis 80:102508 (2022), arXiv:2108.02476.
Maths and defaults: ``../shared/research/method-dcmt.md`` (§a.6–a.8, §b.1, oracle values §g).

Loss of one batch (L = labeled slices, U = unlabeled, B = all; A = refined CAM of one class, see
:mod:`networks.dcmt`; C = the batch's ``attention_mask``)::

    L = 1·CE_L + 0.5·nMSE(C, A_gt)_L + 0.001·Bound(C, A_gt)_L            (every epoch)
        + ω_cls(e)·MSE(softmax_S, softmax_T)_B + ω_att(e)·nMSE(A_S, A_T)_U   (from the switch epoch on)

Fixes of the reference's defects (dossier e), each deliberate:

* **No label leakage.** Attention consistency on unlabeled slices uses the class the *teacher predicts*,
  never the ground truth (the reference indexed the CAMs with the unlabeled slices' true grades, e.4).
  Unlabeled slices reach this module with zero labels and an all-False ``label_mask`` anyway.
* **Aligned views.** The DataModule draws geometry once per slice for both views (photometry
  independently), so the pixel-wise consistency compares maps in one frame (e.5).
* **EMA by step.** :class:`callbacks.ema_teacher.EMATeacher` (added by :meth:`configure_callbacks`) uses
  α_t = min(1 − 1/(t + 1), decay) with t the global step, not the epoch (e.6). The teacher runs in eval mode
  (EMA'd BN statistics, no dropout; ``teacher_train_mode=True`` restores the reference's behaviour).
* **Per-slice TIoU/TIoR** (:class:`lightning_modules.dcmt_metrics.MaskLocalizationRate`, e.7).
* **Shared localisation metrics** at test time, as every classification method
  (:func:`lightning_modules.weak_localization.update_localization`): the heatmap of class k is the min-max
  normalised CAM M̂_k (the map DC-MT refines, before the soft threshold), on the slices with boxes or a real
  ``attention_mask`` (the dilated cartilage mask of the slice data, scored as the class-agnostic target of PxAP).
  Keys ``test/loc/pxap``, ``pxap_raw`` (and the box metrics where the data has boxes; the slice data has none, so
  they are absent); with ``eval_model="both"`` the teacher's are ``test/loc_teacher/...``.

The losses and ramps are pure functions in :mod:`networks.dcmt`. Kept as in the reference: MSE of softmaxes (not
KL), the normalised attention MSE, the bound loss divided by the *full* batch size, the epoch-20 switch (the ramps
are pure functions of the 1-based epoch, or of the step with ``ramp_unit="step"``) and the attention ramp that caps
at 0.2865 (``att_ramp="reference"``; ``"shifted"`` ramps fully to ``consistency_att``).
"""

from __future__ import annotations

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from callbacks.ema_teacher import eval_model_names
from lightning_modules.base import EMATeacherHooks, EvaluationHooks, MedAttnModule, default_optimizer
from lightning_modules.classification_metrics import prediction_targets, record_test_predictions
from lightning_modules.metrics import localization_metrics
from lightning_modules.metrics.bootstrap import TestPredictions
from lightning_modules.dcmt_metrics import TIOR_THRESHOLDS, TIOU_THRESHOLDS, SliceMetrics
from lightning_modules.registry import register_method
from lightning_modules.stage_metrics import for_stages, log_stage_metrics, set_class_names
from lightning_modules.weak_localization import has_localization_targets, update_localization
from lightning_modules.data_check import check_data_classes
# the losses and ramps live with the network (networks.dcmt); the other names stay importable from here too
from networks.dcmt import bound_loss, consistency_weights, normalize_cams, normalized_mse, select_class, softmax_mse
from networks.ema import make_teacher
from networks.masked_loss import masked_ce

__all__ = ["MeanTeacherModule"]


# ------------------------------------------------------------------------------------------ module
class MeanTeacherModule(EMATeacherHooks, EvaluationHooks, MedAttnModule):
    """DC-MT on slice batches (``datamodules.slices.SliceStackDataModule`` or any batch-contract DataModule
    with ``two_views=True`` and one-hot multiclass labels).

    Args:
        net: the student, e.g. :class:`networks.dcmt.DCMTNet` (needs ``forward_all``, ``cams``, ``refine``);
            the teacher is a frozen copy made here.
        class_names: for per-class log keys (the DataModule's names replace them in ``setup``).
        cls_weight, mse_weight, bound_weight: supervised weights (1, 0.5, 0.001).
        consistency_cls, consistency_att: maxima of ω_cls (5) and ω_att (1).
        consistency_start: the switch (epoch 20): no consistency term before it.
        cls_rampup, att_rampup: ramp lengths (40, 40). ``ramp_unit``: ``"epoch"`` (1-based) or ``"step"``.
        att_ramp: ``"reference"`` (caps at 0.2865 for the defaults) or ``"shifted"``.
        attention_losses: use nMSE + bound (off = the "without attention losses" ablation).
        attention_consistency: use the attention-consistency term.
        ema_decay: α cap of the teacher EMA (0.99).
        teacher_train_mode: run the teacher in train mode (BN batch statistics, dropout), as the reference.
        eval_model: ``"student"``, ``"teacher"`` or ``"both"`` in validation/test (``both``: teacher keys get
            a ``_teacher`` suffix). ``attention_maps`` uses the teacher unless ``eval_model="student"``.
            ``predict_model``: the network whose features ``predict`` exports (the teacher by default).
        cam_threshold: A ≥ this counts as attended in TIoU/TIoR (0.999 ⇔ M̂ ≥ 0.469).
        localization: compute the shared localisation metrics at test time (``test/loc/*``, module docstring).
        optimizer, scheduler, channels_last: see :class:`lightning_modules.base.MedAttnModule`.
    """

    def __init__(self, net: nn.Module, class_names: list[str] | None = None, cls_weight: float = 1.0,
                 mse_weight: float = 0.5, bound_weight: float = 0.001, consistency_cls: float = 5.0,
                 consistency_att: float = 1.0, consistency_start: float = 20, cls_rampup: float = 40,
                 att_rampup: float = 40, ramp_unit: str = "epoch", att_ramp: str = "reference",
                 attention_losses: bool = True, attention_consistency: bool = True, ema_decay: float = 0.99,
                 teacher_train_mode: bool = False, eval_model: str = "both", predict_model: str = "teacher",
                 cam_threshold: float = 0.999, tiou_thresholds: tuple[float, ...] = TIOU_THRESHOLDS,
                 tior_thresholds: tuple[float, ...] = TIOR_THRESHOLDS, localization: bool = True,
                 optimizer: OptimizerCallable = default_optimizer,
                 scheduler: LRSchedulerCallable | None = None, channels_last: bool = False) -> None:
        super().__init__(optimizer=optimizer, scheduler=scheduler, channels_last=channels_last)
        if ramp_unit not in ("epoch", "step"):
            raise ValueError(f"ramp_unit must be 'epoch' or 'step', got {ramp_unit!r}")
        consistency_weights(consistency_start, att_ramp=att_ramp)  # validates att_ramp
        self.eval_names = eval_model_names(eval_model)
        eval_model_names(predict_model)
        if predict_model == "both":
            raise ValueError("predict_model must be 'student' or 'teacher'")
        self.student = net
        self.teacher = make_teacher(net, train_mode=teacher_train_mode)
        k = net.num_classes
        self.class_names = list(class_names) if class_names else [f"class_{i}" for i in range(k)]
        self.val_metrics, self.test_metrics = for_stages(lambda stage: nn.ModuleDict({  # one per evaluated network
            name: SliceMetrics(k, tiou_thresholds, tior_thresholds, class_names=self.class_names,
                               suffix="" if i == 0 else f"_{name}")
            for i, name in enumerate(self.eval_names)}), "val", "test")
        self.test_predictions = {name: TestPredictions(suffix="" if i == 0 else f"_{name}")
                                 for i, name in enumerate(self.eval_names)}
        self.test_localization = nn.ModuleDict({
            name: localization_metrics(k, self.class_names, prefix="test/loc/" if i == 0 else f"test/loc_{name}/")
            for i, name in enumerate(self.eval_names)})

    # ------------------------------------------------------------------------------------ plumbing
    def setup(self, stage: str) -> None:
        super().setup(stage)
        check_data_classes(self, self.student.num_classes)
        set_class_names([self.val_metrics, self.test_metrics, self.test_localization], self.class_names)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.student(self.prepare_image(image))

    def forward_student(self, image: torch.Tensor):
        return self.student.forward_all(self.prepare_image(image))

    @torch.no_grad()
    def forward_teacher(self, image: torch.Tensor):
        return self.teacher.forward_all(self.prepare_image(image))

    def attention_maps(self, image: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.eval_names[-1]).attention_maps(self.prepare_image(image))

    def ramp_time(self) -> float:
        return float(self.current_epoch + 1) if self.hparams.ramp_unit == "epoch" else float(self.global_step)

    def consistency_weights(self) -> tuple[float, float]:
        hp = self.hparams
        return consistency_weights(self.ramp_time(), hp.consistency_cls, hp.consistency_att, hp.consistency_start,
                                   hp.cls_rampup, hp.att_rampup, hp.att_ramp)

    # -------------------------------------------------------------------------------------- losses
    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """All loss terms of one training batch, and ``total`` (weighted by the current ramp)."""
        hp = self.hparams
        image = batch["image"]
        size = image.shape[-2:]
        out_s = self.forward_student(image)
        labeled = batch["label_mask"].any(1)
        target = batch["labels"].argmax(1)
        terms = {"cls": masked_ce(out_s.logits, batch["labels"], batch["label_mask"])}
        total = hp.cls_weight * terms["cls"]
        cams_s = self.student.cams(out_s.feature_map)
        if hp.attention_losses:
            sup = labeled & batch.get("has_attention_mask", torch.ones_like(labeled))
            attention = self.student.refine(select_class(cams_s[sup], target[sup]), size)
            mask = batch["attention_mask"][sup]
            terms["mse"] = normalized_mse(mask, attention)
            terms["bound"] = bound_loss(mask, attention, len(labeled))
            total = total + hp.mse_weight * terms["mse"] + hp.bound_weight * terms["bound"]
        w_cls, w_att = self.consistency_weights()
        if w_cls > 0 or w_att > 0:
            out_t = self.forward_teacher(batch.get("image_teacher", image))
            terms["cons_cls"] = softmax_mse(out_s.logits, out_t.logits)
            total = total + w_cls * terms["cons_cls"]
            unlabeled = ~labeled
            if hp.attention_consistency and w_att > 0 and bool(unlabeled.any()):
                # the teacher's predicted class, never the ground truth (dossier e.4)
                predicted = out_t.logits[unlabeled].argmax(1)
                a_s = self.student.refine(select_class(cams_s[unlabeled], predicted), size)
                with torch.no_grad():
                    cams_t = self.teacher.cams(out_t.feature_map[unlabeled])
                    a_t = self.teacher.refine(select_class(cams_t, predicted), size)
                terms["cons_att"] = normalized_mse(a_s, a_t)
                total = total + w_att * terms["cons_att"]
        terms["total"] = total
        return terms

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        terms = self.compute_losses(batch)
        self.check_finite(terms)
        self.log_losses("train", terms, batch_size=len(batch["image"]))
        if self.hparams.ramp_unit == "step" and self.global_step % max(1, self.trainer.log_every_n_steps) == 0:
            self._log_weights(on_step=True)
        return terms["total"]

    def on_train_epoch_start(self) -> None:
        if self.hparams.ramp_unit == "epoch":  # constant within an epoch: one log call per epoch, not per step
            self._log_weights(on_step=False)

    def _log_weights(self, on_step: bool) -> None:
        w_cls, w_att = self.consistency_weights()
        self.log_dict({"train/w_cls": w_cls, "train/w_att": w_att}, on_step=on_step, on_epoch=not on_step, batch_size=1)

    # ---------------------------------------------------------------------------------- evaluation
    def _evaluate(self, batch: dict, stage: str) -> None:
        image = self.prepare_image(batch["image"])
        known = batch["label_mask"].any(1)
        target = batch["labels"].argmax(1)
        for i, name in enumerate(self.eval_names):
            net = getattr(self, name)
            out = net.forward_all(image)
            if i == 0:
                self.log(f"{stage}/loss", masked_ce(out.logits, batch["labels"], batch["label_mask"]),
                         batch_size=int(known.sum().clamp_min(1)), sync_dist=True)
            if not bool(known.any()):
                continue
            metrics = getattr(self, f"{stage}_metrics")[name]
            metrics.classification.update(out.logits[known].float().softmax(-1), target[known])
            if stage == "test":
                record_test_predictions(self.test_predictions[name], batch, out.logits.detach().float().softmax(-1),
                                        prediction_targets("multiclass", batch["labels"], batch["label_mask"]))
                if self.hparams.localization and has_localization_targets(batch):
                    update_localization(self.test_localization[name], batch, normalize_cams(net.cams(out.feature_map)))
            has_mask = known & batch.get("has_attention_mask", torch.ones_like(known))
            if bool(has_mask.any()):
                cams = net.cams(out.feature_map[has_mask])
                attention = net.refine(select_class(cams, target[has_mask]), image.shape[-2:])
                metrics.localization.update(attention >= self.hparams.cam_threshold,
                                            batch["attention_mask"][has_mask] > 0.5, target[has_mask])

    def _log_metrics(self, stage: str) -> None:
        for name in self.eval_names:
            log_stage_metrics(self, stage, getattr(self, f"{stage}_metrics")[name])
            if stage == "test":
                self.test_predictions[name].finish(self, self.class_names)
                if self.hparams.localization:  # NaN (nothing to score) is left out of the log
                    log_stage_metrics(self, "test", self.test_localization[name], drop_nan=True)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        """One pooled feature and the class probabilities per slice, with names (for stage 2)."""
        out = getattr(self, self.hparams.predict_model).forward_all(self.prepare_image(batch["image"]))
        result = {"features": out.features.float(), "probabilities": out.logits.float().softmax(-1)}
        for key in ("image_id", "subject_id", "slice_index", "subject_label", "labels", "label_mask"):
            if key in batch:
                result[key] = batch[key]
        return result


register_method("dcmt", MeanTeacherModule,
                paper="Huo et al., Self-ensembling semi-supervised learning with dual-consistency, MedIA 2022")
