"""Checks the ``sgl_kernel`` stand-in (standin/sgl_kernel) against independent torch references.

    PYTHONPATH=benchmarks/gpu/standin python benchmarks/gpu/check_standin.py [cuda|cpu] [--out FILE.json]

References: ``torch.nn.functional.rms_norm`` in float32 (the norms; Gemma's with weight ``1 + w``), ``F.silu`` /
``F.gelu`` (the gated activations), on fresh random bf16 inputs of the model shapes the GPU runs use (hidden 576,
3584, 4096). Outputs are poisoned (NaN) before each call and in-place results checked too; each element must be within one
bf16 rounding (relative 2^-7) of the reference. Prints one line per
check; exit status 1 if any fails.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

import sgl_kernel

RTOL = 2 ** -7             # one bf16 rounding apart at most (a fused reference kernel may round differently)


def _ref_norm(x32: torch.Tensor, weight: torch.Tensor, eps: float, gemma: bool) -> torch.Tensor:
    w = weight.float() + 1.0 if gemma else weight.float()
    return F.rms_norm(x32, (x32.shape[-1],), w, eps)


def checks(device: str):
    """Yield ``(name, got, want)`` for every op and shape."""
    dtype = torch.bfloat16
    for hidden in (576, 3584, 4096):
        x = torch.randn(37, hidden, device=device, dtype=dtype) * 3
        r = torch.randn_like(x)
        w = torch.rand(hidden, device=device, dtype=dtype) + 0.5
        for gemma, norm, fused in ((False, sgl_kernel.rmsnorm, sgl_kernel.fused_add_rmsnorm),
                                   (True, sgl_kernel.gemma_rmsnorm, sgl_kernel.gemma_fused_add_rmsnorm)):
            tag = f"{norm.__name__} h{hidden}"
            want = _ref_norm(x.float(), w, 1e-6, gemma).to(dtype)
            yield tag, norm(x, w, 1e-6), want
            out = torch.full_like(x, float("nan"))
            norm(x, w, 1e-6, out=out)
            yield tag + " out=", out, want
            xi, ri = x.clone(), r.clone()
            fused(xi, ri, w, 1e-6)
            s = x.float() + r.float()
            yield f"{fused.__name__} h{hidden} residual", ri, s.to(dtype)
            yield f"{fused.__name__} h{hidden} output", xi, _ref_norm(s, w, 1e-6, gemma).to(dtype)
        g = torch.randn(37, 2 * hidden, device=device, dtype=dtype)
        a, b = g[:, :hidden], g[:, hidden:]
        for op, ref in ((sgl_kernel.silu_and_mul, F.silu(a) * b), (sgl_kernel.gelu_and_mul, F.gelu(a) * b),
                        (sgl_kernel.gelu_tanh_and_mul, F.gelu(a, approximate="tanh") * b)):
            out = torch.full_like(a, float("nan"))
            op(g, out=out)
            yield f"{op.__name__} h{hidden}", out, ref
    t = torch.randn(4, device=device)
    yield "weak_ref_tensor", sgl_kernel.weak_ref_tensor(t), t


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("device", nargs="?", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="write the results as JSON")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = []
    for name, got, want in checks(args.device):
        diff = (got.float() - want.float()).abs()
        err = diff.max().item()
        ok = (got.shape == want.shape and not torch.isnan(got).any().item()
              and bool((diff <= RTOL * want.float().abs() + 1e-6).all()))
        results.append({"check": name, "max_abs_err": err, "ok": ok})
        print(f"{'ok  ' if ok else 'FAIL'} {name}: max abs err {err:.3g}")
    summary = {"device": torch.cuda.get_device_name() if args.device == "cuda" else args.device,
               "torch": torch.__version__, "standin": sgl_kernel.__version__, "checks": results,
               "ok": all(r["ok"] for r in results)}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=1)
    print(f"check_standin: {sum(r['ok'] for r in results)}/{len(results)} ok on {summary['device']}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
