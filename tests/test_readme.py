"""The README's code example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_reuse_example_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDATTN_CACHE", str(tmp_path))
    text = README.read_text()
    section = text.split("## Reusing the DataModules in another project", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})


def test_readme_test_command_is_what_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    command = re.search(r"# 3\. Test\n(.+)\n", README.read_text()).group(1).strip()
    assert command in ci.splitlines()
