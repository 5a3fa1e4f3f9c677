"""Offline use: ``sglang.Engine`` with the DiffKV-compressed KV pool, no server.

The DiffKV settings are ordinary ``Engine`` keywords (``kv_pool="diffkv"`` plus ``diffkv_<field>``, the same
fields as the ``--diffkv-*`` flags). The script generates greedily for a few prompts that share a system
prompt, in two batches, so the second batch finds the shared prefix in the radix tree, and prints each output
with its prompt, cached and completion tokens.

    python examples/offline_engine.py                            # converted SmolLM2 (`make model`), CUDA
    PYTHONPATH=$PWD/diffkv_devtools/cpu_shims python examples/offline_engine.py --device cpu

CPU: with ``--device cpu`` the script sets ``SGLANG_USE_CPU_ENGINE=1`` itself. On a CPU-only machine without
SGLang's CPU kernels (``sgl-kernel`` CPU build), ``PYTHONPATH`` must also hold this repo's
``diffkv_devtools/cpu_shims`` (as an absolute path), which stand in for ``sgl_kernel`` and ``torchvision``; those
shims are development scaffolding of this repository, not part of the package. The engine starts worker
processes, so everything runs under ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / ".cache" / "models" / "smollm2-135m-instruct"

SYSTEM = ("You are a concise assistant. Answer in one short sentence. Context: a KV cache stores the keys and "
          "values of every token a language model has seen, so that generating the next token does not recompute "
          "them. Compressing it lets a server keep more requests in memory at once.")
PROMPTS = [
    "What does a KV cache store?",
    "Why would a server compress its KV cache?",
    "Name one risk of compressing a KV cache too aggressively.",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", default=str(DEFAULT_MODEL),
                        help="Hugging Face checkpoint directory (default: the SmolLM2 converted by `make model`)")
    parser.add_argument("--device", default="cpu" if not _has_cuda() else "cuda", help="cpu or cuda")
    parser.add_argument("--alpha-low", type=float, default=0.0,
                        help="DiffKV pruning threshold (default 0: no pruning; DiffKV's paper uses 0.02)")
    parser.add_argument("--tiers", default="k8v4,k4v2", help="DiffKV precision tiers, most precise first")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--max-total-tokens", type=int, default=8192, help="KV pool capacity in tokens")
    return parser.parse_args(argv)


def _has_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def chat_prompt(tokenizer, question: str) -> str:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not Path(args.model_path, "config.json").is_file():
        print(f"offline_engine: no model at {args.model_path} (run `make model` for the default one)", file=sys.stderr)
        return 2
    cpu_kwargs = {}
    if args.device == "cpu":
        os.environ["SGLANG_USE_CPU_ENGINE"] = "1"          # must be set before sglang is imported
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if importlib.util.find_spec("sgl_kernel") is None:
            print("offline_engine: sgl_kernel is not importable; on a CPU-only machine put this repo's CPU "
                  f"shims on PYTHONPATH:\n    PYTHONPATH={REPO / 'diffkv_devtools' / 'cpu_shims'} "
                  f"python {' '.join(sys.argv)}",
                  file=sys.stderr)
            return 2
        # what SGLang's CPU engine needs here: no overlap scheduler, torch sampling
        cpu_kwargs = dict(disable_overlap_schedule=True, sampling_backend="pytorch")

    import sglang
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    prompts = [chat_prompt(tokenizer, q) for q in PROMPTS]
    sampling = {"temperature": 0, "max_new_tokens": args.max_new_tokens}

    t0 = time.monotonic()
    engine = sglang.Engine(model_path=args.model_path, kv_pool="diffkv", diffkv_tiers=args.tiers,
                           diffkv_alpha_low=args.alpha_low, device=args.device,
                           max_total_tokens=args.max_total_tokens, log_level="warning", **cpu_kwargs)
    print(f"engine up in {time.monotonic() - t0:.1f} s: {args.model_path}, kv_pool=diffkv, tiers {args.tiers}, "
          f"alpha_low {args.alpha_low}, device {args.device}")
    try:
        # the first prompt alone, then the others as a batch: the batch finds the shared system prompt cached
        batches = [prompts[:1], prompts[1:]]
        questions = iter(PROMPTS)
        for batch in batches:
            t0 = time.monotonic()
            outputs = engine.generate(prompt=batch, sampling_params=sampling)
            elapsed = time.monotonic() - t0
            for out in outputs:
                meta = out["meta_info"]
                print(f"\nQ: {next(questions)}")
                print(f"A: {' '.join(out['text'].split())}")
                print(f"   prompt {meta.get('prompt_tokens')}, cached {meta.get('cached_tokens')}, "
                      f"completion {meta.get('completion_tokens')} tokens")
            print(f"   (batch of {len(batch)} in {elapsed:.1f} s)")
    finally:
        engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
