"""The README is a front page and its documentation pages hold what they promise.

- The reuse example in ``docs/reuse.md`` runs as written; the README's test command is what CI runs.
- README.md stays a front page (at most 250 lines), and every relative link in README.md and ``docs/*.md`` points
  at an existing file (and, with ``#anchor``, at an existing heading of it).
- Every generated-table command in the docs (``--doc FILE --section KEY``) names a file that holds the KEY markers,
  and every marker pair has such a command, so ``medattn compare`` and the benchmark report write where a reader
  looks; every ``experiments/...yaml`` path, ``python -m`` module and ``python script.py`` the docs name exists.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 250


def _prose(text: str) -> str:
    """The text outside fenced code blocks (links in code are not links)."""
    return re.sub(r"```.*?```", "", text, flags=re.S)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped except '-', spaces to '-'."""
    heading = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", heading).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", _prose(path.read_text()), re.M)}


def test_readme_reuse_example_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDATTN_CACHE", str(tmp_path))
    page = ROOT / "docs" / "reuse.md"
    code = re.search(r"```python\n(.*?)```", page.read_text(), re.S).group(1)
    exec(compile(code, str(page), "exec"), {})


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"# 3\. Test\n(.+)\n", README.read_text()).group(1).strip()
    assert command == "python -m pytest -q" and command in ci.splitlines()


def test_readme_is_a_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines (at most {MAX_README_LINES}): move details into docs/*.md")


def test_every_relative_link_points_at_an_existing_file_and_heading():
    checked, broken = 0, []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", _prose(page.read_text())):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            checked += 1
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no file {dest})")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no heading '#{anchor}' in {dest.name})")
    assert checked >= 20 and not broken, "\n".join(broken)


def test_generated_tables_and_their_commands_agree():
    commands = []  # (page, file, key) for every command that writes a table
    for page in PAGES:
        text = page.read_text()
        for m in re.finditer(r"--(?:doc|readme) (\S+?)`?(?: --section ([\w-]+)|[`)\s])", text):
            key = m.group(2) or ("benchmarks" if "benchmarks.report" in text[max(0, m.start() - 80):m.start()]
                                 else "results")
            commands.append((page, m.group(1), key))
    for page, file, key in commands:
        if file in ("FILE", "<file>"):
            continue
        dest = ROOT / file
        assert dest.is_file(), f"{page.name}: --doc {file} does not exist"
        text = dest.read_text()
        assert f"<!-- {key}:start -->" in text and f"<!-- {key}:end -->" in text, f"{file} lacks the {key} markers"
    named = {(file, key) for _, file, key in commands}
    for page in PAGES:
        for key in re.findall(r"<!-- ([a-z][a-z0-9-]*):start -->", page.read_text()):
            assert (str(page.relative_to(ROOT)), key) in named, f"no command in the docs regenerates {page.name}:{key}"
    assert ("docs/results.md", "results-pcam") in named and ("docs/performance.md", "benchmarks") in named


def _expand(pattern: str) -> list[str]:
    """Shell brace expansion: ``a/{x,y}{,_z}.yaml`` -> a/x.yaml, a/x_z.yaml, a/y.yaml, a/y_z.yaml."""
    parts = re.split(r"\{([^{}]*)\}", pattern)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def test_every_config_path_in_the_docs_exists():
    missing, checked = [], 0
    for page in PAGES:
        for path in re.findall(r"experiments/[\w/{},.-]+?\.yaml", page.read_text()):
            for one in _expand(path):
                checked += 1
                if not (ROOT / one).is_file():
                    missing.append(f"{page.relative_to(ROOT)}: {one}")
    assert checked >= 20 and not missing, "\n".join(missing)


def test_every_module_and_script_in_the_docs_exists():
    import importlib.util

    checked, missing = 0, []
    for page in PAGES:
        text = page.read_text()
        for module in re.findall(r"(?:python|torchrun .*?) -m ([A-Za-z_][\w.]*)", text):
            checked += 1
            if importlib.util.find_spec(module) is None:
                missing.append(f"{page.relative_to(ROOT)}: python -m {module}")
        for script in re.findall(r"python ([\w/]+\.py)", text):
            checked += 1
            if not (ROOT / script).is_file():
                missing.append(f"{page.relative_to(ROOT)}: python {script}")
    assert checked >= 10 and not missing, "\n".join(missing)


def test_doc_flag_writes_between_markers(tmp_path):
    """``--doc`` (and its older name ``--readme``) replaces only the text between the markers."""
    from experiments.benchmarks import report

    results = tmp_path / "results"
    results.mkdir()
    (results / "other.json").write_text(json.dumps({"answer": 42}))
    for flag in ("--doc", "--readme"):
        page = tmp_path / "performance.md"
        page.write_text("a\n<!-- benchmarks:start -->\nold\n<!-- benchmarks:end -->\nb\n")
        report.main(["--results", str(results), flag, str(page)])
        text = page.read_text()
        assert "old" not in text and "| answer | 42 |" in text and text.startswith("a\n") and text.endswith("b\n")


def test_compare_doc_flag_writes_between_markers(tmp_path):
    from experiments import compare

    page = tmp_path / "results.md"
    page.write_text("x\n<!-- results-pcam:start -->\nold\n<!-- results-pcam:end -->\ny\n")
    compare.main([str(ROOT / "tests" / "fixtures" / "compare_runs" / "suite"), "--tags", "suite:fixture", "--out", str(tmp_path / "o"),
                  "--no-plot", "--doc", str(page), "--section", "results-pcam"])
    text = page.read_text()
    assert "old" not in text and "| pcam | 1 | 3 | 0.847 ± 0.050 |" in text and text.endswith("y\n")
