"""GPU benchmark of the seal and compaction kernels: checked against the torch reference, then timed.

Each function first checks the kernel at one size against the torch reference on poisoned arenas (byte for
byte), then times kernel and reference with ``triton.testing.do_bench`` (median) and reports bytes moved
(read + write), microseconds and GB/s. ``main()`` also measures the device-to-device copy bandwidth in the same
run and writes everything to one JSON file::

    python benchmarks/kernels_gpu_seal.py [--out PATH]          # CUDA: $OUT/kernels-seal.json by default
    python benchmarks/kernels_gpu_seal.py --smoke --out /tmp/s.json   # CPU, Triton interpreter, tiny sizes

Seal rows: Llama-3-8B (head_dim 128) and SmolLM2 (64) blocks, page 32, tiers k8v4/k4v2, 256, 4096 and 16384 blocks
(16384: one store chunk of 64 pages x 32 layers x 8 KV heads),
mixes all-high / 30-50-20 / heavy pruning, K/V read from staged blocks in the arena. Compaction rows: 64 MiB
and 1 GiB of blocks (16 B to 8 KiB) sliding down over holes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")      # before triton is imported

import triton  # noqa: E402

import diffkv_sglang.quant as quant  # noqa: E402
from diffkv_sglang.config import TierSpec  # noqa: E402
from diffkv_sglang.format import BlockFormat, StagedBlockFormat  # noqa: E402
from diffkv_sglang.kernels.compaction import move_blocks, move_blocks_reference  # noqa: E402
from diffkv_sglang.kernels.seal import quantize_reference, rotate_reference, seal_blocks  # noqa: E402

MODELS = {"llama3-8b": 128, "smollm2": 64}                      # name -> head_dim
MIXES = {"all_high": (1.0, 0.0, 0.0), "diffkv_typical": (0.3, 0.5, 0.2), "heavy_pruning": (0.1, 0.3, 0.6)}
TIERS = (TierSpec(8, 4), TierSpec(4, 2))
PAGE = 32
MiB = 1 << 20
SIZES = {"seal_blocks": (256, 4096, 16384), "compaction_bytes": (64 * MiB, 1024 * MiB), "check_blocks": 256,
         "copy_bytes": 512 * MiB}
SMOKE_SIZES = {"seal_blocks": (4,), "compaction_bytes": (64 * 1024,), "check_blocks": 3, "copy_bytes": MiB}


def _time_us(fn, device: torch.device) -> float:
    """Median time of ``fn()`` in microseconds: do_bench on CUDA, a few wall-clock runs elsewhere."""
    if device.type == "cuda":
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3
    times = []
    for _ in range(2):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def copy_gbps(device: torch.device, nbytes: int) -> float:
    """Device-to-device copy bandwidth, bytes read + written per second / 1e9."""
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / _time_us(lambda: dst.copy_(src), device) / 1e3


# ----------------------------------------------------------------------------------------------- seal
class _SealCase:
    """One arena with ``n`` staged blocks (random bf16 K/V) and room for their sealed blocks."""

    def __init__(self, fmt: BlockFormat, n: int, mix: tuple[float, float, float], device: torch.device):
        page, dim = fmt.page_size, fmt.head_dim
        staged = StagedBlockFormat(dim, page, torch.bfloat16)
        self.fmt, self.n = fmt, n
        self.keys = torch.randn(n, page, dim, device=device).to(torch.bfloat16)
        self.values = torch.randn(n, page, dim, device=device).to(torch.bfloat16)
        draw = torch.rand(n, page, device=device)
        self.tiers = torch.where(draw < mix[0], 0, torch.where(draw < mix[0] + mix[1], 1, -1)).to(torch.int8)
        counts = quant.tier_counts(self.tiers, fmt.num_tiers)
        sizes = fmt.block_nbytes(counts)
        self.src = torch.arange(n, device=device, dtype=torch.int64) * staged.nbytes
        self.dst = n * staged.nbytes + torch.cumsum(sizes, 0) - sizes
        self.data_bytes = int(fmt.data_nbytes(counts).sum())
        capacity = n * staged.nbytes + int(sizes.sum()) + 16
        self.data = torch.randint(0, 256, (capacity,), dtype=torch.uint8, device=device)
        elements = self.data.view(torch.bfloat16)
        index = (self.src // 2)[:, None] + torch.arange(page * dim, device=device)
        elements[index] = self.keys.reshape(n, -1)
        elements[index + page * dim] = self.values.reshape(n, -1)

    def run_kernel(self):
        return seal_blocks(self.fmt, self.data, self.src, self.tiers, self.dst)

    def run_reference(self, data=None):
        return quant.write_sealed_blocks(self.fmt, self.data if data is None else data, self.dst, self.keys,
                                         self.values, self.tiers)

    @property
    def bytes_moved(self) -> tuple[int, int]:
        page, dim = self.fmt.page_size, self.fmt.head_dim
        read = self.n * (2 * page * dim * 2 + page + 16)             # bf16 K/V, tiers, two offsets
        written = self.data_bytes + self.n * self.fmt.num_tiers * 8  # block bytes, counts
        return read, written


def _section_starts_without_einsum(self, counts):
    """``BlockFormat.section_starts`` without its int64 einsum, which CUDA does not implement ("baddbmm_cuda"
    not implemented for 'Long'); used only when the original fails on this device."""
    counts = counts.to(torch.int64)
    starts = (counts[..., None, None, :] * self._coeffs.to(counts.device)).sum(-1)
    return starts + self._const.to(counts.device)[:, None]


def _reference_runs_on(device: torch.device) -> None:
    """Let the torch reference run on ``device`` (see :func:`_section_starts_without_einsum`)."""
    fmt = BlockFormat(TIERS, 64, PAGE)
    try:
        fmt.section_starts(torch.zeros(1, 2, dtype=torch.int64, device=device))
    except (NotImplementedError, RuntimeError):
        BlockFormat.section_starts = _section_starts_without_einsum
        print("note: BlockFormat.section_starts fails on this device (int64 einsum); the reference uses a "
              "broadcast sum here", file=sys.stderr)


def seal_launch_host_us(device: torch.device, calls: int) -> float:
    """Host time of one ``seal_blocks`` call (launcher + Triton launch), calls back to back: the floor of a
    seal step when few blocks are sealed."""
    case = _SealCase(BlockFormat(TIERS, 128, PAGE), 64, MIXES["diffkv_typical"], device)
    case.run_kernel()
    start = time.perf_counter()
    for _ in range(calls):
        case.run_kernel()
    elapsed = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.synchronize()
    return elapsed / calls * 1e6


def check_seal(device: torch.device, n: int) -> dict:
    """Byte-exact check of the kernel against ``write_sealed_blocks`` run on the CPU, on poisoned arenas, for both
    rotations, with the kernel's butterfly rotation and signed-zero rule (``kernels.seal.rotate_reference`` /
    ``quantize_reference``). Raises AssertionError on any difference. Also counts the bytes in which the same
    reference run on ``device`` differs (on CUDA, torch divides by the Python scalar ``qmax`` through a
    reciprocal, so ``(max - zero) / qmax`` is not correctly rounded there)."""
    original = quant.rotate, quant.quantize
    quant.rotate, quant.quantize = rotate_reference, quantize_reference
    device_reference_diff = {}
    try:
        for dim in MODELS.values():
            for rotation in ("none", "hadamard"):
                fmt = BlockFormat(TIERS, dim, PAGE, rotation, rotation)
                case = _SealCase(fmt, n, MIXES["diffkv_typical"], device)
                expected = case.data.cpu()
                counts_ref = quant.write_sealed_blocks(fmt, expected, case.dst.cpu(), case.keys.cpu(),
                                                       case.values.cpu(), case.tiers.cpu())
                on_device = case.data.clone()
                case.run_reference(on_device)
                counts = case.run_kernel()
                assert torch.equal(counts.cpu(), counts_ref), f"counts differ (dim {dim}, {rotation})"
                diff = int((case.data.cpu() != expected).sum())
                assert diff == 0, f"{diff} bytes differ from the CPU reference (dim {dim}, {rotation})"
                device_reference_diff[f"{dim}/{rotation}"] = int((on_device.cpu() != expected).sum())
    finally:
        quant.rotate, quant.quantize = original
    return {"blocks": n, "head_dims": list(MODELS.values()), "rotations": ["none", "hadamard"],
            "byte_exact_vs_cpu_reference": True, "device_reference_differing_bytes": device_reference_diff}


def bench_seal(device, sizes=None, checks: dict | None = None) -> list[dict]:
    """Seal rows (see the module docstring); the correctness check runs first (its summary goes to
    ``checks["seal"]`` when a dict is given)."""
    device = torch.device(device)
    sizes = sizes or SIZES
    _reference_runs_on(device)
    summary = check_seal(device, sizes["check_blocks"])
    if checks is not None:
        checks["seal"] = summary
    rows = []
    for model, dim in MODELS.items():
        for n in sizes["seal_blocks"]:
            for mix_name, mix in MIXES.items():
                rotations = ("none", "hadamard") if mix_name == "diffkv_typical" else ("none",)
                for rotation in rotations:
                    fmt = BlockFormat(TIERS, dim, PAGE, rotation, rotation)
                    case = _SealCase(fmt, n, mix, device)
                    kernel_us = _time_us(case.run_kernel, device)
                    torch_us = _time_us(case.run_reference, device) if rotation == "none" else None
                    read, written = case.bytes_moved
                    rows.append({
                        "model": model, "head_dim": dim, "page_size": PAGE, "blocks": n, "tiers": "k8v4,k4v2",
                        "mix": dict(zip(("high", "low", "pruned"), mix)), "rotation": rotation, "source": "staged",
                        "bytes_read": read, "bytes_written": written, "bytes_moved": read + written,
                        "kernel_us": kernel_us, "torch_us": torch_us,
                        "gbps": (read + written) / kernel_us / 1e3,
                    })
    return rows


# ----------------------------------------------------------------------------------------- compaction
def _compaction_layout(total: int, device: torch.device):
    """Blocks of 16 B..8 KiB totalling about ``total`` bytes, with holes before about half of them; returns
    (arena, old offsets, new packed offsets, sizes)."""
    mean_units = 256
    n = max(1, total // (16 * mean_units))
    sizes = torch.randint(1, 2 * mean_units, (n,), device=device) * 16
    holes = torch.randint(0, 2 * mean_units, (n,), device=device) * 16 * (torch.rand(n, device=device) < 0.5)
    old = torch.cumsum(sizes + holes, 0) - sizes
    new = torch.cumsum(sizes, 0) - sizes
    capacity = int(old[-1] + sizes[-1]) + 16
    data = torch.randint(0, 256, (capacity,), dtype=torch.uint8, device=device)
    return data, old, new, sizes


def check_compaction(device: torch.device, total: int) -> dict:
    """Kernel vs ``move_blocks_reference`` on a poisoned arena (whole arena compared). Raises AssertionError."""
    data, old, new, sizes = _compaction_layout(total, device)
    expected = data.clone()
    move_blocks_reference(expected, old, new, sizes)
    move_blocks(data, old, new, sizes)
    diff = int((data != expected).sum())
    assert diff == 0, f"{diff} bytes differ from the compaction reference"
    return {"moved_bytes": int(sizes.sum()), "blocks": sizes.numel(), "exact": True}


def bench_compaction(device, sizes=None, checks: dict | None = None) -> list[dict]:
    """Compaction rows: bytes moved counts the gather and the scatter, each read + write (4x the block bytes).
    The correctness check runs first (summary in ``checks["compaction"]``)."""
    device = torch.device(device)
    sizes = sizes or SIZES
    summary = check_compaction(device, sizes["compaction_bytes"][0])
    if checks is not None:
        checks["compaction"] = summary
    rows = []
    for total in sizes["compaction_bytes"]:
        data, old, new, nbytes = _compaction_layout(total, device)
        moved = int(nbytes.sum())
        tmp = torch.empty(moved, dtype=torch.uint8, device=device)
        kernel_us = _time_us(lambda: move_blocks(data, old, new, nbytes, tmp), device)
        torch_us = _time_us(lambda: move_blocks_reference(data, old, new, nbytes), device)
        rows.append({"moved_bytes": moved, "blocks": nbytes.numel(), "bytes_moved": 4 * moved,
                     "kernel_us": kernel_us, "torch_us": torch_us, "gbps": 4 * moved / kernel_us / 1e3})
        del data, tmp
    return rows


# ----------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="result JSON (default $OUT/kernels-seal.json, else benchmarks/results/)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CPU and the Triton interpreter work)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        parser.error("no CUDA device: run with --smoke (Triton interpreter, tiny sizes)")
    sizes = SMOKE_SIZES if args.smoke else SIZES
    out = args.out or os.path.join(os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results"),
                                   "kernels-seal.json")
    torch.manual_seed(0)
    checks = {}
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (triton interpreter)",
        "versions": {"torch": torch.__version__, "triton": triton.__version__},
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "copy_gbps": copy_gbps(device, sizes["copy_bytes"]),
        "seal": bench_seal(device, sizes, checks),
        "seal_launch_host_us": seal_launch_host_us(device, 2 if args.smoke else 200),
        "compaction": bench_compaction(device, sizes, checks),
        "checks": checks,
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{result['device']}: copy {result['copy_gbps']:.0f} GB/s, seal launch {result['seal_launch_host_us']:.0f} us "
          f"on the host -> {out}")
    print("checks:", json.dumps(checks))
    print(f"{'seal':<10}{'dim':>5}{'blocks':>8}  {'mix':<15}{'rot':<9}{'us':>10}{'torch us':>10}{'GB/s':>8}")
    for r in result["seal"]:
        torch_us = f"{r['torch_us']:.1f}" if r["torch_us"] is not None else "-"
        print(f"{r['model']:<10}{r['head_dim']:>5}{r['blocks']:>8}  "
              f"{'/'.join(f'{v:.0%}' for v in r['mix'].values()):<15}{r['rotation']:<9}"
              f"{r['kernel_us']:>10.1f}{torch_us:>10}{r['gbps']:>8.0f}")
    print(f"{'compaction MiB':<16}{'blocks':>8}{'us':>12}{'torch us':>12}{'GB/s':>8}")
    for r in result["compaction"]:
        print(f"{r['moved_bytes'] / MiB:<16.1f}{r['blocks']:>8}{r['kernel_us']:>12.1f}{r['torch_us']:>12.1f}"
              f"{r['gbps']:>8.0f}")
    return result


if __name__ == "__main__":
    main()
