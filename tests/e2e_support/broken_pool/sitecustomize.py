"""A deliberately broken DiffKV pool, for checking that accuracy tests can fail (test-only fault injection).

With this folder first on ``PYTHONPATH`` and ``DIFFKV_TEST_ZERO_VALUES_LAYER=N`` set, every Python process of
the server (launcher, scheduler) stores zeros instead of the values of layer ``N``: the pool still runs, its
keys and every other layer are intact, and only the attention outputs of one layer are wrong. Without the
variable nothing is changed.
"""

import os

_LAYER = os.environ.get("DIFFKV_TEST_ZERO_VALUES_LAYER")

if _LAYER is not None:
    from diffkv_sglang.store import CompressedKVStore

    _write_tokens = CompressedKVStore.write_tokens

    def _write_tokens_zeroing(self, layer, locs, keys, values, **kwargs):
        if layer == int(_LAYER):
            values = values.new_zeros(values.shape)
        return _write_tokens(self, layer, locs, keys, values, **kwargs)

    CompressedKVStore.write_tokens = _write_tokens_zeroing
