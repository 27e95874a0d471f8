"""BatchAugment (issue 17 §3): the per-sample MONAI augmentation of CXRTransform on whole batches.

1. its random parameters follow the per-sample path's distributions (KS and binomial tests against the draws of the
   actual MONAI transforms, with negative controls that show the tests reject a wrong range or probability);
2. image, masks and boxes stay in register;
3. for fixed parameters it computes what MONAI computes (tolerances measured and stated);
4. CXRDataModule(augment_on="batch") trains through on_after_batch_transfer, leaves evaluation batches alone.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from monai.apps.detection.transforms.dictionary import ClipBoxToImaged, RandFlipBoxd, RandZoomBoxd
from monai.transforms import AdjustContrast, Compose, ScaleIntensity
from scipy import stats

import datamodules.batch_augment as batch_augment
from datamodules.batch_augment import BatchAugment, batch_seed
from datamodules.dataset import run_seed, sample_seed
from datamodules.transforms import CXRTransform

N = 4000  # draws per side: a KS test then tells (0.9, 1.1) from (0.8, 1.2) at p ~ 1e-100, 0.8 from 0.5 likewise
ALPHA = 1e-3  # "same distribution" threshold; the seeds are fixed, so each p-value is one fixed number


# ------------------------------------------------------------------------------------ 1. distribution
class _Recorder:
    """Wraps a MONAI transform's RandomState and keeps what ``uniform`` returned (RandGaussianNoise keeps its drawn
    standard deviation in a local variable only)."""

    def __init__(self, state):
        self.state, self.uniforms = state, []

    def uniform(self, *args, **kwargs):
        self.uniforms.append(float(self.state.uniform(*args, **kwargs)))
        return self.uniforms[-1]

    def __getattr__(self, name):
        return getattr(self.state, name)


def monai_draws(transform: CXRTransform, n: int) -> dict[str, np.ndarray]:
    """n per-sample draws of the actual MONAI transforms of ``transform``, reseeded per sample as CXRDataset does
    (``sample_seed``), each transform randomised as its ``__call__`` does. Parameters only where applied (MONAI
    draws them only then)."""
    zoom, flip = transform.geometric.transforms[:2]
    contrast, scale, noise = transform.photometric.transforms
    noise.R = _Recorder(noise.R)  # same RandomState object: set_random_state reseeds it in place
    pixel = torch.zeros(1, 1, 1)
    out = {k: [] for k in ("zoom", "flip", "contrast", "gamma", "scale", "factor", "noise", "sigma")}
    for i in range(n):
        transform.set_random_state(sample_seed((0, 0, 0), i))
        zoom.randomize(None)
        zoom.rand_zoom.randomize(pixel)
        flip.randomize(None)
        contrast.randomize(None)
        scale.randomize()
        noise.randomize(pixel)
        out["zoom"].append(zoom.rand_zoom._zoom[0])
        for key, step, value in (("contrast", contrast, "gamma_value"), ("scale", scale, "factor"),
                                 ("flip", flip, None), ("noise", noise, None)):
            out[key].append(step._do_transform)
            if value and step._do_transform:
                out[{"contrast": "gamma", "scale": "factor"}[key]].append(getattr(step, value))
        if noise._do_transform:
            out["sigma"].append(noise.R.uniforms[-1])
    return {k: np.asarray(v, dtype=float) for k, v in out.items()}


def batch_draws(augment: BatchAugment, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    params = augment.sample_parameters(n, torch.Generator().manual_seed(seed))
    view = params["image"]
    return {"zoom": params["zoom"].numpy(), "flip": params["flip"].numpy(), "contrast": view["contrast"].numpy(),
            "gamma": view["gamma"].numpy(), "scale": view["scale"].numpy(), "factor": view["factor"].numpy(),
            "noise": view["noise"].numpy(), "sigma": view["sigma"].numpy()}


SETTINGS = dict(flip_prob=0.5, zoom=(0.9, 1.1), contrast_gamma=(0.8, 1.25), intensity_scale=0.1, noise_std=0.02)
CONTINUOUS = ("zoom", "gamma", "factor", "sigma")
PROBABILITIES = {"flip": 0.5, "contrast": 0.8, "scale": 0.8, "noise": 0.5}


@pytest.fixture(scope="module")
def monai_sample():
    return monai_draws(CXRTransform(32, train=True, **SETTINGS), N)


def _differences(monai: dict, ours: dict) -> dict[str, float]:
    """p-values: KS per continuous parameter (MONAI vs batch), binomial per probability (batch vs nominal)."""
    p = {k: stats.ks_2samp(monai[k], ours[k]).pvalue for k in CONTINUOUS}
    p.update({k: stats.binomtest(int(ours[k].sum()), len(ours[k]), q).pvalue for k, q in PROBABILITIES.items()})
    return p


def test_parameters_follow_the_per_sample_distributions(monai_sample):
    transform = CXRTransform(32, train=True, **SETTINGS)
    ours = batch_draws(BatchAugment.from_transform(transform), N)
    for key, q in PROBABILITIES.items():  # the reference itself applies MONAI's probabilities
        assert stats.binomtest(int(monai_sample[key].sum()), N, q).pvalue > ALPHA, key
    for key, pvalue in _differences(monai_sample, ours).items():
        assert pvalue > ALPHA, f"{key}: p = {pvalue:.2e}"
    # ranges: inside the per-sample bounds and filling them
    for key, (low, high) in {"zoom": (0.9, 1.1), "gamma": (0.8, 1.25), "factor": (-0.1, 0.1), "sigma": (0, 0.02)}.items():
        assert low <= ours[key].min() < low + 0.01 * (high - low) and high - 0.01 * (high - low) < ours[key].max() <= high


@pytest.mark.parametrize("change", [dict(zoom=(0.8, 1.2)), dict(contrast_gamma=(0.8, 1.2)),
                                    dict(intensity_scale=0.12), dict(noise_std=0.025), dict(flip_prob=0.4)])
def test_the_distribution_tests_reject_a_wrong_range(monai_sample, change):
    """Negative controls: the same tests, against a sampler with one setting off, fail."""
    ours = batch_draws(BatchAugment(**{**SETTINGS, **change}), N)
    assert min(_differences(monai_sample, ours).values()) < 1e-6


@pytest.mark.parametrize("name", ["CONTRAST_PROB", "SCALE_PROB", "NOISE_PROB"])
def test_the_distribution_tests_reject_a_wrong_probability(monai_sample, monkeypatch, name):
    monkeypatch.setattr(batch_augment, name, 0.65)
    ours = batch_draws(BatchAugment(**SETTINGS), N)
    assert min(_differences(monai_sample, ours).values()) < 1e-6


def test_from_transform_reads_the_settings_and_refuses_what_it_cannot_do():
    augment = BatchAugment.from_transform(CXRTransform(32, train=True, two_views=True, zoom=(0.8, 1.3), flip_prob=0.25,
                                                       contrast_gamma=(0.7, 1.4), intensity_scale=0.2,
                                                       noise_std=0.05, mean=0.4, std=0.3))
    assert (augment.zoom, augment.flip_prob, augment.contrast_gamma) == ((0.8, 1.3), 0.25, (0.7, 1.4))
    assert (augment.intensity_scale, augment.noise_std, augment.mean, augment.std) == (0.2, 0.05, 0.4, 0.3)
    assert augment.views == ("image", "image_teacher")
    plain = BatchAugment.from_transform(CXRTransform(32, train=False))
    assert not plain.geometric and plain.sample_parameters(3)["image"] == {}
    with pytest.raises(ValueError, match="augmentation='reference'"):
        BatchAugment.from_transform(CXRTransform(32, train=True, augmentation="reference"))
    with pytest.raises(ValueError, match=r"must be un-normalised intensities in \[0, 1\]"):
        BatchAugment()({"image": torch.full((1, 1, 8, 8), -2.0)})


# ------------------------------------------------------------------------------------------ 2. register
def _box_batch(size: int, boxes: list[list[int]]) -> dict:
    """One image per box: the mask is exactly the filled box, the image a bright square on it."""
    image = torch.full((len(boxes), 1, size, size), 0.1)
    mask = torch.zeros_like(image)
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        mask[i, 0, y1:y2, x1:x2] = 1
        image[i, 0, y1:y2, x1:x2] = 0.9
    return {"image": image, "mask": mask, "attention_mask": mask.clone(),
            "boxes": [torch.tensor([b], dtype=torch.float32) for b in boxes],
            "box_labels": [torch.tensor([i % 3]) for i in range(len(boxes))]}


def _mask_box(mask: torch.Tensor) -> list[float]:
    rows, cols = torch.nonzero(mask[0] > 0.5, as_tuple=True)
    return [cols.min().item(), rows.min().item(), cols.max().item() + 1.0, rows.max().item() + 1.0]


@pytest.mark.parametrize("zoom", [0.9, 1.0, 1.13, 1.25])
@pytest.mark.parametrize("flip", [False, True])
def test_image_masks_and_boxes_stay_in_register(zoom, flip):
    size = 64
    boxes = [[5, 9, 30, 41], [40, 3, 63, 20], [0, 0, 12, 50], [50, 50, 64, 64]]
    batch = _box_batch(size, boxes)
    augment = BatchAugment(flip_prob=0.5, contrast_gamma=None, intensity_scale=0, noise_std=0, mean=0.0, std=1.0)
    params = {"zoom": torch.full((len(boxes),), zoom), "flip": torch.full((len(boxes),), flip), "image": {}}
    out = augment(batch, params=params)
    for i in range(len(boxes)):
        assert len(out["boxes"][i]) == 1 and out["box_labels"][i].tolist() == [i % 3]
        for key in ("mask", "attention_mask"):
            assert set(out[key][i].unique().tolist()) <= {0.0, 1.0}
            np.testing.assert_allclose(_mask_box(out[key][i]), out["boxes"][i][0].tolist(), atol=1.0)
        bright = out["image"][i] > 0.5
        assert (bright != (out["mask"][i] > 0.5)).sum() <= 4 * size  # together, up to a 1-px rim
        assert (bright & (out["mask"][i] < 0.5)).sum() <= 2 * size
    if flip:  # a horizontal flip moves the left box to the right
        assert out["boxes"][0][0, 0] > size / 2


def test_boxes_that_leave_the_image_are_dropped_with_their_labels():
    batch = _box_batch(64, [[0, 0, 3, 3], [20, 20, 40, 40]])
    augment = BatchAugment(contrast_gamma=None, intensity_scale=0, noise_std=0)
    out = augment(batch, params={"zoom": torch.tensor([1.25, 1.25]), "flip": torch.tensor([False, False]),
                                 "image": {}})
    # zoom 1.25 at 64 px: 80 px, 8 cropped on each side, so [0, 0, 3, 3] -> [-8, -8, -4.25, -4.25] -> gone
    assert out["boxes"][0].shape == (0, 4) and out["box_labels"][0].shape == (0,)
    assert out["mask"][0].sum() == 0
    np.testing.assert_allclose(out["boxes"][1][0].tolist(), [17, 17, 42, 42])


def test_random_draws_are_reproducible_and_keep_register():
    batch = _box_batch(48, [[10, 12, 30, 36]] * 6)
    augment = BatchAugment(two_views=True, flip_prob=0.5, zoom=(0.8, 1.2))
    one = augment(batch, torch.Generator().manual_seed(3))
    two = augment(batch, torch.Generator().manual_seed(3))
    other = augment(batch, torch.Generator().manual_seed(4))
    assert all(torch.equal(one[k], two[k]) for k in ("image", "image_teacher", "mask"))
    assert not torch.equal(one["image"], other["image"])
    assert not torch.equal(one["image"], one["image_teacher"])  # independent photometry ...
    for i in range(6):  # ... same geometry: the masks (shared) enclose the boxes, the bright square is in both views
        np.testing.assert_allclose(_mask_box(one["mask"][i]), one["boxes"][i][0].tolist(), atol=1.0)
        student, teacher = one["image"][i] > 0, one["image_teacher"][i] > 0  # 0 = intensity 0.5 after (x - .5) / .25
        assert (student != teacher).sum() <= 4 * 48 and (student != (one["mask"][i] > 0.5)).sum() <= 4 * 48


def test_uint8_input_is_read_as_intensity_over_255():
    batch = _box_batch(32, [[4, 4, 20, 20]] * 2)
    quantised = (batch["image"] * 255).round()
    augment = BatchAugment(two_views=True, flip_prob=0.5)
    as_float = augment({**batch, "image": quantised / 255}, torch.Generator().manual_seed(1))
    as_uint8 = augment({**batch, "image": quantised.to(torch.uint8)}, torch.Generator().manual_seed(1))
    for key in ("image", "image_teacher"):
        torch.testing.assert_close(as_uint8[key], as_float[key], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------- 3. MONAI's maths, fixed draws
def _monai_geometry(image, mask, boxes, zoom, flip, mask_mode):
    """The per-sample path's geometry (CXRTransform's RandZoomBoxd/RandFlipBoxd/ClipBoxToImaged) with the draw fixed."""
    keys = ["image", "mask"]
    steps = [RandZoomBoxd(image_keys=keys, box_keys="boxes", box_ref_image_keys="image", prob=1.0, min_zoom=zoom,
                          max_zoom=zoom, mode=["bilinear", mask_mode], padding_mode="constant", keep_size=True)]
    if flip:
        steps.append(RandFlipBoxd(image_keys=keys, box_keys="boxes", box_ref_image_keys="image", prob=1.0,
                                  spatial_axis=1))
    steps.append(ClipBoxToImaged(box_keys="boxes", label_keys="box_labels", box_ref_image_keys="image",
                                 remove_empty=True))
    out = Compose(steps)({"image": image.clone(), "mask": mask.clone(), "boxes": boxes[:, [1, 0, 3, 2]].clone(),
                          "box_labels": torch.arange(len(boxes))})
    plain = {k: torch.as_tensor(out[k]).as_subclass(torch.Tensor) for k in ("image", "mask", "boxes", "box_labels")}
    plain["boxes"] = plain["boxes"][:, [1, 0, 3, 2]]
    return plain


def _edge(mask: torch.Tensor) -> torch.Tensor:
    """Pixels within 1 px (8-neighbourhood) of the mask's boundary."""
    m = mask[None].float()
    dilated = torch.nn.functional.max_pool2d(m, 3, 1, 1)
    eroded = -torch.nn.functional.max_pool2d(-m, 3, 1, 1)
    return (dilated != eroded)[0]


@pytest.mark.parametrize("zoom", [0.9, 1.1, 0.83, 1.19, 1.016])  # 1.016: 65 px, cropped 0 before, 1 after
@pytest.mark.parametrize("flip", [False, True])
def test_geometry_equals_monai_for_the_same_draw(zoom, flip):
    """Same zoom and flip as MONAI's RandZoomBoxd + RandFlipBoxd + ClipBoxToImaged: boxes equal (1e-4 px), image
    equal up to float rounding (measured max 6e-6 on [0, 1]), masks equal to MONAI's centre-aligned 'nearest-exact'
    (measured: identical here; a rounding tie can flip an edge pixel) and, against the per-sample path's legacy
    'nearest' (up to half a source pixel towards the origin), different only within 1 px of the mask's edge
    (measured 1.0-1.6 % of the pixels of this 64 px disc)."""
    size = 64
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, size, size, generator=g)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    mask = (((yy - 30) ** 2 + (xx - 22) ** 2) < 15**2).float()[None]
    boxes = torch.tensor([[5.0, 10.0, 30.0, 40.0], [50.0, 2.0, 63.0, 20.0], [0.5, 60.0, 2.0, 63.5]])
    augment = BatchAugment(flip_prob=0.5, contrast_gamma=None, intensity_scale=0, noise_std=0, mean=0.0, std=1.0)
    out = augment({"image": image[None], "mask": mask[None], "boxes": [boxes], "box_labels": [torch.arange(3)]},
                  params={"zoom": torch.tensor([zoom]), "flip": torch.tensor([flip]), "image": {}})
    exact = _monai_geometry(image, mask, boxes, zoom, flip, "nearest-exact")
    legacy = _monai_geometry(image, mask, boxes, zoom, flip, "nearest")
    torch.testing.assert_close(out["boxes"][0], exact["boxes"], atol=1e-4, rtol=0)
    assert out["box_labels"][0].tolist() == exact["box_labels"].tolist()
    torch.testing.assert_close(out["image"][0], exact["image"], atol=2e-5, rtol=0)
    ours = out["mask"][0, 0]
    assert (ours != exact["mask"][0]).float().mean() < 0.002
    assert not ((ours != exact["mask"][0]) & ~_edge(exact["mask"][0])).any()
    assert not ((ours != legacy["mask"][0]) & ~_edge(legacy["mask"][0])).any()


def test_photometry_equals_monai_for_the_same_draw():
    """Contrast and scale with fixed draws equal MONAI's AdjustContrast / ScaleIntensity (then the clamp); the noise
    has the drawn standard deviation and is added only where drawn."""
    g = torch.Generator().manual_seed(5)
    pixels = torch.rand(3, 1, 40, 40, generator=g) * 0.8 + 0.1
    augment = BatchAugment()
    drawn = {"contrast": torch.tensor([True, False, True]), "gamma": torch.tensor([0.8, 1.2, 1.25]),
             "scale": torch.tensor([True, True, False]), "factor": torch.tensor([0.1, -0.05, 0.08]),
             "noise": torch.tensor([False, False, False]), "sigma": torch.tensor([0.02, 0.02, 0.02])}
    ours = augment.apply_photometry(pixels, drawn)
    for i in range(3):
        x = pixels[i]
        if drawn["contrast"][i]:
            x = torch.as_tensor(AdjustContrast(float(drawn["gamma"][i]))(x)).as_subclass(torch.Tensor)
        if drawn["scale"][i]:
            x = torch.as_tensor(ScaleIntensity(minv=None, maxv=None, factor=float(drawn["factor"][i]))(x))
        torch.testing.assert_close(ours[i], x.as_subclass(torch.Tensor).clamp(0, 1), atol=1e-6, rtol=0)
    noisy = augment.apply_photometry(torch.full((2, 1, 200, 200), 0.5), {
        "noise": torch.tensor([True, False]), "sigma": torch.tensor([0.02, 0.02])}, torch.Generator().manual_seed(0))
    assert noisy[0].std().item() == pytest.approx(0.02, rel=0.02) and torch.equal(noisy[1], torch.full_like(noisy[1], 0.5))


# ----------------------------------------------------------------------------------------- 4. DataModule
def test_datamodule_augments_training_batches_on_transfer_only(tmp_path):
    import lightning.pytorch as pl

    from datamodules.cxr import CXRDataModule
    from lightning_modules.tiny import pcam

    module, sample_data = pcam(tmp_path)
    data = CXRDataModule(sample_data.reader, **{**sample_data.hparams, "augment_on": "batch", "two_views": True,
                                                "augment_kwargs": {"flip_prob": 0.5}})
    seen: dict[str, list] = {"train": [], "val": []}

    class Spy(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen["train"].append({k: v.clone() for k, v in batch.items() if isinstance(v, torch.Tensor)})

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            seen["val"].append(batch["image"].clone())

    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=[Spy()])
    trainer.fit(module, data)
    assert len(seen["train"]) == 2 and torch.isfinite(trainer.callback_metrics["train/loss"])

    # what the training step saw = BatchAugment of the raw batch, seeded by (seed, run seed, rank 0, epoch 0, index)
    raw_batches = iter(data.train_dataloader())
    augment = BatchAugment.from_transform(CXRTransform(data.hparams.image_size, train=True, two_views=True,
                                                       flip_prob=0.5))
    for index, got in enumerate(seen["train"]):
        raw = next(raw_batches)
        assert 0 <= raw["image"].min() and raw["image"].max() <= 1  # the loader yields un-normalised images
        seed = batch_seed((data.hparams.seed, run_seed(), 0), 0, index)
        expected = augment(raw, torch.Generator().manual_seed(seed))
        for key in ("image", "image_teacher", "mask", "attention_mask"):
            assert torch.equal(got[key], expected[key]), (index, key)
    assert not torch.equal(seen["train"][0]["image"], seen["train"][1]["image"][: len(seen["train"][0]["image"])])

    # evaluation batches: untouched, exactly the per-sample path's
    assert torch.equal(seen["val"][0], next(iter(sample_data.val_dataloader()))["image"])


def test_datamodule_refuses_unknown_or_impossible_augment_on(tmp_path):
    from datamodules.cxr import CXRDataModule
    from datamodules.synthetic import SyntheticCXR

    reader = SyntheticCXR(cache_dir=tmp_path, n_images=8, image_size=32, seed=0)
    with pytest.raises(ValueError, match="augment_on must be 'sample' or 'batch'"):
        CXRDataModule(reader, augment_on="gpu")
    with pytest.raises(ValueError, match="augment_on='batch' cannot run augmentation='reference'"):
        CXRDataModule(reader, augment_on="batch", augment_kwargs={"augmentation": "reference"})


def test_separable_grid_is_affine_grid():
    from datamodules.batch_augment import _separable_grid

    g = torch.Generator().manual_seed(0)
    linear, shift = torch.rand(3, 2, generator=g) * 2 - 1, torch.rand(3, 2, generator=g) - 0.5
    theta = torch.zeros(3, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, :, 2] = linear[:, 0], linear[:, 1], shift
    grid, (inside_y, inside_x) = _separable_grid(linear, shift, 20, 30)
    expected = torch.nn.functional.affine_grid(theta, [3, 1, 20, 30], align_corners=False)
    torch.testing.assert_close(grid, expected, atol=1e-6, rtol=0)
    assert torch.equal((inside_y * inside_x)[:, 0].bool(), (expected.abs() <= 1).all(dim=-1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_cuda_like_on_the_cpu():
    """Device-agnostic: on CUDA the same draw gives the CPU's geometry, and a CUDA generator makes it reproducible."""
    batch = _box_batch(64, [[5, 9, 30, 41], [40, 3, 63, 20]])
    cuda = {k: ([t.cuda() for t in v] if isinstance(v, list) else v.cuda()) for k, v in batch.items()}
    augment = BatchAugment(two_views=True, flip_prob=0.5)
    params = augment.sample_parameters(2, torch.Generator().manual_seed(0))
    geometry = {"zoom": params["zoom"], "flip": params["flip"], "image": {}, "image_teacher": {}}
    on_cpu = augment(batch, params=geometry)
    on_gpu = augment(cuda, params={k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in geometry.items()})
    for key in ("image", "image_teacher", "mask", "attention_mask"):
        assert on_gpu[key].is_cuda
        torch.testing.assert_close(on_gpu[key].cpu(), on_cpu[key], atol=1e-4, rtol=0)
    for got, expected in zip(on_gpu["boxes"], on_cpu["boxes"]):
        torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=0)
    one = augment(cuda, torch.Generator(device="cuda").manual_seed(7))
    two = augment(cuda, torch.Generator(device="cuda").manual_seed(7))
    assert torch.equal(one["image"], two["image"]) and torch.equal(one["image_teacher"], two["image_teacher"])


@pytest.mark.slow
def test_batch_augmentation_resumes_exactly_mid_epoch(tmp_path):
    """A run resumed from a step checkpoint sees the augmented batches the uninterrupted run saw: the seed is a
    function of (data seed, run seed, rank, epoch, batch index) and Lightning restores the batch index."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from callbacks.reliability import RngStateCallback
    from datamodules.cxr import CXRDataModule
    from lightning_modules.tiny import cam_baseline

    class Seen(pl.Callback):
        def __init__(self):
            self.images = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.images[(trainer.current_epoch, batch_idx)] = batch["image"].clone()

    def run(root, callbacks, ckpt_path=None):
        module, sample_data = cam_baseline(tmp_path / "data")
        data = CXRDataModule(sample_data.reader, **{**sample_data.hparams, "augment_on": "batch"})
        seen = Seen()
        trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                             max_epochs=2, limit_train_batches=3, limit_val_batches=0, num_sanity_val_steps=0,
                             default_root_dir=root, callbacks=[*callbacks, seen, RngStateCallback()])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Lightning: the loader is "not resumable" (no state_dict)
            trainer.fit(module, data, ckpt_path=ckpt_path)
        return seen.images

    steps = ModelCheckpoint(dirpath=tmp_path / "steps", filename="{step}", save_top_k=-1, every_n_train_steps=1)
    full = run(tmp_path / "a", [steps])
    resumed = run(tmp_path / "b", [], ckpt_path=str(tmp_path / "steps" / "step=1.ckpt"))
    assert sorted(resumed) == [(0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    for key, image in resumed.items():
        assert torch.equal(image, full[key]), key
    assert not torch.equal(full[(0, 1)], full[(1, 1)])  # epochs draw differently
