"""What the wheel ships and what the project depends on."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# distribution name -> import name, where they differ
IMPORT_NAME = {"pillow": "PIL", "opencv-python-headless": "cv2", "faster-coco-eval": "faster_coco_eval",
               "jsonargparse[signatures]": "jsonargparse", "lightning": "lightning"}
# used by name, not imported: the string that selects it must be in the code
BY_NAME = {"faster-coco-eval": "backend=\"faster_coco_eval\""}


def _imported_top_level() -> set[str]:
    names = set()
    for package in ("lightning_modules", "datamodules", "networks", "callbacks", "experiments"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names


def test_every_core_dependency_is_imported():
    """A dependency nothing imports only slows installs and widens the attack surface (einops and rich were)."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    imported = _imported_top_level()
    code = "\n".join(p.read_text() for package in ("lightning_modules", "networks") for p in (ROOT / package).rglob("*.py"))
    unused = []
    for dep in deps:
        name = re.split(r"[<>=!~ ]", dep, maxsplit=1)[0].strip().lower()
        module = IMPORT_NAME.get(name, name.replace("-", "_"))
        if module not in imported and not (name in BY_NAME and BY_NAME[name] in code):
            unused.append(dep)
    assert not unused, f"core dependencies that no module imports: {unused}"


@pytest.mark.slow
def test_wheel_ships_code_and_configs_not_measurements(tmp_path):
    import setuptools

    if int(setuptools.__version__.split(".")[0]) < 69:  # the build-system floor; no download here (offline tests)
        pytest.skip(f"setuptools {setuptools.__version__} in this environment; building the wheel needs >= 69")
    # a copy of the sources without build leftovers (a stale build/ folder would be packed as it is)
    source = tmp_path / "medattn"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", "build", ".venv*", "runs", "*.egg-info", "__pycache__", "wandb", ".pytest_cache", "shared"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "out"), str(source)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "out").glob("medattn-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "experiments/pcam/synthetic.yaml" in names and "networks/retina.py" in names
    assert not [n for n in names if n.startswith("experiments/benchmarks/results/")]
    assert "experiments/benchmarks/dataloader.py" in names
