"""The README's code runs as written (its "Using the core" example: the store and wrappers without SGLang)."""

from __future__ import annotations

import re

from diffkv_devtools import REPO


def readme_block(section: str) -> str:
    """The first ```python block after the README heading ``section``."""
    text = (REPO / "README.md").read_text()
    body = text[text.index(f"## {section}\n"):]
    return re.search(r"```python\n(.*?)```", body, re.S).group(1)


def test_using_the_core_runs(torch_reference, capsys):
    scope: dict = {}
    exec(compile(readme_block("Using the core"), "README.md: Using the core", "exec"), scope)
    assert "compression_ratio" in capsys.readouterr().out        # the stats it prints
    assert scope["sealed"] > 0 and scope["store"].arena.used_bytes == 0
    assert tuple(scope["out"].shape) == (1, 9, 64)
