"""The comparison suite builds the expected command lines (dry run, nothing is trained), maps the label budget onto
each DataModule's knob, and expands W&B sweep grids offline; every sweep YAML is a valid sweep whose parameters
the ``medattn`` parser accepts."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from experiments import suite as S

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "experiments" / "sweeps").glob("*.yaml"))


def _commands_from(printed: str) -> dict[str, list[str]]:
    """run name -> argv of every `[suite] i/n name: python ...` line printed."""
    out = {}
    for line in printed.splitlines():
        if line.startswith("[suite] ") and ": python " in line:
            head, cmd = line.split(": python ", 1)
            out[head.split()[-1]] = shlex.split(cmd)
    return out


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_quick_preset_dry_run_builds_the_expected_commands(tmp_path, capsys):
    assert S.main(["--preset", "quick", "--dry-run", "--tag", "T", "--out", str(tmp_path)]) == 0
    cmds = _commands_from(capsys.readouterr().out)
    assert list(cmds) == ["pcam-l1-s0", "cam_baseline-l1-s0", "pcam-l1-s1", "cam_baseline-l1-s1"]
    argv = cmds["cam_baseline-l1-s1"]
    assert argv[:4] == ["-m", "experiments.suite", "fit-test", "-c"]
    assert _flag(argv, "-c") == "experiments/cam_baseline/synthetic.yaml"
    assert _flag(argv, "--seed_everything") == "1"
    # 15 minutes for 4 runs with 45 s overhead each: (900 - 180) / 4 = 180 s of training per run
    assert {_flag(a, "--trainer.max_time") for a in cmds.values()} == {"00:00:03:00"}
    assert _flag(argv, "--trainer.logger.init_args.name") == "cam_baseline-l1-s1"
    assert _flag(argv, "--trainer.logger.init_args.group") == "synthetic/cam_baseline-l1"
    assert yaml.safe_load(_flag(argv, "--trainer.logger.init_args.tags")) == [
        "suite:synthetic", "method:cam_baseline", "labels:1", "seed:1", "pair:pcam", "role:baseline"]
    assert _flag(argv, "--trainer.logger.init_args.save_dir") == str(tmp_path)
    assert _flag(argv, "--data.init_args.unlabeled_fraction") == "0"  # labels 1: nothing hidden
    assert not (tmp_path / "logs").exists()  # a dry run starts nothing


def test_label_budget_and_extra_flags_reach_every_run(tmp_path, capsys):
    extra = tmp_path / "mydata.yaml"
    extra.write_text("data:\n  init_args:\n    num_workers: 0\n")
    S.main(["--arms", "pcam", "nonlocal_unet", "unet", "--labels", "0.25", "1", "--seeds", "3", "--max-time",
            "00:00:01:00", "-c", str(extra), "--name", "mine", "--dry-run", "--tag", "T", "--out", str(tmp_path),
            "--", "--trainer.max_epochs", "2"])
    printed = capsys.readouterr().out
    cmds = _commands_from(printed)
    assert list(cmds) == ["pcam-l0.25-s3", "pcam-l1-s3", "nonlocal_unet-l1-s3", "unet-l1-s3"]
    argv = cmds["pcam-l0.25-s3"]
    assert _flag(argv, "--data.init_args.unlabeled_fraction") == "0.75"
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "-c"] == ["experiments/pcam/synthetic.yaml", str(extra.resolve())]
    assert argv[-2:] == ["--trainer.max_epochs", "2"] and _flag(argv, "--trainer.max_time") == "00:00:01:00"
    assert "suite:mine" in _flag(argv, "--trainer.logger.init_args.tags")
    assert _flag(cmds["unet-l1-s3"], "--model.init_args.net.init_args.global_aggregation") == "false"
    assert "global_aggregation" not in " ".join(cmds["nonlocal_unet-l1-s3"])
    assert "nonlocal_unet: no label knob - runs at labels 1 only, skipped at 0.25" in printed
    assert "medattn compare" in printed and "--tags suite:mine" in printed


def test_budget_flags_per_datamodule():
    cxr = {"data": {"class_path": "datamodules.cxr.CXRDataModule", "init_args": {"unlabeled_batch_size": 0}}}
    arm = S.ARMS["pcam"]
    assert S.budget_flags(arm, cxr, 0.1) == ["--data.init_args.unlabeled_fraction", "0.9"]
    assert S.budget_flags(arm, cxr, 1.0) == ["--data.init_args.unlabeled_fraction", "0"]
    semi = {"data": {"class_path": "datamodules.slices.SliceStackDataModule",
                     "init_args": {"label_ratio": 0.25, "unlabeled_batch_size": 30}}}
    assert S.budget_flags(S.ARMS["dcmt"], semi, 0.1) == ["--data.init_args.label_ratio", "0.1"]
    # at 100 % labels no unlabeled image is left: the unlabeled stream is switched off
    assert S.budget_flags(S.ARMS["dcmt"], semi, 1.0) == ["--data.init_args.label_ratio", "1",
                                                         "--data.init_args.unlabeled_batch_size", "0"]
    boxes = {"data": {"class_path": "datamodules.cxr.CXRDataModule", "init_args": {"box_fraction": 0.4}}}
    assert S.budget_flags(S.ARMS["oxnet"], boxes, 0.25) == ["--data.init_args.box_fraction", "0.1"]
    assert S.budget_flags(S.ARMS["oxnet"], boxes, 1.0) == []
    with pytest.raises(ValueError, match="box_fraction"):
        S.budget_flags(S.ARMS["retinanet"], {"data": {"init_args": {"box_fraction": None}}}, 0.5)
    volumes = {"data": {"class_path": "datamodules.volume_segmentation.VolumeSegmentationDataModule", "init_args": {}}}
    assert S.budget_flags(S.ARMS["nonlocal_unet"], volumes, 0.5) is None
    assert S.budget_flags(S.ARMS["nonlocal_unet"], volumes, 1.0) == []


def test_plan_adds_and_orders_dependencies_and_reports_missing_configs(tmp_path):
    """A chained arm brings the arm it starts from (stage 1 before stage 2), and an arm whose config is missing is
    left out with a note, never silently."""
    ghost = S.Arm("ghost", "experiments/ghost/{dataset}.yaml", "g", "method")
    runs, notes = S.plan([S.ARMS["oxnet"], S.ARMS["pcam"], ghost], [0], [1.0], "synthetic", "x", [], tmp_path, "T")
    assert "ghost: experiments/ghost/synthetic.yaml does not exist - arm left out" in notes
    assert "oxnet: needs the retinanet_stage1 arm - added" in notes
    assert [r.arm.name for r in runs] == ["pcam", "retinanet_stage1", "oxnet"]
    assert runs[0].run_dir == tmp_path / "x-pcam-l1" / "pcam-l1-s0-T"


def test_max_time_split():
    assert S.max_time_for(24, 60, 45) == "00:00:01:45"  # (3600 - 24 * 45) / 24 = 105 s
    assert S.max_time_for(100, 10, 45) == "00:00:00:30"  # never below 30 s
    assert S._seconds("00:01:02:03") == 3723


def test_grid_from_a_sweep_yaml(tmp_path):
    runs = S.grid_plan(str(ROOT / "experiments" / "sweeps" / "pcam.yaml"), [], [9], "g", [], tmp_path, "T")
    # 3 pools x 2 learning rates, each with the sweep's own seeds 0 and 1
    assert len(runs) == 12 and {r.seed for r in runs} == {0, 1}
    labels = {r.tags[1] for r in runs}
    assert "method:pcam[pool=lse,lr=0.001]" in labels and len(labels) == 6
    first = runs[0]
    assert first.configs == ["experiments/pcam/synthetic.yaml"]
    assert first.flags == ["--model.init_args.net.init_args.pool=pcam", "--model.init_args.optimizer.init_args.lr=0.0003"]
    assert first.group == "g/00" and runs[1].group == "g/00" and runs[2].group == "g/01"  # seeds share a group


def test_grid_from_config_files(tmp_path, capsys):
    configs = [str(ROOT / "experiments" / f) for f in ("pcam/synthetic.yaml", "cam_baseline/synthetic.yaml")]
    S.main(["--configs", *configs, "--seeds", "0", "1",
            "--dry-run", "--tag", "T", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    cmds = _commands_from(printed)
    assert list(cmds) == ["configs-00-s0", "configs-00-s1", "configs-01-s0", "configs-01-s1"]
    assert "--trainer.max_time" not in cmds["configs-00-s0"]  # a plain grid keeps the configs' own budgets
    assert "method:cam_baseline/synthetic" in _flag(cmds["configs-01-s1"], "--trainer.logger.init_args.tags")


def test_grid_needs_explicit_values(tmp_path):
    sweep = tmp_path / "s.yaml"
    sweep.write_text("method: bayes\nparameters:\n  lr: {min: 0.1, max: 1.0}\ncommand: [medattn, fit]\n")
    with pytest.raises(ValueError, match="no `values`"):
        S.grid_runs(str(sweep))


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_yaml_is_a_wandb_grid_the_cli_accepts(path, capsys):
    sweep = yaml.safe_load(path.read_text())
    assert sweep["method"] == "grid" and sweep["metric"]["goal"] in ("maximize", "minimize")
    assert sweep["command"][:2] == ["medattn", "fit"] and sweep["command"][-1] == "${args}"
    assert all("values" in spec for spec in sweep["parameters"].values())
    stem, configs, combos = S.grid_runs(str(path))
    assert configs and combos
    if not (ROOT / configs[0]).is_file():
        pytest.skip(f"{configs[0]} does not exist yet")
    from experiments.cli import main

    first = {k: v for k, v in combos[0].items() if not k.startswith("_")}
    args = ["fit", "-c", str(ROOT / configs[0]), *(f"--{k}={S._arg(v)}" for k, v in first.items()), "--print_config"]
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    for key, value in first.items():  # every swept parameter landed where the sweep says
        node = config
        for part in key.split("."):
            node = node[part]
        assert node == value, key


@pytest.mark.parametrize("arm", sorted(S.ARMS))
def test_every_arm_names_files_that_exist(arm):
    """An arm whose config or overlay is missing would be left out of every preset with only a printed note
    (the DC-MT baseline pointed at a removed synthetic_labeled_only.yaml until 2026-12-06)."""
    a = S.ARMS[arm]
    for path in [a.config.format(dataset="synthetic"), *a.overlays]:
        assert (ROOT / path).is_file(), f"arm {arm}: {path} does not exist"


def test_epoch_budget_replaces_the_time_limit(tmp_path, capsys):
    """``--epochs N``: every run trains N epochs with no wall-clock limit, so the comparison does not depend on
    the machine's load; mixing it with a wall-clock budget is refused."""
    assert S.main(["--arms", "pcam", "pcam_avg", "--seeds", "0", "--epochs", "7", "--dry-run", "--tag", "T",
                   "--out", str(tmp_path)]) == 0
    cmds = _commands_from(capsys.readouterr().out)
    assert set(cmds) == {"pcam-l1-s0", "pcam_avg-l1-s0"}
    for argv in cmds.values():
        assert _flag(argv, "--trainer.max_epochs") == "7" and _flag(argv, "--trainer.max_time") == "null"
    with pytest.raises(SystemExit):
        S.main(["--arms", "pcam", "--epochs", "7", "--minutes", "5", "--dry-run", "--out", str(tmp_path)])


def test_folds_and_labels_are_refused_for_a_config_grid(tmp_path):
    """--folds with --configs used to plan a single run, the folds silently dropped."""
    for extra in (["--folds", "5"], ["--labels", "0.5"]):
        with pytest.raises(SystemExit):
            S.main(["--configs", "experiments/magsd/covid_cxr.yaml", *extra, "--dry-run", "--out", str(tmp_path)])
