#!/usr/bin/env bash
# Hashes of what shrink writes, for showing that a refactor changes no byte: the README's quantize
# (RTN, GPTQ, AWQ, GPTQ to a compressed-tensors folder), prune (unstructured, N:M, heads, layers),
# distill (2 steps, and 2 steps of QAT), a search on a tiny random model, a pipeline run on that tiny
# model, and every example pipeline's dry-run plan. Calibration is cut to a few short windows so the
# whole set takes minutes; the code paths are the full ones.
#
#   scripts/artifact-hashes.sh [OUT.txt]    # default: target/artifact-hashes.txt
#   diff before.txt after.txt               # empty when every artifact is byte-identical
#
# SHRINK_BIN=/path/to/shrink hashes that binary instead of building this tree (so a copy of the
# old binary can be hashed while the tree changes).
set -euo pipefail
cd "$(dirname "$0")/.."
out_file="${1:-target/artifact-hashes.txt}"
if [[ -n "${SHRINK_BIN:-}" ]]; then
  shrink="$SHRINK_BIN"
else
  cargo build --release -p shrink-cli >&2
  shrink="$PWD/${CARGO_TARGET_DIR:-target}/release/shrink"
fi
"$shrink" data fetch smollm2 shakespeare minilm >&2
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
small=(--samples 4 --seq-len 64)
train=(--steps 2 --batch 1 --seq-len 64 --eval-every 2 --checkpoint-every 2)
step() { echo "[artifacts] $*" >&2; "$shrink" "$@" >/dev/null; }

step quantize smollm2 --method rtn --format gguf:q4_0 -o "$work/rtn-q4_0.gguf"
step quantize smollm2 --method gptq --preset q4_k_m "${small[@]}" -o "$work/gptq-q4_k_m.gguf"
step quantize smollm2 --method awq --format gguf:q4_0 "${small[@]}" -o "$work/awq-q4_0.gguf"
step quantize smollm2 --method gptq --format hf --bits 4 --group 64 "${small[@]}" -o "$work/gptq-w4-hf"
step prune smollm2 --method wanda --sparsity 0.5 "${small[@]}" -o "$work/wanda.gguf"
step prune smollm2 --method sparsegpt --sparsity 2:4 "${small[@]}" -o "$work/sparsegpt-2of4.gguf"
step prune smollm2 --method heads --fraction 0.25 "${small[@]}" -o "$work/heads.gguf"
step prune smollm2 --method layers --fraction 0.25 "${small[@]}" -o "$work/layers.gguf"
step prune minilm --method wanda --sparsity 0.5 --format hf "${small[@]}" -o "$work/minilm-wanda"
step distill smollm2 --layers every:2 "${train[@]}" -o "$work/distill.gguf"
step distill smollm2 --qat q4_0 --calib-samples 4 "${train[@]}" -o "$work/qat-q4_0.gguf"

# A tiny model (2 blocks of width 64, SmolLM2's vocabulary, one distillation step from random) for
# the search and a whole run.
step distill smollm2 --student-config num_hidden_layers=2 --student-config hidden_size=64 \
  --student-config intermediate_size=256 --student-config num_attention_heads=4 \
  --student-config num_key_value_heads=2 --steps 1 --batch 1 --seq-len 64 --eval-every 0 \
  --eval-windows 1 --checkpoint-every 0 -o "$work/tiny.gguf"
cat >"$work/tiny.toml" <<EOF
name = "tiny"
seed = 0
[model]
source = "$work/tiny.gguf"
[data]
calib = "shakespeare:calib"
eval = "shakespeare:eval"
samples = 4
seq_len = 64
[eval]
ctx = 128
chunks = 2
prompts = []
prefill_tokens = 16
decode_tokens = 4
[[stage]]
kind = "search"
name = "search"
input = "model"
formats = ["q8_0", "q5_0", "q4_0"]
embedding_formats = ["q8_0"]
[stage.budget]
target_bpw = 5.0
rounds = 2
[[stage]]
kind = "prune.wanda"
name = "wanda"
input = "model"
sparsity = 0.5
[[stage]]
kind = "quantize.gptq"
name = "gptq"
input = "wanda"
preset = "q4_0"
EOF
step run "$work/tiny.toml" -o "$work/tiny-run"

{
  # (tiny.toml is an input, and names this run's temporary folder.)
  (cd "$work" && find . -type f ! -path './tiny-run/*' ! -name '*.log' ! -name 'log.json' \
    ! -name 'tiny.toml' ! -path '*.distill/*' | LC_ALL=C sort | xargs sha256sum)
  # The run folder: models and stage outputs (reports carry timings, so they are left out).
  (cd "$work" && find tiny-run -type f \( -name '*.gguf' -o -name '*.safetensors' \) \
    | LC_ALL=C sort | xargs sha256sum)
  for p in pipelines/*.toml; do
    echo "$("$shrink" run "$p" --dry-run --json | sha256sum | cut -c1-64)  dry-run:$p"
  done
} >"$out_file"
echo "[artifacts] $(wc -l <"$out_file") hashes in $out_file" >&2
