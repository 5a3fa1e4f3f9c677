"""Shared helpers for the core tests: building stores and a float64 dense attention reference."""

import math
import os
import sys
from pathlib import Path

import pytest
import torch

# Triton kernels run in the interpreter where there is no GPU; set before any test module imports triton
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# kernel-test support (store builders, error bounds): plain modules used by the tests only. What the tests share
# with benchmarks and the demo (server launcher, tiny model, gauges) is the diffkv_devtools package at the repo root.
sys.path.insert(0, str(Path(__file__).parent / "kernel_support"))


@pytest.fixture(scope="session", autouse=True)
def _calibration_cache(tmp_path_factory):
    """Start-up calibrations of this session (servers inherit the environment) go to a fresh folder, never the
    user's ``~/.cache``: each model's first start measures, later ones read the cache."""
    os.environ["DIFFKV_CACHE_DIR"] = str(tmp_path_factory.mktemp("diffkv-cache"))

from kernel_stores import needs_interpreter  # noqa: E402


def pytest_report_header(config):
    return f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}"


def dense_attention(q, keys, values, q_pos, keep=None, sm_scale=None):
    """float64 reference: q ``[Q, Hq, D]``, keys/values ``[T, H, D]`` (position = index), causal by ``q_pos``
    ``[Q]``; ``keep`` ``[H, T]`` bool drops pruned tokens. Returns ``[Q, Hq, D]`` float64 and the probabilities
    ``[Hq, Q, T]``."""
    q, keys, values = q.double(), keys.double(), values.double()
    num_q_heads, heads = q.shape[1], keys.shape[1]
    group = num_q_heads // heads
    k = keys.repeat_interleave(group, dim=1).permute(1, 0, 2)            # [Hq, T, D]
    v = values.repeat_interleave(group, dim=1).permute(1, 0, 2)
    scale = sm_scale if sm_scale is not None else 1 / math.sqrt(q.shape[-1])
    logits = torch.einsum("qhd,htd->hqt", q, k) * scale
    mask = torch.arange(keys.shape[0])[None, None, :] <= q_pos[None, :, None]
    if keep is not None:
        mask = mask & keep.repeat_interleave(group, dim=0)[:, None, :]
    probs = torch.softmax(logits.masked_fill(~mask, -math.inf), -1)
    return torch.einsum("hqt,htd->qhd", probs, v), probs


@pytest.fixture(params=["torch", pytest.param("triton", marks=[pytest.mark.triton, needs_interpreter])])
def kernels(request, monkeypatch):
    """Run a test on the torch reference and on the Triton kernels (``DIFFKV_KERNELS``; on CPU the kernels run in
    Triton's interpreter, see diffkv_sglang.backend_select). Stores built inside the test follow the setting."""
    monkeypatch.setenv("DIFFKV_KERNELS", request.param)
    return request.param


@pytest.fixture
def seeded():
    """Fresh random inputs each run, reproducible from the printed seed on failure."""
    seed = torch.seed() % (2**31)
    torch.manual_seed(seed)
    return seed


@pytest.fixture
def reference_attention():
    """The float64 dense attention reference (see :func:`dense_attention`)."""
    return dense_attention


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny random Llama checkpoint (4 layers, 2 KV heads), built once per session for the server tests."""
    from diffkv_devtools.tiny_model import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def torch_reference(monkeypatch):
    """Stores and wrappers built in the test use the torch reference whatever ``DIFFKV_KERNELS`` says outside;
    kernel tests drive the kernels directly (``DecodePlan``, ``ExtendPlan``)."""
    monkeypatch.setenv("DIFFKV_KERNELS", "torch")
