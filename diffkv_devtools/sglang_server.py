"""Start and stop the real SGLang server on CPU, for the end-to-end tests and the benchmarks.

    with SGLangServer(model_path, ["--kv-pool", "diffkv"]) as server:
        reply = server.post("/generate", {"text": "Hi", "sampling_params": {"max_new_tokens": 8}})

The server runs ``python -m sglang.launch_server`` from a temporary directory (never the repo root, whose
``kernels/`` folder must not shadow PyPI's ``kernels``), with ``SGLANG_USE_CPU_ENGINE=1`` and the CPU shims
(:data:`diffkv_devtools.CPU_SHIMS`) on its ``PYTHONPATH``, and is stopped with its whole process group.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from . import CPU_SHIMS, gauges

CPU_ARGS = ["--device", "cpu", "--disable-overlap-schedule", "--skip-server-warmup", "--sampling-backend", "pytorch",
            "--host", "127.0.0.1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for an SGLang subprocess on this CPU machine (the CPU shims on PYTHONPATH, after a
    ``PYTHONPATH`` in ``extra``, which is prepended rather than replacing them)."""
    extra = dict(extra or {})
    env = dict(os.environ)
    env["SGLANG_USE_CPU_ENGINE"] = "1"
    paths = [extra.pop("PYTHONPATH", ""), str(CPU_SHIMS), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env["HF_HUB_OFFLINE"] = "1"
    env.pop("SGLANG_DIFFKV_POOL", None)
    env.pop("SGLANG_DIFFKV_CONFIG", None)
    env.update(extra)
    return env


class SGLangServer:
    """A running ``sglang.launch_server`` process.

    Args:
        model_path: model directory.
        args: extra CLI arguments (e.g. ``["--kv-pool", "diffkv"]``).
        max_total_tokens: SGLang's pool cap (always set on CPU).
        startup_timeout: seconds to wait for ``/health``.
        env: extra environment variables.
    """

    def __init__(self, model_path: str | os.PathLike, args: list[str] = (), max_total_tokens: int = 8192,
                 startup_timeout: float = 300.0, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path), *CPU_ARGS,
                    "--port", str(self.port), "--max-total-tokens", str(max_total_tokens), *args]
        self.env = cpu_env(env)
        self.startup_timeout = startup_timeout
        self.workdir = tempfile.mkdtemp(prefix="sglang-e2e-")
        self.log_path = Path(self.workdir) / "server.log"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "SGLangServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, cwd=self.workdir, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} during start-up:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"server not healthy after {self.startup_timeout} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
            except ProcessLookupError:
                pass
        self._log.close()
        self.proc = None

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def post(self, path: str, payload: dict, timeout: float = 600.0) -> dict:
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return json.loads(r.read())

    def post_text(self, path: str, payload: dict | None = None, timeout: float = 600.0) -> str:
        request = urllib.request.Request(self.url + path, data=json.dumps(payload or {}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.read().decode()

    def unexpected_errors(self) -> list[str]:
        """Tracebacks in the server log, except SGLang's harmless start-up race in its post-warmup
        ``/freeze_gc`` call (it posts to its own port before the HTTP server listens)."""
        groups, current = [], ""
        for block in self.log_text().split("Traceback (most recent call last):")[1:]:
            current += block
            chained = block.rstrip().endswith(("following exception:", "another exception occurred:"))
            if not chained:
                groups.append(current)
                current = ""
        groups += [current] if current else []
        return [g[-3000:] for g in groups if "freeze_gc" not in g]

    def get_text(self, path: str, timeout: float = 60.0) -> str:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return r.read().decode()

    def metrics(self) -> dict[str, float]:
        """The pool's gauges on ``/metrics``, summed over TP ranks (:func:`diffkv_devtools.gauges.parse`)."""
        return gauges.parse(self.get_text("/metrics"))
