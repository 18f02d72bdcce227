#!/usr/bin/env bash
# Benchmark (not a test): distillation of a depth-pruned SmolLM2-135M. The student is the teacher
# with half its layers removed by Block Influence (`shrink prune --method layers --fraction 0.5`,
# 15 of 30 layers, 81.4 M parameters); `shrink distill` trains it on the teacher's logits (forward
# KL, T = 1, no cross-entropy) over shakespeare:train (ten plays, hamlet held out) for STEPS
# updates of 4 × 256 tokens, with the teacher's forward on every batch. The pruned start, the
# distilled student and the teacher are scored on Hamlet (ctx 512, 32 chunks) by llama-perplexity.
# Records the wall time, peak RSS and training throughput. Writes target/bench/distill.json.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS="${THREADS:-2}"
STEPS="${STEPS:-300}"
TARGET="${CARGO_TARGET_DIR:-$PWD/target}"
cargo build --release -p shrink-cli >&2
SHRINK="$TARGET/release/shrink"
BIN="$(scripts/build-llama-cpp.sh)"
OUT="${OUT:-$PWD/target/bench/distill}"
mkdir -p "$OUT"
SCRIPTS="$PWD/scripts" python3 - "$SHRINK" "$BIN" "$OUT" "$THREADS" "$STEPS" <<'PY'
import json, os, re, subprocess, sys
sys.path.insert(0, os.environ["SCRIPTS"])
from benchlib import run
shrink, bin_dir, out, threads, steps = sys.argv[1:]
hamlet = subprocess.check_output([shrink, "data", "path", "shakespeare:eval"]).decode().split()[0]
model = subprocess.check_output([shrink, "data", "path", "smollm2"]).decode().split()[0]

def llama_ppl(path):
    _, err, _, _ = run([f"{bin_dir}/llama-perplexity", "-m", path, "-f", hamlet, "-c", "512", "--chunks", "32", "-t", threads])
    return float(re.search(r"Final estimate: PPL = ([0-9.]+)", err).group(1))

pruned = os.path.join(out, "layers-50.gguf")
if not os.path.exists(pruned):
    run([shrink, "--threads", threads, "prune", model, "--method", "layers", "--fraction", "0.5", "-o", pruned])
student = os.path.join(out, f"distilled-{steps}.gguf")
args = ["--student", pruned, "--steps", steps, "--batch", "4", "--seq-len", "256", "--lr", "3e-4",
        "--warmup", "20", "--eval-every", "50", "--eval-windows", "8", "--checkpoint-every", "50"]
so, _, wall, rss = run([shrink, "--threads", threads, "distill", model, *args, "-o", student, "--json"])
s = json.loads(so)
t = s["outcome"]["training"]
row = dict(args=" ".join(args), wall_s=round(wall, 1), peak_rss_mb=round(rss),
           tokens=t["log"]["tokens"], tokens_per_s=round(t["tokens_per_s"], 1),
           parameters=s["outcome"]["parameters_student"], eval=t["log"]["eval"],
           teacher_ppl=llama_ppl(model), pruned_ppl=llama_ppl(pruned), distilled_ppl=llama_ppl(student))
gap = row["pruned_ppl"] - row["teacher_ppl"]
row["gap_recovered"] = (row["pruned_ppl"] - row["distilled_ppl"]) / gap
print(json.dumps(row, indent=2))
json.dump(row, open(os.path.join(os.path.dirname(out), "distill.json"), "w"), indent=2)
PY
