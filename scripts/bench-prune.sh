#!/usr/bin/env bash
# Benchmark (not a test): pruning quality and cost on SmolLM2-135M. Each variant is pruned by
# `shrink prune` (calibration: 128 × 512 tokens of shakespeare:calib, seed 0), written as an F32
# GGUF and scored on Hamlet (ctx 512, 32 chunks) by llama-perplexity and by shrink eval; wall time
# and peak RSS of the pruning are recorded. Unstructured: magnitude, Wanda and SparseGPT at 50% and
# 2:4. Structured (no distillation): 25% and 50% of the layers (Block Influence) and of the hidden
# width (activation importance; also magnitude and first-order Taylor for the width), plus 25% of
# the MLP channels (activation and Taylor) and one query head per KV group.
# Writes target/bench/prune.json. VARIANTS selects a subset: "sparsegpt-50 layers-25 …".
BENCH=prune LLAMA=1
source "$(dirname "$0")/bench-common.sh"
python3 - <<'PY'
import json, os, sys
from benchlib import Bench, run
bench = Bench()
model = bench.asset("smollm2")

variants = {}
for method in ["magnitude", "wanda", "sparsegpt"]:
    variants[f"{method}-50"] = ["--method", method, "--sparsity", "0.5"]
    variants[f"{method}-2:4"] = ["--method", method, "--sparsity", "2:4"]
for pct in [25, 50]:
    variants[f"layers-{pct}"] = ["--method", "layers", "--fraction", str(pct / 100)]
    variants[f"width-{pct}"] = ["--method", "width", "--fraction", str(pct / 100)]
variants["layers-25-perplexity"] = ["--method", "layers", "--fraction", "0.25", "--criterion", "perplexity", "--samples", "16"]
variants["layers-25-angular"] = ["--method", "layers", "--fraction", "0.25", "--criterion", "angular"]
variants["channels-25"] = ["--method", "channels", "--fraction", "0.25"]
variants["channels-25-taylor"] = ["--method", "channels", "--fraction", "0.25", "--importance", "taylor", "--samples", "32"]
variants["width-25-taylor"] = ["--method", "width", "--fraction", "0.25", "--importance", "taylor", "--samples", "32"]
variants["width-25-magnitude"] = ["--method", "width", "--fraction", "0.25", "--importance", "magnitude"]
variants["heads-1-of-3"] = ["--method", "heads", "--fraction", "0.34"]
wanted = os.environ.get("VARIANTS", " ".join(variants)).split()
rows = []
for name in wanted:
    args = variants[name]
    path = os.path.join(bench.out, name.replace(":", "_") + ".gguf")
    so, _, wall, rss = bench.shrink_run("prune", model, *args, "--calib", "shakespeare:calib", "-o", path, "--json")
    s = json.loads(so)
    row = dict(variant=name, args=" ".join(args), bytes=os.path.getsize(path), prune_s=round(wall, 1),
               peak_rss_mb=round(rss), parameters=s["parameters_after"], config=s["config"],
               linear_sparsity=s["linear_sparsity"], shrink_ppl=bench.shrink_ppl(path), llama_ppl=bench.llama_ppl(path))
    rows.append(row)
    print(json.dumps(row), flush=True)

print(f"\n{'variant':<22} {'parameters':>12} {'llama ppl':>10} {'shrink ppl':>10} {'prune s':>8} {'RSS MB':>7}")
for r in rows:
    print(f"{r['variant']:<22} {r['parameters']:>12,} {r['llama_ppl']:>10.4f} {r['shrink_ppl']:>10.4f} {r['prune_s']:>8} {r['peak_rss_mb']:>7}")
json.dump(rows, open(os.path.join(os.path.dirname(bench.out), "prune.json"), "w"), indent=2)
PY
