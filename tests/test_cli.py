"""The ``medattn`` runner: every YAML parses (``--print_config``), composition equals the complete file, and a
tiny fit/test/predict runs end to end with W&B disabled."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from experiments.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT / "experiments"
def _complete(path: Path) -> bool:
    """A config that names its model and data classes; overlays (pcam/avg.yaml, dcmt/labeled_only.yaml) do not."""
    config = yaml.safe_load(path.read_text()) or {}
    return all(isinstance(config.get(k), dict) and "class_path" in config[k] for k in ("model", "data"))


COMPLETE = sorted(p for p in EXPERIMENTS.rglob("*.yaml")
                  if "configs" not in p.parts and "sweeps" not in p.parts and _complete(p))
FRAGMENTS = sorted((EXPERIMENTS / "configs").rglob("*.yaml"))
BASE = EXPERIMENTS / "cam_baseline" / "synthetic.yaml"


def _print_config(args, capsys) -> dict:
    with pytest.raises(SystemExit) as stop:
        main(args + ["--print_config"])
    assert stop.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("path", COMPLETE, ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_every_experiment_yaml_prints(path, capsys):
    config = _print_config(["fit", "-c", str(path)], capsys)
    assert config["model"]["class_path"] and config["data"]["class_path"]


@pytest.mark.parametrize("path", FRAGMENTS, ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_every_fragment_composes_with_an_experiment(path, capsys):
    config = _print_config(["fit", "-c", str(BASE), "-c", str(path)], capsys)
    fragment = yaml.safe_load(path.read_text())
    for section, values in fragment.items():
        if isinstance(values, dict) and "init_args" not in values:
            for key, value in values.items():
                if not isinstance(value, (dict, list)):
                    assert config[section][key] == value, (section, key)


def test_fragments_compose_to_the_complete_cam_baseline(capsys):
    # the complete config runs the CPU preset, an overlay that goes after the model it sets channels_last on
    fragments = [EXPERIMENTS / "configs" / f
                 for f in ("trainer/cpu.yaml", "model/cam_baseline.yaml", "data/synthetic.yaml", "trainer/cpu_fast.yaml")]
    composed = _print_config(["fit"] + sum((["-c", str(f)] for f in fragments), []), capsys)
    complete = _print_config(["fit", "-c", str(BASE)], capsys)
    assert composed["model"] == complete["model"] and composed["data"] == complete["data"]


TINY = ["--model.init_args.net.init_args.backbone", "test_resnet", "--data.init_args.image_size", "32",
        "--data.init_args.reader.init_args.n_images", "60", "--data.init_args.reader.init_args.image_size", "64",
        "--data.init_args.labeled_batch_size", "4", "--data.init_args.eval_batch_size", "8",
        "--data.init_args.num_workers", "0", "--data.init_args.min_per_class", "0"]  # 60 images: counts not the point


def test_tiny_fit_writes_config_csv_checkpoint_and_cams(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDATTN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MEDATTN_RUN_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    main(["fit", "-c", str(BASE), *TINY, "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
          "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false"])
    run_dirs = list((tmp_path / "runs").glob("*/*"))
    assert len(run_dirs) == 1
    run = run_dirs[0]
    assert (run / "config.yaml").is_file() and (run / "metrics.csv").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert list((run / "cams" / "epoch_000").glob("*.png"))
    header = (run / "metrics.csv").read_text().splitlines()[0]
    assert "val/auroc" in header and "train/loss_epoch" in header and "val/cam" not in header
    # a second run gets its own directory: the first config is never overwritten
    monkeypatch.delenv("MEDATTN_RUN_DIR", raising=False)
    main(["test", "-c", str(BASE), *TINY, "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
          "--trainer.limit_test_batches", "1", "--trainer.enable_progress_bar", "false"])
    assert len(list((tmp_path / "runs").glob("*/*"))) == 2


def test_pretrained_without_weights_fails_fast_with_instructions(monkeypatch):
    import time

    from networks.backbones import create_backbone

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="weights_file"):
        create_backbone("resnet18", pretrained=True)
    assert time.perf_counter() - start < 2.0
