"""The calibration command (diffkv_sglang.calibrate) on a tiny random Llama: CPU only, no real model, no server."""

import argparse
import json
import random
import subprocess
import sys

import pytest
import torch

from diffkv_sglang import calibrate as cal
from diffkv_sglang.config import DiffKVConfig, TierSpec
from diffkv_sglang.format import BlockFormat
from diffkv_sglang.integration import args as cli
from diffkv_sglang.quant import meta_scale, read_sealed_blocks, rotate, round_trip, unrotate, write_sealed_blocks

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

TOKENS = 256


@pytest.mark.parametrize("rotation", ["none", "hadamard"])
@pytest.mark.parametrize("tier", ["k8v4", "k4v2", "k4v2g2x4", "k2v2g4x4", "k8v8g2x2", "k4v2+kc", "k2v2g1x4+kc"])
def test_fake_quantize_is_what_a_sealed_block_stores(seeded, tier, rotation):
    spec, page, heads, dim, pages = TierSpec.parse(tier), 16, 3, 64, 4
    keys = torch.randn(pages * page, heads, dim) * torch.rand(1, heads, dim) * 4
    values = torch.randn(pages * page, heads, dim) + 0.5
    cand = cal.Candidate(spec.name, spec, rotation, rotation, spec.key_mode)
    kq, vq = cal.quantize_kv(keys, values, cand, page)
    fmt = BlockFormat([spec], dim, page, rotation, rotation)
    blocks = lambda x: x.reshape(pages, page, heads, dim).permute(0, 2, 1, 3).reshape(pages * heads, page, dim)
    tiers = torch.zeros(pages * heads, page, dtype=torch.int64)
    size = int(fmt.block_nbytes(torch.tensor([page])))
    offsets = torch.arange(pages * heads, dtype=torch.int64) * size
    data = torch.zeros(pages * heads * size, dtype=torch.uint8)
    counts = write_sealed_blocks(fmt, data, offsets, blocks(keys), blocks(values), tiers)
    k_ref, v_ref, _ = read_sealed_blocks(fmt, data, offsets, counts)
    assert torch.equal(blocks(kq), k_ref) and torch.equal(blocks(vq), v_ref)
    assert not torch.equal(kq, keys)                      # it did quantize


@pytest.mark.parametrize("rotation", ["none", "hadamard"])
@pytest.mark.parametrize("tier", ["k4v2+kc", "k2v2+ko", "k4v2g2x4+ko"])
def test_key_modes_quantize_each_page_and_head_block(seeded, tier, rotation):
    """fake_quantize with a key mode = the block's meta scale, then quant.round_trip over that block's tokens
    (a partial last page: over its real tokens only)."""
    base = DiffKVConfig(key_rotation=rotation)
    cand, page, heads, dim = cal.Candidate.parse(tier, base), 16, 2, 64
    keys = torch.randn(3 * page + 5, heads, dim) * torch.rand(1, heads, dim) * 4 + torch.randn(1, heads, dim) * 20
    kq = cal.quantize_kv(keys, torch.randn_like(keys), cand, page)[0]
    rotated = rotate(keys, rotation)
    for start in range(0, keys.shape[0], page):
        for head in range(heads):
            block = rotated[start:start + page, head]
            m = meta_scale(block.abs().amax())
            want = round_trip(block / m, cand.key_mode, cand.tier.key_bits, cand.tier.key_groups) * m
            assert torch.equal(kq[start:start + page, head], unrotate(want, rotation)), (start, head)


def test_candidate_names_key_modes_and_bytes():
    base = DiffKVConfig()
    parse = lambda text: cal.Candidate.parse(text, base)
    assert (parse("K4V2+kc").key_mode, parse("k4v2+ko").key_mode, parse("k4v2+hk").key_mode) == \
        ("channel", "channel_offset", "token")
    both = parse("k4v2+ko+hv")
    assert (both.name, both.key_rotation, both.value_rotation, both.key_mode) == \
        ("k4v2+hv+ko", "none", "hadamard", "channel_offset")
    # head_dim 64, page 32: per-token key meta 4 bytes; per channel 2 float16 (8 bytes a token) or 1 (4 bytes)
    sizes = {name: parse(name).bytes_per_token(64, 32) for name in
             ("k8v4", "k4v2", "k4v2+kc", "k4v2+ko", "k2v2", "k2v2+kc", "k2v2+ko", "k4v2g2x4+ko")}
    assert sizes == {"k8v4": 105, "k4v2": 57, "k4v2+kc": 61, "k4v2+ko": 61, "k2v2": 41, "k2v2+kc": 45,
                     "k2v2+ko": 45, "k4v2g2x4+ko": 77}
    # head_dim 128, page 16: 4-bit keys, 2-bit values, value meta, index, and 128 (scale, zero) pairs over 16 tokens
    assert parse("k4v2+kc").bytes_per_token(128, 16) == 64 + 32 + 4 + 1 + 128 * 4 / 16


def test_attend_matches_the_float64_reference(seeded, reference_attention):
    q, k, v = torch.randn(6, 40, 16), torch.randn(2, 40, 16), torch.randn(2, 40, 16)
    rows = torch.arange(30, 40)
    keep = torch.rand(2, 40) > 0.3
    keep[:, 0] = True
    out, probs = cal.attend(q[:, 30:], k, v, 0.25, rows, keep)
    ref, ref_probs = reference_attention(q[:, 30:].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), rows,
                                         keep=keep, sm_scale=0.25)
    torch.testing.assert_close(out.transpose(0, 1).double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(probs.double(), ref_probs, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------ the whole command
SENSITIVE = 2


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A tiny Llama (fresh seed) whose layer 2 has huge outlier key channels, calibrated once."""
    from diffkv_devtools.tiny_model import CORPUS, build_tiny_llama
    from transformers import AutoModelForCausalLM

    seed = random.randrange(2**31)
    print(f"tiny model seed {seed}")
    root = tmp_path_factory.mktemp("calibrate")
    model_dir = build_tiny_llama(root / "model", seed=seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    attn = model.model.layers[SENSITIVE].self_attn           # 4 query heads, 2 KV heads, head_dim 64
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        attn.q_proj.weight *= 8                               # sharper attention: logits matter
        for head in range(2):                                 # one outlier key channel per KV head that the
            channel = int(torch.randint(0, 32, (1,), generator=gen))   # queries ignore (RoPE pairs c, c + 32)
            attn.k_proj.weight[head * 64 + channel] *= 100
            for q_head in (2 * head, 2 * head + 1):
                attn.q_proj.weight[q_head * 64 + channel] = 0
                attn.q_proj.weight[q_head * 64 + channel + 32] = 0
    model.to(torch.bfloat16).save_pretrained(model_dir)
    rng = random.Random(seed)
    text = root / "sample.txt"
    text.write_text(" ".join(rng.choice(CORPUS) for _ in range(200)))
    out = root / "cfg" / "tiny.json"
    argv = ["--model-path", str(model_dir), "--out", str(out), "--text", str(text), "--tokens", str(TOKENS),
            "--eval-queries", "64", "--candidates", "k4v8,k4v8+hk,k4v8g4x1,k4v8+kc,k4v8+ko",
            "--base-config", json.dumps({"tiers": ["k8v8", "k4v8"], "alpha_high": 1000.0, "alpha_low": 0.0,
                                         "window": 16, "obs_window": 16, "page_size": 16}),
            "--fallbacks", "k8v8,k8v8", "--max-error", "0.03"]
    assert cal.main(argv) == 0
    return out, json.loads(out.read_text()), json.loads(out.with_suffix(".report.json").read_text())


def test_sensitive_layer_gets_high_precision_and_only_it(calibrated):
    _, config, report = calibrated
    errors = [layer["policy"]["k8v8,k4v8"] - layer["policy_prune_only"] for layer in report["layers"]]
    assert config["layer_tiers"] == {str(SENSITIVE): ["k8v8", "k8v8"]}, errors
    assert report["overridden_layers"] == [SENSITIVE]
    assert errors[SENSITIVE] > 3 * max(e for i, e in enumerate(errors) if i != SENSITIVE)
    sensitive = report["layers"][SENSITIVE]
    # where the damage sits: the keys (values are 8-bit), and the outlier channel is found
    assert sensitive["key"]["k4v8"] > 5 * sensitive["value"]["k4v8"]
    assert sensitive["key_channel_outlier"]["ratio"] > 10
    assert all(layer["key_channel_outlier"]["ratio"] < sensitive["key_channel_outlier"]["ratio"] / 3
               for layer in report["layers"] if layer["layer"] != SENSITIVE)
    # the format's fixes: Hadamard spreads the outlier over head_dim, groups confine it to a quarter of it
    assert sensitive["attn"]["k4v8+hk"] < sensitive["attn"]["k4v8"] / 2
    assert sensitive["attn"]["k4v8g4x1"] < sensitive["attn"]["k4v8"]
    # per-channel keys give the outlier channel its own scale (an offset would not: that channel's spread is as
    # large as its magnitude, so +ko is only counted here); the report counts their metadata
    assert sensitive["attn"]["k4v8+kc"] < sensitive["attn"]["k4v8"] / 2
    assert report["candidates"]["k4v8+kc"]["key_mode"] == "channel"
    sizes = {name: report["candidates"][name]["bytes_per_token"] for name in ("k4v8", "k4v8+kc", "k4v8+ko")}
    assert sizes == {"k4v8": 105, "k4v8+kc": 105 - 4 + 64 * 4 / 16, "k4v8+ko": 105 + 64 * 2 / 16}   # page 16
    # the KL of quantizing only that layer is the largest, and 8-bit keys cost less than 4-bit ones
    kl = [layer["kl"]["k4v8"] for layer in report["layers"]]
    assert max(range(len(kl)), key=kl.__getitem__) == SENSITIVE
    assert sensitive["kl"]["k8v8"] < sensitive["kl"]["k4v8"]
    assert report["tokens"] == TOKENS and len(report["layers"]) == 4


def test_written_config_is_accepted_by_the_diffkv_config_flag(calibrated):
    out, config, _ = calibrated
    parser = argparse.ArgumentParser()
    cli.add_cli_args(parser)
    parsed = cli.config_from_namespace(parser.parse_args(["--kv-pool", "diffkv", "--diffkv-config", str(out)]))
    assert parsed == DiffKVConfig.from_dict(config)
    assert parsed.tiers_for_layer(SENSITIVE) == (TierSpec(8, 8), TierSpec(8, 8))
    assert parsed.tiers_for_layer(0) == (TierSpec(8, 8), TierSpec(4, 8))
    assert (parsed.window, parsed.page_size, parsed.alpha_low) == (16, 16, 0.0)      # base config kept
    parsed.validate_model(head_dim=64, num_layers=4)


# ------------------------------------------------------------------------------------------- bad flags
@pytest.mark.parametrize("extra, flag, allowed", [
    (["--metric", "mse"], "--metric", "('policy', 'attn', 'kl')"),
    (["--tokens", "many"], "--tokens", "an integer >= 64"),
    (["--tokens", "10"], "--tokens", "an integer >= 64"),
    (["--candidates", "k3v2"], "--candidates", "one of (2, 4, 8)"),
    (["--candidates", "k4v2+rot"], "--candidates", "+hk"),
    (["--candidates", "k4v2+kc+ko"], "--candidates", "one key mode suffix ['+kc', '+ko']"),
    (["--candidates", "k4v2+hk+hv"], "--candidates", "one rotation suffix"),
    (["--candidates", "k4v2g2x4+kc"], "--candidates", "'+kc' with one key group"),
    (["--fallbacks", "k8v4"], "--fallbacks", "exactly 2 tiers"),
    (["--max-error", "-1"], "--max-error", "a finite number >= 0"),
    (["--metric", "kl", "--no-kl"], "--no-kl", "--metric policy or attn"),
    (["--base-config", '{"tiers": ["k9v9"]}'], "--base-config", "one of (2, 4, 8)"),
    (["--dtype", "float8"], "--dtype", "float32"),
    (["--kl-tiers", "k4v2x"], "--kl-tiers", "k8v4"),
])
def test_bad_flags_name_the_flag_and_the_allowed_values(tmp_path, capsys, extra, flag, allowed):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SystemExit) as exc:
        cal.main(["--model-path", str(tmp_path), "--out", str(tmp_path / "o.json"), *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and allowed in err


def test_missing_model_directory_and_bad_text(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cal.main(["--model-path", str(tmp_path / "nope"), "--out", str(tmp_path / "o.json")])
    assert "argument --model-path" in capsys.readouterr().err
    with pytest.raises(cal.CalibrationError, match="--text"):
        cal.load_text(str(tmp_path / "missing.txt"))


def test_core_import_does_not_pull_transformers():
    code = "import sys, diffkv_sglang.calibrate; assert 'transformers' not in sys.modules and 'sglang' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_selection_keeps_passing_base_else_cheapest_passing_fallback():
    base, fb_cheap, fb_dear = (tuple(TierSpec.parse(t) for t in pair.split(","))
                               for pair in ("k8v4,k4v2", "k8v4,k4v4", "k8v8,k8v4"))
    lists = [base, fb_dear, fb_cheap]
    entry = {"policy_prune_only": 0.01, "policy_shares": {"pruned": 0.1, "tier0": 0.2, "tier1": 0.7},
             "policy": {"k8v4,k4v2": 0.05, "k8v8,k8v4": 0.012, "k8v4,k4v4": 0.03}}
    assert cal.select_tiers(entry, lists, "policy", 0.045, 64, 32)[0] == base           # 0.04 above the floor
    assert cal.select_tiers(entry, lists, "policy", 0.03, 64, 32)[0] == fb_cheap        # both pass: fewer bytes
    assert cal.select_tiers(entry, lists, "policy", 0.01, 64, 32)[0] == fb_dear         # only it passes
    assert cal.select_tiers(entry, lists, "policy", 0.0, 64, 32)[0] == fb_dear          # none: smallest error
    assert cal.expected_bytes(entry, fb_cheap, 64, 32) < cal.expected_bytes(entry, fb_dear, 64, 32)


def test_expected_bytes_count_per_channel_metadata_by_the_chance_a_page_holds_the_tier():
    tiers = (TierSpec.parse("k8v4"), TierSpec.parse("k4v2+kc"))
    per_token = [64 + 32 + 4 + 4 + 1, 32 + 16 + 4 + 1]                  # k4v2+kc: no per-token key metadata
    for low_share in (0.0, 0.01, 0.7, 1.0):
        entry = {"policy_shares": {"pruned": 0.0, "tier0": 1 - low_share, "tier1": low_share}}
        expected = (1 - low_share) * per_token[0] + low_share * per_token[1] + (1 - (1 - low_share) ** 32) * 256 / 32
        assert cal.expected_bytes(entry, tiers, 64, 32) == pytest.approx(expected)


def test_candidate_key_modes():
    base = DiffKVConfig()
    kc = cal.Candidate.parse("k4v2+hk+kc", base)
    assert (kc.name, kc.tier, kc.key_rotation, kc.key_mode) == ("k4v2+hk+kc", TierSpec(4, 2, key_mode="channel"),
                                                               "hadamard", "channel")
    assert kc.bytes_per_token(64, 32) == 32 + 16 + 4 + 1 + 64 * 4 / 32
    ko = cal.Candidate.parse("k4v2+ko", base)
    assert ko.tier == TierSpec(4, 2) and ko.bytes_per_token(64, 32) == 57 + 64 * 2 / 32
    assert cal.Candidate.of_tier(TierSpec.parse("k4v2+kc"), base).key_mode == "channel"
    with pytest.raises(cal.CalibrationError, match="one key group"):
        cal.Candidate.parse("k4v2g2x2+kc", base)


def test_from_report_redoes_only_the_selection(calibrated, tmp_path):
    out, _, report = calibrated
    model_dir = report["model_path"]
    again = tmp_path / "again.json"
    # a threshold above every error: no layer is overridden; no model is loaded (the report is enough)
    argv = ["--model-path", model_dir, "--out", str(again), "--from-report", str(out.with_suffix(".report.json")),
            "--fallbacks", "k8v8,k8v8", "--max-error", "10"]
    assert cal.main(argv) == 0
    assert json.loads(again.read_text())["layer_tiers"] == {}
    redone = json.loads(again.with_suffix(".report.json").read_text())
    assert redone["layers"][SENSITIVE]["policy"] == report["layers"][SENSITIVE]["policy"]
    with pytest.raises(SystemExit):                                     # a list the report did not measure
        cal.main(argv[:-4] + ["--fallbacks", "k8v4,k4v4"])
