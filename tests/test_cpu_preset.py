"""The CPU preset (``experiments/configs/trainer/cpu_fast.yaml``: channels_last + bf16-mixed) and its fallback
(``experiments/cpu_precision.py``: 32-true, with a warning naming the reason, where the CPU has no native bf16).

Loss match: every step method's first training loss (tiny registered fixture, same initial weights, same first
batch, one real ``Trainer.fit`` step) under the preset is within ``REL_TOL`` of fp32 NCHW, and differs from it (so
bf16 really ran). 2 % is about five bf16 roundings (bf16 keeps 8 significant bits, 2^-8 = 0.4 %). Measured on
the development CPU (AVX512-BF16), relative difference: PCAM 0.03 %, CAM 0.06 %, MAG-SD 0.22 %, DC-MT 0.63 %,
RetinaNet 0.41 %, OXnet 0.001 %.
"""

from __future__ import annotations

import copy
import platform
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from experiments import cpu_precision
from experiments.cpu_precision import CPUPrecisionFallback, apply_cpu_precision, cpu_precision as resolve
from lightning_modules.tiny import FACTORIES

ROOT = Path(__file__).resolve().parents[1]
PRESET = ROOT / "experiments/configs/trainer/cpu_fast.yaml"
REL_TOL = 0.02
STEP_METHODS = ("pcam", "cam_baseline", "magsd", "dcmt", "retinanet", "oxnet")


def preset() -> tuple[str, bool]:
    """(trainer.precision, model channels_last) as the preset file sets them."""
    config = yaml.safe_load(PRESET.read_text())
    return config["trainer"]["precision"], config["model"]["init_args"]["channels_last"]


class FirstLoss(pl.Callback):
    def __init__(self) -> None:
        self.loss: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        out = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.loss = float(out.detach().float())


def first_loss(module, data, precision: str) -> float:
    grab = FirstLoss()
    pl.seed_everything(0, verbose=False)  # the same first batch (and augmentation draws) in both arms
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, precision=precision, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, callbacks=[grab])
    trainer.fit(module, datamodule=data)
    assert grab.loss is not None, "no training step ran"
    return grab.loss


def test_preset_file_sets_bf16_and_channels_last():
    assert preset() == ("bf16-mixed", True)


@pytest.mark.parametrize("method", STEP_METHODS)
def test_preset_loss_matches_fp32(method, tmp_path, monkeypatch):
    monkeypatch.setenv(cpu_precision.ENV, "on")  # the numerics are under test here, not the detection
    precision, channels_last = preset()
    torch.manual_seed(0)
    module, data = FACTORIES[method](tmp_path)
    fast = copy.deepcopy(module)  # identical initial weights
    fast.channels_last = channels_last
    reference = first_loss(module, data, "32-true")
    got = first_loss(fast, data, precision)
    assert abs(got - reference) <= REL_TOL * abs(reference), (method, reference, got)
    assert got != reference, f"{method}: the preset's loss equals fp32 bit for bit, so bf16 did not run"
    conv = next(m for m in fast.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last), "the preset's channels_last did not apply"


# ------------------------------------------------------------------------------------------ detection, fallback
def test_gpu_other_precisions_and_native_cpu_are_left_alone(monkeypatch):
    monkeypatch.setenv(cpu_precision.ENV, "off")  # even when bf16 is refused on this CPU
    assert resolve("gpu", "bf16-mixed") == ("bf16-mixed", None)
    assert resolve("cpu", "32-true") == ("32-true", None)
    assert resolve("cpu", "bf16-true") == ("bf16-true", None)
    monkeypatch.setenv(cpu_precision.ENV, "on")
    assert resolve("cpu", "bf16-mixed") == ("bf16-mixed", None)


def test_forced_off_falls_back_with_reason(monkeypatch):
    monkeypatch.setenv(cpu_precision.ENV, "off")
    assert resolve("cpu", "bf16-mixed") == ("32-true", f"{cpu_precision.ENV}=off")
    assert resolve("cpu", "bf16")[0] == "32-true"


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86 detection")
def test_detection_without_bf16_instructions(monkeypatch):
    monkeypatch.delenv(cpu_precision.ENV, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    precision, reason = resolve("cpu", "bf16-mixed")
    assert precision == "32-true" and "neither AVX512-BF16 nor AMX" in reason
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert resolve("cpu", "bf16-mixed") == ("bf16-mixed", None)


def test_bad_environment_value_is_named(monkeypatch):
    monkeypatch.setenv(cpu_precision.ENV, "yes")
    with pytest.raises(ValueError, match=f"{cpu_precision.ENV}='yes'.*auto.*on.*off"):
        resolve("cpu", "bf16-mixed")


def test_cli_falls_back_to_fp32_and_records_it(monkeypatch, tmp_path):
    """``medattn`` with the preset on a CPU without native bf16: the Trainer runs 32-true, the warning names the
    reason, the config (what config.yaml records) says 32-true, and channels_last stays on."""
    from experiments.cli import MedAttnCLI

    monkeypatch.setenv(cpu_precision.ENV, "off")
    args = ["-c", str(ROOT / "experiments/cam_baseline/synthetic.yaml"), "-c", str(PRESET),
            "--trainer.logger", "false", "--trainer.callbacks", "[]",
            "--data.init_args.reader.init_args.n_images", "40",
            "--data.init_args.reader.init_args.cache_dir", str(tmp_path), "--data.init_args.num_workers", "0"]
    with pytest.warns(CPUPrecisionFallback, match=r"bf16-mixed -> 32-true on this CPU: MEDATTN_CPU_BF16=off"):
        cli = MedAttnCLI(args=args, run=False)
    assert cli.trainer.precision == "32-true"
    assert cli.config.trainer.precision == "32-true"
    assert cli.model.channels_last is True
    monkeypatch.setenv(cpu_precision.ENV, "on")
    assert MedAttnCLI(args=args, run=False).trainer.precision == "bf16-mixed"


def test_apply_without_trainer_section_is_a_no_op():
    apply_cpu_precision(None)
    apply_cpu_precision({})
