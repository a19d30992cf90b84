"""README.md stays short, keeps the quick start .ci/run mirrors, and its links resolve."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_is_within_its_length():
    assert len(README.splitlines()) <= 150


def test_quick_start_commands_are_the_ones_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'python3 -m venv .venv && .venv/bin/pip install -e ".[dev]" && .venv/bin/wsss demo' in README
    assert ".venv/bin/python -m pytest" in README and ".venv/bin/python -m pytest" in ci
    assert '.venv/bin/pip install -e ".[dev]"' in ci


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_and_anchors_resolve():
    for target in re.findall(r"\]\(([^)#]+\.md)(?:#([^)]+))?\)", README):
        path, anchor = target
        doc = ROOT / path
        assert doc.is_file(), path
        if anchor:
            headings = [_anchor(h) for h in re.findall(r"^#+ (.+)$", doc.read_text(), re.M)]
            assert anchor in headings, f"{path}#{anchor} not among {headings}"
