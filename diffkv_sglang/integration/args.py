"""Command-line flags and ``sglang.Engine`` keyword arguments of the DiffKV pool.

``--kv-pool diffkv`` selects the pool; ``--diffkv-config`` (JSON text or a path) gives a whole
:class:`~diffkv_sglang.config.DiffKVConfig`; each ``--diffkv-<field>`` flag overrides one field of it. The
resolved config travels to SGLang's subprocesses as JSON in the environment (``SGLANG_DIFFKV_POOL``,
``SGLANG_DIFFKV_CONFIG``), so every process builds the same config.

This module imports neither torch kernels nor sglang: it only knows argparse and the config.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any

from ..config import ROTATIONS, PRUNE_SCOPES, ConfigError, DiffKVConfig, build_config
from .calibration import FLAG as CALIBRATION_FLAG
from .calibration import CalibrationSetting

POOL_CHOICES = ("default", "diffkv")
ENV_POOL = "SGLANG_DIFFKV_POOL"
ENV_CONFIG = "SGLANG_DIFFKV_CONFIG"
ENV_CALIBRATION = "SGLANG_DIFFKV_CALIBRATION"
# fields whose flags choose the precision: when none is given, --diffkv-calibration defaults to auto
PRECISION_FIELDS = ("tiers", "groups", "thresholds")


@dataclasses.dataclass(frozen=True)
class Flag:
    """One ``--diffkv-*`` flag: the config field it sets and how to read its text."""

    name: str
    field: str
    kind: type
    help: str
    choices: tuple[str, ...] | None = None

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")


FLAGS = (
    Flag("--diffkv-tiers", "tiers", str, "precision tiers, most precise first, e.g. 'k8v4,k4v2' (bits 8/4/2; "
         "optional groups 'k4v2g2x4'; '+kc' quantizes a tier's keys per channel, e.g. 'k8v4,k4v2+kc')"),
    Flag("--diffkv-groups", "groups", str, "quantization groups per tier as '<key>x<value>', e.g. '1x1,2x4' "
         "(overrides the groups in --diffkv-tiers)"),
    Flag("--diffkv-alpha-high", "alpha_high", float, "relative importance below which a token leaves the first "
         "tier (DiffKV alpha_high, default 1.0)"),
    Flag("--diffkv-alpha-low", "alpha_low", float, "relative importance below which a token is pruned (DiffKV "
         "alpha_low; default 0: pruning off; DiffKV's paper uses 0.02)"),
    Flag("--diffkv-thresholds", "thresholds", str, "tier thresholds for 3-4 tiers, comma separated, non-increasing"),
    Flag("--diffkv-prune-scope", "prune_scope", str, "prune per KV 'head' (DiffKV) or only tokens unimportant in "
         "every head of the 'layer'", PRUNE_SCOPES),
    Flag("--diffkv-window", "window", int, "most recent tokens of a request kept uncompressed (default 64)"),
    Flag("--diffkv-obs-window", "obs_window", int, "last prompt queries that decide prefill importance (default 64)"),
    Flag("--diffkv-page-size", "page_size", int, "tokens per page, the unit of sealing and prefix sharing (default "
         "32; SGLang's --page-size follows it)"),
    Flag("--diffkv-key-rotation", "key_rotation", str, "rotate keys before quantizing", ROTATIONS),
    Flag("--diffkv-value-rotation", "value_rotation", str, "rotate values before quantizing", ROTATIONS),
    Flag("--diffkv-arena-fraction", "arena_fraction", float, "share of the KV memory budget used by the compressed "
         "arena, in (0, 1] (default 1.0)"),
    Flag("--diffkv-compaction-trigger", "compaction_trigger", float, "compact the arena when holes exceed this "
         "fraction of it, in [0, 1] (default 0.25)"),
)
_FLAG_OF_FIELD = {flag.field: flag.name for flag in FLAGS} | {"alpha_prune": "--diffkv-alpha-low"}
_FLAG_OF_FIELD["calibration"] = CALIBRATION_FLAG


class Refusal(ValueError):
    """A server setting the DiffKV pool cannot serve with (raised while SGLang resolves its arguments).

    The message names the setting (a ``--flag`` or an environment variable), the value and what is allowed, in
    the form of the flag errors above, so the launcher can print it as one ``error:`` line; ``sglang.Engine``
    users get the exception itself.
    """

    def __init__(self, setting: str, value: Any, reason: str, allowed: str):
        self.setting, self.value, self.reason, self.allowed = setting, value, reason, allowed
        kind = "argument" if setting.startswith("--") else "environment variable"
        super().__init__(f"{kind} {setting}: invalid value {value!r} with --kv-pool diffkv ({reason}); "
                         f"allowed: {allowed}")


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--kv-pool`` and the ``--diffkv-*`` flags to SGLang's parser.

    An SGLang with ``patches/sglang-0.5.23-kv-pool.patch`` applied has its own ``--kv-pool``: argparse refuses the
    second one (``ArgumentError``), and that flag stays SGLang's; ``plugin.register()`` has added ``diffkv`` to its
    choices through SGLang's ``add_kv_pool_choices``.
    """
    group = parser.add_argument_group("DiffKV compressed KV cache (diffkv-sglang)")
    try:
        group.add_argument("--kv-pool", choices=POOL_CHOICES, default="default",
                           help="KV cache pool: SGLang's dense pool (default) or the DiffKV-compressed pool")
    except argparse.ArgumentError:
        pass                                                        # SGLang's own --kv-pool (see above)
    group.add_argument("--diffkv-config", default=None,
                       help="DiffKV config as a JSON object or the path of a JSON file (fields as in "
                            "diffkv_sglang.DiffKVConfig); --diffkv-* flags override its fields")
    for flag in FLAGS:
        group.add_argument(flag.name, default=None, help=flag.help, choices=flag.choices,
                           type=flag.kind if flag.kind is not str else None)
    group.add_argument(CALIBRATION_FLAG, default=None,
                       help="per-layer tiers measured at start-up on the serving device and cached: 'off', 'auto' "
                            "(the default when no --diffkv-config, --diffkv-tiers, --diffkv-groups or "
                            "--diffkv-thresholds is given) or a cache directory (auto, cached there)")


def flag_error_message(error: ConfigError, from_flags: set[str]) -> str:
    """Phrase a ConfigError in terms of the flag the user typed."""
    field = error.field.split("[")[0].split(".")[0]
    flag = _FLAG_OF_FIELD.get(field)
    if flag is not None and field in from_flags:
        return f"argument {flag}: invalid value {error.value!r}; allowed: {error.allowed}"
    return f"argument --diffkv-config: field {error.field!r} has invalid value {error.value!r}; allowed: {error.allowed}"


def config_from_namespace(ns: argparse.Namespace) -> DiffKVConfig:
    """Build the config from parsed CLI args (raises ConfigError)."""
    overrides = {flag.field: getattr(ns, flag.dest, None) for flag in FLAGS}
    return build_config(getattr(ns, "diffkv_config", None), overrides)


def calibration_from_namespace(ns: argparse.Namespace) -> CalibrationSetting:
    """``--diffkv-calibration`` from parsed CLI args (raises ConfigError with field ``calibration``)."""
    chosen = bool(getattr(ns, "diffkv_config", None)) or any(
        getattr(ns, flag.dest, None) is not None for flag in FLAGS if flag.field in PRECISION_FIELDS)
    return CalibrationSetting.parse(getattr(ns, "diffkv_calibration", None), chosen)


def publish(kv_pool: str, config: DiffKVConfig | None, calibration: CalibrationSetting | None = None) -> None:
    """Record the choice in this process's environment, inherited by SGLang's spawned subprocesses."""
    os.environ[ENV_POOL] = kv_pool
    if config is not None:
        os.environ[ENV_CONFIG] = json.dumps(config.to_dict())
    else:
        os.environ.pop(ENV_CONFIG, None)
    if calibration is not None:
        os.environ[ENV_CALIBRATION] = calibration.to_text()
    else:
        os.environ.pop(ENV_CALIBRATION, None)


def published_calibration() -> CalibrationSetting:
    """The calibration setting published by the launching process (``off`` when none was)."""
    return CalibrationSetting.parse(os.environ.get(ENV_CALIBRATION) or "off", True)


def published_config() -> DiffKVConfig | None:
    """The config published by the launching process, or None if DiffKV is not selected."""
    if os.environ.get(ENV_POOL) != "diffkv":
        return None
    return DiffKVConfig.parse(os.environ.get(ENV_CONFIG) or None)


def split_engine_kwargs(kwargs: dict[str, Any]) -> tuple[str, DiffKVConfig | None, CalibrationSetting | None]:
    """Pop ``kv_pool``, ``diffkv_config``, ``diffkv_calibration`` and ``diffkv_<field>`` keyword arguments of
    ``sglang.Engine``.

    Returns ``(kv_pool, config or None, calibration or None)``; raises ValueError naming the argument on a bad
    value.
    """
    kv_pool = kwargs.pop("kv_pool", "default") or "default"
    if kv_pool not in POOL_CHOICES:
        raise ValueError(f"kv_pool={kv_pool!r} is invalid; allowed: {POOL_CHOICES}")
    source = kwargs.pop("diffkv_config", None)
    calibration = kwargs.pop("diffkv_calibration", None)
    overrides = {flag.field: kwargs.pop(flag.dest, None) for flag in FLAGS}
    if kv_pool != "diffkv":
        given = [k for k, v in overrides.items() if v is not None] + (["diffkv_config"] if source else [])
        given += ["diffkv_calibration"] if calibration is not None else []
        if given:
            raise ValueError(f"DiffKV arguments {given} need kv_pool='diffkv'")
        return kv_pool, None, None
    chosen = bool(source) or any(overrides[field] is not None for field in PRECISION_FIELDS)
    try:
        setting = CalibrationSetting.parse(calibration, chosen)
    except ConfigError as error:
        raise ValueError(f"diffkv_calibration: {error}") from None
    try:
        return kv_pool, build_config(source, overrides), setting
    except ConfigError as error:
        field = error.field.split("[")[0].split(".")[0]
        arg = "diffkv_" + field if field in overrides and overrides[field] is not None else "diffkv_config"
        raise ValueError(f"{arg}: {error}") from None
