#!/usr/bin/env bash
# The test command (README and CI): fetch the demo model and text (sha256-checked, cached), build
# llama.cpp's reference tools from the vendored source (cached), then run every test, including the
# real-model tests against llama.cpp, the default pipeline on SmolLM2 and the check that its
# report.html renders in headless Chromium, and SparseGPT against an independent numpy
# implementation, and GPTQ split over two MPI processes (the `mpi` feature, built against
# Debian's OpenMPI), then the client checks (scripts/check-clients.sh). Extra arguments go to
# `cargo test` (and skip the client checks).
set -euo pipefail
cd "$(dirname "$0")/.."
# cmake builds llama.cpp; Debian's chromium renders report.html; OpenMPI (and libclang, for the
# bindings' generator) builds and runs the `mpi` feature.
missing=()
command -v cmake >/dev/null || missing+=(cmake)
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v mpirun >/dev/null || missing+=(openmpi-bin)
command -v mpicc >/dev/null || missing+=(libopenmpi-dev)
ls /usr/lib/llvm-*/lib/libclang.so >/dev/null 2>&1 || missing+=(libclang-dev)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[test] installing ${missing[*]}" >&2
    apt-get update -qq >&2 && apt-get install -y -qq "${missing[@]}" >&2
  else
    echo "[test] needed: ${missing[*]} (apt-get install ${missing[*]})" >&2
    exit 2
  fi
fi
# numpy runs the independent reference implementations in scripts/reference/.
if ! python3 -c "import numpy" 2>/dev/null; then
  echo "[test] installing numpy" >&2
  python3 -m pip install --quiet --user numpy >&2 \
    || python3 -m pip install --quiet --user --break-system-packages numpy >&2
fi
# The tests write up to 2.5 GB of temporary files at once (measured on the real-model tests) and
# the release build takes a few more: say how much room there is, so that a run that fails for
# want of disk says so first.
free_mb=$(df -Pm "${TMPDIR:-/tmp}" . | awk 'NR > 1 { print $4 }' | sort -n | head -1)
echo "[test] free disk: ${free_mb} MB (temporary files and target/)" >&2
if [ "${free_mb:-0}" -lt 6000 ]; then
  echo "[test] warning: under 6 GB free; the real-model tests may fail with 'No space left on device'" >&2
fi
export SHRINK_LLAMA_CPP_BIN="$(scripts/build-llama-cpp.sh)"
cargo build --release -p shrink-cli --features shrink-cli/mpi
"${CARGO_TARGET_DIR:-target}/release/shrink" data fetch smollm2 gemma3 olmo-tasks shakespeare setuptools-docs click-code pip-docs requests-code minilm
export SHRINK_REAL_TESTS=require
cargo test --workspace --release --features shrink-cli/mpi "$@"
# The exports loaded by the libraries their users load them with, scored against shrink eval
# (issue #22; a cached venv of torch, transformers, compressed-tensors, sentence-transformers):
# on a whole run, not when arguments narrow `cargo test` to some tests.
if [ $# -eq 0 ]; then
  scripts/check-clients.sh "${CARGO_TARGET_DIR:-target}/release/shrink"
fi
