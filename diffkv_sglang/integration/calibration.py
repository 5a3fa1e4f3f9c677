"""Per-layer calibration when the server starts (``--diffkv-calibration off|auto|DIR``).

A model nobody calibrated can break under the default tiers (Qwen2.5-Coder: 4-bit keys in a few layers with
nearly constant key channels; ``docs/calibration.md``). So when the user picked no precision (no
``--diffkv-config``, ``--diffkv-tiers``, ``--diffkv-groups`` or ``--diffkv-thresholds``), the launcher measures
each layer's sensitivity before SGLang starts its schedulers and serves the calibrated config:

* **What runs**: ``python -m diffkv_sglang.calibrate`` in a subprocess (its memory, and on CUDA its context, are
  gone when it exits), on the serving device (``cuda:<base GPU>``, bf16; or the CPU, float32, every core), over
  the first :data:`SAMPLE_TOKENS` tokens of a text shipped in the wheel (:data:`SAMPLE_TEXT`), with the policy
  metric only (one forward pass, no KL), the base config the flags give and calibrate's default fallbacks. A
  layer keeps the base tiers unless their error exceeds calibrate's ``--max-error``.
* **Cache**: the chosen config is stored as ``<cache>/<key>.json`` (with the calibration's log and report beside
  it), the key hashing the model's files (names, sizes, and the first and last MiB of each weight file: a
  fingerprint, not a full hash), the base config and the calibration settings. The next start with the same model
  and flags reads it in milliseconds. ``<cache>`` is ``DIR`` when given, else ``$DIFFKV_CACHE_DIR/calibration``, else
  ``~/.cache/diffkv-sglang/calibration``.
* **Never fatal**: random weights (``--load-format dummy``), a model that is not on local disk yet (SGLang
  downloads Hugging Face ids after this step) or a failed measurement log a warning naming the reason, and the
  server runs with the uncalibrated config.

``off`` serves the config as given; ``auto`` also calibrates on top of explicitly given tiers (a config that
already sets ``layer_tiers`` is served as is).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..config import ConfigError, DiffKVConfig

logger = logging.getLogger(__name__)

FLAG = "--diffkv-calibration"
MODES = ("off", "auto")
ENV_CACHE_ROOT = "DIFFKV_CACHE_DIR"
SAMPLE_TEXT = Path(__file__).resolve().parents[1] / "data" / "calibration_sample.txt"
SAMPLE_TOKENS = 1024
FINGERPRINT_BYTES = 1 << 20             # bytes hashed at each end of a weight file
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
SETTINGS_VERSION = 1                    # bump when what a cached result means changes
PROGRESS_EVERY_S = 10.0
_LAYER_LINE = re.compile(r"layer\s+(\d+)/(\d+)")


@dataclasses.dataclass(frozen=True)
class CalibrationSetting:
    """What ``--diffkv-calibration`` (``sglang.Engine(diffkv_calibration=...)``) asks for.

    Attributes:
        mode: ``"off"`` or ``"auto"``.
        cache_dir: where calibrated configs are kept (None: :func:`default_cache_dir`).
    """

    mode: str
    cache_dir: Path | None = None

    @classmethod
    def parse(cls, text: str | None, tiers_chosen: bool) -> CalibrationSetting:
        """The setting from the flag's text (None: not given). Not given, it is ``auto`` unless the user chose the
        tiers (``tiers_chosen``). Raises ConfigError naming the flag and the allowed values."""
        if text is None:
            return cls("off" if tiers_chosen else "auto")
        value = text.strip()
        if value in MODES:
            return cls(value)
        path = Path(value).expanduser()
        # a new directory must be written as a path, so that a mistyped 'of' or 'atuo' is refused, not created
        looks_like_path = os.sep in value or value.startswith(("~", "."))
        if path.is_dir() or (looks_like_path and not path.exists()):
            return cls("auto", path.resolve())
        raise ConfigError("calibration", text, "off, auto, or a directory for the calibration cache (an existing "
                                               "one, or a path containing '/')")

    def to_text(self) -> str:
        """The form :meth:`parse` reads back (how the launcher hands it to its own resolution step)."""
        return str(self.cache_dir) if self.cache_dir is not None else self.mode


def default_cache_dir() -> Path:
    """Where calibrated configs go without ``--diffkv-calibration DIR``: ``$DIFFKV_CACHE_DIR/calibration``, else
    ``~/.cache/diffkv-sglang/calibration``."""
    root = os.environ.get(ENV_CACHE_ROOT)
    return (Path(root) if root else Path.home() / ".cache" / "diffkv-sglang") / "calibration"


def model_fingerprint(model_dir: Path) -> str:
    """sha256 of a local model directory's file names and sizes, ``config.json`` whole, and the first and last
    :data:`FINGERPRINT_BYTES` of every weight file (fast on a 16 GB checkpoint; a change of the same size that
    touches only the middle of every weight file would go unnoticed)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in model_dir.iterdir() if p.is_file()):
        size = file.stat().st_size
        digest.update(f"{file.name}\0{size}\0".encode())
        if file.name == "config.json":
            digest.update(file.read_bytes())
        elif file.suffix in WEIGHT_SUFFIXES:
            with open(file, "rb") as f:
                digest.update(f.read(FINGERPRINT_BYTES))
                f.seek(max(size - FINGERPRINT_BYTES, 0))
                digest.update(f.read(FINGERPRINT_BYTES))
    return digest.hexdigest()


def local_model_dir(model_path: str) -> Path | None:
    """The directory holding the model's ``config.json``: the path itself, or a Hugging Face id's snapshot that
    is already in the local cache (never downloads); None when there is none yet."""
    path = Path(model_path).expanduser()
    if (path / "config.json").is_file():
        return path
    try:
        from huggingface_hub import snapshot_download

        snapshot = Path(snapshot_download(model_path, local_files_only=True))
    except Exception:                                   # not a repo id, not cached, hub not installed
        return None
    return snapshot if (snapshot / "config.json").is_file() else None


def calibration_device(device: str | None, base_gpu_id: int) -> tuple[str, str]:
    """``(torch device, dtype)`` the calibration runs with for SGLang's ``--device``."""
    if str(device or "cuda").startswith("cuda"):
        return f"cuda:{base_gpu_id}", "bfloat16"
    return "cpu", "float32"


def cache_key(fingerprint: str, base: DiffKVConfig, device: str, dtype: str) -> str:
    """32 hex digits naming a calibration: the model fingerprint, the base config, the device type and dtype, the
    sample text and length, calibrate's default fallbacks (the tier lists a layer may get) and what
    :data:`SETTINGS_VERSION` covers (the other calibrate options)."""
    from ..calibrate import DEFAULT_FALLBACKS

    settings = {"version": SETTINGS_VERSION, "model": fingerprint, "base": base.to_dict(), "dtype": dtype,
                "device_type": device.split(":")[0], "tokens": SAMPLE_TOKENS, "fallbacks": DEFAULT_FALLBACKS,
                "text": hashlib.sha256(SAMPLE_TEXT.read_bytes()).hexdigest()}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]


def _candidates(base: DiffKVConfig) -> str:
    """The tiers calibrate measures: the base tiers and its default fallbacks'."""
    from ..calibrate import DEFAULT_FALLBACKS, parse_fallbacks

    names = [t.name for t in base.tiers]
    for tiers in parse_fallbacks(DEFAULT_FALLBACKS, base):
        names += [t.name for t in tiers if t.name not in names]
    return ",".join(names)


def _measure(base: DiffKVConfig, model_dir: Path, device: str, dtype: str, out: Path, log_path: Path) -> None:
    """Run the calibration subprocess, its lines into ``log_path`` and a progress line every few seconds."""
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    command = [sys.executable, "-m", "diffkv_sglang.calibrate", "--model-path", str(model_dir), "--out", str(out),
               "--base-config", json.dumps(base.to_dict()), "--no-kl", "--candidates", _candidates(base),
               "--text", str(SAMPLE_TEXT), "--tokens", str(SAMPLE_TOKENS), "--device", device, "--dtype", dtype,
               "--threads", str(threads)]
    last = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as log, subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as proc:
        log.write(" ".join(command) + "\n")
        for line in proc.stderr:
            log.write(line)
            found = _LAYER_LINE.search(line)
            if found and time.monotonic() - last >= PROGRESS_EVERY_S:
                last = time.monotonic()
                logger.info("DiffKV calibration: layer %s of %s measured", int(found[1]) + 1, found[2])
    if proc.returncode != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:]
        raise RuntimeError(f"exit status {proc.returncode}: {tail[0] if tail else 'no output'}")


def calibrated_config(base: DiffKVConfig, setting: CalibrationSetting, model_path: str, device: str | None,
                      base_gpu_id: int = 0, load_format: str | None = None) -> DiffKVConfig:
    """The config to serve: ``base`` with per-layer tiers from the cache or a fresh calibration, or ``base``
    itself when the setting is off, the config already sets ``layer_tiers``, or calibration is impossible (a
    warning says why). Logs what was chosen."""
    if setting.mode == "off":
        return base
    if base.layer_tiers:
        logger.info("DiffKV calibration: skipped, the config already sets layer_tiers")
        return base
    skip = "serving the uncalibrated tiers %s (%s off silences this)"
    tiers = ",".join(t.name for t in base.tiers)
    if load_format == "dummy":
        logger.warning("DiffKV calibration: skipped for random weights (--load-format dummy); " + skip, tiers, FLAG)
        return base
    model_dir = local_model_dir(model_path)
    if model_dir is None:
        logger.warning("DiffKV calibration: skipped, %s is not on local disk yet (SGLang downloads it after this "
                       "step; the next start calibrates); " + skip, model_path, tiers, FLAG)
        return base
    cal_device, dtype = calibration_device(device, base_gpu_id)
    if cal_device.startswith("cuda") and not _cuda_visible():
        logger.warning("DiffKV calibration: skipped, no CUDA device is visible to the launcher; " + skip, tiers, FLAG)
        return base
    cache = setting.cache_dir or default_cache_dir()
    key = cache_key(model_fingerprint(model_dir), base, cal_device, dtype)
    path = cache / f"{key}.json"
    if not path.is_file():
        started = time.monotonic()
        logger.info("DiffKV calibration: measuring %s on %s (%s, %d tokens; log in %s)", model_dir, cal_device,
                    dtype, SAMPLE_TOKENS, cache / f"{key}.log")
        try:
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as scratch:
                out = Path(scratch) / "config.json"
                _measure(base, model_dir, cal_device, dtype, out, cache / f"{key}.log")
                os.replace(out.with_suffix(".report.json"), cache / f"{key}.report.json")   # every measurement
                os.replace(out, path)                  # atomic: a concurrent start reads all of it or nothing
        except (OSError, RuntimeError) as exc:
            logger.warning("DiffKV calibration: failed (%s); " + skip, exc, tiers, FLAG)
            return base
        source = f"measured in {time.monotonic() - started:.0f} s, cached in {path}"
    else:
        source = f"from the cache {path}"
    try:
        config = DiffKVConfig.parse(path.read_text(encoding="utf-8"))
    except (OSError, ConfigError) as exc:
        logger.warning("DiffKV calibration: unreadable cached config %s (%s); " + skip, path, exc, tiers, FLAG)
        return base
    changed = {layer: ",".join(t.name for t in tl) for layer, tl in sorted(config.layer_tiers.items())}
    num_layers = _num_layers(model_dir)
    logger.info("DiffKV calibration (%s): %s in %d of %d layers%s", source, tiers, num_layers - len(changed),
                num_layers,
                "; more precise tiers in layer " + ", ".join(f"{layer} ({names})" for layer, names in changed.items())
                if changed else "")
    return config


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available()


def _num_layers(model_dir: Path) -> int:
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    return int(config.get("num_hidden_layers") or config.get("text_config", {}).get("num_hidden_layers", 0))
