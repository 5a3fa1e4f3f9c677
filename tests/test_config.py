import json

import pytest

from diffkv_sglang.config import ConfigError, DiffKVConfig, TierSpec


def test_defaults_are_diffkv():
    cfg = DiffKVConfig()
    assert [t.name for t in cfg.tiers] == ["k8v4", "k4v2"]
    assert cfg.alpha_high == 1.0 and cfg.alpha_low == 0.0          # pruning off by default (docs/accuracy.md)
    assert (cfg.window, cfg.obs_window, cfg.page_size) == (64, 64, 32)
    assert cfg.key_rotation == cfg.value_rotation == "none"


@pytest.mark.parametrize("text, expected", [
    ("k8v4", TierSpec(8, 4, 1, 1)),
    ("K4V2", TierSpec(4, 2, 1, 1)),
    ("k4v2g2", TierSpec(4, 2, 2, 2)),
    ("k4v2g2x4", TierSpec(4, 2, 2, 4)),
    ("k2v2g8x8", TierSpec(2, 2, 8, 8)),
    ("k4v2+kc", TierSpec(4, 2, 1, 1, "channel")),
    ("k2v2g1x4+KC", TierSpec(2, 2, 1, 4, "channel")),
])
def test_tier_names_round_trip(text, expected):
    tier = TierSpec.parse(text)
    assert tier == expected
    assert TierSpec.parse(tier.name) == tier


def test_round_trip_through_json(tmp_path):
    cfg = DiffKVConfig.from_dict({
        "tiers": ["k8v4", "k4v2g2x4", "k2v2g4"], "thresholds": [2.0, 0.5], "alpha_low": 0.01,
        "prune_scope": "layer", "window": 32, "page_size": 16, "key_rotation": "hadamard",
        "layer_tiers": {"0": ["k8v8", "k8v4", "k4v4"]},
    })
    assert DiffKVConfig.from_json(json.dumps(cfg.to_dict())) == cfg
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert DiffKVConfig.parse(str(path)) == cfg
    assert cfg.tiers_for_layer(0)[0] == TierSpec(8, 8)
    assert cfg.tiers_for_layer(1) == cfg.tiers


def test_alpha_names_and_replace():
    cfg = DiffKVConfig.parse('{"alpha_high": 3.0, "alpha_low": 0}')
    assert cfg.thresholds == (3.0,) and cfg.alpha_prune == 0
    assert cfg.replace(alpha_high=0.5).alpha_high == 0.5
    assert cfg.replace(alpha_prune=0.04).alpha_low == 0.04
    assert DiffKVConfig.parse(None) == DiffKVConfig()
    single = DiffKVConfig.from_dict({"tiers": ["k8v8"], "alpha_low": 0})
    assert single.thresholds == () and single.num_tiers == 1


@pytest.mark.parametrize("data, field", [
    ({"tiers": ["k3v4"]}, "tiers.key_bits"),
    ({"tiers": ["k8v16"]}, "tiers.value_bits"),
    ({"tiers": ["k8v4g3"]}, "tiers.key_groups"),
    ({"tiers": ["q8"]}, "tiers"),
    ({"tiers": ["k8v4"] * 5, "thresholds": [1, 1, 1, 1]}, "tiers"),
    ({"tiers": []}, "tiers"),
    ({"alpha_high": -1}, "alpha_high"),
    ({"alpha_high": float("nan")}, "alpha_high"),
    ({"alpha_low": 2.0}, "alpha_low"),
    ({"alpha_low": -0.1}, "alpha_low"),
    ({"tiers": ["k8v4", "k4v2", "k2v2"], "thresholds": [0.5, 1.0]}, "thresholds[1]"),
    ({"tiers": ["k8v4", "k4v2", "k2v2"], "alpha_high": 1.0}, "alpha_high"),
    ({"tiers": ["k8v4", "k4v2", "k2v2"]}, "thresholds"),
    ({"window": -1}, "window"),
    ({"obs_window": 0}, "obs_window"),
    ({"page_size": 0}, "page_size"),
    ({"page_size": 512}, "page_size"),
    ({"page_size": 2.5}, "page_size"),
    ({"key_rotation": "fourier"}, "key_rotation"),
    ({"prune_scope": "request"}, "prune_scope"),
    ({"layer_tiers": {"1": ["k8v4"]}}, "layer_tiers[1]"),
    ({"layer_tiers": {"x": ["k8v4", "k4v2"]}}, "layer_tiers"),
    ({"bogus": 1}, "bogus"),
    ({"arena_fraction": 0}, "arena_fraction"),
    ({"arena_fraction": 1.5}, "arena_fraction"),
    ({"compaction_trigger": -0.1}, "compaction_trigger"),
    ({"tiers": ["k8v4", "k4v2g2+kc"]}, "tiers.key_groups"),
    ({"tiers": ["k8v4", {"key_bits": 4, "value_bits": 2, "key_mode": "offset"}]}, "tiers.key_mode"),
])
def test_bad_values_name_the_field(data, field):
    with pytest.raises(ConfigError) as info:
        DiffKVConfig.from_dict(data)
    assert info.value.field == field
    assert field.split("[")[0].split(".")[0] in str(info.value)
    assert "allowed" in str(info.value)


def test_bad_tier_names_are_named():
    with pytest.raises(ConfigError) as info:
        DiffKVConfig.from_dict({"tiers": ["k8v4", "k5v3"]})
    assert (info.value.field, info.value.value) == ("tiers.key_bits", "k5v3")
    assert str(info.value) == ("diffkv config: tiers.key_bits='k5v3' is invalid; allowed: key bits one of (2, 4, 8) "
                               "(got 5)")
    with pytest.raises(ConfigError) as mapped:        # a mapping is shown as the field's own value
        DiffKVConfig.from_dict({"tiers": [{"key_bits": 8, "value_bits": 3}]})
    assert (mapped.value.field, mapped.value.value) == ("tiers.value_bits", 3)


def test_model_checks():
    cfg = DiffKVConfig.from_dict({"tiers": ["k8v4", "k4v2g1x32"]})
    with pytest.raises(ConfigError, match="value_groups"):
        cfg.validate_model(head_dim=128, num_layers=4)            # 128 / 32 = 4 elements per group: too few
    cfg = DiffKVConfig.from_dict({"tiers": ["k8v4", "k4v2g8"], "layer_tiers": {"3": ["k8v8", "k4v4"]}})
    cfg.validate_model(head_dim=128, num_layers=4)
    with pytest.raises(ConfigError, match="layer_tiers"):
        cfg.validate_model(head_dim=128, num_layers=3)
    with pytest.raises(ConfigError, match="head_dim"):
        DiffKVConfig().validate_model(head_dim=72, num_layers=1)
    with pytest.raises(ConfigError, match="key_rotation"):
        DiffKVConfig(key_rotation="hadamard").validate_model(head_dim=80, num_layers=1)


def test_bad_json_and_missing_file():
    with pytest.raises(ConfigError, match="valid JSON"):
        DiffKVConfig.parse("{not json")
    with pytest.raises(ConfigError, match="existing JSON file"):
        DiffKVConfig.parse("/nonexistent/cfg.json")
