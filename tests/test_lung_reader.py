"""LungSegmentationDataModule reads through a reader (the COVID collection's by default): the metadata, view and
modality filters and the mask lookup live in ``datamodules/readers/covid.py`` only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from datamodules.lung_segmentation import LungSegmentationDataModule
from datamodules.manifest import DataError
from datamodules.readers.covid import COVIDChestXray


def _folder(root: Path) -> Path:
    """Six images: masks for img0..img3 in masks/, img4 only in masks_lungvae/, img5 none; img3 is a lateral view,
    img2 a CT; the metadata has no ``finding`` column (segmentation needs none)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "masks_lungvae").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i, (view, modality) in enumerate([("PA", "X-ray"), ("AP", "X-ray"), ("PA", "CT"), ("L", "X-ray"),
                                          ("AP Supine", "X-ray"), ("PA", "X-ray")]):
        name = f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (12, 16), dtype=np.uint8), "L").save(root / "images" / name)
        mask = np.zeros((12, 16), np.uint8)
        mask[2:10, 3:9] = 255
        if i < 4:
            Image.fromarray(mask, "L").save(root / "masks" / name)
        elif i == 4:
            Image.fromarray(mask, "L").save(root / "masks_lungvae" / name)
        rows.append({"patientid": f"p{i}", "filename": name, "view": view, "modality": modality})
    pd.DataFrame(rows).to_csv(root / "metadata.csv", index=False)
    return root


def test_default_reader_filters_views_modality_and_finds_masks(tmp_path):
    root = _folder(tmp_path / "covid")
    assert LungSegmentationDataModule(root).read_records()["image_id"].tolist() == ["img0.png", "img1.png"]
    records = LungSegmentationDataModule(root, fallback_mask_dir="masks_lungvae").read_records()
    assert records["image_id"].tolist() == ["img0.png", "img1.png", "img4.png"]
    assert records["mask_path"].iloc[2] == str(root / "masks_lungvae" / "img4.png")
    assert LungSegmentationDataModule(root, views=None).read_records()["image_id"].tolist() == [
        "img0.png", "img1.png", "img3.png"]  # no view filter: the lateral view too, never the CT


def test_a_given_reader_is_used_and_default_reader_arguments_are_refused(tmp_path):
    root = _folder(tmp_path / "covid")
    reader = COVIDChestXray(root, finding_map=None, views=["L"])
    dm = LungSegmentationDataModule(reader=reader, image_size=16)
    assert dm.read_records()["image_id"].tolist() == ["img3.png"]
    with pytest.raises(ValueError, match=r"\['root', 'mask_dir'\] configure the default reader"):
        LungSegmentationDataModule(root, mask_dir="masks_lungvae", reader=reader)
    with pytest.raises(ValueError, match="give root"):
        LungSegmentationDataModule()
    with pytest.raises(DataError, match="no image read by COVIDChestXray has a lung mask"):
        LungSegmentationDataModule(root, mask_dir="nowhere").read_records()
