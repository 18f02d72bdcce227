# Sourced by the bench-*.sh scripts after they set BENCH (the benchmark's name) and, when they
# score with llama.cpp, LLAMA=1: strict mode, the repository root as working folder, and exported
# for scripts/benchlib.py: THREADS (default 2), SHRINK (a release build), OUT (default
# target/bench/$BENCH, created) and BIN (llama.cpp's tools, built once and cached).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export THREADS="${THREADS:-2}"
TARGET="${CARGO_TARGET_DIR:-$PWD/target}"
# SHRINK set by the caller: that binary (a copy, so that a build meanwhile cannot change it).
if [ -z "${SHRINK:-}" ]; then
  cargo build --release -p shrink-cli >&2
  export SHRINK="$TARGET/release/shrink"
fi
export OUT="${OUT:-$PWD/target/bench/$BENCH}"
mkdir -p "$OUT"
if [ -n "${LLAMA:-}" ]; then
  BIN="$(scripts/build-llama-cpp.sh)"
  export BIN
fi
export PYTHONPATH="$PWD/scripts${PYTHONPATH:+:$PYTHONPATH}"

# The F32 GGUF of a packaged model (`smollm2`, `gemma3`), made once from its quantized file by
# llama-quantize and cached: what shrink and llama.cpp both start from in the benchmarks (needs
# LLAMA=1). Prints its path.
model_f32() {
  local cache="${SHRINK_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/shrink}"
  local f32="$cache/bench/$1-f32.gguf"
  if [ ! -f "$f32" ]; then
    mkdir -p "$(dirname "$f32")"
    "$SHRINK" data fetch "$1" >/dev/null
    "$BIN/llama-quantize" --allow-requantize "$("$SHRINK" data path "$1")" "$f32.part" F32 >/dev/null 2>&1
    mv "$f32.part" "$f32"
  fi
  echo "$f32"
}
smollm2_f32() { model_f32 smollm2; }
