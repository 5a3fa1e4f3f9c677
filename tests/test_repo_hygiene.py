"""The repository names no machine's own paths: a fresh clone on another machine must work as it is.

Absolute paths into a home, scratch or system folder (``/work``, ``/opt``, ``/tmp``, ``/home``, ``/root``,
``/mnt``, ``/Users``) in a tracked file point at one machine's layout: a wheel store, the shared folder, a
scratch copy. Refer to the team's shared folder by its place beside the repository (``../shared``), use
``tempfile``/``mktemp`` for scratch space and pip's own configuration for wheel locations.
"""

from __future__ import annotations

import re
import subprocess

import pytest

from diffkv_devtools import REPO

MACHINE_PATH = re.compile(r"(?:^|[^\w.-])/(?:work|opt|tmp|home|root|mnt|Users)/")
EXEMPT = {
    "benchmarks/results/accuracy.json",     # model-generated text: samples quote what the model wrote
    "tests/test_repo_hygiene.py",           # this file: the pattern's own examples below
}


def tracked_text_files() -> list[str]:
    done = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"not a git checkout: {done.stderr.strip()}")
    return [f for f in done.stdout.split("\0") if f and f not in EXEMPT]


def test_no_machine_paths_in_tracked_files():
    hits = []
    for name in tracked_text_files():
        path = REPO / name
        if not path.is_file():          # deleted in the working tree, not yet committed
            continue
        data = path.read_bytes()
        if b"\0" in data:               # binary (images)
            continue
        for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            if MACHINE_PATH.search(line):
                hits.append(f"{name}:{number}: {line.strip()[:120]}")
    assert not hits, "machine-specific paths:\n" + "\n".join(hits)


@pytest.mark.parametrize("line, found", [
    ("see /work/shared/reference/x.md", True), ("cp -a pkg /tmp/sg/", True), ('"/opt/wheels"', True),
    ("../shared/reference/x.md", False), ("a/tmp/b", False), ("https://example.org/home/page", False),
])
def test_the_pattern_finds_absolute_paths_only(line, found):
    assert bool(MACHINE_PATH.search(line)) is found
