#!/usr/bin/env bash
# Benchmark (not a test): 4-bit quantization-aware training of SmolLM2-135M from the GPTQ result.
# `shrink quantize --method gptq --format q4_0` is the post-training baseline (128 × 512 tokens of
# shakespeare:calib, seed 0); `shrink distill --qat q4_0` starts from the same GPTQ codes and
# trains the fake-quantized model (straight-through estimator, LSQ scales, token embedding frozen)
# against the unquantized model (forward KL) over shakespeare:train for STEPS updates of 4 × 256
# tokens at LR. Both Q4_0 GGUFs are scored on Hamlet (ctx 512, 32 chunks) by llama-perplexity.
# GPTQ=FILE reuses an existing GPTQ Q4_0 GGUF. Writes target/bench/qat.json.
BENCH=qat LLAMA=1
source "$(dirname "$0")/bench-common.sh"
STEPS="${STEPS:-60}"
LR="${LR:-5e-5}"
GPTQ="${GPTQ:-}" python3 - "$STEPS" "$LR" <<'PY'
import json, os, sys
from benchlib import Bench, run
steps, lr = sys.argv[1:]
bench = Bench()
model = bench.asset("smollm2")

gptq = os.environ.get("GPTQ") or os.path.join(bench.out, "gptq-q4_0.gguf")
if not os.path.exists(gptq):
    bench.shrink_run("quantize", model, "--method", "gptq", "--format", "gguf:q4_0", "--calib", "shakespeare:calib", "-o", gptq)
qat = os.path.join(bench.out, f"qat-q4_0-{steps}.gguf")
args = ["--qat", "q4_0", "--steps", steps, "--batch", "4", "--seq-len", "256", "--lr", lr,
        "--calib", "shakespeare:calib", "--warmup", "5", "--eval-every", "0", "--eval-windows", "8", "--checkpoint-every", "0"]
so, _, wall, rss = bench.shrink_run("distill", model, *args, "-o", qat, "--json")
s = json.loads(so)
t = s["training"]
row = dict(args=" ".join(args), wall_s=round(wall, 1), peak_rss_mb=round(rss),
           tokens=t["log"]["tokens"], tokens_per_s=round(t["tokens_per_s"], 1),
           bytes=os.path.getsize(qat), gptq_bytes=os.path.getsize(gptq), eval=t["log"]["eval"],
           gptq_ppl=bench.llama_ppl(gptq), qat_ppl=bench.llama_ppl(qat))
print(json.dumps(row, indent=2))
json.dump(row, open(os.path.join(os.path.dirname(bench.out), "qat.json"), "w"), indent=2)
PY
