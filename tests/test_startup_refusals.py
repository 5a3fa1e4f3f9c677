"""Start-up outside the one-line CLI refusals of ``test_e2e_serving_limits.py::test_bad_flags_fail_at_start_up``:
``sglang.Engine(kv_pool="diffkv", ...)`` callers get the :class:`~diffkv_sglang.integration.args.Refusal` (a
ValueError) with the message the launcher prints, not an exit; an ``--attention-backend`` the pool replaces is
logged as overridden in one line. Real SGLang in subprocesses; both happen in SGLang's argument resolution, before
any model is loaded."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from diffkv_devtools.sglang_server import cpu_env

pytestmark = pytest.mark.server

ENGINE = textwrap.dedent("""
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

RESOLVE = textwrap.dedent("""
    import sys
    from sglang.srt.plugins import load_plugins
    load_plugins()
    from sglang.srt.arg_groups.overrides import resolving_view
    from sglang.srt.server_args import prepare_server_args
    args = prepare_server_args(sys.argv[1:])
    args.resolve_once()
    print("BACKEND", resolving_view(args).attention_backend)
""")


def test_engine_users_get_the_exception(tiny_model):
    done = subprocess.run([sys.executable, "-c", ENGINE, str(tiny_model)], env=cpu_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == (
        "REFUSED True argument --kv-cache-dtype: invalid value 'fp8_e5m2' with --kv-pool diffkv (DiffKV chooses its "
        "own precision); allowed: auto")


def test_an_overridden_attention_backend_is_logged_in_one_line(tiny_model):
    argv = ["--model-path", str(tiny_model), "--device", "cpu", "--kv-pool", "diffkv", "--attention-backend",
            "torch_native"]
    done = subprocess.run([sys.executable, "-c", RESOLVE, *argv], env=cpu_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "BACKEND diffkv"
    lines = [line for line in done.stderr.splitlines() if "--attention-backend" in line]
    assert len(lines) == 1 and lines[0].endswith(
        "--kv-pool diffkv: --attention-backend torch_native is overridden: the attention backend is 'diffkv', the "
        "only one that reads the DiffKV pool"), done.stderr[-3000:]
