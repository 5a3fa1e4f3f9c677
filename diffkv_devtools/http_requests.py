"""Raw HTTP requests to a test server that report the status instead of raising, and a model copy whose tokenizer
adds no BOS token (for the bad-request and fuzz tests and ``benchmarks/fuzz_serving.py``).

SGLangServer.post raises on 4xx/5xx; these tests need the status and SGLang's error message of every answer,
and a dropped connection (the server died) as a value, so a run can go on to count it.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

DROPPED = -1        # the status :func:`send` reports when no HTTP answer came (connection refused or dropped)


def send(server, path: str, payload: dict | bytes, timeout: float = 300.0) -> tuple[int, object]:
    """POST ``payload`` (a JSON-able object, or raw bytes sent as they are) to ``server.url + path``.

    Returns ``(status, body)``: the body parsed as JSON when it is, else its text; ``(DROPPED, repr(error))``
    when the server gave no HTTP answer."""
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    request = urllib.request.Request(server.url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            status, text = answer.status, answer.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode(errors="replace")
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as error:
        return DROPPED, repr(error)
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def error_message(body: object) -> str | None:
    """SGLang's error message in either of its formats (``{"error": {"message"}}`` of the native API,
    ``{"object": "error", "message"}`` of the OpenAI API); None for other bodies."""
    if isinstance(body, dict):
        if isinstance(body.get("error"), dict):
            return body["error"].get("message")
        if body.get("object") == "error":
            return body.get("message")
    return None


def healthy(server, timeout: float = 120.0) -> bool:
    """Whether the server still generates (``/health_generate`` runs one decode step through the scheduler)."""
    try:
        with urllib.request.urlopen(server.url + "/health_generate", timeout=timeout) as answer:
            return answer.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def wait_until_idle(server, timeout: float = 60.0) -> None:
    """Wait until the scheduler runs and queues no request (``/v1/loads``, answered by the scheduler itself, so
    not stale like ``/metrics``). A request the server already answered can still be running: SGLang sends the
    earlier items of a batch to the scheduler before it validates the later ones, and aborts them
    asynchronously when a later one fails."""
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(server.url + "/v1/loads?include=core", timeout=timeout) as answer:
            loads = json.loads(answer.read())["loads"]
        if all(load["num_running_reqs"] == 0 and load["num_waiting_reqs"] == 0 for load in loads):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"server still busy after {timeout} s: {loads}")
        time.sleep(0.05)


def copy_without_bos(model_dir: str | Path, out_dir: Path) -> Path:
    """A copy of a test model whose tokenizer adds no BOS token, like SmolLM2's: ``text=""`` then tokenizes to
    no tokens at all (the tiny Llama's tokenizer prepends ``<s>`` to every encoding)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in Path(model_dir).iterdir():
        shutil.copy2(path, out_dir / path.name)
    tokenizer = json.loads((out_dir / "tokenizer.json").read_text())
    tokenizer["post_processor"] = None
    (out_dir / "tokenizer.json").write_text(json.dumps(tokenizer))
    return out_dir


def vocab_size(model_dir: str | Path) -> int:
    """The model's vocabulary size (embedding rows), from its ``config.json``."""
    return json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
