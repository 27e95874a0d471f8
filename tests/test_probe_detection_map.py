"""Probe (issue 14 s7): the detection evaluation's mAP values against a case computed by hand.

``DetectionEvaluation`` (RetinaNet and OXnet, validation and test) logs ``map`` (COCO AP@[.5:.95]), ``map_50``,
``map_75``, ``map_40`` (AP at IoU 0.4) and per class ``ap/<class>``, ``ap40/<class>``. COCO's AP for one class at IoU
threshold t: detections of all images sorted by score; each is a true positive if it matches a not yet matched ground
truth of its image with IoU ≥ t; precision is made non-increasing from the right (the envelope) and read at the 101
recall points 0, 0.01, ..., 1 (the first detection whose recall reaches r; 0 if none); AP = their mean. mAP = mean
over the classes that have ground truth.

Five images, two classes (boxes xyxy):
  A  box stream   GT c0 [0,0,10,10]                          dets: c0 [0,0,10,10] 0.90 (IoU 1);  c1 [40,40,60,60] 0.95
  B  box stream   GT c0 [0,0,20,20], c1 [40,40,60,60]        dets: c0 [0,0,20,12.4] 0.80 (IoU 248/400 = 0.62);
                                                                   c1 [40,40,60,60] 0.30 (IoU 1)
  C  box stream   GT c0 [30,30,50,50]                        dets: c0 [0,0,10,10] 0.85 (no overlap);
                                                                   c0 [30,30,50,39] 0.70 (IoU 180/400 = 0.45)
  D  labels c1 known positive, no boxes -> box annotation incomplete, left out of mAP; det c1 [40,40,60,60] 0.60
  E  every label known negative, no boxes -> complete (a normal image) and kept;       det c1 [40,40,60,60] 0.50

Class 0 (3 GT), detections by score: A 0.90 TP, C 0.85 FP, B 0.80 (TP iff t ≤ 0.62), C 0.70 (TP iff t ≤ 0.45).
  t = 0.40:          TP FP TP TP  recall 1/3 1/3 2/3 1, precision 1 1/2 2/3 3/4, envelope 1 3/4 3/4 3/4
                     -> r ≤ 1/3 (34 points): 1; r > 1/3 (67 points): 3/4    AP = (34 + 67·0.75)/101 = 84.25/101
  t = .50, .55, .60: TP FP TP FP  precision 1 1/2 2/3 1/2, envelope 1 2/3 2/3 1/2
                     -> 34 points at 1, r in (1/3, 2/3] (33 points) at 2/3, r > 2/3 (34 points) at 0   AP = 56/101
  t = .65 ... .95:   TP FP FP FP  -> 34 points at 1, the rest 0                                      AP = 34/101
  AP@[.5:.95] = (3·56 + 7·34) / (10·101) = 406/1010.
Class 1 (1 GT, in B), detections by score: A 0.95 FP, E 0.50 FP, B 0.30 TP (D is left out): recall 0 0 1,
  precision 0 0 1/3, envelope 1/3 everywhere -> AP = 1/3 at every threshold. (Were D counted: 1/4.)
"""

from __future__ import annotations

import pytest
import torch

from lightning_modules.retinanet import DetectionEvaluation
from lightning_modules.stage_metrics import log_stage_metrics

AP0 = {"map": 406 / 1010, "map_50": 56 / 101, "map_75": 34 / 101, "map_40": 84.25 / 101}
AP1 = 1 / 3


def _det(*rows) -> dict:
    return {"boxes": torch.tensor([r[0] for r in rows], dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor([r[1] for r in rows], dtype=torch.float32),
            "labels": torch.tensor([r[2] for r in rows], dtype=torch.long)}


def _batches() -> list[tuple[list[dict], dict]]:
    def batch(ids, labels, has_boxes, gt):
        return {"image_id": ids, "labels": torch.tensor(labels, dtype=torch.float32),
                "label_mask": torch.ones(len(ids), 2, dtype=torch.bool), "has_boxes": torch.tensor(has_boxes),
                "boxes": [torch.tensor(b, dtype=torch.float32).reshape(-1, 4) for b, _ in gt],
                "box_labels": [torch.tensor(c, dtype=torch.long) for _, c in gt]}

    first = ([_det(([0, 0, 10, 10], 0.90, 0), ([40, 40, 60, 60], 0.95, 1)),
              _det(([0, 0, 20, 12.4], 0.80, 0), ([40, 40, 60, 60], 0.30, 1)),
              _det(([0, 0, 10, 10], 0.85, 0), ([30, 30, 50, 39], 0.70, 0))],
             batch(["A", "B", "C"], [[1, 0], [1, 1], [1, 0]], [True, True, True],
                   [([[0, 0, 10, 10]], [0]), ([[0, 0, 20, 20], [40, 40, 60, 60]], [0, 1]), ([[30, 30, 50, 50]], [0])]))
    second = ([_det(([40, 40, 60, 60], 0.60, 1)), _det(([40, 40, 60, 60], 0.50, 1))],
              batch(["D", "E"], [[0, 1], [0, 0]], [False, False], [([], []), ([], [])]))
    return [first, second]


class _Recorder:
    """Stands in for the LightningModule: keeps what ``log_stage_metrics`` logs."""

    def __init__(self) -> None:
        self.logged: dict[str, float] = {}

    def log_dict(self, values, **kwargs) -> None:
        self.logged.update({k: float(v) for k, v in values.items()})


def test_map_values_match_the_hand_computed_case():
    evaluation = DetectionEvaluation(num_classes=2, class_names=["lesion", "nodule"])
    for detections, batch in _batches():  # two update calls: mAP is over the union of every batch
        evaluation.update(detections, batch, local_scores=torch.rand(len(detections), 2))
    module = _Recorder()
    log_stage_metrics(module, "val", evaluation)
    got = module.logged
    for key, ap0 in AP0.items():
        assert got[f"val/{key}"] == pytest.approx((ap0 + AP1) / 2, abs=1e-4), key
    assert got["val/ap/lesion"] == pytest.approx(AP0["map"], abs=1e-4)
    assert got["val/ap40/lesion"] == pytest.approx(AP0["map_40"], abs=1e-4)
    assert got["val/ap/nodule"] == pytest.approx(AP1, abs=1e-4)
    assert got["val/ap40/nodule"] == pytest.approx(AP1, abs=1e-4)
    assert evaluation._pairs == []  # reset for the next epoch
