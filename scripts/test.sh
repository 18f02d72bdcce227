#!/usr/bin/env bash
# The test command (README and CI): fetch the demo model and text (sha256-checked, cached), build
# llama.cpp's reference tools from the vendored source (cached), then run every test, including the
# real-model tests against llama.cpp. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cmake >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[test] installing cmake" >&2
    apt-get update -qq >&2 && apt-get install -y -qq cmake >&2
  else
    echo "[test] cmake is required to build the llama.cpp reference tools (apt-get install cmake)" >&2
    exit 2
  fi
fi
export SHRINK_LLAMA_CPP_BIN="$(scripts/build-llama-cpp.sh)"
cargo build --release -p shrink-cli
target/release/shrink data fetch smollm2 shakespeare
export SHRINK_REAL_TESTS=require
cargo test --workspace --release "$@"
