"""SGLang glue: the only part of diffkv_sglang (with ``plugin.py``) that imports sglang.

``args`` (flags and Engine keywords), ``pool`` (KVCache + sizing), ``allocator`` (logical pages, staging,
admission by arena bytes), ``backend`` (the ``diffkv`` attention backend), ``metrics`` (log line, gauges),
``upstream`` (every SGLang internal the plugin touches, imported through it, and the checks that fail loudly).
"""
