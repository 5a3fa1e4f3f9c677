"""The runnable examples in the core's docstrings (``>>>``) run and print what they say, so they cannot drift from
the API: the store's life cycle and the two attention wrappers' plan/run protocol."""

import doctest

import pytest

import diffkv_sglang.attention
import diffkv_sglang.store

MODULES = [diffkv_sglang.store, diffkv_sglang.attention]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, report=True)
    assert result.attempted > 0, f"{module.__name__} has no runnable example"
    assert result.failed == 0
