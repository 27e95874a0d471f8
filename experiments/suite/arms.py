"""The suite's arms (one configuration each) and presets (one documented experiment each)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arm:
    """One configuration of the suite. ``config`` may contain ``{dataset}``.

    ``init_from``: the arm whose checkpoint (same seed, labels and fold; ``best.ckpt``, else ``last.ckpt``) initialises
    this one (OXnet's stage 1 -> stage 2). ``features_from``: the arm whose tested weights export the slice features
    this one reads (DC-MT's "predict slice features -> stage 2"). ``knob``: how the label budget reaches the data
    (``labels``: unlabeled_fraction / label_ratio, ``box``: box_fraction, ``none``: labels 1 only, ``inherit``: no
    flag, the budget comes with ``features_from``'s features)."""

    name: str
    config: str
    pair: str = ""
    role: str = ""
    flags: tuple[str, ...] = ()
    knob: str = "labels"
    init_from: str | None = None
    init_flag: str = "--model.init_args.init_checkpoint"
    overlays: tuple[str, ...] = ()  # configs composed after ``config`` (-c), e.g. a pooling variant
    features_from: str | None = None

    @property
    def needs(self) -> str | None:
        return self.init_from or self.features_from


# Both OXnet stage-2 arms continue stage 1 the same way: a fresh AdamW at OXnet's stage-2 learning rate and the
# BatchNorm statistics frozen at their stage-1 values (as experiments/oxnet/synthetic.yaml), so they differ only in
# the data and losses of stage 2.
STAGE2 = ("--model.init_args.optimizer.init_args.lr", "3e-4", "--model.init_args.freeze_bn", "true")
MAGSD_REF = "experiments/magsd/reference.yaml"

ARMS: dict[str, Arm] = {arm.name: arm for arm in [
    Arm("pcam", "experiments/pcam/{dataset}.yaml", "pcam", "method"),
    Arm("cam_baseline", "experiments/cam_baseline/{dataset}.yaml", "pcam", "baseline"),
    Arm("pcam_avg", "experiments/pcam/{dataset}.yaml", "pcam", "baseline", overlays=("experiments/pcam/avg.yaml",)),
    Arm("pcam_lse", "experiments/pcam/{dataset}.yaml", "pcam", "baseline", overlays=("experiments/pcam/lse.yaml",)),
    Arm("magsd", "experiments/magsd/{dataset}.yaml", "magsd", "method"),
    Arm("resnet50", "experiments/magsd/{dataset}.yaml", "magsd", "baseline", overlays=("experiments/magsd/resnet50.yaml",)),
    # the reference recipe goes after the base and before the baseline overlay (the other order is refused)
    Arm("magsd_reference", "experiments/magsd/{dataset}.yaml", "magsd_reference", "method", overlays=(MAGSD_REF,)),
    Arm("resnet50_reference", "experiments/magsd/{dataset}.yaml", "magsd_reference", "baseline",
        overlays=(MAGSD_REF, "experiments/magsd/resnet50.yaml")),
    Arm("dcmt", "experiments/dcmt/{dataset}.yaml", "dcmt", "method"),
    Arm("dcmt_supervised", "experiments/dcmt/{dataset}.yaml", "dcmt", "baseline", overlays=("experiments/dcmt/labeled_only.yaml",)),
    Arm("dcmt_no_attention", "experiments/dcmt/{dataset}.yaml", "dcmt", "ablation",
        flags=("--model.init_args.attention_losses", "false")),
    Arm("dcmt_subject", "experiments/dcmt_subject/{dataset}.yaml", "dcmt_subject", "method", knob="inherit",
        features_from="dcmt"),
    Arm("retinanet_stage1", "experiments/retinanet/{dataset}.yaml", "oxnet", "stage1", knob="box"),
    Arm("retinanet", "experiments/retinanet/{dataset}.yaml", "oxnet", "baseline", knob="box", flags=STAGE2,
        init_from="retinanet_stage1"),
    Arm("oxnet", "experiments/oxnet/{dataset}.yaml", "oxnet", "method", knob="box", flags=STAGE2,
        init_from="retinanet_stage1"),
    Arm("nonlocal_unet", "experiments/nonlocal_unet/{dataset}.yaml", "nonlocal", "method", knob="none"),
    Arm("unet", "experiments/nonlocal_unet/{dataset}.yaml", "nonlocal", "baseline", knob="none",
        flags=("--model.init_args.net.init_args.global_aggregation", "false")),
]}

# Keys: arms, seeds, labels, minutes (whole suite, split per run) | max_time (per run) | epochs (+ stage1_epochs) |
# own_budget (the configs' own max_time/max_epochs), name (suite name, default the dataset), dataset, folds,
# test ("best": the checkpoint the config's ModelCheckpoint chose; "final": the weights at the end of training).
PRESETS = {
    # <= 15 min on 2 cores: 4 runs of ~3 min
    "quick": {"arms": ["pcam", "cam_baseline"], "seeds": [0, 1], "labels": [1.0], "minutes": 15},
    # <= 60 min on 2 cores
    "full": {"arms": ["pcam", "cam_baseline", "pcam_avg", "pcam_lse", "magsd", "resnet50", "dcmt", "dcmt_supervised",
                      "retinanet", "oxnet", "nonlocal_unet", "unet"], "seeds": [0, 1], "labels": [1.0], "minutes": 60},
    # the label-budget curves of the pairs that use unlabeled images or few boxes
    "labels": {"arms": ["pcam", "cam_baseline", "dcmt", "dcmt_supervised", "retinanet", "oxnet"], "seeds": [0, 1],
               "labels": [0.1, 0.25, 1.0], "minutes": 60},
    # docs/results.md tables, one preset each
    "pcam-pooling": {"arms": ["pcam", "pcam_avg", "pcam_lse"], "seeds": [0, 1, 2], "own_budget": True,
                     "name": "pcam-pooling"},
    "dcmt-acceptance": {"arms": ["dcmt", "dcmt_supervised", "dcmt_no_attention", "dcmt_subject"], "seeds": [0, 1, 2],
                        "own_budget": True, "test": "final", "name": "dcmt-acceptance"},
    "magsd-acceptance": {"arms": ["magsd", "resnet50"], "seeds": [0, 1, 2], "own_budget": True, "test": "final",
                         "name": "magsd-acceptance"},
    "magsd-reference": {"arms": ["magsd_reference", "resnet50_reference"], "seeds": [0, 1, 2], "own_budget": True,
                        "test": "final", "name": "magsd-reference"},
    "magsd-reference-cv": {"arms": ["magsd_reference", "resnet50_reference"], "seeds": [0], "dataset": "covid_cxr",
                           "folds": 5, "own_budget": True, "test": "final", "name": "magsd-reference-cv"},
    "oxnet": {"arms": ["retinanet_stage1", "retinanet", "oxnet"], "seeds": [0, 1, 2], "epochs": 20,
              "stage1_epochs": 20, "name": "oxnet"},
    "nonlocal": {"arms": ["nonlocal_unet", "unet"], "seeds": [0, 1, 2], "epochs": 10, "name": "nonlocal-synthetic"},
}
