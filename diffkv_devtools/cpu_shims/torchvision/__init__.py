"""Test-only torchvision stand-in (see torchvision/_stub.py)."""

# transformers finds this package with importlib.util.find_spec, believes torchvision is
# installed and parses its version; "0.0.0" makes every is_torchvision_greater_or_equal() False.
__version__ = "0.0.0+cpushim"

from torchvision._stub import InterpolationMode  # noqa: F401
from torchvision._stub import module_getattr as __getattr__  # noqa: F401

from torchvision import io, transforms  # noqa: E402,F401
