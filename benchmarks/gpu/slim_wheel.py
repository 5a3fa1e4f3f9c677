"""Repack SGLang's cp312 wheel without parts a text-only server never loads, so a GPU call's carry fits 64 MiB.

    python benchmarks/gpu/slim_wheel.py IN.whl OUT.whl

Removed (39 MB -> about 15.5 MB compressed), each loaded only by a feature the GPU runs never use:

* ``sglang/srt/rust_extensions/_server*.so``, ``_grpc*.so``, ``_bench*.so``, ``_multimodal*.so`` (42 MB raw):
  the Rust HTTP server (``SGLANG_RUST_SERVER``), gRPC mode, the Rust benchmark client and multimodal
  processors, each imported at use time through ``load_rust_extension``;
* ``sglang/multimodal_gen/`` (the diffusion runtime): never imported by ``sglang.srt``.

Kept: everything else, the Rust radix-tree core included (``mem_cache/rust_tree_core``; the runs select SGLang's
Python tree core, see run.sh) and every model file (SGLang's model registry imports them all). ``RECORD`` is
rewritten without the removed files, so pip installs the result like the original.
"""

from __future__ import annotations

import re
import sys
import zipfile

REMOVED = (
    re.compile(r"^sglang/srt/rust_extensions/_(server|grpc|bench|multimodal)\..*\.so$"),
    re.compile(r"^sglang/multimodal_gen/"),
)


def slim(src: str, dst: str) -> tuple[int, int]:
    """Write ``dst`` = ``src`` minus :data:`REMOVED`; returns (files removed, compressed bytes removed)."""
    removed: set[str] = set()
    removed_bytes = 0
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
        record = next(name for name in zin.namelist() if name.endswith(".dist-info/RECORD"))
        for info in zin.infolist():
            if any(pattern.search(info.filename) for pattern in REMOVED):
                removed.add(info.filename)
                removed_bytes += info.compress_size
            elif info.filename != record:
                zout.writestr(info, zin.read(info.filename), compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
        lines = [line for line in zin.read(record).decode().splitlines() if line.split(",")[0] not in removed]
        zout.writestr(record, "\n".join(lines) + "\n")
    return len(removed), removed_bytes


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    count, nbytes = slim(sys.argv[1], sys.argv[2])
    print(f"slim_wheel: removed {count} files ({nbytes / 1e6:.1f} MB compressed) -> {sys.argv[2]}")
