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
