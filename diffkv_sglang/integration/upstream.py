"""Every SGLang 0.5.23 internal the plugin touches: one table, and the checks that fail loudly when one is gone.

diffkv-sglang is built and tested against SGLang 0.5.23 (:data:`SUPPORTED_SGLANG`). SGLang has no stable plugin
API beyond a few registries, so the plugin reaches into its modules; this module is the one place that says where.
The plugin's modules get SGLang objects from here (``from .upstream import PagedTokenToKVPoolAllocator``,
``upstream.resolving_view(...)``): a name of :data:`INTERNALS` is imported on first use (a module ``__getattr__``),
so importing this module imports nothing from SGLang, and ``plugin.register()`` (which runs in every SGLang
process) stays light.

What fails loudly, with :class:`UpstreamMismatch` (a ``RuntimeError`` naming the supported and the installed
SGLang version) instead of a default or a silent no-op:

* a symbol of the table that does not import, or that lacks a member the plugin overrides or calls (a subclass
  overriding a method SGLang renamed would otherwise just never be called);
* a hook target (:func:`register_around_hooks`): SGLang's ``HookRegistry`` only logs a target it cannot find and
  carries on, which would leave the plugin half installed;
* an attribute an SGLang object must have in 0.5.23 (:func:`require_fields`), e.g. ``ModelConfig.attention_arch``
  or ``RadixAttention.sliding_window_size``: a missing one is an error, never a default that lets an unsupported
  model through (:func:`unsupported_model_features`, :func:`unsupported_layer_features`). Fields of Hugging Face
  configs are not probed at all: SGLang's own classifier (``mambaish_config``) decides what is hybrid.

The table is :data:`INTERNALS`: per SGLang symbol its ``module:qualname``, the plugin modules that use it and why,
the public alternative (registry or hook) if one exists, the class members read or overridden and the instance
attributes read. It is rendered at the end of this docstring; ``python -m diffkv_sglang.integration.upstream``
prints it and checks the installed SGLang against it (``tests/test_upstream.py`` runs the same check).

Besides the hook targets (SGLang's plugin mechanism, though three of them are private methods), three places reach
SGLang outside any registry, each with its reason in its row: the ``Engine.server_args_class`` attribute
(:func:`wrap_engine_server_args_class`), the allocator's ``_release_page_ids`` override and the pool's
``_finalize_allocation_log`` call. ``patches/`` proposes the registries that would retire most of the table
(``register_kv_pool``, request checks in SGLang itself).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
from collections.abc import Callable, Iterable
from typing import Any

SUPPORTED_SGLANG = "0.5.23"

# the ``public`` column of a row
PUBLIC = "this is SGLang's public extension point"
READ_ONLY = "none needed: read only"


class UpstreamMismatch(RuntimeError):
    """The installed SGLang lacks something this plugin needs from SGLang 0.5.23."""


def installed_sglang_version() -> str:
    """The installed SGLang's version (from package metadata, without importing it), or ``'not installed'``."""
    try:
        return importlib.metadata.version("sglang")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def mismatch(what: str) -> UpstreamMismatch:
    """The error for a missing SGLang internal: ``what`` says which, e.g. ``"ModelConfig has no attribute 'x'"``."""
    return UpstreamMismatch(f"diffkv-sglang supports SGLang {SUPPORTED_SGLANG}; {what} "
                            f"(SGLang {installed_sglang_version()})")


@dataclasses.dataclass(frozen=True)
class Internal:
    """One SGLang object the plugin touches.

    Attributes:
        path: ``"module:qualname"`` in SGLang 0.5.23.
        used_by: the plugin modules that use it (under ``diffkv_sglang/``).
        why: what the plugin does with it.
        public: whether a public registry or hook covers this use: :data:`PUBLIC` (the row is one),
            :data:`READ_ONLY` (the plugin only reads it), or why none is used (and what ``patches/`` proposes).
        members: class-level names the plugin overrides or calls, checked whenever the symbol is resolved.
        fields: instance attributes the plugin reads, checked on objects with :func:`require_fields`.
        hook: an AROUND target of SGLang's ``HookRegistry`` (:func:`register_around_hooks`), not imported by name.
        optional: present only in an SGLang with ``patches/sglang-0.5.23-kv-pool.patch`` applied.
    """

    path: str
    used_by: str
    why: str
    public: str
    members: tuple[str, ...] = ()
    fields: tuple[str, ...] = ()
    hook: bool = False
    optional: bool = False

    @property
    def module(self) -> str:
        return self.path.partition(":")[0]

    @property
    def qualname(self) -> str:
        return self.path.partition(":")[2]

    @property
    def dotted(self) -> str:
        """The target string of ``HookRegistry.register``."""
        return f"{self.module}.{self.qualname}"

    def resolve(self) -> Any:
        """The SGLang object, imported now, its members checked.

        Raises:
            UpstreamMismatch: the module, the object or one of its members is missing.
            ModuleNotFoundError: a module SGLang itself imports is missing (a broken installation, not a mismatch).
        """
        try:
            obj = importlib.import_module(self.module)
        except ModuleNotFoundError as error:
            if error.name is None or not (self.module == error.name or self.module.startswith(error.name + ".")):
                raise
            raise mismatch(f"module {self.module} does not exist") from None
        for part in self.qualname.split("."):
            if not hasattr(obj, part):
                raise mismatch(f"{obj.__name__} has no attribute {part!r} (needed: {self.path})")
            obj = getattr(obj, part)
        missing = [member for member in self.members if not hasattr(obj, member)]
        if missing:
            raise mismatch(_no_attribute(self.qualname, missing))
        return obj


NO_KV_POOL_REGISTRY = "none in 0.5.23 (register_kv_pool of patches/sglang-0.5.23-kv-pool.patch would be one)"

INTERNALS: tuple[Internal, ...] = (
    # ------------------------------------------------------------------ plugin machinery (plugin.py)
    Internal("sglang.srt.plugins.hook_registry:HookRegistry", "plugin", "installs the AROUND hooks below (hook "
             "targets)", PUBLIC, members=("register",)),
    Internal("sglang.srt.plugins.hook_registry:HookType", "plugin", "the AROUND hook type", PUBLIC,
             members=("AROUND",)),
    Internal("sglang.srt.arg_groups.resolution_hooks:register_resolution_hook", "plugin",
             "wraps the resolution step handle_attention_backend_compatibility: forces the diffkv backend, the page "
             "size and the CUDA graph phases; refuses unsupported setups", PUBLIC),
    Internal("sglang.srt.layers.attention.attention_registry:register_attention_backend", "plugin",
             "registers the 'diffkv' attention backend", PUBLIC),
    Internal("sglang.srt.layers.attention.attention_registry:ATTENTION_BACKENDS", "plugin",
             "the attention backend registry: 'diffkv' is registered once", PUBLIC),
    Internal("sglang.srt.server_args:add_attention_backend_choices", "plugin",
             "lets --attention-backend accept 'diffkv'", PUBLIC),
    Internal("sglang.srt.server_args:add_kv_pool_choices", "plugin",
             "lets SGLang's own --kv-pool accept 'diffkv' (args.add_cli_args then leaves that flag to SGLang)",
             PUBLIC, optional=True),
    Internal("sglang.srt.entrypoints.engine:Engine", "plugin",
             "sglang.Engine(kv_pool=..., diffkv_*=...): its class attribute server_args_class builds the record",
             "none: Engine.__init__ runs load_plugins() itself, so an AROUND hook on it misses the first Engine of "
             "a process, and a HookRegistry REPLACE of server_args_class would rebind ServerArgs in every module "
             "(the registry propagates a patch to every reference of the original); server_args_class is the "
             "attribute SGLang keeps for overriding the record, and wrap_engine_server_args_class wraps it",
             members=("server_args_class",)),
    # ------------------------------------------------------------------------- hook targets (plugin.py)
    Internal("sglang.srt.server_args:ServerArgs.add_cli_args", "plugin", "adds --kv-pool and the --diffkv-* flags",
             "none: SGLang has no registry for plugin flags", hook=True),
    Internal("sglang.srt.server_args:prepare_server_args", "plugin",
             "builds and validates the DiffKV config from the command line and publishes it",
             "none: SGLang has no registry for plugin flags", hook=True),
    Internal("sglang.srt.server_args:ServerArgs.resolve_once", "plugin",
             "from the command line a refusal is one 'error:' line and exit code 2",
             "none: SGLang has no hook for launcher errors", hook=True),
    Internal("sglang.srt.model_executor.pool_configurator:create_memory_pool_configurator", "plugin",
             "sizes the pool at the compressed cost per token", NO_KV_POOL_REGISTRY, hook=True),
    Internal("sglang.srt.mem_cache.kv_cache_configurator:KVCacheConfigurator._build_mha_kv_pool", "plugin",
             "builds DiffKVKVPool instead of the MHA pool", NO_KV_POOL_REGISTRY, hook=True),
    Internal("sglang.srt.mem_cache.kv_cache_configurator:KVCacheConfigurator._build_token_to_kv_pool_allocator",
             "plugin", "builds DiffKVPagedAllocator for a DiffKVKVPool", NO_KV_POOL_REGISTRY, hook=True),
    Internal("sglang.srt.managers.tokenizer_manager:TokenizerManager._validate_one_request", "plugin",
             "refuses (400) the requests that would stop the scheduler (integration/requests.py)",
             "none in 0.5.23; patches/sglang-0.5.23-request-checks.patch proposes the checks upstream", hook=True),
    # ------------------------------------------------------------------------------- resolution (plugin.py)
    Internal("sglang.srt.server_args:ServerArgs", "plugin",
             "the operator's input record (frozen during resolution, so its fields are what was typed); it also "
             "carries the bookkeeping attribute _diffkv_from_cli (ServerArgs accepts underscore attributes outside "
             "its fields and pickles them)", READ_ONLY,
             fields=("model_path", "attention_backend", "prefill_attention_backend", "decode_attention_backend",
                     "speculative_algorithm", "disaggregation_mode", "enable_hierarchical_cache", "enable_lmcache",
                     "kv_cache_dtype", "enable_dp_attention", "enable_unified_memory", "dcp_size", "page_size",
                     "device", "cuda_graph_config")),
    Internal("sglang.srt.arg_groups.overrides:resolving_view", "plugin", "the settings as resolved so far", PUBLIC),
    Internal("sglang.srt.arg_groups.overrides:declare_resolution", "plugin",
             "declares attention_backend, page_size and cuda_graph_config with source 'diffkv'", PUBLIC),
    Internal("sglang.srt.model_executor.cuda_graph_config:with_phase", "plugin",
             "switches the prefill (and, with DIFFKV_CUDA_GRAPH=0 or off CUDA, decode) CUDA graphs off", PUBLIC),
    Internal("sglang.srt.model_executor.cuda_graph_config:Phase", "plugin", "CUDA graph phases", READ_ONLY,
             members=("PREFILL", "DECODE")),
    Internal("sglang.srt.model_executor.cuda_graph_config:Backend", "plugin", "CUDA graph backends", READ_ONLY,
             members=("DISABLED",)),
    Internal("sglang.srt.arg_groups.model_override_base:model_config_of", "plugin",
             "the ModelConfig of the record being resolved", READ_ONLY),
    Internal("sglang.srt.configs.model_config:ModelConfig", "plugin, backend",
             "unsupported_model_features refuses models the pool cannot serve; the pool's shape (KV heads, "
             "head_dim, context length) and the vocabulary size of the request checks", READ_ONLY,
             members=("get_num_kv_heads", "get_num_attention_heads"),
             fields=("attention_arch", "is_hybrid_swa", "is_encoder_decoder", "head_dim", "context_len",
                     "vocab_size")),
    Internal("sglang.srt.configs.hybrid_arch:mambaish_config", "plugin",
             "SGLang's own test for hybrid Mamba / linear-attention models (its configurator builds other pools "
             "for them)", READ_ONLY),
    # ---------------------------------------------------------------------------- pools (plugin.py, pool.py)
    Internal("sglang.srt.mem_cache.kv_cache_configurator:KVCacheConfigurator", "plugin",
             "what the pool hooks read: the model config, layers, dtype, page size, device, draft worker or not",
             READ_ONLY, members=("pool_page_size",),
             fields=("model_config", "layer_info", "kv_cache_dtype", "is_draft_worker", "device")),
    Internal("sglang.srt.model_executor.model_runner_components.layer_setup:ModelLayerInfo", "plugin",
             "this rank's layers", READ_ONLY, fields=("num_effective_layers", "start_layer", "end_layer")),
    Internal("sglang.srt.runtime_context:get_parallel", "plugin, pool, backend",
             "attn_tp_size and attn_dcp_size (KV and query heads per rank), tp_rank (the gauges' label)", READ_ONLY),
    Internal("sglang.srt.runtime_context:get_exec", "plugin", "features.enable_memory_saver, passed to the pool",
             READ_ONLY),
    Internal("sglang.srt.arg_groups.fields.exec_:ExecFeatures", "plugin", "the namespace get_exec().features",
             READ_ONLY, fields=("enable_memory_saver",)),
    Internal("sglang.srt.runtime_context:get_observability", "metrics", "enable_metrics: gauges or not", READ_ONLY),
    Internal("sglang.srt.arg_groups.fields.observability:Observability", "metrics",
             "the namespace get_observability()", READ_ONLY, fields=("enable_metrics",)),
    Internal("sglang.srt.model_executor.pool_configurator:MemoryPoolConfigurator", "pool",
             "base of DiffKVPoolConfigurator", NO_KV_POOL_REGISTRY,
             members=("calculate_pool_sizes", "calculate_pool_sizes_from_max_tokens")),
    Internal("sglang.srt.model_executor.pool_configurator:MemoryPoolConfig", "pool", "the sizing result",
             READ_ONLY, fields=("max_total_num_tokens",)),
    Internal("sglang.srt.mem_cache.memory_pool:KVCache", "pool",
             "base of DiffKVKVPool; _finalize_allocation_log is the private step every SGLang pool ends its "
             "constructor with (it logs the size the pool's get_kv_size_bytes reports and sets mem_usage, which "
             "SGLang's memory report reads)",
             NO_KV_POOL_REGISTRY + "; no public way to report a pool's size",
             members=("set_kv_buffer", "get_key_buffer", "get_value_buffer", "get_kv_buffer",
                      "_finalize_allocation_log"),
             fields=("start_layer",)),
    Internal("sglang.srt.mem_cache.memory_pool:unwrap_write_loc", "pool", "the token slots of set_kv_buffer's loc",
             READ_ONLY),
    # ------------------------------------------------------------------------------------ allocator.py
    Internal("sglang.srt.mem_cache.allocator.paged:PagedTokenToKVPoolAllocator", "allocator",
             "base of DiffKVPagedAllocator: it stages the pages alloc* hands out and answers the scheduler's "
             "capacity hooks (create_prefill_budget ... verify_byte_accounting, public: SGLang's byte-accounted "
             "allocators override them); it releases a page's storage in _release_page_ids, the one funnel of every "
             "page release (free, free_page_ids, free_group_end), which SGLang's own PageInterleave and NPU "
             "allocators override or call the same way",
             NO_KV_POOL_REGISTRY + "; for _release_page_ids none: the public free, free_page_ids and free_group_end "
             "defer pages into free groups, so overriding them would re-implement that bookkeeping "
             "(tests/test_upstream.py checks that all three reach _release_page_ids)",
             members=("alloc", "alloc_extend", "alloc_decode", "_release_page_ids", "clear", "available_size",
                      "get_all_free_pages", "get_kvcache", "create_prefill_budget", "evict_to_free_tokens",
                      "check_decode_capacity", "max_new_tokens_for_memory", "verify_byte_accounting"),
             fields=("size", "page_size")),
    Internal("sglang.srt.mem_cache.prefill_budget:PrefillBudget", "allocator",
             "base of DiffKVPrefillBudget (admission by arena bytes), returned by create_prefill_budget", PUBLIC,
             members=("remaining_total", "remaining_current", "check_prefill", "can_allocate_prefill",
                      "available_chunk_tokens", "reserve", "ceil_paged_tokens"),
             fields=("tree_cache", "page_size")),
    Internal("sglang.srt.mem_cache.base_prefix_cache:BasePrefixCache", "allocator",
             "the radix tree: evicts pages for arena bytes", READ_ONLY,
             members=("supports_prefix_sharing", "evictable_size", "evict_for_alloc")),
    Internal("sglang.srt.mem_cache.base_prefix_cache:EvictParams", "allocator", "the argument of evict_for_alloc",
             READ_ONLY, fields=("num_tokens",)),
    # ------------------------------------------------------------------------------- requests (plugin.py)
    Internal("sglang.srt.managers.io_struct:GenerateReqInput", "plugin",
             "the request checks apply to generate requests only", READ_ONLY,
             fields=("text", "return_logprob", "top_logprobs_num", "logprob_start_len")),
    Internal("sglang.srt.managers.tokenizer_manager:TokenizerManager", "plugin", "model_config.vocab_size",
             READ_ONLY, fields=("model_config",)),
    # -------------------------------------------------------------------------------------- backend.py
    Internal("sglang.srt.layers.attention.base_attn_backend:AttentionBackend", "backend",
             "base of DiffKVAttnBackend", PUBLIC,
             members=("init_forward_metadata", "init_forward_metadata_out_graph", "init_cuda_graph_state",
                      "get_cuda_graph_seq_len_fill_value", "forward_decode", "forward_extend", "support_triton",
                      "shared_read_ends")),
    Internal("sglang.srt.layers.attention.base_attn_backend:SharedReadEnds", "backend",
             "DiffKVAttnBackend.shared_read_ends answers POST_REPLAY: the overlap scheduler's write-after-read "
             "barrier must wait for the whole forward, since every layer reads the store that the scheduler's "
             "releases and allocations change", PUBLIC, members=("POST_REPLAY",)),
    Internal("sglang.srt.layers.radix_attention:RadixAttention", "backend",
             "the layer of a forward call; unsupported_layer_features refuses what the DiffKV attention lacks",
             READ_ONLY,
             fields=("layer_id", "is_cross_attention", "sliding_window_size", "logit_cap", "attn_type", "qk_head_dim",
                     "v_head_dim", "tp_q_head_num", "scaling")),
    Internal("sglang.srt.model_executor.model_runner:ModelRunner", "backend", "the pools and the model config",
             READ_ONLY, fields=("token_to_kv_pool", "req_to_token_pool", "model_config")),
    Internal("sglang.srt.mem_cache.memory_pool:ReqToTokenPool", "backend", "req_to_token: each request's slots",
             READ_ONLY, fields=("req_to_token",)),
    Internal("sglang.srt.model_executor.forward_batch_info:ForwardBatch", "backend", "the batch being planned",
             READ_ONLY,
             fields=("forward_mode", "seq_lens", "seq_lens_cpu", "req_pool_indices", "extend_seq_lens",
                     "out_cache_loc")),
    Internal("sglang.srt.model_executor.forward_batch_info:ForwardMode", "backend", "decode, extend or idle",
             READ_ONLY, members=("is_idle", "is_decode", "is_extend")),
)

_BY_NAME: dict[str, Internal] = {row.qualname: row for row in INTERNALS}       # upstream.<qualname>


def _no_attribute(owner: str, missing: list[str]) -> str:
    others = f" (nor {', '.join(map(repr, missing[1:]))})" if missing[1:] else ""
    return f"{owner} has no attribute {missing[0]!r}{others}"


# ------------------------------------------------------------------------------------------ resolution
def resolve(name: str) -> Any:
    """The SGLang object of the row ``name`` (see :data:`INTERNALS`), imported now.

    Raises:
        KeyError: ``name`` is not in the table (list it there first).
        UpstreamMismatch: the installed SGLang lacks it or one of its members.
    """
    return _BY_NAME[name].resolve()


def is_available(name: str) -> bool:
    """Whether the optional row ``name`` (e.g. ``add_kv_pool_choices`` of a patched SGLang) is installed."""
    try:
        resolve(name)
    except UpstreamMismatch:
        return False
    return True


def __getattr__(name: str) -> Any:
    """``upstream.<name>`` / ``from .upstream import <name>``: the row's SGLang object, imported on first use and
    kept as a module global (SGLang's HookRegistry updates such references when it patches the original)."""
    row = _BY_NAME.get(name)
    if row is None or row.hook:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = row.resolve()
    globals()[name] = value
    return value


def require_fields(obj: Any, name: str) -> None:
    """Check that ``obj`` has every instance attribute the row ``name`` lists.

    Raises:
        UpstreamMismatch: naming the first missing attribute, e.g. ``"ModelConfig has no attribute
            'attention_arch'"``.
    """
    missing = [field for field in _BY_NAME[name].fields if not hasattr(obj, field)]
    if missing:
        raise mismatch(_no_attribute(name, missing))


def missing_internals() -> list[str]:
    """One line per required row the installed SGLang lacks (empty when every symbol and member resolves)."""
    problems = []
    for row in INTERNALS:
        if row.optional:
            continue
        try:
            row.resolve()
        except UpstreamMismatch as error:
            problems.append(str(error))
    return problems


# -------------------------------------------------------------------------------------- installation
def register_around_hooks(hooks: Iterable[tuple[str, Callable]]) -> None:
    """Register ``(target, hook)`` pairs as AROUND hooks with SGLang's ``HookRegistry``, after checking each target.

    Args:
        hooks: ``("module.Class.method", fn)`` pairs; every target must be a ``hook=True`` row.
    Raises:
        ValueError: a target that is not in :data:`INTERNALS`.
        UpstreamMismatch: a target the installed SGLang lacks (checked before anything is registered).
    """
    rows = {row.dotted: row for row in INTERNALS if row.hook}
    hooks = list(hooks)
    for target, _ in hooks:
        if target not in rows:
            raise ValueError(f"hook target {target} is not listed in {__name__}.INTERNALS")
        rows[target].resolve()
    registry, hook_type = resolve("HookRegistry"), resolve("HookType")
    for target, hook in hooks:
        registry.register(target, hook, hook_type.AROUND)


def wrap_engine_server_args_class(take_kwargs: Callable[[dict[str, Any]], None]) -> None:
    """Let ``sglang.Engine(**kwargs)`` take keywords ``ServerArgs`` does not know.

    ``take_kwargs(kwargs)`` removes (and acts on) its keywords before the record is built by whatever
    ``Engine.server_args_class`` held before (``ServerArgs``, or another plugin's factory). Why this attribute and not
    a hook: the ``Engine`` row of :data:`INTERNALS`.

    Raises:
        ImportError: the engine module does not import (e.g. a broken optional dependency; the caller reports it).
        UpstreamMismatch: ``Engine`` has no ``server_args_class``.
    """
    engine = resolve("Engine")
    build_record = engine.server_args_class

    def server_args_class(**kwargs):
        take_kwargs(kwargs)
        return build_record(**kwargs)

    engine.server_args_class = staticmethod(server_args_class)


# ------------------------------------------------------------------------------------ feature checks
def unsupported_model_features(model_config: Any) -> list[str]:
    """What of a model the DiffKV pool cannot serve, each phrased to follow "this model uses"; ``[]`` for a decoder
    with multi-head or grouped-query attention only.

    Args:
        model_config: SGLang's ``ModelConfig``.
    Raises:
        UpstreamMismatch: ``model_config`` lacks an attribute ``ModelConfig`` has in SGLang 0.5.23.
    """
    require_fields(model_config, "ModelConfig")
    features = []
    arch = model_config.attention_arch.name
    if arch != "MHA":
        features.append(f"{arch} attention")
    if model_config.is_hybrid_swa:
        features.append("hybrid sliding-window attention")
    if model_config.is_encoder_decoder:
        features.append("an encoder-decoder architecture")
    if _cached("mambaish_config")(model_config) is not None:
        features.append("Mamba / linear attention layers")
    return features


def unsupported_layer_features(layer: Any) -> list[str]:
    """What of an attention layer the DiffKV attention cannot compute; ``[]`` for causal decoder self-attention
    without sliding window or logit soft-capping, whose keys and values have one head dimension.

    Args:
        layer: SGLang's ``RadixAttention`` (the ``layer`` of ``forward_extend`` / ``forward_decode``).
    Returns:
        e.g. ``["cross attention", "sliding window 4096", "logit soft-capping 30.0",
        "qk_head_dim 192 != v_head_dim 128", "attention type ENCODER_ONLY (not causal)"]``.
    Raises:
        UpstreamMismatch: ``layer`` lacks an attribute ``RadixAttention`` has in SGLang 0.5.23.
    """
    require_fields(layer, "RadixAttention")
    features = []
    if layer.is_cross_attention:
        features.append("cross attention")
    if (layer.sliding_window_size or -1) > -1:
        features.append(f"sliding window {layer.sliding_window_size}")
    if (layer.logit_cap or 0) > 0:
        features.append(f"logit soft-capping {layer.logit_cap}")
    if layer.qk_head_dim != layer.v_head_dim:
        features.append(f"qk_head_dim {layer.qk_head_dim} != v_head_dim {layer.v_head_dim}")
    if layer.attn_type.name != "DECODER":
        features.append(f"attention type {layer.attn_type.name} (not causal)")
    return features


def _cached(name: str) -> Any:
    """``upstream.<name>`` from inside this module: the module global once resolved (or set by a test), else
    resolved now."""
    return globals()[name] if name in globals() else __getattr__(name)


# ---------------------------------------------------------------------------------------------- docs
def render_table() -> str:
    """:data:`INTERNALS` as text: one entry per row."""
    lines = []
    for row in INTERNALS:
        flags = ", ".join(flag for flag, on in (("hook target", row.hook), ("optional", row.optional)) if on)
        lines.append(f"``{row.path}``{f' ({flags})' if flags else ''}")
        lines.append(f"    used by {row.used_by}: {row.why}.")
        lines.append(f"    public registry or hook: {row.public}.")
        if row.members:
            lines.append(f"    members: {', '.join(row.members)}.")
        if row.fields:
            lines.append(f"    instance attributes: {', '.join(row.fields)}.")
    return "\n".join(lines)


if __doc__ is not None:                              # python -OO strips docstrings
    __doc__ += f"\nThe table ({len(INTERNALS)} rows)\n\n" + render_table() + "\n"


def main() -> int:
    """Print the table and check the installed SGLang against it; exit code 1 when something is missing."""
    print(render_table())
    problems = missing_internals()
    print(f"\nSGLang {installed_sglang_version()} (supported: {SUPPORTED_SGLANG}): "
          + ("every internal resolves" if not problems else f"{len(problems)} missing"))
    for problem in problems:
        print(f"  {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
