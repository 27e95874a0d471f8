"""Test-wide settings: no network, no W&B server, small thread count, shared data location."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")

# The same setting as the CLI's data root (``MEDATTN_DATA``, see experiments/cli.py); ``MEDATTN_SHARED_DATA`` is the
# older name, still honoured.
SHARED_DATA = Path(os.environ.get("MEDATTN_DATA") or os.environ.get("MEDATTN_SHARED_DATA")
                   or Path(__file__).resolve().parents[1].parent / "shared" / "data")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data folder ``../shared/data``; tests using it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (set MEDATTN_DATA to its location)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """The built-in synthetic NIH-layout dataset, generated once per test session (small size)."""
    from datamodules.synthetic import write_synthetic_cxr

    root = tmp_path_factory.mktemp("synthetic_cxr")
    write_synthetic_cxr(root / "data", n_images=120, image_size=64, seed=0)
    return root / "data"
