"""``OXnetModule``: omni-supervised detection from box-annotated, image-labelled and unlabeled chest X-rays.

L. Luo, H. Chen, Y. Zhou, H. Lin, P.-A. Heng, "OXnet: Deep Omni-supervised Thoracic Disease Detection from Chest
X-rays", MICCAI 2021 (arXiv:2104.03218). Stage 2 of the recipe: the student (:class:`networks.oxnet.OXnet`) starts
from a stage-1 :class:`~lightning_modules.retinanet.RetinaNetModule` checkpoint, the teacher is its EMA
(``callbacks.ema_teacher.EMATeacher``), and the class prototypes are updated by
``callbacks.prototype_momentum.PrototypeMomentum``; the module adds both itself (``configure_callbacks``). Maths: :mod:`networks.oxnet`.

One training batch holds three streams (``datamodules/batch.py``), each with a fixed count per rank:

==============  ============================================================================================
stream          losses
==============  ============================================================================================
box             focal + smooth-L1 on the boxes; DAA; GPA; label-filtered distillation (``distill_box_stream``)
label           DAA; GPA; label-filtered distillation (pseudo-boxes of classes the image is labelled with)
unlabeled       distillation filtered by teacher confidence only (``unlabeled_score_thresh``), no label filter
==============  ============================================================================================

The label filter is one rule for every stream: a pseudo-box of class c is dropped when c is *known negative* for
the image (``label_mask`` and label 0), so a fully labelled image keeps only its labelled classes and an unlabeled
image (nothing known) keeps everything above the confidence threshold. The reference code had two streams only,
fed its "unlabeled" stream with image labels, and left box images out of distillation; the issue asks for box images
to take part in "everything else", which ``distillation.distill_box_stream=True`` does (``False`` restores the
reference).

Normalisation (why the numbers decompose under DDP): focal/regression are per-image means over the box images, DAA
is divided by the number of labelled images, distillation is a per-image mean over the distillation images, and the
GPA batch means F̄_c are sums all-reduced over ranks with a differentiable all-reduce. With per-rank stream counts fixed
by the sampler, a W-process run therefore has the same loss and gradients as one process on the W-times batch.

Loss weights default to 1 (the reference; its ramped "consistency weight" was computed but never used).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from callbacks.ema_teacher import EMATeacher, eval_model_names
from callbacks.method_callbacks import module_callbacks
from callbacks.prototype_momentum import PrototypeMomentum
from datamodules.batch import STREAM_BOX, STREAM_UNLABELED
from lightning_modules.base import MedAttnModule
from lightning_modules.registry import register_method
from lightning_modules.retinanet import DetectionEvaluation, FrozenBatchNormHooks, load_stage1_weights
from lightning_modules.stage_metrics import for_stages, log_stage_metrics, set_class_names
from networks.ema import make_teacher
from networks.oxnet import (Distillation, OXnet, class_feature_sums, daa_loss, distillation_losses, gpa_losses,
                            pseudo_boxes)
from lightning_modules.data_check import check_data_classes

__all__ = ["OXnetModule"]

LOSS_NAMES = ("focal", "box", "daa", "intra", "inter", "sfl", "consistency")

# A module built in Python keeps its Distillation settings in the hyper-parameters: allow-listed so that its
# checkpoints load as data (weights_only), as lightning_modules.base does for the default optimiser.
torch.serialization.add_safe_globals([Distillation])


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward also sums over ranks (every rank computes the same loss from the sum)."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class OXnetModule(FrozenBatchNormHooks, MedAttnModule):
    """OXnet stage 2.

    Args:
        net: an :class:`networks.oxnet.OXnet` (the student); the teacher is a frozen copy of it. Its RetinaNet's
            ``detection`` settings (:class:`networks.retina.DetectionSettings`) are the supervised loss, anchor
            matching (pseudo-boxes included) and inference settings.
        init_checkpoint: stage-1 checkpoint loaded into ``net.retina`` before the teacher is copied (the global
            head stays zero-initialised). ``None`` starts from the network's own initialisation.
        class_names: per-class key names (replaced by the DataModule's when trained through ``medattn``).
        loss_weights: weight per loss term, by name (``focal``, ``box``, ``daa``, ``intra``, ``inter``, ``sfl``,
            ``consistency``); a term left out weighs 1, as every term does in the reference.
        gpa_margin: δ of the inter-class hinge. gpa_global_batch: under DDP, form F̄_c over the global batch.
        distillation: pseudo-boxes and soft focal loss (:class:`networks.oxnet.Distillation`: confidence
            thresholds for labelled and unlabeled images, their NMS IoU, α₀ α₁ γ, ``distill_box_stream``).
        freeze_bn: keep the student's BatchNorm statistics at their stage-1 values (reference); also what makes
            DDP and single-process runs agree.
        eval_model: ``"student"``, ``"teacher"`` or ``"both"`` (teacher keys get a ``_teacher`` suffix).
        ema_decay: α cap of the teacher EMA (0.99); prototype_beta: momentum β of the class prototypes (0.7). The
            module adds ``EMATeacher(ema_decay)`` and ``PrototypeMomentum(prototype_beta)`` itself
            (:meth:`configure_callbacks`), so OXnet trains as OXnet under any ``Trainer``; a copy listed in
            ``trainer.callbacks`` is dropped with a note if identical and is an error if not
            (:mod:`callbacks.method_callbacks`).
        **kwargs: ``optimizer``, ``scheduler``, ``channels_last`` of :class:`~lightning_modules.base.MedAttnModule`.
    """

    def __init__(
        self,
        net: OXnet,
        init_checkpoint: str | None = None,
        class_names: list[str] | None = None,
        loss_weights: dict[str, float] | None = None,
        gpa_margin: float = 1.0,
        gpa_global_batch: bool = True,
        distillation: Distillation = Distillation(),
        freeze_bn: bool = True,
        eval_model: str = "student",
        ema_decay: float = 0.99,
        prototype_beta: float = 0.7,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        unknown = sorted(set(loss_weights or {}) - set(LOSS_NAMES))
        if unknown:
            raise ValueError(f"loss_weights: unknown loss term(s) {unknown}; the terms are {list(LOSS_NAMES)}")
        self.loss_weights = {name: float((loss_weights or {}).get(name, 1.0)) for name in LOSS_NAMES}
        if not all(0.0 <= w < float("inf") for w in self.loss_weights.values()):
            raise ValueError(f"loss_weights must be finite and >= 0, got {self.loss_weights}")
        self.distillation = distillation
        if init_checkpoint:
            load_stage1_weights(net.retina, init_checkpoint)
        self.student = net
        self.teacher = make_teacher(net)
        k, d = net.num_classes, net.feature_dim
        self.class_names = list(class_names) if class_names else [f"class_{i}" for i in range(k)]
        # Prototype state: persistent buffers, so checkpoints carry it (see callbacks.prototype_momentum).
        self.register_buffer("prototypes", torch.zeros(k, d))
        self.register_buffer("prototype_updates", torch.zeros(k))
        self.prototype_stats: tuple[Tensor, Tensor] | None = None
        self.eval_names = eval_model_names(eval_model)
        self.val_metrics, self.test_metrics = for_stages(lambda stage: nn.ModuleDict({  # one per evaluated network
            name: DetectionEvaluation(k, global_scores=True, suffix="" if i == 0 else f"_{name}",
                                      class_names=self.class_names)
            for i, name in enumerate(self.eval_names)}), "val", "test")

    # ----------------------------------------------------------------------------------------- plumbing
    def setup(self, stage: str) -> None:
        super().setup(stage)
        check_data_classes(self, self.student.num_classes)
        set_class_names([self.val_metrics, self.test_metrics], self.class_names)

    def configure_callbacks(self):
        # The EMA teacher and the prototype momentum are part of the method, not options of a config.
        hp = self.hparams
        return module_callbacks(self, {"ema_decay": lambda: EMATeacher(decay=hp.ema_decay),
                                       "prototype_beta": lambda: PrototypeMomentum(beta=hp.prototype_beta)})

    def train(self, mode: bool = True):
        super().train(mode)  # with freeze_bn, the student's BatchNorm statistics stay fixed (FrozenBatchNormHooks)
        self.teacher.eval()  # the teacher is never in train mode (fixed BN, no dropout)
        return self

    def forward(self, image: Tensor) -> Tensor:
        """Image-level probabilities (B, K) from the global head."""
        return torch.sigmoid(self.student(self.prepare_image(image))["global_logits"])

    def forward_student(self, image: Tensor) -> dict:
        return self.student(self.prepare_image(image))

    @torch.no_grad()
    def forward_teacher(self, image: Tensor) -> dict:
        return self.teacher.forward_detection(self.prepare_image(image))

    def attention_maps(self, image: Tensor) -> Tensor:
        return self.student.attention_maps(self.prepare_image(image))

    def postprocess(self, out: dict, image: Tensor) -> list[dict]:
        return self.student.retina.postprocess(out, image.shape[-2:])

    @torch.no_grad()
    def detect(self, image: Tensor) -> list[dict]:
        """Student detections per image: ``boxes`` (M, 4) ``xyxy`` in input pixels, ``scores``, ``labels``."""
        return self.postprocess(self.forward_student(image), image)

    # ------------------------------------------------------------------------------------------ training
    def _global_sum(self, tensor: Tensor) -> Tensor:
        if self.hparams.gpa_global_batch and _distributed():
            return _AllReduceSum.apply(tensor)
        return tensor

    def supervised_terms(self, out: dict, anchors: Tensor, batch: dict, rows: list[int]) -> tuple[Tensor, Tensor]:
        if not rows:
            zero = out["cls_logits"].sum() * 0.0 + out["box_deltas"].sum() * 0.0
            return zero, zero
        cls, reg = self.student.retina.detection_losses(out["cls_logits"][rows], out["box_deltas"][rows], anchors,
                                                        [batch["boxes"][i] for i in rows],
                                                        [batch["box_labels"][i] for i in rows])
        return cls.mean(), reg.mean()

    def gpa_terms(self, out: dict, positive: Tensor) -> tuple[Tensor, Tensor]:
        """Intra/inter losses against the current prototypes; stores the prototype-update statistics."""
        features = out["category_features"]
        sums, counts = class_feature_sums(features, positive)
        # Under DDP, F̄_c is the global-batch mean: sums and counts are all-reduced (one collective, differentiable).
        reduced = self._global_sum(torch.cat([sums, counts[:, None]], dim=1))
        sums, counts = reduced[:, :-1], reduced[:, -1]
        class_mean = sums / counts.clamp(min=1.0)[:, None]
        intra, inter = gpa_losses(class_mean, counts.detach() > 0, self.prototypes, self.prototype_updates > 0,
                                  self.hparams.gpa_margin)
        # Local statistics for PrototypeMomentum (it all-reduces them): weights y · σ(s), detached.
        probs = torch.sigmoid(out["global_logits"].detach())
        self.prototype_stats = class_feature_sums(features.detach(), positive * probs)
        return intra, inter

    def distillation_terms(self, out: dict, anchors: Tensor, batch: dict, rows: list[int],
                           image_hw) -> tuple[Tensor, Tensor]:
        d = self.distillation
        zero = out["cls_logits"].sum() * 0.0 + out["box_deltas"].sum() * 0.0
        if not rows:
            return zero, zero
        teacher_image = batch.get("image_teacher", batch["image"])[rows]
        teacher = self.forward_teacher(teacher_image)
        teacher_probs = torch.sigmoid(teacher["cls_logits"].float())
        retina = self.student.retina
        known_negative = batch["label_mask"] & (batch["labels"] < 0.5)
        sfl, reg = [], []
        for j, i in enumerate(rows):
            unlabeled = int(batch["stream"][i]) == STREAM_UNLABELED
            thresh = d.unlabeled_score_thresh if unlabeled else d.pseudo_score_thresh
            pseudo = pseudo_boxes(teacher_probs[j], teacher["box_deltas"][j], anchors,
                                  lambda deltas, a: retina.decode(deltas, a, image_hw), thresh, d.pseudo_nms_thresh,
                                  allowed_classes=~known_negative[i])
            s, r = distillation_losses(out["cls_logits"][i], out["box_deltas"][i], teacher_probs[j], anchors,
                                       pseudo["boxes"], retina.box_coder, d, retina.detection)
            sfl.append(s)
            reg.append(r)
        return torch.stack(sfl).mean() + zero, torch.stack(reg).mean() + zero

    def compute_losses(self, batch: dict) -> dict[str, Tensor]:
        """Every loss term and the weighted ``total`` for one three-stream batch (no logging, no guard); also
        stores ``prototype_stats`` for ``PrototypeMomentum``."""
        image = self.prepare_image(batch["image"])
        out = self.student(image)
        anchors = self.student.retina.anchors(image.shape[-2:], out["cls_maps"])
        stream = batch["stream"].tolist()
        box_rows = [i for i, s in enumerate(stream) if s == STREAM_BOX]
        distil_rows = [i for i, s in enumerate(stream) if s != STREAM_BOX or self.distillation.distill_box_stream]
        positive = ((batch["labels"] > 0.5) & batch["label_mask"]).float()

        terms = {}
        terms["focal"], terms["box"] = self.supervised_terms(out, anchors, batch, box_rows)
        terms["daa"] = daa_loss(out["global_logits"], batch["labels"], batch["label_mask"])
        terms["intra"], terms["inter"] = self.gpa_terms(out, positive)
        terms["sfl"], terms["consistency"] = self.distillation_terms(out, anchors, batch, distil_rows,
                                                                     image.shape[-2:])
        terms["total"] = sum(self.loss_weights[name] * terms[name] for name in LOSS_NAMES)
        return terms

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        terms = self.compute_losses(batch)
        self.check_finite(terms)
        self.log_losses("train", terms, batch_size=len(batch["stream"]))
        return terms["total"]

    # ---------------------------------------------------------------------------------------- evaluation
    def eval_step(self, batch: dict, stage: str) -> None:
        image = self.prepare_image(batch["image"])
        for name, evaluation in getattr(self, f"{stage}_metrics").items():
            out = getattr(self, name)(image)
            local = torch.sigmoid(out["cls_logits"].float()).amax(dim=1)
            evaluation.update(self.postprocess(out, image), batch, local, torch.sigmoid(out["global_logits"]))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.eval_step(batch, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        return {"image_id": batch["image_id"], "detections": self.detect(batch["image"]),
                "scores": self(batch["image"])}

    def on_validation_epoch_end(self) -> None:
        for evaluation in self.val_metrics.values():
            log_stage_metrics(self, "val", evaluation)

    def on_test_epoch_end(self) -> None:
        for evaluation in self.test_metrics.values():
            log_stage_metrics(self, "test", evaluation)


register_method("oxnet", OXnetModule,
                paper="Luo et al., OXnet: Deep Omni-supervised Thoracic Disease Detection from Chest X-rays, "
                      "MICCAI 2021")
