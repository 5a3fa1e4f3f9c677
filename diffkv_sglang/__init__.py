"""diffkv-sglang: a DiffKV-compressed KV cache for SGLang.

The core (config, format, quant, policy, memory, store, attention) imports torch and triton only; the SGLang
glue lives in :mod:`diffkv_sglang.plugin`.
"""

from .config import ConfigError, DiffKVConfig, TierSpec

__version__ = "0.1.0"
__all__ = ["ConfigError", "DiffKVConfig", "TierSpec", "__version__"]
