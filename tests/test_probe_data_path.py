"""Probes of the shared 2D data path (issue 14 s7, unlisted components): each test goes red when one piece is removed
or bent, with an oracle computed from the file on disk or by hand.

* Horizontal flip: image, lesion masks and boxes are mirrored left-right together. The box-follows-image test of
  ``test_transforms_io.py`` also passes with a *vertical* flip (boxes and image still agree), which on a chest X-ray
  swaps apex and base instead of the sides.
* Evaluation images are never augmented: a validation image is its file, letterboxed and normalised, nothing else.
  Comparing two passes over the validation loader cannot see augmentation, because training draws are seeded
  per sample and repeat exactly.
* Boxes that a zoom pushes out of the image are clipped to it, and dropped (with their label) when nothing is left.
* Unknown labels (NaN in the manifest: CheXpert U-Ignore, blanks) reach the batch as label_mask False with a 0
  placeholder, never as a known negative.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datamodules.batch import STREAM_LABEL
from datamodules.cxr import CXRDataModule
from datamodules.dataset import CXRDataset
from datamodules.io import read_gray_uint8
from datamodules.manifest import Manifest
from datamodules.synthetic import SyntheticCXR
from datamodules.transforms import CXRTransform

MEAN, STD = 0.5, 0.25  # CXRTransform's default normalisation


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
    return SyntheticCXR(cache_dir=tmp_path_factory.mktemp("synthetic"), n_images=40, image_size=64, seed=0)


def test_horizontal_flip_mirrors_image_masks_and_boxes_left_to_right():
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (1, 48, 48), generator=g, dtype=torch.uint8)  # square: letterbox is the identity
    mask = torch.zeros(1, 48, 48, dtype=torch.uint8)
    mask[0, 10:30, 5:20] = 1
    boxes = np.array([[5.0, 10.0, 20.0, 30.0, 2.0]], np.float32)  # x0, y0, x1, y1, class
    transform = CXRTransform(48, train=True, zoom=(1.0, 1.0), flip_prob=1.0, contrast_gamma=(1.0, 1.0),
                             intensity_scale=0.0, noise_std=0.0)
    out = transform(image, boxes, mask=mask, attention_mask=mask)
    expected = (image.float() / 255 - MEAN) / STD
    torch.testing.assert_close(out["image"], expected.flip(-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(out["mask"], mask.float().flip(-1))
    torch.testing.assert_close(out["attention_mask"], mask.float().flip(-1))
    # x -> 48 - x swaps the edges: columns [5, 20) become [28, 43); rows unchanged
    torch.testing.assert_close(out["boxes"], torch.tensor([[28.0, 10.0, 43.0, 30.0]]))
    assert out["box_labels"].tolist() == [2]


def test_evaluation_images_are_the_letterboxed_file_and_nothing_else(reader):
    """image_size = the files' size (64), so the letterbox is the identity: a validation image must equal
    (pixels / 255 - 0.5) / 0.25 of its PNG exactly, although the training transform augments (augment=True)."""
    dm = CXRDataModule(reader, image_size=64, min_per_class=0, eval_batch_size=64, seed=0, augment=True)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    paths = dm.manifest.records.set_index("image_id")["image_path"]
    assert len(batch["image_id"]) > 0
    for image, image_id in zip(batch["image"], batch["image_id"]):
        raw = read_gray_uint8(paths[image_id])
        assert raw.shape == (1, 64, 64)
        torch.testing.assert_close(image, (raw.float() / 255 - MEAN) / STD, atol=1e-6, rtol=0,
                                   msg=f"validation image {image_id} is not its file")


def test_unknown_labels_are_masked_not_made_negative(reader):
    base = reader.load().subset([0, 1, 2])
    labels = np.ones_like(base.labels)  # all positive, so a 0 in the batch can only be a placeholder
    labels[0, 1] = np.nan  # one unknown class
    labels[1, :] = np.nan  # an image with no known label
    manifest = Manifest(base.records, labels, base.class_names, base.boxes, base.task, base.source)
    dataset = CXRDataset(manifest, CXRTransform(32), STREAM_LABEL)
    k = labels.shape[1]
    first, second, third = dataset[0], dataset[1], dataset[2]
    assert first["label_mask"].tolist() == [True, False] + [True] * (k - 2)
    assert first["labels"].tolist() == [1.0, 0.0] + [1.0] * (k - 2)  # 0 where unknown: a placeholder, masked
    assert not second["label_mask"].any() and not torch.isnan(second["labels"]).any()
    assert third["label_mask"].all() and third["labels"].eq(1).all()


def test_zoom_clips_boxes_to_the_image_and_drops_those_that_leave_it():
    """A fixed ×1.5 zoom about the centre (24) maps x -> 24 + 1.5·(x − 24): [0, 10) -> [−12, 3), clipped to [0, 3);
    [0, 4) -> [−12, −6), outside the image, dropped with its label; [20, 28) -> [18, 30), kept as is. A box that
    left the image would otherwise reach the detection and localisation targets with negative coordinates."""
    transform = CXRTransform(48, train=True, zoom=(1.5, 1.5), contrast_gamma=(1.0, 1.0), intensity_scale=0.0,
                             noise_std=0.0)
    boxes = np.array([[0, 0, 10, 10, 0], [0, 0, 4, 4, 1], [20, 20, 28, 28, 2]], np.float32)
    out = transform(torch.zeros(1, 48, 48, dtype=torch.uint8), boxes)
    torch.testing.assert_close(out["boxes"], torch.tensor([[0.0, 0.0, 3.0, 3.0], [18.0, 18.0, 30.0, 30.0]]))
    assert out["box_labels"].tolist() == [0, 2]
