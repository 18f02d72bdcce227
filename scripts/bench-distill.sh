#!/usr/bin/env bash
# Benchmark (not a test): distillation of a depth-pruned SmolLM2-135M. The student is the teacher
# with half its layers removed by Block Influence (`shrink prune --method layers --fraction 0.5`,
# 15 of 30 layers, 81.4 M parameters); `shrink distill` trains it on the teacher's logits (forward
# KL, T = 1, no cross-entropy) over shakespeare:train (ten plays, hamlet held out) for STEPS
# updates of 4 × 256 tokens, with the teacher's forward on every batch. The pruned start, the
# distilled student and the teacher are scored on Hamlet (ctx 512, 32 chunks) by llama-perplexity.
# Records the wall time, peak RSS and training throughput. Writes target/bench/distill.json.
BENCH=distill LLAMA=1
source "$(dirname "$0")/bench-common.sh"
STEPS="${STEPS:-300}"
python3 - "$STEPS" <<'PY'
import json, os, sys
from benchlib import Bench, run
steps = sys.argv[1]
bench = Bench()
model = bench.asset("smollm2")

pruned = os.path.join(bench.out, "layers-50.gguf")
if not os.path.exists(pruned):
    bench.shrink_run("prune", model, "--method", "layers", "--fraction", "0.5", "-o", pruned)
student = os.path.join(bench.out, f"distilled-{steps}.gguf")
args = ["--student", pruned, "--steps", steps, "--batch", "4", "--seq-len", "256", "--lr", "3e-4",
        "--warmup", "20", "--eval-every", "50", "--eval-windows", "8", "--checkpoint-every", "50"]
so, _, wall, rss = bench.shrink_run("distill", model, *args, "-o", student, "--json")
s = json.loads(so)
t = s["outcome"]["training"]
row = dict(args=" ".join(args), wall_s=round(wall, 1), peak_rss_mb=round(rss),
           tokens=t["log"]["tokens"], tokens_per_s=round(t["tokens_per_s"], 1),
           parameters=s["outcome"]["parameters_student"], eval=t["log"]["eval"],
           teacher_ppl=bench.llama_ppl(model), pruned_ppl=bench.llama_ppl(pruned), distilled_ppl=bench.llama_ppl(student))
gap = row["pruned_ppl"] - row["teacher_ppl"]
row["gap_recovered"] = (row["pruned_ppl"] - row["distilled_ppl"]) / gap
print(json.dumps(row, indent=2))
json.dump(row, open(os.path.join(os.path.dirname(bench.out), "distill.json"), "w"), indent=2)
PY
