"""Every Python snippet of the README runs as written, each on its own (a new user pastes them one by one)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_the_readme_has_snippets():
    assert len(SNIPPETS) >= 4


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[f"snippet{i}" for i in range(len(SNIPPETS))])
def test_snippet_runs_as_written(snippet, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # snippets may write files (figures)
    exec(compile(snippet, str(README), "exec"), {"__name__": "__readme__"})
