"""SGLang plugin entry point: ``[project.entry-points."sglang.srt.plugins"] diffkv = "diffkv_sglang.plugin:register"``.

SGLang calls :func:`register` in every process it starts (launcher, scheduler, detokenizer). Registration only
adds hooks; each hook checks whether DiffKV was selected (``--kv-pool diffkv`` or
``sglang.Engine(kv_pool="diffkv")``) and otherwise calls SGLang's own code unchanged, so installing the package
changes nothing by default.

What the hooks do when DiffKV is selected:

======================================================  ================================================
hook                                                    effect
======================================================  ================================================
``ServerArgs.add_cli_args`` (around)                    adds ``--kv-pool`` and the ``--diffkv-*`` flags
``prepare_server_args`` (around)                        builds and validates the config, publishes it
``ServerArgs.resolve_once`` (around)                    from the command line, a refusal is one
                                                        ``error:`` line and exit code 2
``Engine.server_args_class`` (wrapped)                  accepts ``kv_pool=`` / ``diffkv_*=`` keywords
resolution step ``handle_attention_backend_compatibility``  forces ``--attention-backend diffkv`` (a different
                                                        one typed is logged as overridden), the page
                                                        size, no CUDA graphs; refuses unsupported setups
                                                        (:class:`~.integration.args.Refusal`); then
                                                        calibrates per-layer tiers
                                                        (:mod:`.integration.calibration`)
``create_memory_pool_configurator`` (around)            sizes the pool at the compressed cost per token
``KVCacheConfigurator._build_mha_kv_pool`` (around)     builds :class:`DiffKVKVPool`
``KVCacheConfigurator._build_token_to_kv_pool_allocator``  builds :class:`DiffKVPagedAllocator`
``TokenizerManager._validate_one_request`` (around)     refuses (400) the requests that would stop the
                                                        scheduler (:mod:`.integration.requests`)
attention backend registry ``"diffkv"``                 :class:`DiffKVAttnBackend`
======================================================  ================================================

Every SGLang object named here (and in ``integration/``) is listed, with why and whether a public registry covers
it, in :mod:`.integration.upstream`, and imported through it; a target or attribute SGLang 0.5.23 has and the
installed SGLang lacks is an error naming both versions, never a silent default.
"""

from __future__ import annotations

import logging
import os
import sys

from .backend_select import CUDA_GRAPH_ENV, KERNELS_ENV, MODES, cuda_graph_enabled, kernel_mode
from .config import ConfigError, DiffKVConfig
from .integration import args as cli
from .integration import upstream

logger = logging.getLogger(__name__)

_registered = False


def _selected_config() -> DiffKVConfig | None:
    """The DiffKV config of this server, or None when the default pool is selected."""
    return cli.published_config()


# ------------------------------------------------------------------------------------ CLI / Engine
PROG = "sglang serve"          # the prog of the parser in SGLang's prepare_server_args: its argparse errors' prefix


def _fail(message: str):
    """End the launcher like one of SGLang's argparse errors: ``sglang serve: error: MESSAGE`` on stderr, exit
    code 2, no traceback."""
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _add_cli_args(original, parser):
    original(parser)
    cli.add_cli_args(parser)


def _prepare_server_args(original, argv):
    server_args = original(argv)
    import argparse

    probe = argparse.ArgumentParser(add_help=False)
    cli.add_cli_args(probe)
    ns, _ = probe.parse_known_args(argv)
    config = calibration = None
    if ns.kv_pool == "diffkv":
        try:
            config = cli.config_from_namespace(ns)
            calibration = cli.calibration_from_namespace(ns)
        except ConfigError as error:
            given = {flag.field for flag in cli.FLAGS if getattr(ns, flag.dest) is not None}
            given |= {"alpha_prune"} if ns.diffkv_alpha_low is not None else set()
            given |= {"calibration"} if ns.diffkv_calibration is not None else set()
            _fail(cli.flag_error_message(error, given))
    elif any(getattr(ns, flag.dest) is not None for flag in cli.FLAGS) or ns.diffkv_config or ns.diffkv_calibration:
        _fail("--diffkv-* flags need --kv-pool diffkv")
    cli.publish(ns.kv_pool, config, calibration)
    server_args._diffkv_from_cli = True          # read by _resolve_once (ServerArgs keeps underscore bookkeeping)
    return server_args


def _resolve_once(original, server_args):
    """Launched from the command line (``prepare_server_args`` built the record), a refusal of the DiffKV pool
    ends the launcher like a flag error; ``sglang.Engine`` callers get the :class:`~.integration.args.Refusal`."""
    try:
        return original(server_args)
    except cli.Refusal as refusal:
        if not getattr(server_args, "_diffkv_from_cli", False):
            raise
        _fail(str(refusal))


def _take_engine_kwargs(kwargs: dict) -> None:
    """``sglang.Engine(**kwargs)``: pop ``kv_pool`` and the ``diffkv_*`` keywords and publish the choice, before
    SGLang builds its record from the rest."""
    cli.publish(*cli.split_engine_kwargs(kwargs))


# ------------------------------------------------------------------------------------- resolution
def _resolve(server_args, previous):
    previous(server_args)
    config = _selected_config()
    if config is None:
        return
    upstream.require_fields(server_args, "ServerArgs")
    cfg = upstream.resolving_view(server_args)
    if cfg.speculative_algorithm:
        raise cli.Refusal("--speculative-algorithm", cfg.speculative_algorithm,
                          "speculative decoding is not supported", "unset")
    if cfg.disaggregation_mode not in (None, "null"):
        raise cli.Refusal("--disaggregation-mode", cfg.disaggregation_mode, "PD disaggregation is not supported",
                          "null")
    for switch in ("enable_hierarchical_cache", "enable_lmcache"):
        if getattr(cfg, switch):
            raise cli.Refusal(_flag(switch), True, "KV offloading is not supported", "off (flag not given)")
    if cfg.kv_cache_dtype not in ("auto", None):
        raise cli.Refusal("--kv-cache-dtype", cfg.kv_cache_dtype, "DiffKV chooses its own precision", "auto")
    for switch, feature in (("enable_dp_attention", "DP attention"), ("enable_unified_memory", "unified memory")):
        if getattr(cfg, switch):
            raise cli.Refusal(_flag(switch), True, f"{feature} is not supported", "off (flag not given)")
    if (cfg.dcp_size or 1) > 1:
        raise cli.Refusal("--dcp-size", cfg.dcp_size, "decode context parallelism is not supported", "1")
    if cfg.page_size not in (None, 1, config.page_size):
        raise cli.Refusal("--page-size", cfg.page_size, f"the DiffKV page size is {config.page_size}",
                          f"{config.page_size} or unset (change it with --diffkv-page-size)")
    for name in ("prefill_attention_backend", "decode_attention_backend"):
        backend = getattr(cfg, name)
        if backend not in (None, "diffkv"):
            raise cli.Refusal(_flag(name), backend, "only the diffkv attention backend reads the DiffKV pool",
                              "diffkv or unset")
    typed = server_args.attention_backend      # the record holds what was typed; resolution declares its choices
    if typed not in (None, "diffkv"):
        logger.warning("--kv-pool diffkv: --attention-backend %s is overridden: the attention backend is 'diffkv', "
                       "the only one that reads the DiffKV pool", typed)
    _refuse_unsupported_model(server_args)
    config = _calibrate(server_args, cfg, config)
    try:
        wants_graphs = cuda_graph_enabled()
    except ValueError:
        raise cli.Refusal(CUDA_GRAPH_ENV, os.environ[CUDA_GRAPH_ENV], "it switches SGLang's decode CUDA graphs",
                          "0 (off) or 1 (on, the default)") from None
    try:
        kernels = kernel_mode()
    except ValueError:
        raise cli.Refusal(KERNELS_ENV, os.environ[KERNELS_ENV], "it picks the DiffKV kernels",
                          " or ".join(MODES)) from None
    on_cuda = str(cfg.device or "cuda").startswith("cuda")
    no_kernels = _why_no_kernels(server_args, kernels) if on_cuda else None
    decode_graphs = wants_graphs and on_cuda and no_kernels is None
    disabled = upstream.Backend.DISABLED
    graphs = upstream.with_phase(cfg.cuda_graph_config, upstream.Phase.PREFILL, backend=disabled)
    if not decode_graphs:
        graphs = upstream.with_phase(graphs, upstream.Phase.DECODE, backend=disabled)
    upstream.declare_resolution(server_args, "diffkv", attention_backend="diffkv", page_size=config.page_size,
                                cuda_graph_config=graphs)
    logger.info("DiffKV pool selected: %s", config.to_dict())
    decode_state = ("as SGLang configures them" if decode_graphs
                    else f"off ({CUDA_GRAPH_ENV}=0)" if not wants_graphs
                    else f"off (device {cfg.device})" if not on_cuda
                    else f"off ({no_kernels}: captured graphs need the DiffKV kernels)")
    logger.warning("--kv-pool diffkv: the attention backend is 'diffkv'; prefill CUDA graphs are off; decode CUDA "
                   "graphs are %s", decode_state)


def _calibrate(server_args, cfg, config: DiffKVConfig) -> DiffKVConfig:
    """The config with per-layer tiers from ``--diffkv-calibration`` (:mod:`.integration.calibration`), on the
    resolved device (``cfg``, the resolving view), published again for SGLang's subprocesses, which are started
    after resolution."""
    calibration = cli.published_calibration()
    if calibration.mode == "off":
        return config
    from .integration.calibration import calibrated_config

    calibrated = calibrated_config(config, calibration, server_args.model_path, cfg.device,
                                   server_args.base_gpu_id or 0, server_args.load_format)
    if calibrated is not config:
        cli.publish("diffkv", calibrated, calibration)
    return calibrated


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _why_no_kernels(server_args, mode: str) -> str | None:
    """Why a CUDA store would run the torch reference instead of the kernels (``backend_select.use_kernels``), or
    None when it runs the kernels."""
    if mode == "torch":
        return f"{KERNELS_ENV}=torch"
    model_config = upstream.model_config_of(server_args)
    head_dim = getattr(model_config, "head_dim", None)
    if head_dim is not None and head_dim & (head_dim - 1):
        return f"head_dim {head_dim} is not a power of two"
    return None


def _refuse_unsupported_model(server_args) -> None:
    model_config = upstream.model_config_of(server_args)
    if model_config is None:
        return
    features = upstream.unsupported_model_features(model_config)
    if features:
        raise cli.Refusal("--model-path", server_args.model_path, f"this model uses {' and '.join(features)}",
                          "a model with multi-head or grouped-query attention only")


# ---------------------------------------------------------------------------------------- pools
def _plan_for(configurator, config: DiffKVConfig):
    from .integration.pool import PoolPlan

    upstream.require_fields(configurator, "KVCacheConfigurator")
    model_config = configurator.model_config
    parallel = upstream.get_parallel()
    heads = model_config.get_num_kv_heads(parallel.attn_tp_size, parallel.attn_dcp_size)
    return PoolPlan(config, configurator.layer_info.num_effective_layers, heads, model_config.head_dim,
                    configurator.kv_cache_dtype)


def _memory_pool_configurator(original, configurator):
    config = _selected_config()
    if config is None or configurator.is_draft_worker:
        return original(configurator)
    from .integration.pool import DiffKVPoolConfigurator

    return DiffKVPoolConfigurator(_plan_for(configurator, config))


def _build_mha_kv_pool(original, self, *, max_total_num_tokens: int, mha_pool_class, quant_method=None):
    config = _selected_config()
    if config is None or self.is_draft_worker:
        return original(self, max_total_num_tokens=max_total_num_tokens, mha_pool_class=mha_pool_class,
                        quant_method=quant_method)
    from .integration.pool import DiffKVKVPool

    return DiffKVKVPool(max_total_num_tokens, self.pool_page_size, _plan_for(self, config),
                        context_len=self.model_config.context_len, device=self.device,
                        layer_num=self.layer_info.num_effective_layers, start_layer=self.layer_info.start_layer,
                        end_layer=self.layer_info.end_layer,
                        enable_memory_saver=upstream.get_exec().features.enable_memory_saver)


def _build_allocator(original, self, *, sizes, token_to_kv_pool, token_to_kv_pool_allocator=None, **kwargs):
    from .integration.pool import DiffKVKVPool

    if token_to_kv_pool_allocator is None and isinstance(token_to_kv_pool, DiffKVKVPool):
        from .integration.allocator import DiffKVPagedAllocator

        return DiffKVPagedAllocator(sizes.max_total_num_tokens, token_to_kv_pool.page_size,
                                    token_to_kv_pool.dtype, self.device, token_to_kv_pool, need_sort=False)
    return original(self, sizes=sizes, token_to_kv_pool=token_to_kv_pool,
                    token_to_kv_pool_allocator=token_to_kv_pool_allocator, **kwargs)


def _validate_request(original, self, obj, input_ids):
    """Refuse (a ValueError: SGLang answers 400) a generate request that would stop the scheduler, before SGLang's
    own checks of the tokenized request; see :mod:`.integration.requests`."""
    if _selected_config() is not None and isinstance(obj, upstream.GenerateReqInput):
        from .integration.requests import check_generate_request

        check_generate_request(input_ids, self.model_config.vocab_size, text=obj.text,
                               return_logprob=obj.return_logprob, top_logprobs_num=obj.top_logprobs_num,
                               logprob_start_len=obj.logprob_start_len)
    return original(self, obj, input_ids)


def _make_backend(model_runner):
    from .integration.backend import DiffKVAttnBackend

    return DiffKVAttnBackend(model_runner)


# ------------------------------------------------------------------------------------- register
HOOKS = (
    ("sglang.srt.server_args.ServerArgs.add_cli_args", _add_cli_args),
    ("sglang.srt.server_args.prepare_server_args", _prepare_server_args),
    ("sglang.srt.server_args.ServerArgs.resolve_once", _resolve_once),
    ("sglang.srt.model_executor.pool_configurator.create_memory_pool_configurator", _memory_pool_configurator),
    ("sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._build_mha_kv_pool", _build_mha_kv_pool),
    ("sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._build_token_to_kv_pool_allocator",
     _build_allocator),
    ("sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request", _validate_request),
)


def register() -> None:
    """Install the DiffKV hooks (idempotent). Called by SGLang's plugin loader in every process.

    Raises:
        upstream.UpstreamMismatch: a hook target the installed SGLang lacks (before anything is installed; SGLang's
            loader logs it, and ``--kv-pool`` is then an unknown flag).
    """
    global _registered
    if _registered:
        return
    if upstream.installed_sglang_version() != upstream.SUPPORTED_SGLANG:
        logger.warning("diffkv-sglang is built and tested against SGLang %s; this is SGLang %s",
                       upstream.SUPPORTED_SGLANG, upstream.installed_sglang_version())
    upstream.register_around_hooks(HOOKS)
    upstream.register_resolution_hook("handle_attention_backend_compatibility")(_resolve)
    upstream.add_attention_backend_choices(["diffkv"])
    if upstream.is_available("add_kv_pool_choices"):          # an SGLang with patches/ applied has --kv-pool
        upstream.add_kv_pool_choices(["diffkv"])
    if "diffkv" not in upstream.ATTENTION_BACKENDS:
        upstream.register_attention_backend("diffkv")(_make_backend)
    _registered = True
    try:
        upstream.wrap_engine_server_args_class(_take_engine_kwargs)
    except ImportError as error:      # e.g. a broken optional dependency of the engine module
        logger.warning("diffkv: sglang.Engine(kv_pool=...) is unavailable (%s); the server flags still work", error)
