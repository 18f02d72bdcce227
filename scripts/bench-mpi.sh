#!/usr/bin/env bash
# MPI benchmark (issue #19): GPTQ with its calibration split over 2 MPI ranks of 1 thread each
# against 1 process of 2 threads, on SmolLM2 (Q4_0, SAMPLES × 512 calibration tokens, default 128)
# and on BLOCKS (default 1) blocks of the Llama-3-8B shapes (`shrink synth llama3-8b --layers N`,
# Q4_0, 16 × 512), in one run; and `shrink eval` split by chunks the same two ways, on SmolLM2
# (all of Hamlet, ctx 512) and on the 8B blocks (block by block, EVAL_CHUNKS chunks of 512,
# default 8); and `shrink run pipelines/smollm2-sweep.toml` (RTN, 4 sweep variants, 32 chunks
# evaluated per model) as 1 process of 2 threads and as 2 ranks of 1 thread (variants dealt out,
# evaluations split by chunks). Checks that both write the same bytes (and print the same
# figures). Needs OpenMPI
# (apt-get install openmpi-bin libopenmpi-dev libclang-dev); builds shrink with the `mpi` feature
# unless SHRINK names such a build.
#
#   scripts/bench-mpi.sh                 # OUT=target/bench/mpi
#   STEPS=smollm2 scripts/bench-mpi.sh   # some steps: smollm2, 8b, eval, eval-8b, sweep (default all)
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
launch() { # name, ranks, threads, shrink arguments...: its JSON in $OUT/name.json; sets $elapsed
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
  elapsed=$(python3 -c "print(f'{$end - $start:8.1f}')")
}
run() { # name, ranks, threads, shrink arguments...: wall time and peak RSS
  launch "$@"
  python3 - "$OUT/$1.json" "$1" "$elapsed" <<'PY'
import json, sys
summary = json.load(open(sys.argv[1]))
memory = summary["memory"]
peak = memory.get("peak_rss_bytes_any_rank", memory["peak_rss_bytes"])
print(f"{sys.argv[2]:<34} {sys.argv[3]} s {peak / 1e6:8.0f} MB "
      f"(estimate per rank {memory['estimated_peak_bytes'] / 1e6:.0f} MB)")
PY
}
compare() { # a, b
  if cmp -s "$OUT/$1" "$OUT/$2"; then echo "same bytes: $1 = $2"; else echo "DIFFERENT: $1 $2"; exit 1; fi
}
STEPS="${STEPS:-smollm2 8b eval eval-8b sweep}"
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
eval_run() { # name, ranks, threads, shrink eval arguments...: wall time and the figures
  launch "$@"
  python3 - "$OUT/$1.json" "$1" "$elapsed" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{sys.argv[2]:<34} {sys.argv[3]} s  ppl {r['perplexity']['ppl']:.4f} over {r['chunks']} chunks")
PY
}
same_figures() { # a.json, b.json: the reports but their timings
  python3 - "$OUT/$1" "$OUT/$2" <<'PY' || exit 1
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
for r in (a, b):
    for k in ("wall_s", "tokens_per_s"):
        r.pop(k, None)
if a != b:
    sys.exit(f"DIFFERENT: {sys.argv[1]} {sys.argv[2]}")
print(f"same figures: {sys.argv[1]} = {sys.argv[2]}")
PY
}
if want eval; then
  job=(eval smollm2 --text shakespeare:eval --ctx 512)
  eval_run eval-smollm2-1-rank-2-threads 1 2 "${job[@]}"
  eval_run eval-smollm2-2-ranks-1-thread 2 1 "${job[@]}"
  same_figures eval-smollm2-1-rank-2-threads.json eval-smollm2-2-ranks-1-thread.json
fi
if want eval-8b; then
  blocks="${BLOCKS:-1}"
  model="$OUT/synth-8b-$blocks"
  [ -d "$model" ] || "$SHRINK" synth llama3-8b --layers "$blocks" -o "$model" >/dev/null
  job=(eval "$model" --stream --text shakespeare:eval --ctx 512 --chunks "${EVAL_CHUNKS:-8}")
  eval_run "eval-8b-$blocks-blocks-1-rank-2-threads" 1 2 "${job[@]}"
  eval_run "eval-8b-$blocks-blocks-2-ranks-1-thread" 2 1 "${job[@]}"
  same_figures "eval-8b-$blocks-blocks-1-rank-2-threads.json" \
    "eval-8b-$blocks-blocks-2-ranks-1-thread.json"
fi
if want sweep; then
  for way in "sweep-1-rank-2-threads 1 2" "sweep-2-ranks-1-thread 2 1"; do
    set -- $way
    rm -rf "${OUT:?}/$1"
    launch "$1" "$2" "$3" run pipelines/smollm2-sweep.toml -o "$OUT/$1"
    echo "$1 $elapsed s"
  done
  python3 - "$OUT/sweep-1-rank-2-threads" "$OUT/sweep-2-ranks-1-thread" <<'PY' || exit 1
import json, pathlib, sys
one, two = (pathlib.Path(p) for p in sys.argv[1:3])
rows = lambda d: [(r["name"], r["perplexity"], r["kl_mean"], r["cached"])
                  for r in json.load(open(d / "report.json"))["rows"]]
if rows(one) != rows(two):
    sys.exit(f"DIFFERENT reports: {rows(one)} {rows(two)}")
for f in sorted((one / "stages").glob("*/model.gguf")):
    if f.read_bytes() != (two / f.relative_to(one)).read_bytes():
        sys.exit(f"DIFFERENT: {f}")
print(f"same stage files and report rows ({len(rows(one))} models)")
PY
fi
