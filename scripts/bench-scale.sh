#!/usr/bin/env bash
# Scaling benchmark (issue #19): a random-weight model with Llama-3-8B's exact shapes
# (`shrink synth llama3-8b`, sharded bf16, ~16 GB) quantized block by block, with peak RSS and wall
# time of every step, against llama-quantize on the same model (its F16 GGUF written by shrink), in
# one run. Needs ~35 GB of disk under OUT; files are removed as soon as they are measured.
#
#   scripts/bench-scale.sh            # OUT=target/bench/scale THREADS=2
#   STEPS=gptq scripts/bench-scale.sh # only some steps: rtn, llama-quantize, gptq, prune, spill,
#                                     # activations, pipeline, structured, search (default all)
#
# Prints one line per step: step, peak RSS (MB), wall time (s). The gptq step quantizes the first
# GPTQ_BLOCKS (4) blocks of the 8B shapes by GPTQ to Q4_0 on 16 × 512 calibration tokens and prints
# seconds per block (forward passes and Hessians apart from GPTQ itself) and the projection to 32.
# The prune step prunes the whole 8B model by magnitude (50%, per layer) to an F16 GGUF block by
# block, and llama.cpp loads the result. The spill step runs Wanda (50%) with the calibration
# activations in memory and spilled to disk (--spill-activations): on SPILL_BLOCKS (2) blocks of
# the 8B shapes with 32 × 512 tokens, and on SmolLM2 with 128 × 512, where both files are compared
# byte for byte. The activations step quantizes SmolLM2 by GPTQ to Q4_0 (128 × 512 calibration
# tokens) with the activations kept in f32, bf16 and f16 (--activations-dtype), and scores each
# file in llama-perplexity (-c 512) on Hamlet (its first 32 chunks, and whole) and on the
# off-domain text (pip-docs:eval, pip's documentation, whole): the quality cost of half the
# activation memory, with peak RSS and time. The pipeline step runs a pipeline on the 8B shapes
# (RTN into the q4_k_m mix, PIPELINE_CHUNKS (4) chunks of 512 Hamlet tokens): held whole its run
# would need ~100 GB, so it evaluates block by block ([eval] stream = "auto"); its peak RSS against
# the estimate `shrink validate` prints, and each model's perplexity and KL. The structured step
# prunes block by block: the whole 8B model's width by 25% (magnitude) to an F16 GGUF that
# llama.cpp loads; MLP channels by 25% (activation) and one of STRUCTURED_BLOCKS (2) layers (Block
# Influence) of the 8B shapes with 16 × 512 calibration tokens; and SmolLM2's width (activation,
# 64 × 512) and depth (Block Influence) by 25%, as pipelines/smollm2-structured.toml does. The
# search step runs a pipeline's search stage on the 8B shapes, read block by block.
BENCH=scale LLAMA=1
source "$(dirname "$0")/bench-common.sh"
hamlet="$("$SHRINK" data path shakespeare:eval)"
measure() { # name, command...
  local name="$1"; shift
  # TRACE=1: the memory of every step over time too ($OUT/NAME.rss.tsv, scripts/rss-trace.sh).
  local trace=(); [ -n "${TRACE:-}" ] && trace=(scripts/rss-trace.sh "$OUT/$name.rss.tsv")
  /usr/bin/time -f "%M %e" -o "$OUT/$name.time" "${trace[@]}" "$@" >"$OUT/$name.log" 2>&1
  read -r kb s <"$OUT/$name.time"
  printf '%-34s %8.0f MB %8.1f s\n' "$name" "$((kb / 1024))" "$s"
}
STEPS="${STEPS:-rtn llama-quantize gptq prune spill activations pipeline structured search}"
want() { [[ " $STEPS " == *" $1 "* ]]; }
if want rtn || want llama-quantize || want prune || want pipeline || want structured; then
  [ -d "$OUT/synth-8b" ] || measure synth "$SHRINK" synth llama3-8b -o "$OUT/synth-8b"
fi
if want rtn; then
measure shrink-rtn-q4_k_m-from-bf16 "$SHRINK" --threads "$THREADS" quantize "$OUT/synth-8b" \
  --method rtn --preset q4_k_m -o "$OUT/rtn-q4_k_m.gguf"
# llama.cpp loads it: two chunks of 128 tokens.
measure llama-perplexity-on-shrink-q4_k_m "$BIN/llama-perplexity" -m "$OUT/rtn-q4_k_m.gguf" \
  -f "$hamlet" -c 128 --chunks 2 -t "$THREADS"
grep -o 'Final estimate: PPL = [0-9.]*' "$OUT/llama-perplexity-on-shrink-q4_k_m.log"
rm -f "$OUT/rtn-q4_k_m.gguf"
fi
if want llama-quantize; then
measure shrink-convert-f16-gguf "$SHRINK" convert "$OUT/synth-8b" --to gguf "$OUT/f16.gguf" --dtype f16
measure llama-quantize-q4_k_m "$BIN/llama-quantize" "$OUT/f16.gguf" "$OUT/lq-q4_k_m.gguf" Q4_K_M "$THREADS"
ls -l "$OUT/lq-q4_k_m.gguf" | awk '{printf "llama-quantize Q4_K_M: %.1f MB\n", $5 / 1e6}'
rm -f "$OUT/lq-q4_k_m.gguf"
measure shrink-rtn-q4_k_m-from-f16-gguf "$SHRINK" --threads "$THREADS" quantize "$OUT/f16.gguf" \
  --method rtn --preset q4_k_m -o "$OUT/rtn-f16-q4_k_m.gguf"
ls -l "$OUT/rtn-f16-q4_k_m.gguf" | awk '{printf "shrink Q4_K_M: %.1f MB\n", $5 / 1e6}'
rm -f "$OUT/rtn-f16-q4_k_m.gguf"
rm -f "$OUT/f16.gguf"
fi
if want gptq; then
  blocks="${GPTQ_BLOCKS:-4}"
  model="$OUT/synth-8b-$blocks"
  [ -d "$model" ] || "$SHRINK" synth llama3-8b --layers "$blocks" -o "$model" >/dev/null
  measure "shrink-gptq-q4_0-$blocks-blocks" "$SHRINK" --threads "$THREADS" quantize "$model" \
    --method gptq --format gguf:q4_0 --samples 16 --seq-len 512 --json -o "$OUT/gptq-q4_0.gguf"
  python3 - "$OUT/shrink-gptq-q4_0-$blocks-blocks.log" "$OUT/shrink-gptq-q4_0-$blocks-blocks.time" "$blocks" <<'PY'
import json, re, sys
text = open(sys.argv[1]).read()
summary = json.JSONDecoder().raw_decode(text[text.index("{"):])[0]
wall = float(open(sys.argv[2]).read().split()[1])
blocks = int(sys.argv[3])
per_block = {}
for layer in summary["layers"]:
    b = int(re.search(r"layers\.(\d+)\.", layer["name"]).group(1))
    per_block[b] = per_block.get(b, 0.0) + layer["wall_s"]
gptq = sum(per_block.values()) / blocks
print(f"gptq: {wall / blocks:.1f} s per block over {blocks} blocks (GPTQ itself {gptq:.1f} s, "
      f"forwards and Hessians {(wall - gptq * blocks) / blocks:.1f} s); 32 blocks: "
      f"{32 * wall / blocks / 60:.0f} min")
PY
  rm -f "$OUT/gptq-q4_0.gguf"
fi
if want prune; then
  measure shrink-magnitude-50-f16 "$SHRINK" --threads "$THREADS" prune "$OUT/synth-8b" \
    --method magnitude --sparsity 0.5 --dtype f16 --json -o "$OUT/magnitude-f16.gguf"
  python3 -c 'import json,sys; t=open(sys.argv[1]).read(); m=json.JSONDecoder().raw_decode(t[t.index("{"):])[0]["memory"]; print("prune estimate: %.0f MB" % (m["estimated_peak_bytes"]/2**20))' \
    "$OUT/shrink-magnitude-50-f16.log"
  ls -l "$OUT/magnitude-f16.gguf" | awk '{printf "pruned F16 GGUF: %.1f MB\n", $5 / 1e6}'
  measure llama-perplexity-on-shrink-pruned "$BIN/llama-perplexity" -m "$OUT/magnitude-f16.gguf" \
    -f "$hamlet" -c 128 --chunks 2 -t "$THREADS"
  grep -o 'Final estimate: PPL = [0-9.]*' "$OUT/llama-perplexity-on-shrink-pruned.log"
  rm -f "$OUT/magnitude-f16.gguf"
fi
if want spill; then
  blocks="${SPILL_BLOCKS:-2}"
  model="$OUT/synth-8b-$blocks"
  [ -d "$model" ] || "$SHRINK" synth llama3-8b --layers "$blocks" -o "$model" >/dev/null
  estimate() {
    python3 -c 'import json,sys; t=open(sys.argv[1]).read(); m=json.JSONDecoder().raw_decode(t[t.index("{"):])[0]["memory"]; print("  estimate %.0f MB, spilled: %s" % (m["estimated_peak_bytes"]/2**20, m["spilled_activations"]))' "$1"
  }
  for how in memory spilled; do
    flag=(); [ "$how" = spilled ] && flag=(--spill-activations)
    measure "shrink-wanda-8b-$blocks-blocks-$how" "$SHRINK" --threads "$THREADS" prune "$model" \
      --method wanda --sparsity 0.5 --samples 32 --seq-len 512 --json "${flag[@]}" \
      -o "$OUT/wanda-8b-$how.gguf"
    estimate "$OUT/shrink-wanda-8b-$blocks-blocks-$how.log"
    measure "shrink-wanda-smollm2-$how" "$SHRINK" --threads "$THREADS" prune smollm2 \
      --method wanda --sparsity 0.5 --json "${flag[@]}" -o "$OUT/wanda-smollm2-$how.gguf"
    estimate "$OUT/shrink-wanda-smollm2-$how.log"
  done
  for m in 8b smollm2; do
    cmp "$OUT/wanda-$m-memory.gguf" "$OUT/wanda-$m-spilled.gguf" && echo "wanda $m: same bytes"
    rm -f "$OUT/wanda-$m-memory.gguf" "$OUT/wanda-$m-spilled.gguf"
  done
fi
if want activations; then
  "$SHRINK" data fetch pip-docs >/dev/null
  docs="$OUT/pip-docs.txt"
  # The split's files concatenated, as shrink reads DATASET:SPLIT.
  "$SHRINK" data path pip-docs:eval | xargs cat >"$docs"
  for dtype in f32 bf16 f16; do
    measure "shrink-gptq-smollm2-activations-$dtype" "$SHRINK" --threads "$THREADS" quantize smollm2 \
      --method gptq --format gguf:q4_0 --activations-dtype "$dtype" --json \
      -o "$OUT/gptq-activations-$dtype.gguf"
    # Hamlet's first 32 chunks (the README's protocol), all of Hamlet, all of the docs.
    for text in hamlet-32 hamlet docs; do
      file="$hamlet" chunks=(); [ "$text" = docs ] && file="$docs"
      [ "$text" = hamlet-32 ] && chunks=(--chunks 32)
      "$BIN/llama-perplexity" -m "$OUT/gptq-activations-$dtype.gguf" -f "$file" -c 512 \
        "${chunks[@]}" -t "$THREADS" >"$OUT/ppl-$dtype-$text.log" 2>&1
      printf '  %s on %s: %s\n' "$dtype" "$text" \
        "$(grep -o 'Final estimate: PPL = [0-9.]* +/- [0-9.]*' "$OUT/ppl-$dtype-$text.log")"
    done
  done
  for dtype in bf16 f16; do
    cmp -s "$OUT/gptq-activations-f32.gguf" "$OUT/gptq-activations-$dtype.gguf" \
      && echo "$dtype: the f32 file's bytes" || echo "$dtype: other bytes than f32"
  done
  rm -f "$OUT"/gptq-activations-*.gguf
fi
if want pipeline; then
  cat >"$OUT/pipeline-8b.toml" <<EOF
name = "synth-8b-rtn-q4_k_m"
[model]
source = "$OUT/synth-8b"
[data]
eval = "shakespeare:eval"
[[stage]]
kind = "quantize.rtn"
name = "q4_k_m"
preset = "q4_k_m"
[eval]
ctx = 512
chunks = ${PIPELINE_CHUNKS:-4}
prompts = []
decode_tokens = 0
[export]
formats = ["gguf"]
EOF
  "$SHRINK" validate "$OUT/pipeline-8b.toml" --json | python3 -c 'import json,sys; d=json.load(sys.stdin); print("  estimate %.0f MB, block by block: %s" % (d["estimated_peak_bytes"]/2**20, d["eval_block_by_block"]))'
  rm -rf "$OUT/run-8b"
  measure shrink-run-8b-rtn-q4_k_m "$SHRINK" --threads "$THREADS" run "$OUT/pipeline-8b.toml" \
    -o "$OUT/run-8b" --json
  python3 - "$OUT/run-8b" <<'PY'
import json, sys
run = sys.argv[1]
report = json.load(open(f"{run}/report.json"))
stage = json.load(open(f"{run}/stages/q4_k_m/stage.json"))
print(f"  block by block: {report['eval']['block_by_block']}; stage peak "
      f"{stage['peak_rss_bytes'] / 2**20:.0f} MB, {stage['wall_s']:.0f} s")
for r in report["rows"]:
    print(f"  {r['name']}: ppl {r['perplexity']:.4f}, KL {r['kl_mean']}, "
          f"top-1 {r['top1_agreement']}, {r['size_bytes'] / 1e6:.1f} MB")
PY
  rm -rf "$OUT/run-8b"
fi
if want structured; then
  memory() { # the job's estimate beside its peak RSS
    python3 -c 'import json,sys; t=open(sys.argv[1]).read(); s=json.JSONDecoder().raw_decode(t[t.index("{"):])[0]; m=s["memory"]; print("  estimate %.0f MB; shape %s" % (m["estimated_peak_bytes"]/2**20, s["config"]))' "$1"
  }
  measure shrink-width-25-8b-f16 "$SHRINK" --threads "$THREADS" prune "$OUT/synth-8b" \
    --method width --fraction 0.25 --importance magnitude --dtype f16 --json -o "$OUT/width-f16.gguf"
  memory "$OUT/shrink-width-25-8b-f16.log"
  ls -l "$OUT/width-f16.gguf" | awk '{printf "  width-pruned F16 GGUF: %.1f MB\n", $5 / 1e6}'
  measure llama-perplexity-on-shrink-width "$BIN/llama-perplexity" -m "$OUT/width-f16.gguf" \
    -f "$hamlet" -c 128 --chunks 2 -t "$THREADS"
  grep -o 'Final estimate: PPL = [0-9.]*' "$OUT/llama-perplexity-on-shrink-width.log"
  rm -f "$OUT/width-f16.gguf"
  blocks="${STRUCTURED_BLOCKS:-2}"
  model="$OUT/synth-8b-$blocks"
  [ -d "$model" ] || "$SHRINK" synth llama3-8b --layers "$blocks" -o "$model" >/dev/null
  measure "shrink-channels-25-8b-$blocks-blocks" "$SHRINK" --threads "$THREADS" prune "$model" \
    --method channels --fraction 0.25 --samples 16 --seq-len 512 --dtype f16 --json \
    -o "$OUT/channels.gguf"
  memory "$OUT/shrink-channels-25-8b-$blocks-blocks.log"
  measure "shrink-layers-8b-$blocks-blocks" "$SHRINK" --threads "$THREADS" prune "$model" \
    --method layers --fraction 0.5 --samples 16 --seq-len 512 --dtype f16 --json \
    -o "$OUT/layers.gguf"
  memory "$OUT/shrink-layers-8b-$blocks-blocks.log"
  rm -f "$OUT/channels.gguf" "$OUT/layers.gguf"
  measure shrink-width-25-smollm2 "$SHRINK" --threads "$THREADS" prune smollm2 --method width \
    --fraction 0.25 --samples 64 --seq-len 512 --json -o "$OUT/smollm2-width.gguf"
  memory "$OUT/shrink-width-25-smollm2.log"
  measure shrink-layers-25-smollm2 "$SHRINK" --threads "$THREADS" prune smollm2 --method layers \
    --fraction 0.25 --samples 64 --seq-len 512 --json -o "$OUT/smollm2-layers.gguf"
  memory "$OUT/shrink-layers-25-smollm2.log"
  sha256sum "$OUT/smollm2-width.gguf" "$OUT/smollm2-layers.gguf" | sed 's/^/  /'
  rm -f "$OUT/smollm2-width.gguf" "$OUT/smollm2-layers.gguf"
fi
if want search; then
  # A search stage on SEARCH_BLOCKS (2) blocks of the 8B shapes, read block by block: the
  # sensitivity (q8_0/q4_k/q4_0 codes by SEARCH_WEIGHTS, rtn by default: GPTQ's own cost on these
  # shapes is the gptq step's; 8 × 256 tokens), up to 2 verified mixes; its peak RSS against the
  # estimate, seconds per linear measured.
  blocks="${SEARCH_BLOCKS:-2}"
  model="$OUT/synth-8b-$blocks"
  [ -d "$model" ] || "$SHRINK" synth llama3-8b --layers "$blocks" -o "$model" >/dev/null
  cat >"$OUT/search-8b.toml" <<EOF
name = "synth-8b-search"
[model]
source = "$model"
[data]
samples = 24
seq_len = 512
[[stage]]
kind = "search"
name = "search"
formats = ["q8_0", "q4_k", "q4_0"]
weights = "${SEARCH_WEIGHTS:-rtn}"
[stage.budget]
target_bpw = 5.0
rounds = 2
[eval]
ctx = 512
chunks = 2
prompts = []
decode_tokens = 0
stream = "always"
[export]
formats = ["gguf"]
EOF
  "$SHRINK" validate "$OUT/search-8b.toml" --json | python3 -c 'import json,sys; d=json.load(sys.stdin); print("  estimate %.0f MB" % (d["estimated_peak_bytes"]/2**20))'
  rm -rf "$OUT/run-search"
  measure "shrink-search-8b-$blocks-blocks" "$SHRINK" --threads "$THREADS" run \
    "$OUT/search-8b.toml" -o "$OUT/run-search" --json
  python3 - "$OUT/run-search" <<'PY'
import json, sys
stage = json.load(open(f"{sys.argv[1]}/stages/search/stage.json"))
s = stage["search"]
linears = sum(1 for it in s["sensitivity"] if it["name"] != "embeddings")
print(f"  stage peak {stage['peak_rss_bytes'] / 2**20:.0f} MB "
      f"(estimate {stage.get('estimated_peak_bytes', 0) / 2**20:.0f} MB), {stage['wall_s']:.0f} s; "
      f"sensitivity {s['sensitivity_s']:.0f} s ({s['sensitivity_s'] / linears:.1f} s per linear)")
for t in s["outcome"]["tried"]:
    print(f"  round {t['round']}: {t['size_bytes'] / 1e6:.1f} MB, KL {t['score']['kl']:.5f}, "
          f"met {t['met']}")
PY
  rm -rf "$OUT/run-search"
fi
