"""The start-up calibration (``diffkv_sglang.integration.calibration``): when it runs, what it caches and how it
fails. The real measurement runs ``python -m diffkv_sglang.calibrate`` on the tiny Llama in a subprocess."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from diffkv_sglang.config import DiffKVConfig, TierSpec
from diffkv_sglang.integration import calibration as cal
from diffkv_sglang.integration.calibration import CalibrationSetting, calibrated_config, model_fingerprint

BASE = DiffKVConfig()
LOGGER = "diffkv_sglang.integration.calibration"


def test_the_sample_text_ships_enough_tokens():
    """The wheel's sample holds the tokens the calibration reads (about 4 characters per token in English)."""
    assert len(cal.SAMPLE_TEXT.read_text(encoding="utf-8")) > 5 * cal.SAMPLE_TOKENS


def test_fingerprint_follows_the_weights_and_config(tiny_model, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    first = model_fingerprint(model)
    assert model_fingerprint(model) == first
    weights = next(model.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1                                                  # the last byte of the last tensor
    weights.write_bytes(bytes(data))
    changed = model_fingerprint(model)
    assert changed != first
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "rope_theta": 1.0}))
    assert model_fingerprint(model) not in (first, changed)


def test_off_and_explicit_layer_tiers_are_served_as_given(tiny_model, tmp_path):
    assert calibrated_config(BASE, CalibrationSetting("off"), str(tiny_model), "cpu") is BASE
    given = BASE.replace(layer_tiers={0: (TierSpec.parse("k8v8"), TierSpec.parse("k8v4"))})
    assert calibrated_config(given, CalibrationSetting("auto", tmp_path), str(tiny_model), "cpu") is given
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("model, device, load_format, why", [
    ("tiny", "cpu", "dummy", "random weights (--load-format dummy)"),
    ("missing", "cpu", None, "is not on local disk yet"),
    ("tiny", "cuda", None, "no CUDA device is visible"),
])
def test_impossible_calibrations_warn_and_serve_the_base(tiny_model, tmp_path, caplog, monkeypatch, model, device,
                                                         load_format, why):
    monkeypatch.setattr(cal, "_cuda_visible", lambda: False)
    path = str(tiny_model) if model == "tiny" else str(tmp_path / "no-such-model")
    with caplog.at_level(logging.WARNING, LOGGER):
        assert calibrated_config(BASE, CalibrationSetting("auto", tmp_path / "cache"), path, device,
                                 load_format=load_format) is BASE
    assert why in caplog.text and "serving the uncalibrated tiers k8v4,k4v2" in caplog.text
    assert not (tmp_path / "cache").exists()


def test_a_failed_measurement_warns_and_caches_nothing(tmp_path, caplog):
    """A directory with a config.json that transformers cannot load: the subprocess fails, the server goes on."""
    model = tmp_path / "broken"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    with caplog.at_level(logging.WARNING, LOGGER):
        assert calibrated_config(BASE, CalibrationSetting("auto", tmp_path / "cache"), str(model), "cpu") is BASE
    assert "DiffKV calibration: failed (exit status" in caplog.text
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".log"]      # the log, for the user to read


@pytest.mark.slow
def test_measured_once_then_read_from_the_cache(tiny_model, tmp_path, caplog):
    setting = CalibrationSetting("auto", tmp_path)
    with caplog.at_level(logging.INFO, LOGGER):
        measured = calibrated_config(BASE, setting, str(tiny_model), "cpu")
    assert "measured in" in caplog.text
    cached = [p for p in tmp_path.glob("*.json") if not p.name.endswith(".report.json")]
    assert len(cached) == 1 and measured == DiffKVConfig.parse(cached[0].read_text())
    report = json.loads(cached[0].with_suffix(".report.json").read_text())      # every measurement, for the user
    assert report["config"] == measured.to_dict() and len(report["layers"]) == 4
    assert measured.replace(layer_tiers={}) == BASE                # only the per-layer tiers are chosen
    assert all(len(tiers) == BASE.num_tiers for tiers in measured.layer_tiers.values())
    caplog.clear()
    with caplog.at_level(logging.INFO, LOGGER):
        assert calibrated_config(BASE, setting, str(tiny_model), "cpu") == measured
    assert "from the cache" in caplog.text and "measuring" not in caplog.text
    other_base = BASE.replace(window=BASE.window * 2)              # another base config: another cache entry
    assert cal.cache_key(model_fingerprint(tiny_model), other_base, "cpu", "float32") != cached[0].stem


def test_an_unreadable_cached_result_warns_and_serves_the_base(tiny_model, tmp_path, caplog):
    key = cal.cache_key(model_fingerprint(tiny_model), BASE, "cpu", "float32")
    (tmp_path / f"{key}.json").write_text('{"tiers": ["k9v9"]}')
    with caplog.at_level(logging.WARNING, LOGGER):
        assert calibrated_config(BASE, CalibrationSetting("auto", tmp_path), str(tiny_model), "cpu") is BASE
    assert "unreadable cached config" in caplog.text and "serving the uncalibrated tiers" in caplog.text
