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

# The F32 GGUF of SmolLM2, made once from the packaged Q4_1 file by llama-quantize and cached: what
# shrink and llama.cpp both start from in the speed benchmarks (needs LLAMA=1). Prints its path.
smollm2_f32() {
  local cache="${SHRINK_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/shrink}"
  local f32="$cache/bench/smollm2-f32.gguf"
  if [ ! -f "$f32" ]; then
    mkdir -p "$(dirname "$f32")"
    "$BIN/llama-quantize" --allow-requantize "$("$SHRINK" data path smollm2)" "$f32.part" F32 >/dev/null 2>&1
    mv "$f32.part" "$f32"
  fi
  echo "$f32"
}
