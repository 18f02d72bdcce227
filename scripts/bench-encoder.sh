#!/usr/bin/env bash
# Benchmark (not a test): every technique on the MiniLM sentence encoder (all-MiniLM-L6-v2).
# Runs pipelines/minilm-compress.toml — W8 (RTN, int8 per channel), W4-GPTQ (int4, groups of 128),
# 50% Wanda, and 3 of 6 layers (Block Influence) distilled back for 400 updates — then, on a quiet
# machine, re-measures each model's encode throughput with `shrink eval` on the same 512 Hamlet
# sentences (batches of 32, 2 threads). Prints one row per model: embedding cosine and top-10
# neighbour agreement vs the original, size, encode tokens/s. Writes target/bench/encoder.json.
BENCH=encoder
source "$(dirname "$0")/bench-common.sh"
PIPELINE="$PWD/pipelines/minilm-compress.toml"
python3 - "$PIPELINE" <<'PY'
import json, os, sys
from benchlib import Bench, run
pipeline = sys.argv[1]
bench = Bench()
_, _, wall, rss = bench.shrink_run("run", pipeline, "-o", os.path.join(bench.out, "run"))
report = json.load(open(os.path.join(bench.out, "run", "report.json")))
original = bench.asset("minilm")
rows = []
for r in report["rows"]:
    path = original if r["kind"] == "baseline" else os.path.join(bench.out, "run", r["artifact"])
    so, _, _, _ = bench.shrink_run("eval", path, "--sentences", "512", "--batch", "4", "--json")
    e = json.loads(so)
    rows.append(dict(model=r["name"], kind=r["kind"], cosine=r["embedding_cosine"],
                     top10=r["neighbour_agreement"], size_bytes=r["size_bytes"],
                     bits_per_weight=r["bits_per_weight"], parameters=r["parameters"],
                     stage_wall_s=r["stage_wall_s"], encode_tokens_per_s=round(e["encode_tokens_per_s"], 1),
                     sentences_per_s=round(e["sentences_per_s"], 1)))
base = rows[0]["encode_tokens_per_s"]
print(f"pipeline wall {wall:.0f} s, peak RSS {rss:.0f} MB")
print(f"{'model':<12} {'cosine':>8} {'top-10':>7} {'size MB':>8} {'bpw':>6} {'tok/s':>8} {'speed':>6}")
for r in rows:
    cos = "-" if r["cosine"] is None else f"{r['cosine']:.4f}"
    top = "-" if r["top10"] is None else f"{100 * r['top10']:.1f}%"
    print(f"{r['model']:<12} {cos:>8} {top:>7} {r['size_bytes'] / 1e6:>8.1f} {r['bits_per_weight']:>6.2f} "
          f"{r['encode_tokens_per_s']:>8.0f} {r['encode_tokens_per_s'] / base:>5.2f}×")
json.dump(dict(pipeline_wall_s=round(wall, 1), peak_rss_mb=round(rss), rows=rows),
          open(os.path.join(os.path.dirname(bench.out), "encoder.json"), "w"), indent=2)
PY
