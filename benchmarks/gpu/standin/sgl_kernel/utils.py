"""``sgl_kernel.utils`` of the GPU stand-in: the one helper SGLang's Triton attention backend imports."""

import functools

import torch


@functools.cache
def is_arch_support_pdl() -> bool:
    """Programmatic dependent launch needs compute capability 9.0 or newer (Hopper), as in sgl_kernel."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9
