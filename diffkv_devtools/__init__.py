"""Development support of this repository, shared by tests, benchmarks and the demo; never shipped.

Not listed in pyproject's ``packages``, so no wheel contains it, and nothing in ``diffkv_sglang`` imports it
(``tests/test_packaging.py`` checks both). The editable install of ``make setup`` (compat mode) puts the repo root
on ``sys.path``, so ``import diffkv_devtools`` works in the repo's ``.venv`` from any directory.

* :mod:`.sglang_server`: start and stop the real SGLang server on CPU (``SGLangServer``, ``cpu_env``);
* :mod:`.preloaded`: many short SGLang command lines forked from one interpreter that imported SGLang once;
* :mod:`.gauges`: the pool's ``sglang:diffkv_*`` gauges read from ``/metrics``;
* :mod:`.http_requests`: raw HTTP requests that report the status instead of raising;
* :mod:`.e2e_common`: the DiffKV flags, prompt and ``/generate`` helper of the end-to-end tests;
* :mod:`.tiny_model`: a tiny random Llama checkpoint (``python -m diffkv_devtools.tiny_model OUT_DIR``);
* :mod:`.teacher_forced`: teacher-forced comparison of two KV pools;
* :mod:`.request_fuzz`: a seeded fuzz run of SGLang's HTTP API;
* ``cpu_shims/`` (:data:`CPU_SHIMS`): stand-ins for ``sgl_kernel`` and ``torchvision`` that let SGLang run on a
  CPU-only machine. A folder, not a subpackage: it goes on the ``PYTHONPATH`` of the SGLang server (or engine)
  subprocess only (``sglang_server.cpu_env`` does that), never on the ``sys.path`` of the process that starts it.
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CPU_SHIMS = Path(__file__).resolve().parent / "cpu_shims"
