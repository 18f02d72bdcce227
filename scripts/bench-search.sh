#!/usr/bin/env bash
# Benchmark (not a test): budget-driven search on SmolLM2-135M. Runs pipelines/smollm2-search.toml
# (mixed precision at the byte sizes of llama.cpp's Q4_K_M and Q4_0 files), then scores each
# searched GGUF on Hamlet (ctx 512, 32 chunks) with llama-perplexity in the same run, beside the
# reference figures of llama.cpp's Q4_K_M and Q4_0 with an importance matrix (../shared/ANCHORS.md:
# 38.0930 at 105,454,368 bytes, 40.2597 at 91,893,024 bytes). Writes target/bench/search.json.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS="${THREADS:-2}"
cargo build --release -p shrink-cli >&2
TARGET="${CARGO_TARGET_DIR:-$PWD/target}"
SHRINK="$TARGET/release/shrink"
BIN="$(scripts/build-llama-cpp.sh)"
OUT="${OUT:-$PWD/target/bench/search}"
mkdir -p "$OUT"
SCRIPTS="$PWD/scripts" python3 - "$SHRINK" "$BIN" "$OUT" "$THREADS" <<'PY'
import json, os, subprocess, sys
sys.path.insert(0, os.environ["SCRIPTS"])
from benchlib import llama_ppl, run
shrink, bin_dir, out, threads = sys.argv[1:]
hamlet = subprocess.check_output([shrink, "data", "path", "shakespeare:eval"]).decode().split()[0]
run_dir = os.path.join(out, "run")
_, _, wall, rss = run([shrink, "--threads", threads, "run", "pipelines/smollm2-search.toml", "-o", run_dir])
report = json.load(open(os.path.join(run_dir, "report.json")))
references = {"at-q4_k_m-size": ("Q4_K_M + imatrix", 105454368, 38.0930),
              "at-q4_0-size": ("Q4_0 + imatrix", 91893024, 40.2597)}
rows = []
for sec in report["searches"]:
    name = sec["stage"]
    path = os.path.join(run_dir, "stages", name, "model.gguf")
    ppl = llama_ppl(bin_dir, path, hamlet, threads)
    ref_name, ref_bytes, ref_ppl = references[name]
    best = sec["rounds"][sec["best_round"]]
    model_row = next(r for r in report["rows"] if r["name"] == name)
    row = dict(stage=name, bytes=os.path.getsize(path), budget=sec["goal"], met=sec["met"],
               rounds=len(sec["rounds"]), stopped=sec["stopped"], types=best["types"],
               searched_bpw=round(best["bits_per_weight"], 4), llama_ppl=ppl,
               shrink_ppl=model_row["perplexity"], reference=ref_name, reference_bytes=ref_bytes,
               reference_ppl=ref_ppl, ppl_ratio=round(ppl / ref_ppl, 4),
               sensitivity_s=round(sec["sensitivity_s"], 1), stage_wall_s=round(model_row["stage_wall_s"], 1))
    rows.append(row)
    print(json.dumps(row), flush=True)
json.dump(dict(rows=rows, pipeline_wall_s=round(wall, 1), peak_rss_mb=round(rss)),
          open(os.path.join(out, "..", "search.json"), "w"), indent=1)
PY
