"""DiffKV configuration: precision tiers, importance thresholds, windows and page size.

A :class:`DiffKVConfig` is the single, validated description of how a model's KV cache is compressed.
Every other module (format, policy, store, kernels, the SGLang plugin) reads it; nothing else holds
compression settings.

Tiers are ordered from most to least precise. A token whose relative importance ``r`` (its mean attention
times the context length ``N``, so ``r == 1`` means "as much attention as a uniform distribution would give")
is pruned when ``r < alpha_prune``; otherwise it goes to the first tier ``t`` with ``r >= thresholds[t]``,
and to the last tier when it is below every threshold. With K8V4 and K4V2, thresholds ``[1.0]`` and
``alpha_prune = 0.02`` this is DiffKV's rule: high tier at or above ``alpha_high / N``, low tier between
``alpha_low / N`` and ``alpha_high / N``, pruned below ``alpha_low / N``. The defaults keep DiffKV's tiers and
``alpha_high`` but turn pruning off (``alpha_prune = 0``): pruning is irreversible and decided before later
questions arrive, and on the needle and multi-turn tasks it lost retrievals that quantization alone kept
(``docs/accuracy.md``); DiffKV's 0.02 stays available.

Example::

    cfg = DiffKVConfig.from_json('{"tiers": ["k8v4", "k4v2"], "alpha_high": 1.0, "alpha_low": 0.02}')
    cfg = DiffKVConfig.parse("/path/to/model-diffkv.json")          # a file path works as well
    tiers_of_layer_3 = cfg.tiers_for_layer(3)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

SUPPORTED_BITS = (2, 4, 8)
MAX_TIERS = 4
MAX_PAGE_SIZE = 256  # in-page token indices are stored as uint8
ROTATIONS = ("none", "hadamard")
PRUNE_SCOPES = ("head", "layer")
# How a tier's keys are quantized in a sealed block (values always per token): "token", min-max per token and group;
# "channel", min-max per channel over the tier's tokens of the block (KIVI-style), written with the suffix "+kc".
KEY_MODES = ("token", "channel")
CHANNEL_SUFFIX = "+kc"

_TIER_NAME = re.compile(r"^k(\d+)v(\d+)(?:g(\d+)(?:x(\d+))?)?(\+kc)?$")


class ConfigError(ValueError):
    """A bad configuration value. The message names the field, the value and what is allowed."""

    def __init__(self, field: str, value: Any, allowed: str):
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"diffkv config: {field}={value!r} is invalid; allowed: {allowed}")


@dataclasses.dataclass(frozen=True)
class TierSpec:
    """One precision tier: bit widths and quantization groups for keys and values, and the keys' mode.

    A group is a contiguous slice of ``head_dim`` with its own scale and zero point, so ``key_groups=1``
    quantizes the whole key vector of a token with one (scale, zero) pair. With ``key_mode="channel"`` the keys
    instead get one (scale, zero) pair per channel over the tier's tokens of a block (one key group).

    Written compactly as ``k{key_bits}v{value_bits}`` with optional ``g{key_groups}`` or
    ``g{key_groups}x{value_groups}`` and ``+kc`` for per-channel keys: ``"k8v4"``, ``"k4v2g2x4"``, ``"k4v2+kc"``.
    """

    key_bits: int
    value_bits: int
    key_groups: int = 1
    value_groups: int = 1
    key_mode: str = "token"

    @classmethod
    def parse(cls, spec: str | Mapping[str, Any] | TierSpec, field: str = "tiers") -> TierSpec:
        """Build a tier from ``"k8v4"``-style text, a mapping of the four fields, or a TierSpec."""
        if isinstance(spec, TierSpec):
            tier = spec
        elif isinstance(spec, str):
            match = _TIER_NAME.match(spec.strip().lower())
            if not match:
                raise ConfigError(field, spec, "tier names like 'k8v4', 'k4v2', 'k4v2g2x4' (g<key groups>x<value groups>), "
                                               "'k4v2+kc' (per-channel keys)")
            kb, vb, kg, vg, channel = match.groups()
            tier = cls(int(kb), int(vb), int(kg or 1), int(vg or kg or 1), "channel" if channel else "token")
        elif isinstance(spec, Mapping):
            unknown = set(spec) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise ConfigError(field, dict(spec), "keys key_bits, value_bits, key_groups, value_groups, key_mode "
                                                     f"(unknown: {sorted(unknown)})")
            try:
                tier = cls(**spec)
            except TypeError as exc:
                raise ConfigError(field, dict(spec), "key_bits and value_bits are required") from exc
        else:
            raise ConfigError(field, spec, "a tier name such as 'k8v4' or a mapping")
        try:
            tier.validate(field)
        except ConfigError as error:
            if not isinstance(spec, str):
                raise
            part = error.field.rpartition(".")[2].replace("_", " ")      # name the tier the user wrote
            raise ConfigError(error.field, spec, f"{part} {error.allowed} (got {error.value})") from None
        return tier

    def validate(self, field: str = "tiers") -> None:
        """Check bit widths and group counts (group divisibility of head_dim is checked by ``validate_head_dim``)."""
        for name in ("key_bits", "value_bits"):
            bits = getattr(self, name)
            if bits not in SUPPORTED_BITS:
                raise ConfigError(f"{field}.{name}", bits, f"one of {SUPPORTED_BITS}")
        for name in ("key_groups", "value_groups"):
            groups = getattr(self, name)
            if not isinstance(groups, int) or groups < 1 or groups & (groups - 1):
                raise ConfigError(f"{field}.{name}", groups, "a power of two >= 1 that divides head_dim")
        if self.key_mode not in KEY_MODES:
            raise ConfigError(f"{field}.key_mode", self.key_mode, f"one of {KEY_MODES}")
        if self.key_mode == "channel" and self.key_groups != 1:
            raise ConfigError(f"{field}.key_groups", self.key_groups,
                              "1 with per-channel keys (key_mode 'channel' has a scale per channel, not per group)")

    def validate_head_dim(self, head_dim: int, field: str = "tiers") -> None:
        """Check that every group is a whole number of bytes of codes and at least 8 elements wide."""
        for name in ("key", "value"):
            groups, bits = getattr(self, f"{name}_groups"), getattr(self, f"{name}_bits")
            if head_dim % groups or head_dim // groups < 8:
                raise ConfigError(f"{field}.{name}_groups", groups, f"a divisor of head_dim={head_dim} leaving >= 8 elements per group")
            if (head_dim // groups) * bits % 8:
                raise ConfigError(f"{field}.{name}_groups", groups, f"groups whose {bits}-bit codes fill whole bytes")

    @property
    def name(self) -> str:
        """Compact name, e.g. ``k8v4``, ``k4v2g2x4`` or ``k4v2+kc``."""
        base = f"k{self.key_bits}v{self.value_bits}"
        if (self.key_groups, self.value_groups) != (1, 1):
            base = f"{base}g{self.key_groups}x{self.value_groups}"
        return base + (CHANNEL_SUFFIX if self.key_mode == "channel" else "")

    def data_bits_per_element(self) -> float:
        """Bits per K or V element averaged over both, ignoring metadata: (kb + vb) / 2."""
        return (self.key_bits + self.value_bits) / 2


def _default_tiers() -> tuple[TierSpec, ...]:
    return (TierSpec(8, 4), TierSpec(4, 2))


@dataclasses.dataclass(frozen=True)
class DiffKVConfig:
    """Validated DiffKV settings.

    Attributes:
        tiers: ordered precision tiers, most precise first (1 to 4).
        thresholds: relative-importance thresholds between consecutive tiers, non-increasing,
            ``len(tiers) - 1`` values. ``thresholds[0]`` is DiffKV's ``alpha_high``.
        alpha_prune: pruning threshold (DiffKV's ``alpha_low``, 0.02 in the paper); 0 (the default) disables
            pruning.
        prune_scope: ``"head"`` prunes a token in each KV head independently (DiffKV); ``"layer"`` prunes a
            token only where it is below ``alpha_prune`` in every KV head of the layer, otherwise it is kept in
            the last tier.
        window: the most recent ``window`` tokens of a request are never compressed.
        obs_window: number of last prompt queries whose attention decides prefill importance.
        page_size: tokens per logical page (SGLang's ``--page-size``); the unit of sealing and sharing.
        key_rotation / value_rotation: ``"none"`` or ``"hadamard"`` (normalized Hadamard rotation per head before
            quantization; attention stays exact because queries are rotated the same way).
        layer_tiers: per-layer overrides of ``tiers`` (same number of tiers), e.g. to keep 8-bit keys in a
            sensitive layer.
        arena_fraction: share of the KV memory budget given to the block arena (the rest stays free).
        compaction_trigger: compact the arena when holes exceed this fraction of its capacity.
    """

    tiers: tuple[TierSpec, ...] = dataclasses.field(default_factory=_default_tiers)
    thresholds: tuple[float, ...] = (1.0,)
    alpha_prune: float = 0.0
    prune_scope: str = "head"
    window: int = 64
    obs_window: int = 64
    page_size: int = 32
    key_rotation: str = "none"
    value_rotation: str = "none"
    layer_tiers: Mapping[int, tuple[TierSpec, ...]] = dataclasses.field(default_factory=dict)
    arena_fraction: float = 1.0
    compaction_trigger: float = 0.25

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------------------------------- checks
    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad field."""
        if not 1 <= len(self.tiers) <= MAX_TIERS:
            raise ConfigError("tiers", [t.name for t in self.tiers], f"1 to {MAX_TIERS} tiers")
        for tier in self.tiers:
            tier.validate("tiers")
        if len(self.thresholds) != len(self.tiers) - 1:
            raise ConfigError("thresholds", list(self.thresholds), f"exactly {len(self.tiers) - 1} value(s), one per tier boundary")
        for i, value in enumerate(self.thresholds):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"thresholds[{i}]" if i else "alpha_high", value, "a finite number >= 0")
        for i in range(1, len(self.thresholds)):
            if self.thresholds[i] > self.thresholds[i - 1]:
                raise ConfigError(f"thresholds[{i}]", self.thresholds[i], f"<= thresholds[{i - 1}]={self.thresholds[i - 1]} (non-increasing)")
        if not isinstance(self.alpha_prune, (int, float)) or not math.isfinite(self.alpha_prune) or self.alpha_prune < 0:
            raise ConfigError("alpha_low", self.alpha_prune, "a finite number >= 0 (0 disables pruning)")
        if self.thresholds and self.alpha_prune > self.thresholds[-1]:
            raise ConfigError("alpha_low", self.alpha_prune, f"<= the last tier threshold {self.thresholds[-1]}")
        if self.prune_scope not in PRUNE_SCOPES:
            raise ConfigError("prune_scope", self.prune_scope, f"one of {PRUNE_SCOPES}")
        if not _is_int(self.page_size) or not 1 <= self.page_size <= MAX_PAGE_SIZE:
            raise ConfigError("page_size", self.page_size, f"an integer in [1, {MAX_PAGE_SIZE}]")
        if not _is_int(self.window) or self.window < 0:
            raise ConfigError("window", self.window, "an integer >= 0")
        if not _is_int(self.obs_window) or self.obs_window < 1:
            raise ConfigError("obs_window", self.obs_window, "an integer >= 1")
        for name in ("key_rotation", "value_rotation"):
            if getattr(self, name) not in ROTATIONS:
                raise ConfigError(name, getattr(self, name), f"one of {ROTATIONS}")
        if not _is_number(self.arena_fraction) or not 0 < self.arena_fraction <= 1:
            raise ConfigError("arena_fraction", self.arena_fraction, "a number in (0, 1]")
        if not _is_number(self.compaction_trigger) or not 0 <= self.compaction_trigger <= 1:
            raise ConfigError("compaction_trigger", self.compaction_trigger, "a number in [0, 1]")
        for layer, tiers in self.layer_tiers.items():
            field = f"layer_tiers[{layer}]"
            if not _is_int(layer) or layer < 0:
                raise ConfigError("layer_tiers", layer, "layer indices >= 0")
            if len(tiers) != len(self.tiers):
                raise ConfigError(field, [t.name for t in tiers], f"exactly {len(self.tiers)} tiers, like 'tiers'")
            for tier in tiers:
                tier.validate(field)

    def validate_model(self, head_dim: int, num_layers: int) -> None:
        """Check the parts that depend on the model: groups against ``head_dim``, overrides against layers,
        rotation against a power-of-two ``head_dim``."""
        for tier in self.tiers:
            tier.validate_head_dim(head_dim, "tiers")
        for layer, tiers in self.layer_tiers.items():
            if layer >= num_layers:
                raise ConfigError("layer_tiers", layer, f"layer indices in [0, {num_layers - 1}]")
            for tier in tiers:
                tier.validate_head_dim(head_dim, f"layer_tiers[{layer}]")
        if head_dim % 16:
            raise ConfigError("head_dim", head_dim, "a multiple of 16 (the compressed block format needs it)")
        if "hadamard" in (self.key_rotation, self.value_rotation) and head_dim & (head_dim - 1):
            raise ConfigError("key_rotation", "hadamard", f"'none' for head_dim={head_dim} (Hadamard needs a power of two)")

    # ------------------------------------------------------------------------------------- accessors
    @property
    def alpha_high(self) -> float:
        """DiffKV's alpha_high: the threshold between the first two tiers (inf with a single tier)."""
        return self.thresholds[0] if self.thresholds else math.inf

    @property
    def alpha_low(self) -> float:
        """DiffKV's alpha_low: the pruning threshold."""
        return self.alpha_prune

    @property
    def num_tiers(self) -> int:
        return len(self.tiers)

    def tiers_for_layer(self, layer: int) -> tuple[TierSpec, ...]:
        """The tiers used by ``layer`` (its override if any)."""
        return self.layer_tiers.get(layer, self.tiers)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict that :meth:`from_dict` reads back to an equal config."""
        return {
            "tiers": [t.name for t in self.tiers],
            "thresholds": list(self.thresholds),
            "alpha_low": self.alpha_prune,
            "prune_scope": self.prune_scope,
            "window": self.window,
            "obs_window": self.obs_window,
            "page_size": self.page_size,
            "key_rotation": self.key_rotation,
            "value_rotation": self.value_rotation,
            "layer_tiers": {str(k): [t.name for t in v] for k, v in sorted(self.layer_tiers.items())},
            "arena_fraction": self.arena_fraction,
            "compaction_trigger": self.compaction_trigger,
        }

    # ---------------------------------------------------------------------------------------- parsing
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DiffKVConfig:
        """Build from a mapping. Accepts ``alpha_high`` (first threshold) and ``alpha_low`` (pruning) as
        DiffKV's names, ``thresholds`` for more tiers, and tiers as names or mappings."""
        if not isinstance(data, Mapping):
            raise ConfigError("diffkv_config", data, "a JSON object")
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)} | {"alpha_high", "alpha_low"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(unknown[0], data[unknown[0]], f"known fields: {sorted(known)}")
        kwargs: dict[str, Any] = {}
        if "tiers" in data:
            tiers = data.pop("tiers")
            if isinstance(tiers, str):
                tiers = [t for t in tiers.split(",") if t.strip()]
            if not isinstance(tiers, Sequence) or not tiers:
                raise ConfigError("tiers", tiers, "a non-empty list of tiers such as ['k8v4', 'k4v2']")
            kwargs["tiers"] = tuple(TierSpec.parse(t) for t in tiers)
        num_tiers = len(kwargs.get("tiers", _default_tiers()))
        if "thresholds" in data and "alpha_high" in data:
            raise ConfigError("alpha_high", data["alpha_high"], "either alpha_high or thresholds, not both")
        if "thresholds" in data:
            thresholds = data.pop("thresholds")
            if not isinstance(thresholds, Sequence) or isinstance(thresholds, str):
                raise ConfigError("thresholds", thresholds, "a list of numbers")
            kwargs["thresholds"] = tuple(thresholds)
        elif "alpha_high" in data:
            alpha_high = data.pop("alpha_high")
            if num_tiers != 2:
                raise ConfigError("alpha_high", alpha_high, f"use 'thresholds' ({num_tiers - 1} values) with {num_tiers} tiers")
            kwargs["thresholds"] = (alpha_high,)
        elif num_tiers != 2:
            if num_tiers == 1:
                kwargs["thresholds"] = ()
            else:
                raise ConfigError("thresholds", None, f"{num_tiers - 1} values for {num_tiers} tiers")
        if "alpha_low" in data and "alpha_prune" in data:
            raise ConfigError("alpha_low", data["alpha_low"], "either alpha_low or alpha_prune, not both")
        if "alpha_low" in data:
            kwargs["alpha_prune"] = data.pop("alpha_low")
        if "layer_tiers" in data:
            overrides = data.pop("layer_tiers")
            if not isinstance(overrides, Mapping):
                raise ConfigError("layer_tiers", overrides, "an object {layer: [tiers]}")
            parsed = {}
            for key, tiers in overrides.items():
                try:
                    layer = int(key)
                except (TypeError, ValueError):
                    raise ConfigError("layer_tiers", key, "integer layer indices") from None
                if isinstance(tiers, str):
                    tiers = [t for t in tiers.split(",") if t.strip()]
                parsed[layer] = tuple(TierSpec.parse(t, f"layer_tiers[{layer}]") for t in tiers)
            kwargs["layer_tiers"] = parsed
        kwargs.update(data)
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> DiffKVConfig:
        """Build from a JSON object string."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError("diffkv_config", text[:80], f"valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
        return cls.from_dict(data)

    @classmethod
    def parse(cls, source: str | os.PathLike | Mapping[str, Any] | DiffKVConfig | None) -> DiffKVConfig:
        """Build from a config, a mapping, a JSON string, or a path to a JSON file (``None``: defaults)."""
        if source is None:
            return cls()
        if isinstance(source, DiffKVConfig):
            return source
        if isinstance(source, Mapping):
            return cls.from_dict(source)
        text = os.fspath(source)
        if text.lstrip().startswith("{"):
            return cls.from_json(text)
        if not os.path.isfile(text):
            raise ConfigError("diffkv_config", text, "a JSON object or the path of an existing JSON file")
        with open(text, encoding="utf-8") as f:
            return cls.from_json(f.read())

    def replace(self, **changes: Any) -> DiffKVConfig:
        """A validated copy with some fields changed (DiffKV names ``alpha_high``/``alpha_low`` accepted)."""
        data = self.to_dict()
        if "alpha_high" in changes:
            data.pop("thresholds")
        if "alpha_prune" in changes:
            data.pop("alpha_low")
        data.update(changes)
        return DiffKVConfig.from_dict(data)


def _parse_groups(text: str, tiers: list[Any]) -> list[TierSpec]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if len(parts) != len(tiers):
        raise ConfigError("groups", text, f"{len(tiers)} entries '<key groups>x<value groups>', one per tier")
    out = []
    for part, tier in zip(parts, tiers):
        key, _, value = part.partition("x")
        try:
            key_groups, value_groups = int(key), int(value or key)
        except ValueError:
            raise ConfigError("groups", text, "entries like '1x1' or '2x4'") from None
        base = TierSpec.parse(tier)
        out.append(dataclasses.replace(base, key_groups=key_groups, value_groups=value_groups))
    return out


def build_config(config_source: str | Mapping[str, Any] | None, overrides: Mapping[str, Any]) -> DiffKVConfig:
    """The DiffKV config from ``--diffkv-config`` plus the individual flag values (SGLang's ``--diffkv-*``
    flags and ``sglang.Engine`` keywords, ``integration/args.py``; ``python -m diffkv_sglang.calibrate``).

    Args:
        config_source: JSON text, a path, a mapping or None (defaults).
        overrides: ``{field: value}`` from ``--diffkv-*`` flags (None values are ignored). ``tiers``,
            ``groups`` and ``thresholds`` may be comma-separated text.
    Raises:
        ConfigError: naming the flag (or the config field) at fault.
    """
    base = DiffKVConfig.parse(config_source).to_dict()
    given = {k: v for k, v in overrides.items() if v is not None}
    if "tiers" in given and isinstance(given["tiers"], str):
        given["tiers"] = [t.strip() for t in given["tiers"].split(",") if t.strip()]
        if "thresholds" not in given and "alpha_high" not in given and len(given["tiers"]) != len(base["tiers"]):
            base.pop("thresholds")                         # the old tier count's thresholds no longer apply
    if "thresholds" in given and isinstance(given["thresholds"], str):
        try:
            given["thresholds"] = [float(x) for x in given["thresholds"].split(",") if x.strip()]
        except ValueError:
            raise ConfigError("thresholds", given["thresholds"], "comma-separated numbers") from None
    if "groups" in given:
        tiers = given.get("tiers", base["tiers"])
        given["tiers"] = [t.name for t in _parse_groups(given.pop("groups"), tiers)]
    if "alpha_high" in given:
        base.pop("thresholds", None)
    if "alpha_low" in given:
        base.pop("alpha_low", None)
    base.update(given)
    return DiffKVConfig.from_dict(base)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
