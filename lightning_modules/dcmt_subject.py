"""``SubjectAggregationModule``: DC-MT stage 2, a mean-teacher bi-GRU that grades subjects from their
slice features (Huo et al., MedIA 2022; dossier ``../shared/research/method-dcmt.md`` §a.10, §b.3).

Loss: CE on the labeled subjects + ω(e)·MSE(softmax_S, softmax_T) over all subjects, with the reference's stage-2
weight ω(e) = c·exp(−5 (1 − (clip(e, 20, 100) − 20)/100)²) from epoch 20 on (0 before; 0.086294 at e = 50, capped
at 0.818731 for e ≥ 100; :func:`networks.dcmt.subject_consistency_weight`). As in stage 1 the EMA teacher is
updated by :class:`callbacks.ema_teacher.EMATeacher` per optimiser step (the reference used the epoch index), and
runs in eval mode. The student's only perturbation is its dropout (plus ``feature_noise`` if the DataModule adds
it); the reference's teacher also used dropout (``teacher_train_mode=True``).

Option ``meanpool_prior`` (off by default, i.e. the reference): the logits become
``log(mean slice probability) + aggregator(x)`` with the aggregator's classifier initialised to zero, so training
starts exactly at the mean-pooling decision and the network learns a correction to it. When stage 1 is already
good, mean pooling is hard to beat from a few labeled subjects with the reference's position-specific (T, 1)
read-outs; the prior keeps that baseline and lets the GRU add what the sequence tells beyond it.

Metrics, per class and macro (one-vs-rest): AUROC, accuracy, sensitivity, specificity, F1
(:class:`lightning_modules.dcmt_metrics.SubjectMetrics`). The same metrics of the *mean-pooling baseline*
(the subject's mean slice probability from stage 1) are logged under ``<stage>/meanpool_*``, so every run
reports how much the aggregator adds.
"""

from __future__ import annotations

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from callbacks.ema_teacher import eval_model_names
from lightning_modules.base import EMATeacherHooks, EvaluationHooks, MedAttnModule, default_optimizer
from lightning_modules.classification_metrics import prediction_targets, record_test_predictions
from lightning_modules.metrics.bootstrap import TestPredictions
from lightning_modules.dcmt_metrics import SubjectMetrics
from lightning_modules.registry import register_method
from lightning_modules.stage_metrics import for_stages, log_stage_metrics, set_class_names
from lightning_modules.data_check import check_data_classes
from networks.dcmt import softmax_mse, subject_consistency_weight  # the maths of both DC-MT stages
from networks.ema import make_teacher
from networks.masked_loss import masked_ce

__all__ = ["SubjectAggregationModule"]


class SubjectAggregationModule(EMATeacherHooks, EvaluationHooks, MedAttnModule):
    """Mean-teacher subject classifier on :class:`datamodules.subject_features.SubjectFeatureDataModule` batches.

    Args:
        net: the student aggregator, e.g. :class:`networks.dcmt_subject.BiGRUAggregator`.
        class_names: per-class log keys (replaced by the DataModule's).
        consistency, consistency_start, consistency_rampup, ramp: ω(t) (1, 20, 100, ``"reference"``).
        ramp_unit: ``"epoch"`` (1-based, the reference) or ``"step"``.
        ema_decay, teacher_train_mode, eval_model: as :class:`lightning_modules.dcmt.MeanTeacherModule`.
        meanpool_prior: add the log mean slice probability to the logits (see above); needs a ``classifier``
            layer on ``net`` (zero-initialised here) and ``mean_probabilities`` in the batches.
        optimizer, scheduler: see :class:`lightning_modules.base.MedAttnModule`.
    """

    def __init__(self, net: nn.Module, class_names: list[str] | None = None, consistency: float = 1.0,
                 consistency_start: float = 20, consistency_rampup: float = 100, ramp: str = "reference",
                 ramp_unit: str = "epoch", ema_decay: float = 0.99, teacher_train_mode: bool = False,
                 eval_model: str = "both", meanpool_prior: bool = False,
                 optimizer: OptimizerCallable = default_optimizer,
                 scheduler: LRSchedulerCallable | None = None) -> None:
        super().__init__(optimizer=optimizer, scheduler=scheduler)
        subject_consistency_weight(consistency_start, ramp=ramp)  # validates ramp
        if ramp_unit not in ("epoch", "step"):
            raise ValueError(f"ramp_unit must be 'epoch' or 'step', got {ramp_unit!r}")
        self.eval_names = eval_model_names(eval_model)
        if meanpool_prior:
            nn.init.zeros_(net.classifier.weight)  # start from mean pooling; the correction is learned
        self.student = net
        self.teacher = make_teacher(net, train_mode=teacher_train_mode)
        k = net.num_classes
        self.class_names = list(class_names) if class_names else [f"class_{i}" for i in range(k)]
        def subject_metrics(stage: str) -> nn.ModuleDict:  # one per evaluated network, and the mean-pooling baseline
            nets = {name: SubjectMetrics(k, class_names=self.class_names, suffix="" if i == 0 else f"_{name}")
                    for i, name in enumerate(self.eval_names)}
            return nn.ModuleDict({**nets, "meanpool": SubjectMetrics(k, class_names=self.class_names, prefix="meanpool_")})
        self.val_metrics, self.test_metrics = for_stages(subject_metrics, "val", "test")
        self.test_predictions = {name: TestPredictions(suffix="" if i == 0 else f"_{name}")
                                 for i, name in enumerate(self.eval_names)}

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = check_data_classes(self, self.student.num_classes, what="aggregator")
        set_class_names([self.val_metrics, self.test_metrics], self.class_names)
        if dm is not None:
            expected = getattr(self.student, "in_features", None)
            if hasattr(dm, "num_features") and expected is not None and dm.num_features != expected:
                raise ValueError(f"the aggregator takes {expected} inputs per slice but the data gives "
                                 f"{dm.num_features} (data.inputs={dm.hparams.inputs!r}); set "
                                 "model.net.init_args.in_features")

    def _logits(self, net: nn.Module, features: torch.Tensor, mean_probabilities: torch.Tensor | None) -> torch.Tensor:
        logits = net(features)
        if self.hparams.meanpool_prior:
            if mean_probabilities is None:
                raise ValueError("meanpool_prior=True needs the batch's mean_probabilities")
            logits = logits + mean_probabilities.float().clamp_min(1e-6).log()
        return logits

    def forward(self, features: torch.Tensor, mean_probabilities: torch.Tensor | None = None) -> torch.Tensor:
        return self._logits(self.student, features, mean_probabilities)

    def forward_student(self, features: torch.Tensor, mean_probabilities: torch.Tensor | None = None) -> torch.Tensor:
        return self._logits(self.student, features, mean_probabilities)

    @torch.no_grad()
    def forward_teacher(self, features: torch.Tensor, mean_probabilities: torch.Tensor | None = None) -> torch.Tensor:
        return self._logits(self.teacher, features, mean_probabilities)

    def consistency_weight(self) -> float:
        hp = self.hparams
        t = float(self.current_epoch + 1) if hp.ramp_unit == "epoch" else float(self.global_step)
        return subject_consistency_weight(t, hp.consistency, hp.consistency_start, hp.consistency_rampup, hp.ramp)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        prior = batch.get("mean_probabilities")
        logits = self.forward_student(batch["features"], prior)
        terms = {"cls": masked_ce(logits, batch["labels"], batch["label_mask"])}
        weight = self.consistency_weight()
        total = terms["cls"]
        if weight > 0:
            teacher_logits = self.forward_teacher(batch.get("features_teacher", batch["features"]), prior)
            terms["cons_cls"] = softmax_mse(logits, teacher_logits)
            total = total + weight * terms["cons_cls"]
        terms["total"] = total
        self.check_finite(terms)
        self.log_losses("train", terms, batch_size=len(logits))
        self.log("train/w_cons", weight, on_step=True, on_epoch=False, batch_size=1)
        return total

    def _evaluate(self, batch: dict, stage: str) -> None:
        known = batch["label_mask"].any(1)
        target = batch["labels"].argmax(1)
        metrics = getattr(self, f"{stage}_metrics")
        for i, name in enumerate(self.eval_names):
            logits = self._logits(getattr(self, name), batch["features"], batch.get("mean_probabilities"))
            if i == 0:
                self.log(f"{stage}/loss", masked_ce(logits, batch["labels"], batch["label_mask"]),
                         batch_size=int(known.sum().clamp_min(1)), sync_dist=True)
            if bool(known.any()):
                metrics[name].update(logits[known].float().softmax(-1), target[known])
            if stage == "test":
                record_test_predictions(self.test_predictions[name], batch, logits.detach().float().softmax(-1),
                                        prediction_targets("multiclass", batch["labels"], batch["label_mask"]))
        if bool(known.any()):
            metrics["meanpool"].update(batch["mean_probabilities"][known].float(), target[known])

    def _log_metrics(self, stage: str) -> None:
        for name, metrics in getattr(self, f"{stage}_metrics").items():
            log_stage_metrics(self, stage, metrics)
            if stage == "test" and name in self.test_predictions:
                self.test_predictions[name].finish(self, self.class_names)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        net = getattr(self, self.eval_names[-1])
        logits = self._logits(net, batch["features"], batch.get("mean_probabilities"))
        return {"subject_id": batch["subject_id"], "probabilities": logits.float().softmax(-1)}


register_method("dcmt_subject", SubjectAggregationModule,
                paper="Huo et al., Self-ensembling semi-supervised learning with dual-consistency, MedIA 2022 (stage 2)")
