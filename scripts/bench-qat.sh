#!/usr/bin/env bash
# Benchmark (not a test): 4-bit quantization-aware training of SmolLM2-135M from the GPTQ result.
# `shrink quantize --method gptq --format q4_0` is the post-training baseline (128 × 512 tokens of
# shakespeare:calib, seed 0); `shrink distill --qat q4_0` starts from the same GPTQ codes and
# trains the fake-quantized model (straight-through estimator, LSQ scales, token embedding frozen)
# against the unquantized model (forward KL) over shakespeare:train for STEPS updates of 4 × 256
# tokens at LR. Both Q4_0 GGUFs are scored on Hamlet (ctx 512, 32 chunks) by llama-perplexity.
# GPTQ=FILE reuses an existing GPTQ Q4_0 GGUF. Writes target/bench/qat.json.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS="${THREADS:-2}"
STEPS="${STEPS:-60}"
LR="${LR:-5e-5}"
TARGET="${CARGO_TARGET_DIR:-$PWD/target}"
cargo build --release -p shrink-cli >&2
SHRINK="$TARGET/release/shrink"
BIN="$(scripts/build-llama-cpp.sh)"
OUT="${OUT:-$PWD/target/bench/qat}"
mkdir -p "$OUT"
SCRIPTS="$PWD/scripts" GPTQ="${GPTQ:-}" python3 - "$SHRINK" "$BIN" "$OUT" "$THREADS" "$STEPS" "$LR" <<'PY'
import json, os, re, subprocess, sys
sys.path.insert(0, os.environ["SCRIPTS"])
from benchlib import run
shrink, bin_dir, out, threads, steps, lr = sys.argv[1:]
hamlet = subprocess.check_output([shrink, "data", "path", "shakespeare:eval"]).decode().split()[0]
model = subprocess.check_output([shrink, "data", "path", "smollm2"]).decode().split()[0]

def llama_ppl(path):
    _, err, _, _ = run([f"{bin_dir}/llama-perplexity", "-m", path, "-f", hamlet, "-c", "512", "--chunks", "32", "-t", threads])
    return float(re.search(r"Final estimate: PPL = ([0-9.]+)", err).group(1))

gptq = os.environ.get("GPTQ") or os.path.join(out, "gptq-q4_0.gguf")
if not os.path.exists(gptq):
    run([shrink, "--threads", threads, "quantize", model, "--method", "gptq", "--format", "q4_0", "-o", gptq])
qat = os.path.join(out, f"qat-q4_0-{steps}.gguf")
args = ["--qat", "q4_0", "--steps", steps, "--batch", "4", "--seq-len", "256", "--lr", lr,
        "--warmup", "5", "--eval-every", "0", "--eval-windows", "8", "--checkpoint-every", "0"]
so, _, wall, rss = run([shrink, "--threads", threads, "distill", model, *args, "-o", qat, "--json"])
s = json.loads(so)
t = s["training"]
row = dict(args=" ".join(args), wall_s=round(wall, 1), peak_rss_mb=round(rss),
           tokens=t["log"]["tokens"], tokens_per_s=round(t["tokens_per_s"], 1),
           bytes=os.path.getsize(qat), gptq_bytes=os.path.getsize(gptq), eval=t["log"]["eval"],
           gptq_ppl=llama_ppl(gptq), qat_ppl=llama_ppl(qat))
print(json.dumps(row, indent=2))
json.dump(row, open(os.path.join(os.path.dirname(out), "qat.json"), "w"), indent=2)
PY
