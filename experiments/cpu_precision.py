"""bf16 on the CPU only where the CPU computes in bf16: the rule behind the CPU preset
(``experiments/configs/trainer/cpu_fast.yaml``) and every ready-made CPU config that asks for ``bf16-mixed``.

``bf16-mixed`` on a CPU is fast only with native bf16 instructions: x86 AVX512-BF16 (``vdpbf16ps``; AMD Zen 4,
Intel Cooper Lake and later) or AMX (Intel Sapphire Rapids and later), or Arm's BF16 extension. There oneDNN's bf16
convolutions and matmuls run about 1.95x the fp32 rate (docs/performance.md). Without them torch still runs bf16
autocast, but by converting to fp32 and back in every kernel: the results are bf16-rounded and the step is *slower*
than fp32. So, when a run on the CPU asks for ``bf16-mixed`` (or its alias ``bf16``), :func:`apply_cpu_precision`
(called by ``medattn`` before the Trainer is built) keeps it where :func:`native_bf16` finds the instructions and
otherwise sets ``trainer.precision`` to ``32-true`` with one :class:`CPUPrecisionFallback` warning naming the reason.
The run's ``config.yaml`` then records ``32-true``: what ran, not what was asked.

The environment variable ``MEDATTN_CPU_BF16`` overrides the detection: ``auto`` (the default) detects, ``on`` keeps
bf16 on any CPU (emulated where not native: to reproduce a bf16 run's numerics, not for speed), ``off`` always falls
back to ``32-true`` (an fp32 run of a bf16 config, e.g. as the reference for a comparison). GPU runs, ``bf16-true``
and every other precision are left as they are. ``channels_last`` needs no detection: it pays in fp32 too (1.1-1.2x
with oneDNN, docs/performance.md), so the preset keeps it on in the fallback.
"""

from __future__ import annotations

import os
import platform
import warnings

import torch

ENV = "MEDATTN_CPU_BF16"
FALLBACK = "32-true"
BF16_MIXED = ("bf16-mixed", "bf16")  # Lightning's precision flag and its alias


class CPUPrecisionFallback(UserWarning):
    """A CPU run asked for bf16-mixed and runs 32-true instead (the message says why)."""


def native_bf16() -> tuple[bool, str]:
    """Whether bf16-mixed should run on this CPU, and the reason (named in the fallback warning).

    Honours ``MEDATTN_CPU_BF16`` (``auto``/``on``/``off``; anything else is a ``ValueError`` naming the variable).
    Detection uses torch's own CPU feature queries (``torch.cpu._is_avx512_bf16_supported``,
    ``torch.cpu._is_amx_tile_supported`` on x86; ``torch.ops.mkldnn._is_mkldnn_bf16_supported``, which on Arm means
    the BF16 extension); a torch without them counts as "not found" and says so."""
    mode = os.environ.get(ENV, "auto").strip().lower()
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"{ENV}={os.environ[ENV]!r}: expected auto (detect), on (always bf16) or off (always fp32)")
    if mode != "auto":
        return mode == "on", f"{ENV}={mode}"
    if not torch.backends.mkldnn.is_available():
        return False, "this torch build has no oneDNN (torch.backends.mkldnn.is_available() is False)"
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i386", "i686", "x86"):
        avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
        amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
        if avx512_bf16 is None and amx is None:
            return False, f"torch {torch.__version__} cannot report the CPU's bf16 instructions"
        if avx512_bf16 is not None and avx512_bf16():
            return True, "the CPU has AVX512-BF16"
        if amx is not None and amx():
            return True, "the CPU has AMX"
        return False, "the CPU has neither AVX512-BF16 nor AMX, so bf16 would be emulated (slower than fp32)"
    if machine in ("arm64", "aarch64"):
        try:
            arm_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False, f"torch {torch.__version__} cannot report the CPU's bf16 instructions"
        return (True, "the CPU has Arm BF16") if arm_bf16 else \
            (False, "the CPU has no Arm BF16 extension, so bf16 would be emulated (slower than fp32)")
    return False, f"no bf16 detection for a {machine or 'unknown'} CPU"


def runs_on_cpu(accelerator) -> bool:
    """Whether Lightning's ``accelerator`` flag puts the run on the CPU (``auto``/unset: when there is no GPU)."""
    if accelerator in (None, "auto"):
        mps = getattr(torch.backends, "mps", None)
        return not torch.cuda.is_available() and not (mps is not None and mps.is_available())
    return isinstance(accelerator, str) and accelerator.lower() == "cpu"


def cpu_precision(accelerator, precision) -> tuple[object, str | None]:
    """The precision a run should use, and the fallback's reason (``None`` when ``precision`` is kept)."""
    if str(precision) not in BF16_MIXED or not runs_on_cpu(accelerator):
        return precision, None
    supported, reason = native_bf16()
    return (precision, None) if supported else (FALLBACK, reason)


def apply_cpu_precision(config) -> None:
    """Set ``config.trainer.precision`` (a parsed jsonargparse namespace of one subcommand) to ``32-true`` where a
    CPU run asks for bf16-mixed without native bf16, with one :class:`CPUPrecisionFallback` warning."""
    trainer = config.get("trainer") if config is not None else None
    if trainer is None:
        return
    asked = trainer.get("precision")
    precision, reason = cpu_precision(trainer.get("accelerator"), asked)
    if reason is not None:
        trainer["precision"] = precision
        warnings.warn(f"trainer.precision {asked} -> {precision} on this CPU: {reason}; {ENV}=on keeps bf16 "
                      "(emulated, slower)", CPUPrecisionFallback, stacklevel=2)
