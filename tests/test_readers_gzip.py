"""Read what users have (issue 19 item 7): the gzipped NIH / CheXpert label files are found by the default names
and read as they are, and a label file without its box file is a loud warning naming the path, not 0 boxes."""

from __future__ import annotations

import gzip
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from datamodules.readers.chexpert import CheXpert
from datamodules.readers.nih import NIHChestXray14

needs_data = pytest.mark.needs_shared_data


def _gzip(source: Path, target: Path) -> None:
    target.write_bytes(gzip.compress(source.read_bytes()))


@needs_data
def test_nih_gzipped_label_and_box_files_are_read_by_default(shared_data, tmp_path):
    nih = shared_data / "nih-cxr14-sample"
    _gzip(nih / "Data_Entry_2017_v2020.bbox_images.csv", tmp_path / "Data_Entry_2017_v2020.csv.gz")
    _gzip(nih / "BBox_List_2017.csv", tmp_path / "BBox_List_2017.csv.gz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # found, so no missing-box-file warning
        reader = NIHChestXray14(tmp_path, require_images=False)
        manifest = reader.load()
    plain = NIHChestXray14(nih, data_entry="Data_Entry_2017_v2020.bbox_images.csv", require_images=False).load()
    assert manifest.source == str(tmp_path / "Data_Entry_2017_v2020.csv.gz")
    assert len(manifest) == len(plain) == 880  # the 880 images with boxes (shared/data/README.md)
    assert reader.report["boxes_read"] == 984 and len(manifest.boxes) == len(plain.boxes) > 0
    np.testing.assert_array_equal(manifest.labels, plain.labels)
    pd.testing.assert_frame_equal(manifest.boxes.drop(columns="source_row"), plain.boxes.drop(columns="source_row"))


@needs_data
def test_nih_label_file_without_box_file_warns_with_the_path(shared_data, tmp_path):
    nih = shared_data / "nih-cxr14-sample"
    _gzip(nih / "Data_Entry_2017_v2020.head300.csv", tmp_path / "Data_Entry_2017_v2020.csv.gz")
    reader = NIHChestXray14(tmp_path, require_images=False)
    with pytest.warns(UserWarning, match=rf"box file is not: no {tmp_path}/BBox_List_2017\.csv \(nor .*\.gz\)"):
        manifest = reader.load()
    assert len(manifest) == 300 and len(manifest.boxes) == 0 and reader.report["box_file_missing"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # bbox_list=None says "no boxes": silent
        NIHChestXray14(tmp_path, bbox_list=None, require_images=False).load()


def test_nih_label_file_missing_names_both_names_tried(tmp_path):
    from datamodules.manifest import DataError

    with pytest.raises(DataError, match=r"tried Data_Entry_2017\*\.csv and Data_Entry_2017\*\.csv\.gz\): no file matches"):
        NIHChestXray14(tmp_path, require_images=False).load()


@needs_data
def test_chexpert_gzipped_csv_is_read_by_default(shared_data, tmp_path):
    source = shared_data / "chexpert-sample" / "chexpert_train.head100.csv"
    _gzip(source, tmp_path / "train.csv.gz")
    manifest = CheXpert(tmp_path, require_images=False).load()
    plain = CheXpert(shared_data / "chexpert-sample", csv=source.name, require_images=False).load()
    assert len(manifest) == len(plain) == 100
    np.testing.assert_array_equal(manifest.labels, plain.labels)
    assert manifest.records["patient_id"].tolist() == plain.records["patient_id"].tolist()
