"""Build a tiny random Llama checkpoint for CPU end-to-end tests (no downloads).

    python -m diffkv_devtools.tiny_model OUT_DIR        # or: build_tiny_llama(OUT_DIR)

The result is a Hugging Face model directory that ``sglang.launch_server --model-path OUT_DIR``
and ``transformers.AutoModelForCausalLM`` can load:

- tokenizer: byte-level BPE trained with ``tokenizers`` on a few built-in sentences, special
  tokens ``<pad>`` (0), ``<s>`` (1, bos, prepended to every encoding), ``</s>`` (2, eos), wrapped
  as ``PreTrainedTokenizerFast`` with a trivial chat template;
- model: ``LlamaConfig`` hidden 256, intermediate 512, 4 layers, 4 heads, 2 KV heads,
  head_dim 64, max positions 2048, random weights (seeded), saved as bf16 safetensors.

Deterministic: the same seed gives byte-identical weights and tokenizer files. About 5 MB.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

CORPUS = [
    "Once upon a time there was a small language model that lived on a CPU.",
    "The quick brown fox jumps over the lazy dog.",
    "Keys and values are stored in a paged cache; some tokens matter more than others.",
    "DiffKV keeps important tokens at high precision and compresses the rest.",
    "A radix tree shares the prefix of many requests, so the cache is reused.",
    "Hello, world! How are you today? I am fine, thank you.",
    "Numbers like 0 1 2 3 4 5 6 7 8 9 10 42 100 and 2048 appear in text too.",
    "User: what is the capital of France? Assistant: Paris is the capital of France.",
]

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2

# No {{ bos_token }} here: the tokenizer's post-processor already prepends <s>.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)

MODEL_KWARGS = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)


def _build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A",
        pair="<s> $A <s> $B",
        special_tokens=[("<s>", bos_id)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=MODEL_KWARGS["max_position_embeddings"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_llama(out_dir: str | os.PathLike, seed: int = 0, bpe_vocab_size: int = 512) -> Path:
    """Write the tiny checkpoint (config, bf16 safetensors, tokenizer) into ``out_dir``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = _build_tokenizer(bpe_vocab_size)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=ids["<pad>"],
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
        **MODEL_KWARGS,
    )
    config.dtype = torch.bfloat16  # recorded as "dtype": "bfloat16" in config.json

    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model = model.to(torch.bfloat16).eval()
    model.generation_config.do_sample = False
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", help="directory to write the checkpoint into (created if missing)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    path = build_tiny_llama(args.out_dir, seed=args.seed)
    files = sorted(p.name for p in path.iterdir())
    size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    print(f"tiny llama written to {path} ({size / 1e6:.1f} MB): {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
