#!/bin/bash
# Fills the ignored folders a GPU call carries. Runs on the CPU dev machine (needs PyPI), from anywhere:
#   bash benchmarks/gpu/prepare.sh
# Result (about 30 MB, inside the 64 MiB a call carries with the working tree):
#   .cache/gpu/wheels/     the slimmed sglang 0.5.23 cp312 wheel (slim_wheel.py), the dependency wheels of
#                          wheels.txt (what the GPU image lacks) and this project's wheel (for its dist-info:
#                          the sglang.srt.plugins entry point; run.sh runs the working tree's package itself)
#   .cache/gpu/tokenizer/  SmolLM2-135M-Instruct's tokenizer files (vocab 49152), from the model `make model`
#                          converts into .cache/models/smollm2-135m-instruct (no weights are carried)
# Model shapes are the committed configs in benchmarks/gpu/models/; weights are random (run.sh, the tests).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
MODEL=${SMOLLM2_DIR:-$REPO/.cache/models/smollm2-135m-instruct}
DEST=$REPO/.cache/gpu
PY=${PYTHON:-python3}
[ -f "$MODEL/tokenizer.json" ] || { echo "prepare.sh: no tokenizer in $MODEL (run 'make model' first)" >&2; exit 1; }

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
PLATFORMS=""
for p in manylinux_2_34_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do PLATFORMS="$PLATFORMS --platform $p"; done
download() { "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
               $PLATFORMS "$@"; }

rm -rf "$DEST/wheels" "$DEST/tokenizer"
mkdir -p "$DEST/wheels" "$DEST/tokenizer"
download -d "$TMP" sglang==0.5.23
"$PY" "$HERE/slim_wheel.py" "$TMP"/sglang-0.5.23-*.whl "$DEST/wheels/$(basename "$TMP"/sglang-0.5.23-*.whl)"
sed 's/#.*//' "$HERE/wheels.txt" | grep -v '^sglang==' | grep . > "$TMP/deps.txt"
download -d "$DEST/wheels" -r "$TMP/deps.txt"
"$PY" -m pip wheel -q --no-deps -w "$DEST/wheels" "$REPO"
cp "$MODEL"/tokenizer.json "$MODEL"/tokenizer_config.json "$MODEL"/generation_config.json "$DEST/tokenizer/"
[ -f "$MODEL/chat_template.jinja" ] && cp "$MODEL/chat_template.jinja" "$DEST/tokenizer/"
echo "prepare.sh: $(ls "$DEST/wheels" | wc -l) wheels"
du -sh "$DEST/wheels" "$DEST/tokenizer"
