#!/usr/bin/env bash
# Builds llama.cpp's reference tools (llama-perplexity, llama-quantize, llama-imatrix, llama-tokenize,
# llama-bench)
# from the llama.cpp source vendored in the llama-cpp-python sdist, once per machine.
# Prints the directory holding the binaries. Cached under $SHRINK_CACHE_DIR (default ~/.cache/shrink).
set -euo pipefail
VERSION=0.3.36
SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
CACHE="${SHRINK_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/shrink}"
ROOT="$CACHE/llama.cpp/$VERSION"
# Built without AMX and with llama-perplexity's log flushed at exit (both below): the binaries'
# cache folder names that build.
BIN="$ROOT/bin-noamx-logflush"
BUILD="$ROOT/build-noamx"
TOOLS=(llama-perplexity llama-quantize llama-imatrix llama-tokenize llama-bench)

have_all() { for t in "${TOOLS[@]}"; do [ -x "$BIN/$t" ] || return 1; done; }
if have_all; then echo "$BIN"; exit 0; fi

log() { echo "[build-llama-cpp] $*" >&2; }
command -v cmake >/dev/null || { log "cmake is missing: install it (apt-get install cmake)"; exit 2; }
command -v python3 >/dev/null || { log "python3 with pip is needed to fetch llama-cpp-python==$VERSION"; exit 2; }

mkdir -p "$ROOT"
SDIST="$ROOT/llama_cpp_python-$VERSION.tar.gz"
if [ ! -f "$SDIST" ] || ! echo "$SHA256  $SDIST" | sha256sum -c --status; then
  log "fetching llama-cpp-python==$VERSION (sdist)"
  tmp=$(mktemp -d)
  python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python -d "$tmp" "llama-cpp-python==$VERSION" >&2
  mv "$tmp"/llama_cpp_python-$VERSION.tar.gz "$SDIST.part" && mv "$SDIST.part" "$SDIST"
  rm -rf "$tmp"
fi
echo "$SHA256  $SDIST" | sha256sum -c --status || { log "sha256 mismatch for $SDIST"; exit 1; }

SRC="$ROOT/src"
if [ ! -f "$SRC/CMakeLists.txt" ]; then
  log "unpacking vendor/llama.cpp"
  rm -rf "$SRC" "$SRC.part" && mkdir -p "$SRC.part"
  tar xzf "$SDIST" -C "$SRC.part" --strip-components=3 "llama_cpp_python-$VERSION/vendor/llama.cpp"
  mv "$SRC.part" "$SRC"
fi

# llama.cpp's logger is a leaked singleton whose worker thread prints asynchronously: a process
# that exits right after its last line can lose its tail, and llama-perplexity's last lines are its
# per-chunk values and "Final estimate". On a loaded 2-core machine that happened 5 runs in a row.
# The tool's main() (a 4-line wrapper round llama_perplexity) is rewritten to stop the logger,
# which prints every queued line, before returning; the computation is untouched.
cat > "$SRC/tools/perplexity/main.cpp" <<'CPP'
#include "log.h"

int llama_perplexity(int argc, char ** argv);

int main(int argc, char ** argv) {
    const int rc = llama_perplexity(argc, argv);
    common_log_pause(common_log_main());
    return rc;
}
CPP
log "building ${TOOLS[*]} (Release, CPU) — takes several minutes on 2 cores"
# Native ISA, but no AMX: on AMX machines (Sapphire Rapids VMs) ggml's AMX matmul segfaults in
# llama-perplexity. GCC's explicit -mno-* flags win over -march=native whatever their order.
NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
cmake -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON \
  -DCMAKE_C_FLAGS="$NO_AMX" -DCMAKE_CXX_FLAGS="$NO_AMX" >&2
cmake --build "$BUILD" --config Release -j "$(nproc)" --target "${TOOLS[@]}" >&2
mkdir -p "$BIN.part"
for t in "${TOOLS[@]}"; do cp "$BUILD/bin/$t" "$BIN.part/"; done
rm -rf "$BIN" && mv "$BIN.part" "$BIN"
echo "$BIN"
