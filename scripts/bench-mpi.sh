#!/usr/bin/env bash
# MPI benchmark (issue #19): GPTQ with its calibration split over 2 MPI ranks of 1 thread each
# against 1 process of 2 threads, on SmolLM2 (Q4_0, SAMPLES × 512 calibration tokens, default 128)
# and on BLOCKS (default 1) blocks of the Llama-3-8B shapes (`shrink synth llama3-8b --layers N`,
# Q4_0, 16 × 512), in one run. Checks that both write the same bytes. Needs OpenMPI
# (apt-get install openmpi-bin libopenmpi-dev libclang-dev); builds shrink with the `mpi` feature
# unless SHRINK names such a build.
#
#   scripts/bench-mpi.sh                 # OUT=target/bench/mpi
#   STEPS=smollm2 scripts/bench-mpi.sh   # only one model: smollm2, 8b (default both)
#
# Prints one line per run: wall time (s), peak RSS of the highest rank (MB, shrink's own reading
# of every rank), and whether the two runs' files are identical.
BENCH=mpi
if [ -z "${SHRINK:-}" ]; then
  cargo build --release -p shrink-cli --features mpi >&2
  export SHRINK="${CARGO_TARGET_DIR:-$PWD/target}/release/shrink"
fi
source "$(dirname "$0")/bench-common.sh"
root=()
[ "$(id -u)" = 0 ] && root=(--allow-run-as-root)
run() { # name, ranks, threads, shrink arguments...
  local name="$1" ranks="$2" threads="$3"; shift 3
  local start end
  start=$(date +%s.%N)
  if [ "$ranks" = 1 ]; then
    "$SHRINK" --threads "$threads" "$@" --json >"$OUT/$name.json" 2>"$OUT/$name.log"
  else
    mpirun "${root[@]}" --oversubscribe -n "$ranks" \
      "$SHRINK" --threads "$threads" "$@" --json >"$OUT/$name.json" 2>"$OUT/$name.log"
  fi
  end=$(date +%s.%N)
  python3 - "$OUT/$name.json" "$name" "$start" "$end" <<'PY'
import json, sys
summary = json.load(open(sys.argv[1]))
memory = summary["memory"]
peak = memory.get("peak_rss_bytes_any_rank", memory["peak_rss_bytes"])
print(f"{sys.argv[2]:<34} {float(sys.argv[4]) - float(sys.argv[3]):8.1f} s {peak / 1e6:8.0f} MB "
      f"(estimate per rank {memory['estimated_peak_bytes'] / 1e6:.0f} MB)")
PY
}
compare() { # a, b
  if cmp -s "$OUT/$1" "$OUT/$2"; then echo "same bytes: $1 = $2"; else echo "DIFFERENT: $1 $2"; exit 1; fi
}
STEPS="${STEPS:-smollm2 8b}"
want() { [[ " $STEPS " == *" $1 "* ]]; }
if want smollm2; then
  job=(quantize smollm2 --method gptq --format gguf:q4_0 --samples "${SAMPLES:-128}" --seq-len 512)
  run smollm2-1-rank-2-threads 1 2 "${job[@]}" -o "$OUT/smollm2-1x2.gguf"
  run smollm2-2-ranks-1-thread 2 1 "${job[@]}" -o "$OUT/smollm2-2x1.gguf"
  compare smollm2-1x2.gguf smollm2-2x1.gguf
  rm -f "$OUT"/smollm2-*.gguf
fi
if want 8b; then
  blocks="${BLOCKS:-1}"
  model="$OUT/synth-8b-$blocks"
  [ -d "$model" ] || "$SHRINK" synth llama3-8b --layers "$blocks" -o "$model" >/dev/null
  job=(quantize "$model" --method gptq --format gguf:q4_0 --samples 16 --seq-len 512)
  run "8b-$blocks-blocks-1-rank-2-threads" 1 2 "${job[@]}" -o "$OUT/8b-1x2.gguf"
  run "8b-$blocks-blocks-2-ranks-1-thread" 2 1 "${job[@]}" -o "$OUT/8b-2x1.gguf"
  compare 8b-1x2.gguf 8b-2x1.gguf
  rm -f "$OUT"/8b-*.gguf
fi
