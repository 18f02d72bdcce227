#!/usr/bin/env bash
# Client checks (issue #22): shrink's exports loaded by the libraries their users load them with
# (torch, transformers, compressed-tensors, sentence-transformers, gguf; versions pinned in
# scripts/clients/requirements.txt), each scored against `shrink eval` / `shrink embed` on the same
# tokens. The venv is built once per requirements file and cached under $SHRINK_CACHE_DIR
# (default ~/.cache/shrink; about 5.8 GB, torch's CUDA libraries included). Usage:
#   scripts/check-clients.sh [SHRINK_BINARY] [WORK_DIR]
# Writes WORK_DIR/clients.json (default: a temporary folder, removed afterwards); exit 1 when a
# check fails. Exports already in a given WORK_DIR are reused, not remade (for iterating on the
# checks): pass a fresh folder to check a new binary's writers.
set -euo pipefail
cd "$(dirname "$0")/.."
SHRINK="${1:-${CARGO_TARGET_DIR:-target}/release/shrink}"
CACHE="${SHRINK_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/shrink}"
REQ=scripts/clients/requirements.txt
VENV="$CACHE/clients/venv-$(sha256sum "$REQ" | cut -c1-12)"
log() { echo "[check-clients] $*" >&2; }
if [ ! -f "$VENV/.complete" ]; then
  log "building the client venv in $VENV"
  rm -rf "$VENV"
  python3 -m venv "$VENV" || { log "python3 -m venv failed (Debian: apt-get install python3-venv)"; exit 2; }
  "$VENV/bin/pip" install --quiet --no-cache-dir -r "$REQ" >&2
  touch "$VENV/.complete"
fi
if [ $# -ge 2 ]; then
  WORK="$2"
else
  WORK=$(mktemp -d)
  trap 'rm -rf "$WORK"' EXIT
fi
"$VENV/bin/python" scripts/clients/check.py "$(realpath "$SHRINK")" "$WORK"
