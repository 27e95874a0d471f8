"""The acceptance and docs experiments as suite presets (dry runs: nothing is trained) and the one scorer.

Ported from the per-method scripts they replace (experiments/{dcmt,magsd,oxnet}/acceptance.py,
experiments/magsd/crossval.py, experiments/pcam/compare.py): the same arms, configs in the same order, the same
weights tested, and the same folds for every arm."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pandas as pd
import pytest

from experiments import suite as S
from experiments.suite.scoring import scored_predictions

ROOT = Path(__file__).resolve().parents[1]


def _dry(tmp_path, capsys, *args: str) -> dict[str, list[str]]:
    assert S.main([*args, "--dry-run", "--tag", "T", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    return {line.split(": python ", 1)[0].split()[-1]: shlex.split(line.split(": python ", 1)[1])
            for line in printed.splitlines() if line.startswith("[suite] ") and ": python " in line}


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def _configs(argv: list[str]) -> list[str]:
    return [Path(argv[i + 1]).name for i, a in enumerate(argv) if a == "-c"]


@pytest.mark.parametrize("preset", sorted(S.PRESETS))
def test_every_preset_plans_runs_from_files_that_exist(preset, tmp_path, capsys):
    argv = _dry(tmp_path, capsys, "--preset", preset, "--seeds", "0")
    assert argv, f"preset {preset} plans nothing"
    for cmd in argv.values():
        for i, a in enumerate(cmd):
            if a == "-c":
                assert (ROOT / cmd[i + 1]).is_file(), f"{preset}: {cmd[i + 1]} does not exist"


def test_dcmt_acceptance_chains_stage_1_features_into_stage_2(tmp_path, capsys):
    argv = _dry(tmp_path, capsys, "--preset", "dcmt-acceptance", "--seeds", "1")
    assert list(argv) == ["dcmt-l1-s1", "dcmt_supervised-l1-s1", "dcmt_no_attention-l1-s1", "dcmt_subject-l1-s1"]
    assert all(a[3:5] == ["--test-weights", "final"] for a in argv.values())  # no checkpoint selection
    features = tmp_path / "dcmt-acceptance-dcmt-l1" / "dcmt-l1-s1-T" / "slice_features.npz"
    assert _flag(argv["dcmt-l1-s1"], "--export-features") == str(features)
    assert _flag(argv["dcmt_subject-l1-s1"], "--data.init_args.features_file") == str(features)
    assert _configs(argv["dcmt_subject-l1-s1"]) == ["synthetic.yaml"] and "dcmt_subject" in argv["dcmt_subject-l1-s1"][
        argv["dcmt_subject-l1-s1"].index("-c") + 1]
    assert _configs(argv["dcmt_supervised-l1-s1"]) == ["synthetic.yaml", "labeled_only.yaml"]
    assert _flag(argv["dcmt_no_attention-l1-s1"], "--model.init_args.attention_losses") == "false"
    assert "--export-features" not in argv["dcmt_supervised-l1-s1"]
    assert "--trainer.max_time" not in argv["dcmt-l1-s1"]  # the configs' own budgets


def test_arm_flags_reach_one_arm_only(tmp_path, capsys):
    argv = _dry(tmp_path, capsys, "--preset", "dcmt-acceptance", "--seeds", "0", "--arm-flags", "dcmt_subject",
                "--data.init_args.inputs probabilities")
    assert _flag(argv["dcmt_subject-l1-s0"], "--data.init_args.inputs") == "probabilities"
    assert "--data.init_args.inputs" not in argv["dcmt-l1-s0"]


def test_magsd_reference_overlay_sits_under_both_arms_before_the_baseline(tmp_path, capsys):
    argv = _dry(tmp_path, capsys, "--preset", "magsd-reference", "--seeds", "0")
    assert {k: _configs(v) for k, v in argv.items()} == {
        "magsd_reference-l1-s0": ["synthetic.yaml", "reference.yaml"],
        "resnet50_reference-l1-s0": ["synthetic.yaml", "reference.yaml", "resnet50.yaml"]}
    assert all(_flag(a, "--test-weights") == "final" for a in argv.values())
    plain = _dry(tmp_path, capsys, "--preset", "magsd-acceptance", "--seeds", "0")
    assert {k: _configs(v) for k, v in plain.items()} == {"magsd-l1-s0": ["synthetic.yaml"],
                                                          "resnet50-l1-s0": ["synthetic.yaml", "resnet50.yaml"]}


def test_cross_validation_gives_both_arms_the_same_folds(tmp_path, capsys):
    argv = _dry(tmp_path, capsys, "--preset", "magsd-reference-cv")
    assert len(argv) == 10  # 5 folds x 2 arms, seed 0
    for fold in range(5):
        pair = [argv[f"{arm}-l1-s0-f{fold}"] for arm in ("magsd_reference", "resnet50_reference")]
        for a in pair:
            assert (_flag(a, "--data.init_args.num_folds"), _flag(a, "--data.init_args.fold")) == ("5", str(fold))
            assert _configs(a)[0] == "covid_cxr.yaml" and f"fold:{fold}" in _flag(a, "--trainer.logger.init_args.tags")
    with pytest.raises(SystemExit):
        S.main(["--preset", "magsd-reference-cv", "--folds", "1", "--dry-run", "--out", str(tmp_path)])


def test_pcam_pooling_preset_is_pcam_vs_avg_vs_lse_on_the_configs_budget(tmp_path, capsys):
    argv = _dry(tmp_path, capsys, "--preset", "pcam-pooling")
    assert len(argv) == 9 and {k.rsplit("-", 2)[0] for k in argv} == {"pcam", "pcam_avg", "pcam_lse"}
    assert _configs(argv["pcam_lse-l1-s2"]) == ["synthetic.yaml", "lse.yaml"]
    assert _configs(argv["pcam_avg-l1-s0"]) == ["synthetic.yaml", "avg.yaml"]
    assert all("--trainer.max_time" not in a for a in argv.values())


# ------------------------------------------------------------------------------------------------- one scorer
def test_prediction_metrics_hand_case():
    from experiments.suite.scoring import prediction_metrics

    # 3 classes; true 0,0,1,2,-; predicted 0,1,1,1,- (last row has no label: left out)
    frame = pd.DataFrame({
        "image_id": list("abcde"), "patient_id": list("abcde"),
        "label/x": [1, 1, 0, 0, -1], "label/y": [0, 0, 1, 0, -1], "label/z": [0, 0, 0, 1, -1],
        "score/x": [0.8, 0.3, 0.1, 0.2, 0.9], "score/y": [0.1, 0.6, 0.8, 0.5, 0.0], "score/z": [0.1, 0.1, 0.1, 0.3, 0.1],
    })  # fmt: skip
    m = prediction_metrics(frame)
    assert m["test/accuracy"] == pytest.approx(2 / 4)
    assert m["test/recall"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert m["test/precision"] == pytest.approx((1 + 1 / 3 + 0) / 3)
    assert m["test/specificity"] == pytest.approx((2 / 2 + 1 / 3 + 3 / 3) / 3)
    assert m["test/f1"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert prediction_metrics(frame.assign(**{"label/y": [1, 0, 1, 0, 0]})) == {}  # multilabel


def test_scored_predictions_fills_missing_checks_logged_and_ignores_stale_files(tmp_path):
    path = tmp_path / "test_predictions.csv"
    pd.DataFrame({"label/a": [1, 0, 1, 0], "label/b": [0, 1, 0, 1],
                  "score/a": [0.9, 0.2, 0.4, 0.3], "score/b": [0.1, 0.8, 0.6, 0.7]}).to_csv(path, index=False)
    filled = scored_predictions(path, {"test/accuracy": 0.75}, since=0.0)
    assert "test/accuracy" not in filled and filled["test/recall"] == pytest.approx(0.75)
    with pytest.raises(RuntimeError, match="test/accuracy: the module logged 0.500000"):
        scored_predictions(path, {"test/accuracy": 0.5}, since=0.0)
    os.utime(path, (1.0, 1.0))
    assert scored_predictions(path, {}, since=100.0) == {}  # an earlier run's file


@pytest.mark.slow
def test_cross_validation_runs_every_fold_and_partitions_the_data(tmp_path, monkeypatch):
    """Three real folds of a tiny MAG-SD run; compare's per-run table shows the test folds partition the 60 images."""
    from experiments.compare import find_runs, runs_table

    monkeypatch.setenv("WANDB_MODE", "disabled")
    tiny = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.precision=32-true",
            "--model.init_args.net.init_args.backbone=test_resnet", "--model.init_args.net.init_args.num_maps=4",
            f"--data.init_args.reader.init_args.cache_dir={tmp_path}", "--data.init_args.reader.init_args.n_images=60",
            "--data.init_args.reader.init_args.image_size=32", "--data.init_args.image_size=32",
            "--data.init_args.labeled_batch_size=8", "--data.init_args.min_per_class=0"]
    code = S.main(["--arms", "magsd", "--folds", "3", "--seeds", "0", "--test-weights", "final", "--tag", "T",
                   "--out", str(tmp_path / "cv"), "--", *tiny])
    assert code == 0
    table = runs_table(find_runs([tmp_path / "cv"]))
    assert sorted(table["fold"]) == [0, 1, 2]
    assert int(table["data/n_test"].sum()) == 60  # the folds partition the data
    assert table["test/specificity"].notna().all() and table["time/fit_s"].gt(0).all()
