"""``python -m experiments.retest``: the best checkpoint of a finished run, tested again with its own config."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from experiments import retest
from experiments.cli import MedAttnCLI
from tests.test_run_identity import RUNS, TINY, _clean_env

pytestmark = pytest.mark.slow


def test_retest_reproduces_the_original_test_and_keeps_names(tmp_path, monkeypatch):
    _clean_env(monkeypatch, tmp_path)
    monkeypatch.setenv("MEDATTN_RUN_ID", "orig")
    MedAttnCLI(args=["fit", *TINY, "--trainer.max_epochs", "2", "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")])
    monkeypatch.delenv("MEDATTN_RUN_ID")
    run = tmp_path / RUNS / "cam_baseline-synthetic-orig"
    assert (run / "checkpoints" / "best.ckpt").is_file()
    original = pd.read_csv(run / "metrics.csv")

    out = tmp_path / "again"
    # the child processes import the project from the repository root, whatever the working directory
    assert retest.main([str(tmp_path / "runs"), "--out", str(out)]) == 0
    again = out / RUNS.name / "cam_baseline-synthetic-orig"  # same group folder, same name and run id
    assert (again / "retest_of.txt").read_text().strip() == str((run / "checkpoints" / "best.ckpt").resolve())
    new = pd.read_csv(again / "metrics.csv")
    # unchanged evaluation code and the same best checkpoint: the same test numbers
    for key in ("test/auroc", "test/loss"):
        assert float(new[key].dropna().iloc[-1]) == pytest.approx(float(original[key].dropna().iloc[-1]), abs=1e-6)


def test_retest_refuses_an_output_inside_its_input(tmp_path):
    with pytest.raises(SystemExit):
        retest.main([str(tmp_path), "--out", str(tmp_path / "sub")])
