"""``RetinaNetModule``: supervised RetinaNet on the box stream (OXnet stage 1), plus the detection evaluation that
OXnet reuses.

T.-Y. Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017; configured as in OXnet's stage 1 (dossier
``method-oxnet.md`` b.1). The network, anchors and losses are in :mod:`networks.retina`.

Evaluation (validation and test), shared with :mod:`lightning_modules.oxnet`:
    * torchmetrics ``MeanAveragePrecision`` (``faster_coco_eval`` backend, maxDets 100, all areas):
      ``<stage>/map`` (AP@[.5:.95]), ``map_50``, ``map_75``, ``map_40`` (AP at IoU 0.4, the reference's "AP40"),
      and per-class ``<stage>/ap/<class>`` (AP@[.5:.95]) and ``<stage>/ap40/<class>``.
    * Which images enter mAP: those whose box annotation is complete, i.e. box-stream images (``has_boxes``) and
      images known to be normal (every label known and 0), which have no lesion to box. An image with a finding
      but no boxes is left out (its missing boxes would count as false positives).
    * ``<stage>/auroc_local``: image-level AUROC of the highest anchor probability per class, macro over the classes
      with positive and negative images (the project policy, :mod:`lightning_modules.metrics.auroc`;
      ``<stage>/auroc_local_classes`` of them; OXnet's global head likewise as ``auroc``/``auroc_classes``).
    * No bootstrap interval here: detection is reported with mAP, whose patient-level bootstrap would rerun the
      COCO evaluation per resample (the classification methods log ``test/auroc_ci_low``/``_high``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torchmetrics.detection import MeanAveragePrecision

from datamodules.batch import STREAM_BOX
from lightning_modules.base import MedAttnModule
from lightning_modules.classification_metrics import IGNORE, metric_targets
from lightning_modules.metrics.auroc import MaskedMultilabelAUROC
from lightning_modules.metrics.gather import all_gather_list
from lightning_modules.registry import register_method
from lightning_modules.stage_metrics import for_stages, log_stage_metrics, set_class_names
from networks.retina import RetinaNet
from lightning_modules.data_check import check_data_classes

__all__ = ["RetinaNetModule", "DetectionEvaluation", "FrozenBatchNormHooks", "box_complete", "freeze_batchnorm_",
           "load_stage1_weights"]


def box_complete(batch: dict) -> Tensor:
    """(B,) bool: images whose box annotation is complete (box stream, or known normal)."""
    normal = batch["label_mask"].all(dim=1) & (batch["labels"].sum(dim=1) == 0)
    return batch["has_boxes"].bool() | normal


def freeze_batchnorm_(module: nn.Module) -> None:
    """Put every BatchNorm of ``module`` in eval mode (running statistics fixed; affine weights still train), as
    the reference does each epoch. Needed with small per-rank batches, and makes DDP ranks agree exactly."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


class FrozenBatchNormHooks:
    """For a detection :class:`MedAttnModule` with hyper-parameter ``freeze_bn`` (list it before ``MedAttnModule`` in
    the bases): in training every BatchNorm of the module keeps its running statistics (:func:`freeze_batchnorm_`).
    Lightning 2.6 keeps the modules' modes as it finds them (it never calls ``train()`` at fit start), so the modes
    are (re)applied at each epoch start; the evaluation loop restores them afterwards."""

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.hparams.freeze_bn:
            freeze_batchnorm_(self)
        return self

    def on_train_epoch_start(self) -> None:
        self.train(True)


def load_stage1_weights(retina: RetinaNet, checkpoint: str | Path) -> None:
    """Load a stage-1 checkpoint into ``retina``: a Lightning checkpoint of ``RetinaNetModule`` (``net.*`` keys) or
    a plain RetinaNet ``state_dict``. Strict, so a mismatched architecture fails with the offending keys.

    The file is loaded as data and verified (:func:`callbacks.checkpoint_io.load_checkpoint_file`): a checkpoint
    that holds code, or is corrupt, is refused with an error naming it. A P7 conv saved by a pyramid ending at P6
    (networks built before P7 was dropped from such pyramids, where it never reached an output) is skipped."""
    from callbacks.checkpoint_io import load_checkpoint_file

    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"init_checkpoint {path} does not exist (train stage 1 first: "
                                "medattn fit -c experiments/retinanet/synthetic.yaml)")
    state = load_checkpoint_file(path, map_location="cpu")
    state = state.get("state_dict", state)
    if any(k.startswith("net.") for k in state):
        state = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
    if not hasattr(retina.fpn.extra_blocks, "p7"):
        state = {k: v for k, v in state.items() if not k.startswith("fpn.extra_blocks.p7.")}
    retina.load_state_dict(state, strict=True)


class DetectionEvaluation(nn.Module):
    """One stage's detection metrics: mAP (IoU [.5:.95] and IoU 0.4, torchmetrics), the local image-level AUROC
    and, with ``global_scores=True``, the AUROC of an image-level head (OXnet's global logits).

    ``class_names`` name the per-class APs; ``suffix`` is appended to the metric names (``val/map_teacher``) when
    several networks are evaluated. Logged with :func:`lightning_modules.stage_metrics.log_stage_metrics`.

    mAP under DDP: the per-image (prediction, target) pairs are kept on the CPU and gathered to every rank with
    ``all_gather_object`` before ``MeanAveragePrecision`` is computed on their union, sorted by image id. Letting
    torchmetrics sync its own list states instead breaks when a rank has no detection in its shard (an empty 1-D
    state against another rank's (N, 4) boxes: gloo aborts), and the image order - which decides COCO's
    tie-breaking between equal scores - would differ from a 1-process run. Sorting makes the value identical to
    the 1-process value over the same images.
    """

    def __init__(self, num_classes: int, global_scores: bool = False, suffix: str = "",
                 class_names: list[str] | None = None) -> None:
        super().__init__()
        self.suffix = suffix
        self.class_names = list(class_names) if class_names else [f"class_{k}" for k in range(num_classes)]
        self._pairs: list[tuple[str, dict, dict]] = []  # (image id, prediction, target), on the CPU
        self.auroc_local = MaskedMultilabelAUROC(num_classes, ignore_index=IGNORE)
        self.auroc = MaskedMultilabelAUROC(num_classes, ignore_index=IGNORE) if global_scores else None

    def update(self, detections: list[dict], batch: dict, local_scores: Tensor,
               global_scores: Tensor | None = None) -> None:
        complete = box_complete(batch).tolist()
        ids = batch.get("image_id") or [f"{len(self._pairs) + i}" for i in range(len(complete))]
        for image_id, det, boxes, labels, keep in zip(ids, detections, batch["boxes"], batch["box_labels"], complete):
            if keep:
                pred = {k: v.detach().float().cpu() if k != "labels" else v.detach().long().cpu()
                        for k, v in det.items()}
                self._pairs.append((str(image_id), pred, {"boxes": boxes.float().cpu(), "labels": labels.long().cpu()}))
        truth = metric_targets("multilabel", batch["labels"], batch["label_mask"])
        self.auroc_local.update(local_scores.detach().float(), truth)
        if self.auroc is not None:
            self.auroc.update(global_scores.detach().float(), truth)

    def _gathered_pairs(self) -> list[tuple[str, dict, dict]]:
        return sorted(all_gather_list(self._pairs), key=lambda pair: pair[0])

    @staticmethod
    def _mean_ap(pairs: list[tuple[str, dict, dict]], **kwargs) -> dict:
        metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", class_metrics=True,
                                      backend="faster_coco_eval", sync_on_compute=False, **kwargs)
        if pairs:
            metric.update([p for _, p, _ in pairs], [t for _, _, t in pairs])
        return metric.compute()

    def compute(self) -> dict[str, Tensor]:
        """Every value global (collectives under DDP: every rank calls this): mAP from the gathered pairs, AUROC
        synchronised by torchmetrics."""
        class_names = self.class_names
        pairs = self._gathered_pairs()
        full, at40 = self._mean_ap(pairs), self._mean_ap(pairs, iou_thresholds=[0.4])
        values = {k: full[k] for k in ("map", "map_50", "map_75")}
        values["map_40"] = at40["map"]
        for key, result in (("ap", full), ("ap40", at40)):
            classes = result["classes"].reshape(-1).tolist()
            per_class = result.get("map_per_class", torch.zeros(0)).reshape(-1).tolist()
            for c, ap in zip(classes, per_class):
                if ap >= 0 and 0 <= c < len(class_names):  # -1 = class absent from the ground truth
                    values[f"{key}/{class_names[c]}"] = torch.tensor(ap)
        local = self.auroc_local.compute()
        values["auroc_local"], values["auroc_local_classes"] = local["auroc"], local["auroc_classes"]
        if self.auroc is not None:
            image_level = self.auroc.compute()
            values["auroc"], values["auroc_classes"] = image_level["auroc"], image_level["auroc_classes"]
        return {k + self.suffix: v.float() for k, v in values.items()}

    def reset(self) -> None:
        self._pairs = []
        for metric in (self.auroc_local, self.auroc):
            if metric is not None:
                metric.reset()


class RetinaNetModule(FrozenBatchNormHooks, MedAttnModule):
    """RetinaNet trained on the box-annotated images of each batch (other streams are ignored).

    Args:
        net: a :class:`networks.retina.RetinaNet` (injected from the config); its ``detection`` settings
            (:class:`networks.retina.DetectionSettings`) hold the loss and inference settings.
        class_names: names for per-class keys; the DataModule's names replace them when trained through ``medattn``.
        freeze_bn: keep backbone BatchNorm statistics fixed (reference; use with pretrained weights). Off by
            default here because the backbone starts from scratch on the synthetic data.
        init_checkpoint: weights to start from (a ``RetinaNetModule`` checkpoint or a RetinaNet ``state_dict``),
            with a fresh optimiser: the box-only continuation that OXnet stage 2 is compared with.
        **kwargs: ``optimizer``, ``scheduler``, ``channels_last`` of :class:`~lightning_modules.base.MedAttnModule`.
    """

    def __init__(self, net: RetinaNet, class_names: list[str] | None = None, freeze_bn: bool = False,
                 init_checkpoint: str | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if init_checkpoint:
            load_stage1_weights(net, init_checkpoint)
        self.net = net
        num_classes = net.num_classes
        self.class_names = list(class_names) if class_names else [f"class_{k}" for k in range(num_classes)]
        self.val_metrics, self.test_metrics = for_stages(
            lambda stage: DetectionEvaluation(num_classes, class_names=self.class_names), "val", "test")

    # ----------------------------------------------------------------------------------------- plumbing
    def setup(self, stage: str) -> None:
        super().setup(stage)
        check_data_classes(self, self.net.num_classes)
        set_class_names([self.val_metrics, self.test_metrics], self.class_names)

    def forward(self, image: Tensor) -> Tensor:
        """Image-level class scores (B, K): the highest anchor probability per class."""
        return torch.sigmoid(self.net(self.prepare_image(image))["cls_logits"].float()).amax(dim=1)

    def attention_maps(self, image: Tensor) -> Tensor:
        return self.net.attention_maps(self.prepare_image(image))

    def postprocess(self, out: dict, image: Tensor) -> list[dict]:
        return self.net.postprocess(out, image.shape[-2:])

    @torch.no_grad()
    def detect(self, image: Tensor) -> list[dict]:
        """Detections per image: ``boxes`` (M, 4) ``xyxy`` in input pixels, ``scores``, ``labels``."""
        return self.postprocess(self.net(self.prepare_image(image)), image)

    # ------------------------------------------------------------------------------------------ training
    def supervised_losses(self, out: dict, image_hw, boxes: list[Tensor],
                          labels: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Mean focal and regression losses over the images of ``out`` (one per entry of ``boxes``)."""
        anchors = self.net.anchors(image_hw, out["cls_maps"])
        cls, reg = self.net.detection_losses(out["cls_logits"], out["box_deltas"], anchors, boxes, labels)
        return cls.mean(), reg.mean()

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        rows = (batch["stream"] == STREAM_BOX).nonzero().squeeze(1).tolist()
        if not rows:
            raise ValueError("RetinaNetModule needs box-stream images in every training batch: set "
                             "data.init_args.box_batch_size > 0 (and box_fraction > 0)")
        image = self.prepare_image(batch["image"][rows])
        out = self.net(image)
        focal, box = self.supervised_losses(out, image.shape[-2:], [batch["boxes"][i] for i in rows],
                                            [batch["box_labels"][i] for i in rows])
        terms = {"focal": focal, "box": box, "total": focal + box}
        self.check_finite(terms)
        self.log_losses("train", terms, batch_size=len(rows))
        return terms["total"]

    # ---------------------------------------------------------------------------------------- evaluation
    def eval_step(self, batch: dict, stage: str) -> None:
        image = self.prepare_image(batch["image"])
        out = self.net(image)
        scores = torch.sigmoid(out["cls_logits"].float()).amax(dim=1)
        getattr(self, f"{stage}_metrics").update(self.postprocess(out, image), batch, scores)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self.eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.eval_step(batch, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        return {"image_id": batch["image_id"], "detections": self.detect(batch["image"])}

    def on_validation_epoch_end(self) -> None:
        log_stage_metrics(self, "val", self.val_metrics)

    def on_test_epoch_end(self) -> None:
        log_stage_metrics(self, "test", self.test_metrics)


register_method("retinanet", RetinaNetModule,
                paper="Lin et al., Focal Loss for Dense Object Detection, ICCV 2017")
