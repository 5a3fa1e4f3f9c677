#!/usr/bin/env python3
"""Probe: would subtracting a per-channel key offset before quantizing fix the layers that 4/8-bit keys break?

    .venv/bin/python scripts/probe_key_offset.py .cache/models/qwen2.5-coder-0.5b-instruct [--tokens 1024]

Softmax is shift-invariant per query, so subtracting one constant vector ``b`` from every key of a (layer, KV head)
changes each logit of a query by the same ``q . b`` and leaves attention exact; only the quantization range
changes. The DiffKV format has no such offset today; this measures what it would buy. Same sample, split and
quantizer as ``python -m diffkv_sglang.calibrate`` (``b``: the per-channel mean of the prompt's keys): for each
layer, the relative attention-output error of the last ``--eval-queries`` queries with only the keys quantized
(1 group, no rotation), plain and offset-corrected, at 4 and 8 bits, and the channel with the largest mean
(its mean and spread over the prompt, against the head's median channel spread). Prints one line per layer.
"""

from __future__ import annotations

import argparse

import torch

from diffkv_sglang import calibrate as cal


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_path")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--eval-queries", type=int, default=128)
    ap.add_argument("--page-size", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tokenizer = cal.load_model(args.model_path, torch.float32)
    ids = cal.sample_ids(tokenizer, cal.load_text(None)[0], args.tokens)
    capture: dict = {}
    with cal._hooked(capture=capture):
        cal._log_probs(model, ids)
    for layer in sorted(capture):
        q, k, v, scaling = capture[layer]
        ctx = k.shape[1] - args.eval_queries
        rows = torch.arange(ctx, k.shape[1])
        exact, _ = cal.attend(q[:, ctx:], k, v, scaling, rows)
        offset = k[:, :ctx].mean(1, keepdim=True)                              # [H, 1, D]
        errors = []
        for bits in (4, 8):
            for b in (torch.zeros_like(offset), offset):
                kq = cal.fake_quantize((k - b).transpose(0, 1), bits, 1, "none", args.page_size).transpose(0, 1) + b
                errors.append(cal.rel_error(cal.attend(q[:, ctx:], kq, v, scaling, rows)[0], exact))
        mean, std = k[:, :ctx].mean(1), k[:, :ctx].std(1)                       # [H, D]
        head, channel = divmod(int(mean.abs().argmax()), mean.shape[1])
        print(f"layer {layer:3d}: keys only, 4-bit {errors[0]:.3f} -> offset {errors[1]:.3f}; "
              f"8-bit {errors[2]:.3f} -> offset {errors[3]:.3f}; largest |mean| channel: head {head} channel "
              f"{channel} mean {mean[head, channel]:.1f} std {std[head, channel]:.2f} (median channel std of the "
              f"head {std[head].median():.2f}, per-token |key| max {k[head, :ctx].abs().amax(-1).median():.1f})",
              flush=True)


if __name__ == "__main__":
    main()
