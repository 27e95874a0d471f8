"""Patient-level bootstrap interval of the macro AUROC, and the per-image test predictions it is computed from.

A single run's test AUROC is one draw: which patients happened to be in the test split matters as much as the
seed. :func:`bootstrap_macro_auroc` resamples **patients** with replacement (all images of a drawn patient come
along, as often as the patient is drawn), recomputes the macro AUROC under the project policy (mean over classes
with a positive and a negative in the resample, :mod:`lightning_modules.metrics.auroc`), and returns
the percentile interval. Resampling images instead would treat correlated images of one patient as independent
and give a too-narrow interval.

Defaults: 1000 resamples, seed 0, 95 % percentile interval. Resamples are weights on the images (how often each
image's patient was drawn), so each resample costs one weighted Mann-Whitney pass over presorted scores:
O(R·N·K) after one sort per class, a fraction of a second for thousands of images.

:class:`TestPredictions` collects ``image_id, patient_id, label, score`` per test image in a module, gathers
them from every rank, writes ``<run dir>/test_predictions.csv`` and logs ``test/auroc_ci_low`` and
``test/auroc_ci_high`` (plus ``test/auroc_ci_resamples``, the resamples with at least one defined class).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from lightning_modules.metrics.gather import all_gather_list

__all__ = ["weighted_auroc", "bootstrap_macro_auroc", "TestPredictions", "N_RESAMPLES", "CI_LEVEL"]

N_RESAMPLES = 1000
CI_LEVEL = 0.95


def weighted_auroc(scores: np.ndarray, target: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC of one class under R weightings of its N entries: ``(N,), (N,) 0/1, (R, N) -> (R,)``, NaN where the
    weighted set has no positive or no negative. Ties count 1/2 (the Mann-Whitney statistic, = trapezoidal AUC)."""
    order = np.argsort(scores, kind="stable")
    s, y, w = scores[order], target[order].astype(bool), weights[:, order]
    if len(s) == 0:
        return np.full(w.shape[0], np.nan)
    group = np.concatenate([[0], np.cumsum(s[1:] != s[:-1])])  # tie groups, increasing score
    starts = np.flatnonzero(np.concatenate([[True], s[1:] != s[:-1]]))
    neg = np.add.reduceat(w * ~y, starts, axis=1)  # (R, groups): weight of the negatives in each tie group
    below = np.cumsum(neg, axis=1) - neg  # negatives strictly below each group
    credit = below + 0.5 * neg
    pos_w = w * y
    total_pos, total_neg = pos_w.sum(1), neg.sum(1)
    numerator = (pos_w * credit[:, group]).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = numerator / (total_pos * total_neg)
    auc[(total_pos <= 0) | (total_neg <= 0)] = np.nan
    return auc


def _macro(scores: np.ndarray, target: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(R,) macro AUROC under the policy; ``target`` (N, K) in {0, 1, -1 unknown}."""
    per_class = []
    for k in range(target.shape[1]):
        known = target[:, k] >= 0
        per_class.append(weighted_auroc(scores[known, k], target[known, k], weights[:, known]))
    per_class = np.stack(per_class, axis=1)
    out = np.full(per_class.shape[0], np.nan)
    any_defined = ~np.isnan(per_class).all(1)
    out[any_defined] = np.nanmean(per_class[any_defined], axis=1)
    return out


def bootstrap_macro_auroc(scores, target, patient_ids: Sequence, n_resamples: int = N_RESAMPLES, seed: int = 0,
                          level: float = CI_LEVEL, chunk: int = 100) -> dict[str, float]:
    """Macro AUROC and its patient-level bootstrap percentile interval.

    Args:
        scores: (N, K) scores (probabilities or logits; only their order matters).
        target: (N, K) 0/1 per class (multilabel, or one-hot multiclass = one-vs-rest), -1 = unknown entry.
        patient_ids: (N,) the resampling unit of each row.
    Returns ``{"auroc", "low", "high", "resamples"}``: point estimate on the data as given, interval bounds, and
    the number of resamples with a defined value (the others are dropped; all NaN -> NaN bounds).
    """
    scores, target = np.asarray(scores, float), np.asarray(target, float)
    if scores.ndim == 1:
        scores, target = scores[:, None], target[:, None]
    if scores.shape != target.shape or len(patient_ids) != len(scores):
        raise ValueError(f"scores {scores.shape}, target {target.shape} and {len(patient_ids)} patient ids must "
                         "have one row per image")
    _, patient = np.unique(np.asarray(patient_ids, dtype=str), return_inverse=True)
    n_patients = int(patient.max()) + 1 if len(patient) else 0
    point = float(_macro(scores, target, np.ones((1, len(scores))))[0]) if len(scores) else math.nan
    rng = np.random.default_rng(seed)
    values = []
    for start in range(0, n_resamples, chunk):
        r = min(chunk, n_resamples - start)
        draws = rng.integers(0, n_patients, size=(r, n_patients)) if n_patients else np.zeros((r, 0), int)
        counts = np.stack([np.bincount(d, minlength=n_patients) for d in draws]) if n_patients else draws
        values.append(_macro(scores, target, counts[:, patient].astype(float)))
    values = np.concatenate(values) if values else np.zeros(0)
    values = values[~np.isnan(values)]
    alpha = (1.0 - level) / 2
    low, high = (np.quantile(values, [alpha, 1 - alpha]) if len(values) else (math.nan, math.nan))
    return {"auroc": point, "low": float(low), "high": float(high), "resamples": float(len(values))}


class TestPredictions:
    """Per-image test predictions of one network: collected per batch, gathered, written, bootstrapped.

    ``update(image_ids, patient_ids, scores (B, K), target (B, K) 0/1/-1)``; ``finish(module, class_names)``
    (every rank calls it: it gathers) writes ``test_predictions.csv`` (``image_id, patient_id, label/<class>,
    score/<class>``; rank duplicates from a padded ``DistributedSampler`` removed by ``image_id``) into the run
    directory and logs ``test/auroc_ci_low``/``_high``/``_resamples`` (``suffix`` appended, e.g. ``_student``).
    """

    def __init__(self, n_resamples: int = N_RESAMPLES, seed: int = 0, level: float = CI_LEVEL,
                 filename: str = "test_predictions.csv", suffix: str = "") -> None:
        self.n_resamples, self.seed, self.level, self.filename, self.suffix = n_resamples, seed, level, filename, suffix
        self.rows: list[tuple[str, str, np.ndarray, np.ndarray]] = []

    def reset(self) -> None:
        self.rows = []

    def update(self, image_ids: Sequence, patient_ids: Sequence, scores: torch.Tensor, target: torch.Tensor) -> None:
        s = scores.detach().float().cpu().numpy()
        t = target.detach().float().cpu().numpy()
        for i, (image_id, patient_id) in enumerate(zip(image_ids, patient_ids)):
            self.rows.append((str(image_id), str(patient_id), t[i], s[i]))

    def _gathered(self) -> list:
        rows = all_gather_list(self.rows)
        unique = {row[0]: row for row in rows}  # a padded sampler repeats images on some rank
        return [unique[k] for k in sorted(unique)]

    def frame(self, rows: list, class_names: Sequence[str]) -> pd.DataFrame:
        data = {"image_id": [r[0] for r in rows], "patient_id": [r[1] for r in rows]}
        for k, name in enumerate(class_names):
            data[f"label/{name}"] = [r[2][k] for r in rows]
        for k, name in enumerate(class_names):
            data[f"score/{name}"] = [r[3][k] for r in rows]
        return pd.DataFrame(data)

    def finish(self, module, class_names: Sequence[str]) -> dict[str, float]:
        trainer = module.trainer
        run_dir = trainer.log_dir or trainer.default_root_dir  # a collective under DDP: every rank resolves it
        rows = self._gathered()
        self.reset()
        if not rows:
            return {}
        result = bootstrap_macro_auroc(np.stack([r[3] for r in rows]), np.stack([r[2] for r in rows]),
                                       [r[1] for r in rows], self.n_resamples, self.seed, self.level)
        if trainer.is_global_zero and run_dir:
            name = self.filename if not self.suffix else self.filename.replace(".csv", f"{self.suffix}.csv")
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            self.frame(rows, class_names).to_csv(Path(run_dir) / name, index=False)
        values = {f"test/auroc_ci_low{self.suffix}": result["low"], f"test/auroc_ci_high{self.suffix}": result["high"],
                  f"test/auroc_ci_resamples{self.suffix}": result["resamples"]}
        # identical on every rank (same gathered rows, same seed): no further sync
        module.log_dict({k: torch.tensor(v, dtype=torch.float32) for k, v in values.items() if not math.isnan(v)},
                        sync_dist=False)
        return result
