"""Test-only torchvision stand-in (see torchvision/_stub.py)."""

from torchvision._stub import InterpolationMode  # noqa: F401
from torchvision._stub import module_getattr as __getattr__  # noqa: F401
