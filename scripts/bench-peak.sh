#!/usr/bin/env bash
# The machine's limits (issue #20, item 1): the f32 FMA peak on registers (AVX-512 and AVX2),
# f32 GEMM at shrink's shapes through candle's `gemm` crate (what the forward uses) and through
# OpenBLAS, and the memory bandwidth (STREAM triad), at 1 thread and at THREADS (default 2).
# Every later speed figure is quoted as a ratio to these. Installs Debian's libopenblas-dev when
# it is missing (as root), to build the example with the `openblas` feature.
#
#   scripts/bench-peak.sh      # prints the example's lines for each thread count
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
THREADS="${THREADS:-2}"
if ! ldconfig -p | grep -q 'libopenblas\.so '; then
  if [ "$(id -u)" = 0 ]; then
    apt-get install -y libopenblas-dev >&2
  else
    echo "libopenblas-dev is missing: apt-get install libopenblas-dev" >&2
    exit 1
  fi
fi
cargo build --release -p shrink-models --example peak --features shrink-models/openblas >&2
peak="${CARGO_TARGET_DIR:-$PWD/target}/release/examples/peak"
for threads in 1 "$THREADS"; do
  RAYON_NUM_THREADS="$threads" OPENBLAS_NUM_THREADS="$threads" "$peak"
done
