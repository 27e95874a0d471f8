"""Mirror-copy baseline of a hemisphere hold-out (``holdout: hemisphere``, e.g. ``mni152.yaml``): no learning.

    python -m experiments.nonlocal_unet.mirror_baseline                          # experiments/nonlocal_unet/mni152.yaml
    python -m experiments.nonlocal_unet.mirror_baseline -c my_config.yaml --root DIR --json out.json

The hemisphere protocol trains on one half of the foreground box along ``split_axis`` and evaluates the other.
On a (near-)symmetric brain the evaluated half is almost the mirror image of the training half, so copying
the training half's labels, mirrored, onto the evaluated half scores high with no learning at all. This script
builds the config's own DataModule (same reader, same boxes and halves), predicts every evaluation voxel as the
label of its mirror voxel, and reports Dice per foreground class and their mean exactly as the config's
``medattn test`` does (torchmetrics ``DiceScore(include_background=False, average="none")`` on the evaluation
crop, the metric of ``NonLocalUNetModule``), under the same ``test/dice_<class>`` keys.

Mirror (documented choice): about the centre of the foreground box along ``split_axis``, the plane the protocol
itself splits at (index ``i`` -> ``lo + hi - 1 - i`` for the box ``[lo, hi)``); only training-half labels are
read: a mirror index that falls outside the training half (the midline slice of an odd-length box mirrors onto
itself) is clamped to the nearest training slice. ``--centre world`` mirrors about world coordinate 0 of the
split axis instead (the MNI midline), with the same clamping.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torchmetrics.segmentation import DiceScore

__all__ = ["mirror_prediction", "mirror_dice", "build_datamodule", "main"]


def mirror_prediction(label: np.ndarray, eval_box, train_limits, axis: int, centre2: float) -> np.ndarray:
    """Labels of the ``eval_box`` crop predicted as the labels at the mirror positions ``centre2 - i`` along
    ``axis`` (``centre2`` = twice the mirror plane's index), clamped into ``train_limits`` of that axis."""
    lo, hi = eval_box[axis]
    t_lo, t_hi = train_limits[axis]
    source = np.clip(np.rint(centre2 - np.arange(lo, hi)).astype(int), t_lo, t_hi - 1)
    crop = tuple(slice(a, b) if i != axis else slice(None) for i, (a, b) in enumerate(eval_box))
    return np.take(label[crop], source, axis=axis)


def mirror_dice(dm, centre: str = "box") -> dict[str, float]:
    """``test/dice`` and ``test/dice_<class>`` of the mirror copy on a set-up hemisphere DataModule."""
    from datamodules.volume_segmentation import foreground_box

    if dm.holdout != "hemisphere":
        raise ValueError(f"the mirror-copy baseline needs holdout='hemisphere', got holdout={dm.holdout!r}")
    if centre not in ("box", "world"):
        raise ValueError(f"centre must be 'box' or 'world', got {centre!r}")
    metric = DiceScore(dm.num_classes, include_background=False, average="none", input_format="index")
    axis = dm.split_axis
    test = dm.datasets["test"]
    for vol, eval_box in zip(test.volumes, test.boxes):
        box = foreground_box(vol.image[dm.foreground_channel] != 0, vol.subject_id)
        full = tuple((0, s) for s in vol.image.shape[1:])
        low, high = dm._halves(box, full)
        train_limits = (low if dm.train_side == "low" else high)[1]
        if centre == "box":
            centre2 = box[axis][0] + box[axis][1] - 1
        else:
            if vol.affine is None or vol.affine[axis, axis] == 0:
                raise ValueError(f"subject {vol.subject_id}: no axis-aligned affine for --centre world")
            centre2 = 2.0 * -vol.affine[axis, 3] / vol.affine[axis, axis]
        pred = mirror_prediction(vol.label, eval_box, train_limits, axis, centre2)
        truth = vol.label[tuple(slice(a, b) for a, b in eval_box)]
        metric.update(torch.from_numpy(pred)[None], torch.from_numpy(truth)[None])
    values = metric.compute().float().reshape(-1)
    out = {"test/dice": float(values.nanmean())}
    out.update({f"test/dice_{name}": float(v) for name, v in zip(dm.class_names[1:], values)})
    return out


def build_datamodule(configs: list[str], root: str | None):
    """The config's VolumeSegmentationDataModule, set up (``root`` replaces the reader's ``root``)."""
    import importlib

    from experiments.cli import DATA_PLACEHOLDER, data_root
    from experiments.suite import merged_config

    def build(spec):
        if isinstance(spec, dict) and "class_path" in spec:
            module, _, name = spec["class_path"].rpartition(".")
            kwargs = {k: build(v) for k, v in (spec.get("init_args") or {}).items()}
            return getattr(importlib.import_module(module), name)(**kwargs)
        if isinstance(spec, str) and spec.startswith(DATA_PLACEHOLDER):
            return str(data_root()) + spec[len(DATA_PLACEHOLDER):]
        return spec

    data = dict(merged_config(configs)["data"])
    if root is not None:
        data = json.loads(json.dumps(data))
        data["init_args"]["reader"].setdefault("init_args", {})["root"] = root
    dm = build(data)
    dm.prepare_data()
    dm.setup("test")
    return dm


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog="python -m experiments.nonlocal_unet.mirror_baseline",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", action="append", help="config file(s) (default: mni152.yaml)")
    parser.add_argument("--root", help="data folder (replaces data.init_args.reader.init_args.root)")
    parser.add_argument("--centre", choices=["box", "world"], default="box", help="mirror plane (see the docstring)")
    parser.add_argument("--json", type=Path, help="also write the metrics here")
    args = parser.parse_args(argv)
    configs = args.config or [str(Path(__file__).with_name("mni152.yaml"))]
    result = mirror_dice(build_datamodule(configs, args.root), args.centre)
    for key, value in result.items():
        print(f"{key}\t{value:.4f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
