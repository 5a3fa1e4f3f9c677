"""``sglang.Engine(kv_pool="diffkv", ...)`` with a setting the pool cannot serve: the caller gets the
:class:`~diffkv_sglang.integration.args.Refusal` (a ValueError) with the message the launcher prints as one line
(``test_e2e_serving_limits.py::test_bad_flags_fail_at_start_up``), not an exit. Real SGLang in a subprocess; the
refusal comes from SGLang's argument resolution, before any model is loaded."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from sglang_server import cpu_env      # tests/e2e_support, put on sys.path by conftest

pytestmark = pytest.mark.server

SCRIPT = textwrap.dedent("""
    import sys
    import sglang
    from diffkv_sglang.integration.args import Refusal
    if __name__ == "__main__":
        try:
            sglang.Engine(model_path=sys.argv[1], kv_pool="diffkv", device="cpu", kv_cache_dtype="fp8_e5m2",
                          log_level="error")
        except Refusal as refusal:
            print("REFUSED", isinstance(refusal, ValueError), refusal)
""")


def test_engine_users_get_the_exception(tiny_model):
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_model)], env=cpu_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == (
        "REFUSED True argument --kv-cache-dtype: invalid value 'fp8_e5m2' with --kv-pool diffkv (DiffKV chooses its "
        "own precision); allowed: auto")
