"""``medattn`` speaks in one line (issue 15 section 2): a data/weights/checkpoint error is one line naming the file
(``MEDATTN_DEBUG=1`` gives the traceback), ``--x...init_args.y null`` means None, no prefix abbreviations, ``--help``
lists ``compare``, and the end-of-test table shows the headline metrics without the per-class rows."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

from datamodules.cxr import CXRDataModule
from experiments.cli import MedAttnCLI, main
from experiments.cli_support import headline_table, is_per_class

ROOT = Path(__file__).resolve().parents[1]
BASE = str(ROOT / "experiments" / "cam_baseline" / "synthetic.yaml")
TINY = ["--model.init_args.net.init_args.backbone", "test_resnet", "--data.init_args.image_size", "32",
        "--data.init_args.reader.init_args.n_images", "60", "--data.init_args.reader.init_args.image_size", "64",
        "--data.init_args.labeled_batch_size", "4", "--data.init_args.eval_batch_size", "8",
        "--data.init_args.num_workers", "0"]
if "min_per_class" in inspect.signature(CXRDataModule).parameters:  # 60 images: class counts are not the point
    TINY += ["--data.init_args.min_per_class", "0"]
NET = "--model.init_args.net.init_args."


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MEDATTN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MEDATTN_RUN_DIR", raising=False)
    monkeypatch.delenv("MEDATTN_DEBUG", raising=False)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Union subtypes" not in err, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("medattn: error:")]
    assert len(lines) == 1, err[-2000:]
    return lines[0]


def test_missing_weights_file_is_one_line_naming_it(tmp_path, capsys):
    missing = tmp_path / "resnet10t.safetensors"
    with pytest.raises(SystemExit) as stop:
        main(["fit", "-c", BASE, *TINY, NET + "pretrained", "true", NET + "weights_file", str(missing),
              "--trainer.logger", "false", "--trainer.fast_dev_run", "1"])
    assert stop.value.code == 2
    line = _error_line(capsys)
    assert str(missing) in line and "FileNotFoundError" in line and "weights_file null" in line


def test_error_wrapped_by_jsonargparse_is_reported_as_the_original(capsys, monkeypatch):
    """A constructor that refuses its arguments (here: pretrained without a weights file, offline) is shown as its
    own message, not as jsonargparse's "Does not validate against any of the Union subtypes"."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as stop:
        main(["fit", "-c", BASE, *TINY, NET + "pretrained", "true", "--trainer.logger", "false"])
    assert stop.value.code == 2
    line = _error_line(capsys)
    assert line.startswith("medattn: error: RuntimeError: pretrained=True") and "weights_file" in line


def test_forced_linked_value_is_one_line(capsys):
    """``ConfigLinkError`` (a config forcing a value the data contradicts) reaches the terminal as one line too."""
    with pytest.raises(SystemExit) as stop:
        main(["fit", "-c", BASE, *TINY, NET + "num_classes", "3", "--trainer.logger", "false"])
    assert stop.value.code == 2
    line = _error_line(capsys)
    assert "ConfigLinkError" in line and "num_classes=3" in line and "num_classes is 4" in line


def test_debug_switch_gives_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDATTN_DEBUG", "1")
    with pytest.raises(Exception) as raised:  # noqa: PT011 - jsonargparse's wrapper, with the original as cause
        main(["fit", "-c", BASE, *TINY, NET + "weights_file", str(tmp_path / "w.pth"), "--trainer.logger", "false",
              "--trainer.fast_dev_run", "1"])
    assert "w.pth" in str(raised.value) or "w.pth" in str(raised.value.__cause__)


def test_corrupt_checkpoint_is_one_line_naming_it(tmp_path, capsys):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as stop:
        main(["test", "-c", BASE, *TINY, "--ckpt_path", str(bad), "--trainer.logger", "false"])
    assert stop.value.code == 2
    line = _error_line(capsys)
    assert str(bad) in line and "CheckpointError" in line


def test_missing_data_root_is_one_line_in_a_real_process(tmp_path):
    """The output format is the point here, so a real process: no traceback before the line, exit status 2."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MEDATTN_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.cli", "fit", "-c", BASE, *TINY,
         "--data.init_args.reader", "datamodules.readers.nih.NIHChestXray14",
         "--data.init_args.reader.init_args.root", str(tmp_path / "no-nih"), "--trainer.logger", "false",
         "--trainer.fast_dev_run", "1"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("medattn: error: DataError") and str(tmp_path / "no-nih") in last
    assert "--data.init_args.reader.init_args.root" in last  # what to do


def test_null_on_the_command_line_means_none():
    """jsonargparse passes an argument two class levels down as ``--weights_file=None`` (the string 'None')."""
    cli = MedAttnCLI(args=["-c", BASE, *TINY, NET + "weights_file", "some.pth", NET + "weights_file", "null",
                           "--trainer.logger", "false"], run=False)
    assert cli.config.model.init_args.net.init_args.weights_file is None
    assert cli.model.net.num_classes == 4  # built: a 'None' string would have failed "weights_file None does not exist"
    assert "weights_file: null" in cli.parser.dump(cli.config, skip_none=False)  # as RunConfigSaver writes config.yaml


def test_null_shows_as_null_in_print_config(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "-c", BASE, NET + "weights_file", "some.pth", NET + "weights_file=null", "--print_config"])
    import yaml

    net = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["net"]["init_args"]
    assert net["weights_file"] is None and net["backbone"] == "resnet10t"  # merged, the YAML's backbone kept


def test_prefix_abbreviation_is_an_error(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["fit", "-c", BASE, "--trainer.max_epoch", "1", "--print_config"])
    assert stop.value.code == 2
    assert "--trainer.max_epoch" in capsys.readouterr().err


def test_help_lists_compare(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert all(f"    {name} " in out for name in ("fit", "validate", "test", "predict", "compare"))


def test_per_class_keys_and_headline_table():
    names = ["Atelectasis", "Mass"]
    assert is_per_class("test/auroc_per_class/Mass", names) and is_per_class("test/sensitivity/Mass", names)
    assert is_per_class("test/loc/iou/Atelectasis", names) and is_per_class("test/dice_Mass", names)
    assert not is_per_class("test/auroc", names) and not is_per_class("test/loc/iou", names)
    table = headline_table([{"test/auroc": 0.75, "test/auroc_per_class/Mass": 0.5, "test/sensitivity/Mass": 1.0}],
                           names)
    assert "test/auroc " in table and "0.7500" in table and "Mass" not in table and "2 per-class values" in table


def test_after_fit_test_table_has_no_per_class_rows(capsys):
    main(["fit", "-c", BASE, *TINY, "--trainer.fast_dev_run", "1", "--trainer.logger", "false",
          "--trainer.enable_progress_bar", "false"])
    out = capsys.readouterr().out
    assert "test/auroc_per_class/" not in out and "/Nodule" not in out and "/Mass" not in out  # synthetic classes
    assert "test/auroc " in out and "per-class values not shown" in out
