"""The synthetic NIH-layout chest-X-ray dataset: statistics of the plan, geometry of the rendered lesions,
the exact NIH file layout, determinism, atomic/rank-safe caching, and the reader round trip."""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from datamodules.manifest import DataError
from datamodules.synthetic import (
    BBOX_HEADER,
    CLASSES,
    DATA_ENTRY_HEADER,
    SyntheticCXR,
    SyntheticCXRConfig,
    main,
    plan_synthetic_cxr,
    render_image,
    write_synthetic_cxr,
)
from datamodules.synthetic_cache import is_complete

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nih-cxr14-sample"
SMALL = dict(n_images=24, image_size=48, seed=3)


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "L", f"{path}: mode {im.mode}"
        return np.asarray(im)


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    return write_synthetic_cxr(tmp_path_factory.mktemp("syn") / "data", **SMALL)


# ------------------------------------------------------------------------------------------ the plan
def test_plan_statistics_of_default_dataset():
    plan = plan_synthetic_cxr(SyntheticCXRConfig())
    labels = plan[list(CLASSES)].to_numpy(float)
    assert len(plan) == 800 and plan["image_index"].is_unique
    prevalence = labels.mean(axis=0)
    assert np.all((prevalence > 0.20) & (prevalence < 0.36)), prevalence
    assert 0.15 < (labels.sum(1) == 0).mean() < 0.4  # some "No Finding" images
    assert (labels.sum(1) >= 2).mean() > 0.1  # multi-label for real
    # Boxes: 20 % of all images, only images with a finding.
    assert plan["boxed"].sum() == 160
    assert labels[plan["boxed"].to_numpy()].sum(1).min() >= 1
    # Several images per patient.
    per_patient = plan.groupby("patient_id").size()
    assert per_patient.max() == 5 and per_patient.mean() > 2.5 and (per_patient >= 2).mean() > 0.6
    assert (plan.groupby("patient_id")["follow_up"].min() == 0).all()
    # The marker is present in about half the images and uncorrelated with every label.
    marker = (plan["marker"] != "").to_numpy(float)
    assert 0.4 < marker.mean() < 0.6
    assert set(plan["marker"]) == {"", "L", "R"}
    for k, name in enumerate(CLASSES):
        r = np.corrcoef(marker, labels[:, k])[0, 1]
        assert abs(r) < 0.1, f"marker correlates with {name}: r = {r:.3f}"
    # Split by patient, about 20 % test.
    test_patients = set(plan.loc[plan["split"] == "test", "patient_id"])
    assert test_patients.isdisjoint(plan.loc[plan["split"] == "train_val", "patient_id"])
    assert 0.18 <= (plan["split"] == "test").mean() <= 0.23


def test_findings_persist_within_a_patient():
    """Follow-ups keep their predecessor's findings more often than chance (so a patient split matters)."""
    plan = plan_synthetic_cxr(SyntheticCXRConfig(n_images=3000))
    labels = plan[list(CLASSES)].to_numpy()
    follow = plan["follow_up"].to_numpy() > 0
    agree = (labels[1:][follow[1:]] == labels[:-1][follow[1:]]).mean()
    p = 0.28
    assert agree > (p**2 + (1 - p) ** 2) + 0.15  # independent draws would agree 60 % of the time


def test_single_label_plan_has_exactly_one_class_per_image():
    plan = plan_synthetic_cxr(SyntheticCXRConfig(single_label=True))
    labels = plan[list(CLASSES)].to_numpy(int)
    assert (labels.sum(1) == 1).all()
    assert np.all(np.abs(labels.mean(0) - 0.25) < 0.06), labels.mean(0)


def test_config_rejects_bad_parameters():
    with pytest.raises(ValueError, match="prevalence"):
        SyntheticCXRConfig(prevalence=1.5)
    with pytest.raises(ValueError, match="image_size"):
        SyntheticCXRConfig(image_size=8)
    assert SyntheticCXRConfig(seed=1).digest() != SyntheticCXRConfig(seed=0).digest()


# ------------------------------------------------------------------------------------------ the pixels
def test_rendered_lesions_lie_in_the_lungs_and_boxes_are_tight():
    config = SyntheticCXRConfig(n_images=200, image_size=96)
    plan = plan_synthetic_cxr(config).to_dict("records")
    areas: dict[str, list[int]] = {c: [] for c in CLASSES}
    centre_y: dict[str, list[float]] = {c: [] for c in CLASSES}
    for i in range(0, 200, 5):
        out = render_image(config, plan[i], i)
        image, lung = out["image"], out["lung_mask"]
        assert image.dtype == np.uint8 and image.shape == (96, 96)
        assert 0.12 < lung.mean() < 0.4
        assert sorted({c for c, _, _ in out["lesions"]}) == sorted(c for c in CLASSES if plan[i][c])
        for name, mask, (x, y, w, h) in out["lesions"]:
            assert mask.any() and not (mask & ~lung).any(), f"{name} of image {i} leaves the lung mask"
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            assert (x, y, w, h) == (cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1)
            areas[name].append(int(mask.sum()))
            centre_y[name].append(y + h / 2)
        if plan[i]["marker"]:
            mx, my, mw, mh = out["marker_box"]
            assert not lung[my : my + mh, mx : mx + mw].any()  # in a corner, off the lungs
        else:
            assert out["marker_box"] is None
    med = {c: np.median(v) for c, v in areas.items()}
    # Distinct sizes: nodules are small, masses and infiltrates large; effusions sit at a lung base.
    assert med["Nodule"] * 4 < med["Mass"] and med["Nodule"] * 4 < med["Infiltration"], med
    assert med["Nodule"] < 0.01 * 96 * 96
    assert np.median(centre_y["Effusion"]) > np.median(centre_y["Mass"] + centre_y["Nodule"])


def test_marker_is_drawn_and_is_bright():
    config = SyntheticCXRConfig(n_images=40, image_size=64)
    plan = plan_synthetic_cxr(config).to_dict("records")
    i = next(j for j, r in enumerate(plan) if r["marker"])
    out = render_image(config, plan[i], i)
    x, y, w, h = out["marker_box"]
    patch = out["image"][y : y + h, x : x + w].astype(int)
    assert patch.max() - np.median(out["image"][:h, :w]) > 60 or patch.max() > 150


# ------------------------------------------------------------------------------------------ the files
def test_files_follow_the_nih_layout(small_root: Path):
    root = small_root
    entry_lines = (root / "Data_Entry_2017.csv").read_text().splitlines()
    assert entry_lines[0] == DATA_ENTRY_HEADER
    bbox_lines = (root / "BBox_List_2017.csv").read_text().splitlines()
    assert bbox_lines[0] == BBOX_HEADER
    if SAMPLE.is_dir():  # the headers are the real ones, byte for byte
        real = (SAMPLE / "Data_Entry_2017_v2020.head300.csv").read_text().splitlines()[0]
        assert entry_lines[0] == real
        assert bbox_lines[0] == (SAMPLE / "BBox_List_2017.csv").read_text().splitlines()[0]

    entries = pd.read_csv(root / "Data_Entry_2017.csv")
    assert list(entries.columns[-4:]) == ["OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"]
    assert len(entries) == SMALL["n_images"] and entries["Image Index"].str.fullmatch(r"\d{8}_\d{3}\.png").all()
    assert (entries["OriginalImage[Width"] == 48).all() and (entries["Height]"] == 48).all()
    findings = {f for s in entries["Finding Labels"] for f in s.split("|")}
    assert findings <= set(CLASSES) | {"No Finding"}
    assert entries["Patient ID"].map("{:08d}".format).eq(entries["Image Index"].str[:8]).all()

    boxes = pd.read_csv(root / "BBox_List_2017.csv")
    assert list(boxes.columns[:6]) == ["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]"]
    assert len(boxes.columns) == 9 and boxes.iloc[:, 6:].isna().all().all()
    assert "Infiltration" not in set(boxes["Finding Label"])
    lesions = pd.read_csv(root / "synthetic_lesions.csv")
    in_list = lesions[lesions["in_bbox_list"] == 1]
    assert len(in_list) == len(boxes)
    assert sorted(in_list["class"].replace({"Infiltration": "Infiltrate"})) == sorted(boxes["Finding Label"])

    labels = entries.set_index("Image Index")["Finding Labels"]
    for name in entries["Image Index"]:
        image, lung = _read(root / "images" / name), _read(root / "masks" / name)
        lesion = _read(root / "lesion_masks" / name)
        assert image.shape == lung.shape == lesion.shape == (48, 48)
        assert set(np.unique(lung)) <= {0, 255} and set(np.unique(lesion)) <= {0, 255}
        assert not ((lesion > 0) & (lung == 0)).any(), f"{name}: lesion outside the lung mask"
        assert (labels[name] == "No Finding") == (not lesion.any())
        covered = np.zeros_like(lesion, dtype=bool)
        for row in lesions[lesions["Image Index"] == name].itertuples():
            x, y, w, h = int(row.x), int(row.y), int(row.w), int(row.h)
            assert lesion[y : y + h, x : x + w].any()
            covered[y : y + h, x : x + w] = True
        assert not ((lesion > 0) & ~covered).any(), f"{name}: lesion pixels outside every box"

    train = (root / "train_val_list.txt").read_text().split()
    test = (root / "test_list.txt").read_text().split()
    assert sorted(train + test) == sorted(entries["Image Index"]) and train and test
    assert not {n[:8] for n in train} & {n[:8] for n in test}  # by patient
    done = json.loads((root / "DONE").read_text())
    assert done["params"]["n_images"] == SMALL["n_images"] and done["hash"] == SyntheticCXRConfig(**SMALL).digest()


def test_generation_is_deterministic_for_a_seed(tmp_path: Path, small_root: Path):
    again = write_synthetic_cxr(tmp_path / "again", **SMALL)
    for csv in ("Data_Entry_2017.csv", "BBox_List_2017.csv", "synthetic_lesions.csv", "train_val_list.txt"):
        assert (again / csv).read_bytes() == (small_root / csv).read_bytes(), csv
    for sub in ("images", "masks", "lesion_masks"):
        names = sorted(p.name for p in (small_root / sub).iterdir())
        assert names == sorted(p.name for p in (again / sub).iterdir())
        for name in names:
            assert np.array_equal(_read(again / sub / name), _read(small_root / sub / name)), f"{sub}/{name}"
    other = write_synthetic_cxr(tmp_path / "other", **{**SMALL, "seed": 4})
    first = sorted((small_root / "images").iterdir())[0].name
    assert not np.array_equal(_read(other / "images" / first), _read(small_root / "images" / first))


def test_cache_is_reused_replaced_when_stale_and_never_clobbers_foreign_data(tmp_path: Path):
    root = tmp_path / "data"
    config = SyntheticCXRConfig(n_images=4, image_size=32)
    write_synthetic_cxr(root, config)
    stamp = (root / "DONE").stat().st_mtime_ns
    write_synthetic_cxr(root, config)
    assert (root / "DONE").stat().st_mtime_ns == stamp  # reused, not rewritten
    bigger = SyntheticCXRConfig(n_images=6, image_size=32)
    assert not is_complete(root, bigger.digest())
    write_synthetic_cxr(root, bigger)  # stale synthetic data (other parameters) is replaced
    assert is_complete(root, bigger.digest()) and len(list((root / "images").iterdir())) == 6
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no temporary directories left behind

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    with pytest.raises(DataError, match="no DONE marker"):
        write_synthetic_cxr(foreign, config)
    assert (foreign / "notes.txt").read_text() == "precious"


def _generate(root: str) -> None:
    write_synthetic_cxr(root, n_images=6, image_size=32)


def test_concurrent_first_use_is_safe(tmp_path: Path):
    """Two ranks generating at once: both return, one complete dataset remains, no temp dirs."""
    root = tmp_path / "data"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_generate, args=(str(root),)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert is_complete(root, SyntheticCXRConfig(n_images=6, image_size=32).digest())
    assert len(list((root / "images").iterdir())) == 6
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_cli_and_default_cache_dir(tmp_path: Path, monkeypatch, capsys):
    main(["--out", str(tmp_path / "cli"), "--n-images", "3", "--image-size", "32", "--seed", "5"])
    assert is_complete(tmp_path / "cli", SyntheticCXRConfig(n_images=3, image_size=32, seed=5).digest())
    assert "3 images of 32 px" in capsys.readouterr().out
    monkeypatch.setenv("MEDATTN_CACHE", str(tmp_path / "cache"))
    reader = SyntheticCXR(n_images=3, image_size=32)
    assert reader.root == tmp_path / "cache" / f"synthetic-cxr-{reader.config.digest()}"
    assert SyntheticCXR(cache_dir=tmp_path / "x").root.parent == tmp_path / "x"
    with pytest.raises(ValueError, match="subset"):
        SyntheticCXR(classes=["Pneumonia"])


# ------------------------------------------------------------------------------------------ the reader
def test_reader_round_trip(tmp_path: Path):
    pytest.importorskip("datamodules.readers.nih", reason="the NIH reader has not landed yet")
    reader = SyntheticCXR(cache_dir=tmp_path, n_images=20, image_size=48, seed=1)
    manifest = reader.load()
    assert manifest.class_names == list(CLASSES) and len(manifest) == 20 and manifest.task == "multilabel"
    entries = pd.read_csv(reader.root / "Data_Entry_2017.csv").set_index("Image Index")
    for row, labels in zip(manifest.records.itertuples(), manifest.labels):
        name = Path(row.image_path).name
        expected = [c in entries.loc[name, "Finding Labels"].split("|") for c in CLASSES]
        assert labels.tolist() == [float(e) for e in expected]
        assert Path(row.mask_path).name == name and Path(row.mask_path).parent.name == "masks"
        assert Path(row.attention_mask_path).parent.name == "lesion_masks"
    assert len(manifest.boxes) == len(pd.read_csv(reader.root / "BBox_List_2017.csv"))

    single = SyntheticCXR(cache_dir=tmp_path, n_images=20, image_size=48, single_label=True).load()
    assert single.task == "multiclass" and (single.labels.sum(1) == 1).all() and len(single) == 20


# ------------------------------------------------------------------------------------------ learnability
@pytest.mark.slow
def test_learnable_but_not_trivial_for_a_linear_model(tmp_path: Path):
    """Logistic regression on 32-px thumbnails: well above chance, far from perfect."""
    torch = pytest.importorskip("torch")
    from torchmetrics.functional.classification import multilabel_auroc

    root = write_synthetic_cxr(tmp_path / "data", n_images=800, image_size=64)
    entries = pd.read_csv(root / "Data_Entry_2017.csv")
    x = torch.stack([torch.from_numpy(_read(root / "images" / n).copy()) for n in entries["Image Index"]]).float()
    x = torch.nn.functional.avg_pool2d(x[:, None] / 255.0, 2).flatten(1)
    x = (x - x.mean(0)) / (x.std(0) + 1e-3)
    y = torch.tensor([[c in s.split("|") for c in CLASSES] for s in entries["Finding Labels"]]).float()
    test = torch.tensor(entries["Image Index"].isin((root / "test_list.txt").read_text().split()).to_numpy())
    w = torch.zeros(x.shape[1], len(CLASSES), requires_grad=True)
    b = torch.zeros(len(CLASSES), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x[~test] @ w + b, y[~test]) + 1e-2 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        auroc = multilabel_auroc(x[test] @ w + b, y[test].long(), num_labels=len(CLASSES), average=None)
    assert 0.62 < auroc.mean() < 0.9, auroc
