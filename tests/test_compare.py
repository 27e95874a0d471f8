"""``medattn compare`` on recorded fixture runs (tests/fixtures/compare_runs/suite: hand-written config.yaml + metrics.csv;
tests/fixtures/compare_runs/leet: the JSON lines `wandb leet inspect --json` prints), checked against hand-computed values.

Fixture values (test metrics, seeds 0 / 1 / 2):
    pcam          test/auroc 0.80 0.84 0.90   test/loc/iou@0.3 0.50 0.40 0.60   pointing 0.6 0.7 (missing)
    cam_baseline  test/auroc 0.70 0.75 0.74   test/loc/iou@0.3 0.30 0.35 0.20   pointing 0.5 0.4 0.3
plus an older pcam seed-0 run (test/auroc 0.10) that must be ignored, a run of group ``legacy/group`` with
``unlabeled_fraction: 0.75`` (labels 0.25, seed 5) and a bare CSVLogger folder ``csv_only/version_0``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from experiments import compare as C

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "compare_runs"
RUNS = FIXTURES / "suite"


def _mean_std(values):
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    return C.compare(C.find_runs([RUNS]), out, name="fixture")


def row(summary: pd.DataFrame, method: str, labels: float = 1.0) -> pd.Series:
    rows = summary[(summary["method"] == method) & (summary["labels"] == labels)]
    assert len(rows) == 1, summary[["method", "labels"]]
    return rows.iloc[0]


def test_rows_are_methods_and_label_fractions(result):
    summary = result["summary"]
    assert list(zip(summary["method"], summary["labels"])) == [
        ("pcam", 1.0), ("cam_baseline", 1.0), ("csv_only", 1.0), ("legacy/group", 0.25)]
    assert list(summary["n"]) == [3, 3, 1, 1]
    assert row(summary, "pcam")["seeds"] == "0 1 2"  # the older seed-0 run was dropped, not averaged
    assert row(summary, "legacy/group", 0.25)["seeds"] == "5"


def test_mean_and_std_over_seeds_match_hand_computed_values(result):
    summary = result["summary"]
    for method, auroc, iou in (("pcam", [0.80, 0.84, 0.90], [0.50, 0.40, 0.60]),
                               ("cam_baseline", [0.70, 0.75, 0.74], [0.30, 0.35, 0.20])):
        r = row(summary, method)
        for metric, values in (("test/auroc", auroc), ("test/loc/iou@0.3", iou)):
            mean, std = _mean_std(values)
            assert r[f"{metric} mean"] == pytest.approx(mean, abs=1e-9)
            assert r[f"{metric} std"] == pytest.approx(std, abs=1e-9)
    # pcam: 0.846667 ± 0.050332 ; cam: 0.730000 ± 0.026458 (worked by hand in the module docstring's numbers)
    assert row(summary, "pcam")["test/auroc std"] == pytest.approx(0.050332, abs=1e-6)
    assert row(summary, "cam_baseline")["test/loc/iou@0.3 std"] == pytest.approx(0.076376, abs=1e-6)


def test_markdown_table_text(result):
    lines = result["markdown"].splitlines()
    assert lines[0] == "| method | labels | seeds | test/auroc | test/loc/iou@0.3 | test/loc/pointing | time/fit_s |"
    assert lines[2] == "| pcam | 1 | 3 | 0.847 ± 0.050 | 0.500 ± 0.100 | 0.650 ± 0.071 (2/3) | 110 ± 10 |"
    assert lines[3] == "| cam_baseline | 1 | 3 | 0.730 ± 0.026 | 0.283 ± 0.076 | 0.400 ± 0.100 | 90 ± 10 |"
    assert lines[4] == "| csv_only | 1 | 1 | 0.580 | – | – | – |"  # one seed: the value alone
    assert lines[5] == "| legacy/group | 0.25 | 1 | 0.660 | 0.250 | – | 42 |"


def test_pair_differences_are_paired_by_seed(result):
    # pcam − cam per seed: auroc 0.10 0.09 0.16 -> 0.116667 ± 0.037859; iou 0.20 0.05 0.40 -> 0.216667 ± 0.175594;
    # pointing (seeds 0, 1 only) 0.1 0.3 -> 0.2 ± 0.141421; time 20 20 20 -> 20 ± 0
    line = [l for l in result["pairs"].splitlines() if l.startswith("| pcam |")][0]
    assert line == "| pcam | 1 | pcam − cam_baseline | 3 | 0.117 ± 0.038 | 0.217 ± 0.176 | 0.200 ± 0.141 (2/3) | 20 ± 0 |"


def test_files_written(result):
    written = result["written"]
    assert set(written) == {"csv", "md", "runs_csv", "pairs_md", "png", "labels_png"}
    table = pd.read_csv(written["csv"])
    assert table.loc[table["method"] == "pcam", "test/auroc mean"].item() == pytest.approx(0.846667, abs=1e-6)
    runs = pd.read_csv(written["runs_csv"])
    assert len(runs) == 8 and sorted(runs.loc[runs["method"] == "pcam", "test/auroc"]) == [0.80, 0.84, 0.90]
    assert written["md"].read_text() == result["markdown"]
    for key in ("png", "labels_png"):
        assert written[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and written[key].stat().st_size > 5000


def test_val_metrics_come_from_the_best_epoch_of_the_monitor_or_the_last():
    run = C.load_csv_run(RUNS / "fixture-pcam-l1" / "pcam-l1-s0-20260101-120000")
    best = C.run_values(run, "best")  # ModelCheckpoint monitor val/auroc (max): epoch 1
    assert (best["val/auroc"], best["val/loss"], best["val/best_epoch"]) == (0.85, 0.50, 1.0)
    last = C.run_values(run, "last")
    assert (last["val/auroc"], last["val/loss"]) == (0.80, 0.45)
    by_loss = C.run_values(run, "best", monitor="val/loss", mode="min")  # epoch 2
    assert (by_loss["val/auroc"], by_loss["val/loss"]) == (0.80, 0.45)
    assert best["test/auroc"] == 0.80 and best["time/fit_s"] == 100  # test/time: last logged value


def test_metric_globs_and_val_mode(tmp_path):
    runs = [r for r in C.find_runs([RUNS]) if "pcam" in r.tags or r.tag("method") == "pcam"]
    out = C.compare(runs, tmp_path, metrics=["val/*"], val="best", plot=False)
    r = row(out["summary"], "pcam")
    assert r["val/auroc mean"] == pytest.approx((0.85 + 0.88 + 0.90) / 3)
    assert "test/auroc mean" not in out["summary"]


def test_tag_and_group_filters():
    runs = C.find_runs([RUNS])
    assert len(runs) == 9
    assert {C.identify(r)[0] for r in C._filter(runs, None, ["role:baseline"])} == {"cam_baseline"}
    assert len(C._filter(runs, None, ["pair:pcam", "seed:1"])) == 2  # all of the tags
    assert C._filter(runs, None, ["pair:pcam", "seed:7"]) == []
    assert {r.group for r in C._filter(runs, ["legacy/*"], None)} == {"legacy/group"}


def test_offline_wandb_records_parse_like_a_csv_run():
    run = C.parse_leet_records((FIXTURES / "leet" / "offline-run.jsonl").read_text().splitlines(), "x")
    assert run.group == "fixture/dcmt-l0.25" and run.tag("method") == "dcmt"
    assert C.identify(run) == ("dcmt", 0.25, 3)
    values = C.run_values(run)  # monitor val/loss (min) from the logged config: epoch 1
    assert (values["val/auroc"], values["val/loss"], values["test/auroc"], values["test/mtiou"]) == (0.64, 0.7, 0.67, 0.41)


class _FakeRun:
    def __init__(self, seed, auroc):
        self.id, self.url, self.name, self.group = f"r{seed}", f"https://x/r{seed}", f"pcam-s{seed}", "g/pcam"
        self.tags = ["method:pcam", f"seed:{seed}"]
        self.config = {"config": {"seed_everything": seed}}
        self.summary = {"test/auroc": auroc, "_runtime": 3.0, "val/cam": {"_type": "images"}}

    def history(self, samples, pandas):
        return pd.DataFrame({"epoch": [0, 1], "val/auroc": [0.5, 0.6]})


class _FakeApi:
    def __init__(self):
        self.calls = []

    def runs(self, path, filters):
        self.calls.append((path, filters))
        return [_FakeRun(0, 0.7), _FakeRun(1, 0.9)]


def test_online_runs_through_the_wandb_api_interface(tmp_path):
    api = _FakeApi()
    runs = C.load_wandb_online("team/medattn", ["g/pcam"], ["suite:x"], api=api)
    assert api.calls == [("team/medattn", {"$and": [{"group": {"$in": ["g/pcam"]}}, {"tags": {"$in": ["suite:x"]}}]})]
    load = C.load_wandb_online("team/medattn", None, ["suite:x", "pair:p"], api=api)
    assert api.calls[-1][1] == {"$and": [{"tags": {"$in": ["suite:x"]}}, {"tags": {"$in": ["pair:p"]}}]} and load
    out = C.compare(runs, tmp_path, plot=False)
    r = row(out["summary"], "pcam")
    assert r["test/auroc mean"] == pytest.approx(0.8) and r["test/auroc std"] == pytest.approx(math.sqrt(0.02))


def test_medattn_compare_subcommand_and_readme_section(tmp_path, capsys):
    from experiments.cli import main

    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- results:start -->\nold\n<!-- results:end -->\ntail\n")
    main(["compare", str(RUNS), "--tags", "suite:fixture", "--out", str(tmp_path / "o"), "--name", "t",
          "--no-plot", "--readme", str(readme)])
    printed = capsys.readouterr().out
    assert "| pcam | 1 | 3 | 0.847 ± 0.050 |" in printed and "legacy" not in printed
    text = readme.read_text()
    assert "old" not in text and "| cam_baseline | 1 | 3 | 0.730 ± 0.026 |" in text and text.endswith("tail\n")
    assert "Method − baseline, paired by seed:" in text and "| pcam | 1 | pcam − cam_baseline | 3 | 0.117 ± 0.038 |" in text
    assert (tmp_path / "o" / "t.csv").is_file() and not (tmp_path / "o" / "t.png").exists()


def test_no_runs_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no runs found"):
        C.main([str(tmp_path), "--out", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        C.find_runs([tmp_path / "missing"])


@pytest.mark.slow
def test_real_offline_wandb_run_is_read_with_leet(tmp_path, monkeypatch):
    """A real offline W&B run (no metrics.csv beside it) read through `wandb leet inspect --json`."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = wandb.init(project="medattn", dir=str(tmp_path), group="g/leet", tags=["method:leet", "seed:4"],
                     config={"config": {"seed_everything": 4}}, name="leet-s4", mode="offline")
    for epoch, value in enumerate([0.5, 0.9, 0.7]):
        run.log({"epoch": epoch, "val/auroc": value})
    run.log({"test/auroc": 0.77})
    run.finish()
    runs = C.find_runs([tmp_path], source="wandb")
    assert len(runs) == 1 and C.identify(runs[0]) == ("leet", 1.0, 4)
    values = C.run_values(runs[0])
    assert values["test/auroc"] == pytest.approx(0.77) and values["val/auroc"] == pytest.approx(0.9)


def test_no_pairs_table_without_both_roles(tmp_path):
    baselines = C._filter(C.find_runs([RUNS]), None, ["role:baseline"])
    out = C.compare(baselines, tmp_path, plot=False)
    assert out["pairs"] is None and "pairs_md" not in out["written"]


def test_single_run_bootstrap_interval_is_shown_next_to_the_seed_spread():
    # two seeds of one method: auroc 0.80, 0.84 (± 0.028); their bootstrap intervals [0.70, 0.88], [0.74, 0.92]
    # -> the cell shows the mean bounds [0.72, 0.90]; the bounds are not columns of their own
    table = pd.DataFrame({"method": ["m", "m"], "labels": [1.0, 1.0], "seed": [0, 1], "pair": [None, None],
                          "role": [None, None], "test/auroc": [0.80, 0.84], "test/auroc_ci_low": [0.70, 0.74],
                          "test/auroc_ci_high": [0.88, 0.92], "test/auroc_ci_resamples": [1000, 1000]})
    metrics = C.select_metrics(table, ["test/*"])
    assert metrics == ["test/auroc"]
    summary = C.aggregate(table, metrics)
    assert summary.loc[0, "test/auroc ci_low"] == pytest.approx(0.72)
    assert C.markdown(summary, metrics).splitlines()[2] == "| m | 1 | 2 | 0.820 ± 0.028 [0.720, 0.900] |"
    assert C._ci_columns("test/auroc_teacher") == ("test/auroc_ci_low_teacher", "test/auroc_ci_high_teacher")
