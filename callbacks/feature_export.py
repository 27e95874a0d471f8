"""Write per-slice features and probabilities from ``predict`` to one ``.npz`` file (DC-MT stage 1 → 2).

Used with ``medattn predict`` on a trained :class:`lightning_modules.dcmt.MeanTeacherModule`, whose
``predict_step`` returns ``features`` (B, D), ``probabilities`` (B, K) and the batch's names. The file holds
(N = slices of every subject, sorted by subject then slice):

* ``features`` float32 (N, D), ``probabilities`` float32 (N, K);
* ``image_id``, ``subject_id`` str (N,); ``slice_index`` int64 (N,);
* ``slice_label``, ``subject_label`` int64 (N,), −1 where unknown;
* ``class_names`` str (K,);
* ``subject_role`` str (N,) and ``subject_fold`` int64 (N,): each slice's subject's stage-1 role (``labeled``,
  ``unlabeled``, ``val``, ``test``) and fold, and ``split_info`` (a JSON string: the split arguments), from the
  DataModule's ``split_record()`` (:class:`datamodules.slices.SliceStackDataModule`). DC-MT stage 2 takes its
  split from these arrays, so every subject keeps its stage-1 role; a DataModule without ``split_record`` gives a
  file without them, which stage 2 refuses.

Under DDP each rank writes a shard next to the output, then rank 0 merges them (dropping duplicates) and
deletes the shards. Strings are stored as fixed-width unicode arrays, so ``np.load`` needs no pickle;
:func:`datamodules.subject_features.read_slice_features` reads the file back.

Example::

    medattn predict -c experiments/dcmt/synthetic.yaml --ckpt_path runs/.../last.ckpt \\
        --trainer.callbacks+=callbacks.feature_export.SliceFeatureWriter \\
        --trainer.callbacks.output_path=slice_features.npz
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

__all__ = ["SliceFeatureWriter"]

_KEYS = ("features", "probabilities", "image_id", "subject_id", "slice_index", "slice_label", "subject_label")


def _to_numpy(value) -> np.ndarray:
    if torch.is_tensor(value):
        return value.detach().cpu().numpy()
    return np.asarray(value)


class SliceFeatureWriter(BasePredictionWriter):
    """Collect ``predict_step`` outputs batch by batch and write them at the end of the predict epoch.

    Args:
        output_path: the ``.npz`` file (parent folders are created; relative to the working directory).
    """

    def __init__(self, output_path: str | Path = "slice_features.npz") -> None:
        super().__init__(write_interval="batch")
        self.output_path = Path(output_path)
        self._parts: list[dict[str, np.ndarray]] = []

    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._parts = []

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        missing = [k for k in ("features", "probabilities", "image_id", "subject_id", "slice_index") if k not in prediction]
        if missing:
            raise KeyError(f"SliceFeatureWriter needs predict_step to return {missing}; got {sorted(prediction)}")
        part = {k: _to_numpy(prediction[k]) for k in ("features", "probabilities", "image_id", "subject_id", "slice_index")}
        part["features"] = part["features"].astype(np.float32)
        part["probabilities"] = part["probabilities"].astype(np.float32)
        n = len(part["image_id"])
        if "labels" in prediction and "label_mask" in prediction:
            labels, known = _to_numpy(prediction["labels"]), _to_numpy(prediction["label_mask"]).any(1)
            part["slice_label"] = np.where(known, labels.argmax(1), -1).astype(np.int64)
        else:
            part["slice_label"] = np.full(n, -1, np.int64)
        part["subject_label"] = (_to_numpy(prediction["subject_label"]).astype(np.int64) if "subject_label" in prediction
                                 else np.full(n, -1, np.int64))
        self._parts.append(part)

    def _merged(self, parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        data = {k: np.concatenate([p[k] for p in parts]) for k in _KEYS}
        _, first = np.unique(data["image_id"].astype(str), return_index=True)
        data = {k: v[first] for k, v in data.items()}
        order = np.lexsort((data["slice_index"], data["subject_id"].astype(str)))
        data = {k: v[order] for k, v in data.items()}
        for key in ("image_id", "subject_id"):
            data[key] = data[key].astype(str)
        return data

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._parts:
            return
        out = self.output_path.expanduser().absolute()
        out.parent.mkdir(parents=True, exist_ok=True)
        class_names = np.asarray(list(getattr(pl_module, "class_names", [])), dtype=str)
        record = getattr(trainer.datamodule, "split_record", None) if trainer.datamodule is not None else None
        roles = record() if callable(record) else None
        if trainer.world_size > 1:
            shard = out.with_name(f"{out.stem}.rank{trainer.global_rank}.npz")
            np.savez(shard, **self._merged(self._parts))
            trainer.strategy.barrier("slice_feature_writer")
            if trainer.is_global_zero:
                shards = [out.with_name(f"{out.stem}.rank{r}.npz") for r in range(trainer.world_size)]
                parts = [dict(np.load(s)) for s in shards]
                self._write(out, self._merged(parts), class_names, roles)
                for s in shards:
                    s.unlink()
            trainer.strategy.barrier("slice_feature_writer_done")
        else:
            self._write(out, self._merged(self._parts), class_names, roles)
        self._parts = []

    @staticmethod
    def _with_roles(out: Path, data: dict[str, np.ndarray], roles) -> dict[str, np.ndarray]:
        """Add ``subject_role``, ``subject_fold`` and ``split_info`` (see the module doc)."""
        if roles is None:
            print(f"[medattn] note: {out} records no stage-1 subject roles (the DataModule has no split_record()); "
                  "DC-MT stage 2 will refuse it")
            return data
        frame, info = roles
        frame = frame.set_index("subject_id")
        subjects = data["subject_id"].astype(str)
        missing = sorted(set(subjects) - set(frame.index))
        if missing:
            raise ValueError(f"SliceFeatureWriter: subjects {missing[:3]} were predicted but have no role in the "
                             "DataModule's split_record()")
        return {**data, "subject_role": frame["role"].reindex(subjects).to_numpy().astype(str),
                "subject_fold": frame["fold"].reindex(subjects).to_numpy().astype(np.int64),
                "split_info": np.asarray(json.dumps(info, sort_keys=True))}

    @staticmethod
    def _write(out: Path, data: dict[str, np.ndarray], class_names: np.ndarray, roles=None) -> None:
        data = SliceFeatureWriter._with_roles(out, data, roles)
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.npz")
        np.savez(tmp, class_names=class_names, **data)
        os.replace(tmp, out)
        print(f"[medattn] wrote {len(data['image_id'])} slice features of {len(np.unique(data['subject_id']))} "
              f"subjects ({data['features'].shape[1]}-d) to {out}")

