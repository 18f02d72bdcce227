#!/usr/bin/env bash
# Benchmark (not a test): budget-driven search on SmolLM2-135M. Runs pipelines/smollm2-search.toml
# (mixed precision at the byte sizes of llama.cpp's Q4_K_M and Q4_0 files), then scores each
# searched GGUF on Hamlet (ctx 512, 32 chunks) with llama-perplexity in the same run, beside the
# reference figures of llama.cpp's Q4_K_M and Q4_0 with an importance matrix (../shared/ANCHORS.md:
# 38.0930 at 105,454,368 bytes, 40.2597 at 91,893,024 bytes). Writes target/bench/search.json.
BENCH=search LLAMA=1
source "$(dirname "$0")/bench-common.sh"
python3 - <<'PY'
import json, os, sys
from benchlib import Bench, run
bench = Bench()
run_dir = os.path.join(bench.out, "run")
_, _, wall, rss = bench.shrink_run("run", "pipelines/smollm2-search.toml", "-o", run_dir)
report = json.load(open(os.path.join(run_dir, "report.json")))
references = {"at-q4_k_m-size": ("Q4_K_M + imatrix", 105454368, 38.0930),
              "at-q4_0-size": ("Q4_0 + imatrix", 91893024, 40.2597)}
rows = []
for sec in report["searches"]:
    name = sec["stage"]
    path = os.path.join(run_dir, "stages", name, "model.gguf")
    ppl = bench.llama_ppl(path)
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
          open(os.path.join(bench.out, "..", "search.json"), "w"), indent=1)
PY
