"""Flags and Engine keywords of the plugin (diffkv_sglang.integration.args): no SGLang process needed."""

import argparse
import json

import pytest

from diffkv_sglang.config import ConfigError, DiffKVConfig, TierSpec
from diffkv_sglang.integration import args as cli
from diffkv_sglang.integration.calibration import CalibrationSetting


def parse(argv):
    parser = argparse.ArgumentParser()
    cli.add_cli_args(parser)
    return parser.parse_args(argv)


def test_defaults_and_flags_override_the_json_config(tmp_path):
    assert cli.config_from_namespace(parse([])) == DiffKVConfig()
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"tiers": ["k8v8", "k4v4"], "alpha_high": 2.0, "window": 32}))
    ns = parse(["--diffkv-config", str(path), "--diffkv-alpha-low", "0", "--diffkv-window", "16",
                "--diffkv-key-rotation", "hadamard"])
    cfg = cli.config_from_namespace(ns)
    assert cfg.tiers == (TierSpec(8, 8), TierSpec(4, 4)) and cfg.alpha_high == 2.0
    assert (cfg.alpha_prune, cfg.window, cfg.key_rotation) == (0, 16, "hadamard")


def test_tiers_groups_and_thresholds():
    cfg = cli.config_from_namespace(parse(["--diffkv-tiers", "k8v4,k4v2,k2v2", "--diffkv-thresholds", "2,0.5",
                                           "--diffkv-groups", "1x1,2x4,4x4"]))
    assert [t.name for t in cfg.tiers] == ["k8v4", "k4v2g2x4", "k2v2g4x4"] and cfg.thresholds == (2.0, 0.5)
    single = cli.config_from_namespace(parse(["--diffkv-tiers", "k8v8", "--diffkv-alpha-low", "0"]))
    assert single.num_tiers == 1 and single.thresholds == ()
    channel = cli.config_from_namespace(parse(["--diffkv-tiers", "k8v4,k4v2+kc"]))
    assert [t.key_mode for t in channel.tiers] == ["token", "channel"] and channel.tiers[1].name == "k4v2+kc"


@pytest.mark.parametrize("argv, flag", [
    (["--diffkv-alpha-low", "-1"], "--diffkv-alpha-low"),
    (["--diffkv-alpha-high", "-2"], "--diffkv-alpha-high"),
    (["--diffkv-tiers", "k3v4,k4v2"], "--diffkv-tiers"),
    (["--diffkv-tiers", "k8v4,k4v2g2+kc"], "--diffkv-tiers"),
    (["--diffkv-groups", "1x1"], "--diffkv-groups"),
    (["--diffkv-groups", "ax1,1x1"], "--diffkv-groups"),
    (["--diffkv-window", "-4"], "--diffkv-window"),
    (["--diffkv-obs-window", "0"], "--diffkv-obs-window"),
    (["--diffkv-page-size", "1000"], "--diffkv-page-size"),
    (["--diffkv-arena-fraction", "1.5"], "--diffkv-arena-fraction"),
    (["--diffkv-compaction-trigger", "2"], "--diffkv-compaction-trigger"),
    (["--diffkv-thresholds", "x"], "--diffkv-thresholds"),
])
def test_bad_flag_values_name_the_flag(argv, flag):
    ns = parse(argv)
    with pytest.raises(ConfigError) as info:
        cli.config_from_namespace(ns)
    given = {f.field for f in cli.FLAGS if getattr(ns, f.dest) is not None}
    message = cli.flag_error_message(info.value, given)
    assert message.startswith(f"argument {flag}:") and "allowed" in message


def test_bad_choices_are_argparse_errors(capsys):
    for argv in (["--kv-pool", "compressed"], ["--diffkv-key-rotation", "fourier"], ["--diffkv-window", "x"]):
        with pytest.raises(SystemExit):
            parse(argv)
    assert "--diffkv-window" in capsys.readouterr().err


def test_bad_json_config_names_the_config_flag():
    with pytest.raises(ConfigError) as info:
        cli.config_from_namespace(parse(["--diffkv-config", '{"alpha_low": 5}']))
    assert cli.flag_error_message(info.value, set()).startswith("argument --diffkv-config: field 'alpha_low'")


def test_engine_keywords(tmp_path):
    kwargs = {"model_path": "m", "kv_pool": "diffkv", "diffkv_alpha_low": 0.0, "diffkv_window": 8}
    pool, cfg, calibration = cli.split_engine_kwargs(kwargs)
    assert pool == "diffkv" and cfg.alpha_prune == 0.0 and cfg.window == 8 and kwargs == {"model_path": "m"}
    assert calibration == CalibrationSetting("auto")                 # no precision keyword: calibrate
    assert cli.split_engine_kwargs({"kv_pool": "diffkv", "diffkv_tiers": "k8v4"})[2] == CalibrationSetting("off")
    assert cli.split_engine_kwargs({"kv_pool": "diffkv", "diffkv_calibration": str(tmp_path)})[2] == \
        CalibrationSetting("auto", tmp_path.resolve())
    assert cli.split_engine_kwargs({}) == ("default", None, None)
    with pytest.raises(ValueError, match="need kv_pool='diffkv'"):
        cli.split_engine_kwargs({"diffkv_window": 8})
    with pytest.raises(ValueError, match="need kv_pool='diffkv'"):
        cli.split_engine_kwargs({"diffkv_calibration": "off"})
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="diffkv_calibration: .*allowed: off, auto, or a directory"):
        cli.split_engine_kwargs({"kv_pool": "diffkv", "diffkv_calibration": str(tmp_path / "file")})
    with pytest.raises(ValueError, match="diffkv_window"):
        cli.split_engine_kwargs({"kv_pool": "diffkv", "diffkv_window": -1})
    with pytest.raises(ValueError, match="kv_pool"):
        cli.split_engine_kwargs({"kv_pool": "paged"})


def test_publish_round_trip(monkeypatch, tmp_path):
    for name in (cli.ENV_POOL, cli.ENV_CONFIG, cli.ENV_CALIBRATION):
        monkeypatch.delenv(name, raising=False)
    assert cli.published_config() is None and cli.published_calibration() == CalibrationSetting("off")
    cfg = DiffKVConfig(window=8, alpha_prune=0.0)
    for setting in (CalibrationSetting("auto"), CalibrationSetting("auto", tmp_path), CalibrationSetting("off")):
        cli.publish("diffkv", cfg, setting)
        assert cli.published_config() == cfg and cli.published_calibration() == setting
    cli.publish("default", None)
    assert cli.published_config() is None and cli.published_calibration() == CalibrationSetting("off")


@pytest.mark.parametrize("argv, mode", [
    ([], "auto"),                                                  # nothing chosen: calibrate
    (["--diffkv-window", "8"], "auto"),                            # not a precision flag
    (["--diffkv-tiers", "k8v4,k4v2"], "off"), (["--diffkv-groups", "1x1,2x4"], "off"),
    (["--diffkv-thresholds", "1.0"], "off"), (["--diffkv-config", "{}"], "off"),
    (["--diffkv-tiers", "k8v4,k4v2", "--diffkv-calibration", "auto"], "auto"),
    (["--diffkv-calibration", "off"], "off"),
])
def test_calibration_defaults_to_auto_when_no_precision_is_chosen(argv, mode):
    assert cli.calibration_from_namespace(parse(["--kv-pool", "diffkv", *argv])) == CalibrationSetting(mode)


def test_bad_calibration_value_names_the_flag(tmp_path):
    (tmp_path / "file").write_text("")
    ns = parse(["--kv-pool", "diffkv", "--diffkv-calibration", str(tmp_path / "file")])
    with pytest.raises(ConfigError) as info:
        cli.calibration_from_namespace(ns)
    assert cli.flag_error_message(info.value, {"calibration"}) == (
        f"argument --diffkv-calibration: invalid value {str(tmp_path / 'file')!r}; allowed: off, auto, or a "
        "directory for the calibration cache (an existing one, or a path containing '/')")
    with pytest.raises(ConfigError):                               # a typo of 'off' is not a new directory
        cli.calibration_from_namespace(parse(["--kv-pool", "diffkv", "--diffkv-calibration", "of"]))
    new_dir = tmp_path / "not" / "yet"                             # created on first use
    assert cli.calibration_from_namespace(parse(["--kv-pool", "diffkv", "--diffkv-calibration", str(new_dir)])) == \
        CalibrationSetting("auto", new_dir.resolve())


def test_coexists_with_a_native_kv_pool_flag():
    """An SGLang with patches/ applied already has --kv-pool, its choices the list SGLang's add_kv_pool_choices
    extends (plugin.register() adds 'diffkv' there): the flag stays SGLang's, the --diffkv-* flags are added."""
    kv_pool_choices = ["default"]
    parser = argparse.ArgumentParser()
    parser.add_argument("--kv-pool", choices=kv_pool_choices, default="default", help="SGLang's own pool flag")
    cli.add_cli_args(parser)
    kv_pool_choices.extend(["diffkv"])                          # what add_kv_pool_choices(["diffkv"]) does
    ns = parser.parse_args(["--kv-pool", "diffkv", "--diffkv-window", "8"])
    assert (ns.kv_pool, ns.diffkv_window) == ("diffkv", 8)
    usage = parser.format_help()
    assert "SGLang's own pool flag" in usage and "DiffKV-compressed pool" not in usage


@pytest.mark.parametrize("flags, tier, allowed", [
    ("k8v4,k5v3", "k5v3", "key bits one of (2, 4, 8) (got 5)"),
    ("k8v4,k4v3", "k4v3", "value bits one of (2, 4, 8) (got 3)"),
    ("k8v4g3,k4v2", "k8v4g3", "key groups a power of two >= 1 that divides head_dim (got 3)"),
])
def test_tier_errors_name_the_tier(flags, tier, allowed):
    with pytest.raises(ConfigError) as info:
        cli.config_from_namespace(parse(["--diffkv-tiers", flags]))
    message = cli.flag_error_message(info.value, {"tiers"})
    assert message == f"argument --diffkv-tiers: invalid value {tier!r}; allowed: {allowed}"


def test_refusals_name_the_setting_the_value_and_what_is_allowed():
    refusal = cli.Refusal("--page-size", 16, "the DiffKV page size is 32", "32 or unset")
    assert isinstance(refusal, ValueError)
    assert str(refusal) == ("argument --page-size: invalid value 16 with --kv-pool diffkv (the DiffKV page size is "
                            "32); allowed: 32 or unset")
    assert str(cli.Refusal("DIFFKV_CUDA_GRAPH", "2", "why", "0 or 1")).startswith(
        "environment variable DIFFKV_CUDA_GRAPH: invalid value '2' with --kv-pool diffkv (why)")
    assert "\n" not in str(refusal)
