"""MAG-SD's reference recipe: CLAHE, per-column z-scoring, the reference augmentation, the composed overlay
(``experiments/magsd/reference.yaml``) for both arms, and the cross-validation table scoring both arms alike."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from datamodules.transforms import CXRTransform, ReferenceAugment, clahe, column_standardize, letterbox

MAGSD = Path(__file__).resolve().parents[1] / "experiments" / "magsd"


def fixed_image(h: int = 60, w: int = 80) -> torch.Tensor:
    """A low-contrast uint8 image with structure (values 100-131)."""
    yy, xx = np.mgrid[0:h, 0:w]
    return torch.from_numpy((100 + (xx * 7 + yy * 3) % 32).astype(np.uint8))[None]


# ------------------------------------------------------------------------------------------- transforms
def test_column_standardize_hand_case():
    image = torch.tensor([[[1.0, 10.0], [2.0, 10.0], [3.0, 10.0]]])  # (1, 3 rows, 2 columns)
    z = 1.5**0.5  # column 0: mean 2, population std sqrt(2/3)
    torch.testing.assert_close(column_standardize(image), torch.tensor([[[-z, 0.0], [0.0, 0.0], [z, 0.0]]]))


def test_column_standardize_gives_each_column_mean_0_std_1():
    x = column_standardize(torch.rand(1, 50, 30) * 7 + 3)
    torch.testing.assert_close(x.mean(dim=1), torch.zeros(1, 30), atol=1e-6, rtol=0)
    torch.testing.assert_close(x.std(dim=1, correction=0), torch.ones(1, 30), atol=1e-5, rtol=0)


def test_clahe_is_opencvs_with_the_given_clip_and_tiles():
    image = fixed_image()
    expected = cv2.createCLAHE(clipLimit=4.0, tileGridSize=(4, 4)).apply(image[0].numpy())
    out = clahe(image, 4.0, 4)
    assert out.dtype == torch.uint8 and torch.equal(out[0], torch.from_numpy(expected))
    assert not torch.equal(out, clahe(image, 4.0, 2)) and not torch.equal(out, clahe(image, 1.0, 4))
    assert out.float().std() > 3 * image.float().std()  # it stretches a low-contrast image
    with pytest.raises(ValueError, match="uint8"):
        clahe(image.float())


def test_eval_transform_equalizes_the_image_area_only_then_z_scores_columns():
    image = fixed_image(60, 80)  # landscape: letterboxed to 224 x 224 with 56 rows of padding at the bottom
    plain = CXRTransform(224, mean=0.0, std=1.0 / 255, clahe_clip_limit=4.0)(image)["image"]  # x·255
    resized, scale = letterbox(image, 224)
    h = round(60 * scale)
    area = clahe(resized[:, :h].contiguous(), 4.0, 4)
    torch.testing.assert_close(plain[:, :h], area.float(), atol=1e-3, rtol=0)
    assert torch.equal(plain[:, h:], torch.zeros_like(plain[:, h:]))  # padding left alone
    z = CXRTransform(224, clahe_clip_limit=4.0, normalize="column")(image)["image"]
    torch.testing.assert_close(z, column_standardize(plain / 255))


def test_reference_augment_moves_masks_and_boxes_with_the_image_and_is_seeded():
    image = torch.zeros(1, 64, 64, dtype=torch.uint8)
    image[:, 20:40, 10:30] = 200
    mask = (image > 0).to(torch.uint8)
    boxes = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    state = torch.get_rng_state()
    augment = ReferenceAugment(64)
    applied = 0
    for seed in range(40):
        augment.set_random_state(seed)
        out, masks, out_boxes, labels = augment(image, {"mask": mask}, boxes, torch.tensor([1]))
        augment.set_random_state(seed)
        again = augment(image, {"mask": mask}, boxes, torch.tensor([1]))[0]
        assert torch.equal(out, again)  # a function of the sample seed
        changed = not torch.equal(out, image)
        applied += changed
        low, high = float(out.min()), float(out.max())  # ColorJitter's contrast lifts the background
        bright = out[0].float() > (low + high) / 2
        if high > low:  # the bright square and its mask moved together (nearest vs bilinear: edges only)
            agree = (bright == masks["mask"][0].bool()).float().mean()
            assert agree > 0.97, (seed, float(agree))
        if masks["mask"].any() and len(out_boxes):  # the box encloses the moved mask
            ys, xs = masks["mask"][0].nonzero(as_tuple=True)
            x0, y0, x1, y1 = out_boxes[0].tolist()
            # 2.5 px: nearest-neighbour masks vs exactly rotated box corners
            assert x0 - 2.5 <= xs.min() and xs.max() <= x1 + 2.5 and y0 - 2.5 <= ys.min() and ys.max() <= y1 + 2.5
        assert len(out_boxes) == len(labels)
    assert 10 <= applied <= 30  # the whole list with p = 0.5 (binomial(40, 0.5): outside [10, 30] has p < 2e-3)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is untouched


def test_reference_options_are_checked():
    with pytest.raises(ValueError, match="normalize"):
        CXRTransform(64, normalize="image")
    with pytest.raises(ValueError, match="augmentation"):
        CXRTransform(64, augmentation="reference_v2")
    with pytest.raises(ValueError, match="clahe_clip_limit"):
        CXRTransform(64, clahe_clip_limit=0)
    evaluation = CXRTransform(64, train=False, augmentation="reference")
    assert evaluation.reference is None  # evaluation images are never augmented (the reference's bug)


# ----------------------------------------------------------------------------------------- composed config
def compose(*names: str, extra=()):
    from experiments.cli import MedAttnCLI

    args = [a for n in names for a in ("-c", str(MAGSD / n))]
    return MedAttnCLI(args=[*args, "--trainer.logger=false", *extra], run=False)


@pytest.mark.parametrize("base,arm", [("synthetic.yaml", "magsd"), ("synthetic.yaml", "resnet50"),
                                      ("covid_cxr.yaml", "magsd")])
def test_reference_overlay_composes_the_recipe_for_both_arms(base, arm, tmp_path):
    from collections import Counter

    from lightning_modules.magsd import MAGSDModule

    names = [base, "reference.yaml"] + (["resnet50.yaml"] if arm == "resnet50" else [])
    cli = compose(*names, extra=[f"--trainer.default_root_dir={tmp_path}",
                                 "--model.init_args.net.init_args.backbone=test_resnet"])
    assert cli.trainer.max_epochs == 150 and cli.config.trainer.max_time is None
    assert isinstance(cli.model, MAGSDModule) is (arm == "magsd")
    config = cli.model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.SGD)
    for group in optimizer.param_groups:  # the BAP head at the backbone's lr (head_lr_scale 1)
        assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (1e-3, 0.9, True, 5e-4)
    assert isinstance(scheduler, torch.optim.lr_scheduler.MultiStepLR)
    assert scheduler.milestones == Counter({75: 1, 125: 1}) and scheduler.gamma == 0.1
    hp = cli.datamodule.hparams
    assert (hp.image_size, hp.labeled_batch_size, hp.augment) == (224, 16, True)
    transform = cli.datamodule._transform(train=True)
    assert transform.clahe == (4.0, 4) and transform.normalize == "column" and transform.reference is not None


def test_reference_overlay_must_precede_the_baseline_overlay():
    with pytest.raises(SystemExit):  # the other order names head_lr_scale for a module without it: an error
        compose("synthetic.yaml", "resnet50.yaml", "reference.yaml")


@pytest.mark.parametrize("arm", ["magsd", "resnet50"])
def test_reference_recipe_fast_dev_run(arm, tmp_path):
    names = ["synthetic.yaml", "reference.yaml"] + (["resnet50.yaml"] if arm == "resnet50" else [])
    cli = compose(*names, extra=[
        f"--trainer.default_root_dir={tmp_path}", "--trainer.fast_dev_run=1", "--trainer.precision=32-true",
        "--model.init_args.net.init_args.backbone=test_resnet", f"--data.init_args.reader.init_args.cache_dir={tmp_path}",
        "--data.init_args.reader.init_args.n_images=40", "--data.init_args.reader.init_args.image_size=64",
        "--data.init_args.min_per_class=0", "--data.init_args.eval_batch_size=16"])
    if arm == "magsd":
        cli.model.hparams.num_maps = 4
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 1
    batch = next(iter(cli.datamodule.train_dataloader()))
    image = batch["image"]
    assert image.shape == (16, 1, 224, 224)
    varying = image.std(dim=2, correction=0) > 1e-3  # per-column z-score of every training image
    assert varying.float().mean() > 0.9
    torch.testing.assert_close(image.mean(dim=2), torch.zeros_like(image.mean(dim=2)), atol=1e-5, rtol=0)
    torch.testing.assert_close(image.std(dim=2, correction=0)[varying], torch.ones(int(varying.sum())),
                               atol=1e-4, rtol=0)


# both arms, one scorer, and the reference overlay under both arms: tests/test_suite_presets.py
