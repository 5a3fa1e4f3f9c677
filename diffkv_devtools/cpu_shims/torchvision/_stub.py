"""Shared body of the test-only torchvision stand-in.

PyPI torchvision wheels link libtorch_cuda.so and cannot load with CPU-only torch, yet sglang
imports torchvision at module level (multimodal preprocessing). Every name resolves: the
``InterpolationMode`` enum is real, anything else is a dummy class that raises when used.
"""

from __future__ import annotations

import enum


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def _unavailable(name: str) -> type:
    def __init__(self, *args, **kwargs):
        raise RuntimeError(
            f"torchvision.{name} is unavailable: this is the CPU test stub (diffkv_devtools/cpu_shims)"
        )

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"torchvision.{name} is unavailable: CPU test stub")

    return type(name, (), {"__init__": __init__, "__call__": __call__, "__module__": "torchvision"})


_cache: dict[str, type] = {}


def module_getattr(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    if name not in _cache:
        _cache[name] = _unavailable(name)
    return _cache[name]
