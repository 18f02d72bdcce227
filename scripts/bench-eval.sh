#!/usr/bin/env bash
# Benchmark (not a test): evaluation throughput of `shrink eval` against `llama-perplexity` on the
# same F32 GGUF of SmolLM2-135M, same text and protocol (hamlet, ctx 512, 32 chunks), 2 threads,
# measured back to back in one run. Prints a table and writes target/bench/eval.json.
BENCH=eval LLAMA=1
source "$(dirname "$0")/bench-common.sh"
CHUNKS="${CHUNKS:-32}"
MODEL="$($SHRINK data path smollm2)"
HAMLET="$($SHRINK data path shakespeare:eval)"
F32="$(smollm2_f32)"
mkdir -p target/bench
SCRIPTS="$PWD/scripts" python3 - "$SHRINK" "$BIN/llama-perplexity" "$F32" "$MODEL" "$HAMLET" "$THREADS" "$CHUNKS" <<'PY'
import json, os, re, sys
sys.path.insert(0, os.environ["SCRIPTS"])
from benchlib import run
shrink, llama, f32, q41, hamlet, threads, chunks = sys.argv[1:]
tokens = int(chunks) * 512

rows = []
def llama_cpp(model, label):
    _, stderr, wall, rss = run([llama, "-m", model, "-f", hamlet, "-c", "512", "--chunks", chunks, "-t", threads])
    ppl = float(re.search(r"Final estimate: PPL = ([0-9.]+)", stderr).group(1))
    rows.append(dict(tool="llama-perplexity", weights=label, ppl=ppl, wall_s=wall, tokens_per_s=tokens / wall, peak_rss_mb=rss))

def ours(model, label):
    stdout, _, wall, rss = run([shrink, "--threads", threads, "eval", model, "--text", hamlet, "--ctx", "512", "--chunks", chunks, "--json"])
    r = json.loads(stdout)
    rows.append(dict(tool="shrink eval", weights=label, ppl=r["perplexity"]["ppl"], wall_s=wall, tokens_per_s=tokens / wall,
                     eval_tokens_per_s=r["tokens_per_s"], peak_rss_mb=rss))

llama_cpp(f32, "F32")
ours(f32, "F32")
llama_cpp(q41, "Q4_1")
ours(q41, "Q4_1 (dequantized to f32)")
print(f"{'tool':<18} {'weights':<26} {'ppl':>9} {'wall s':>8} {'tokens/s':>9} {'peak RSS MB':>12}")
for r in rows:
    print(f"{r['tool']:<18} {r['weights']:<26} {r['ppl']:>9.4f} {r['wall_s']:>8.1f} {r['tokens_per_s']:>9.1f} {r['peak_rss_mb']:>12.0f}")
ratio = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
print(f"\nF32 throughput ratio shrink / llama.cpp (end-to-end wall, {tokens} tokens, {threads} threads): {ratio:.2f}x")
json.dump(dict(threads=int(threads), tokens=tokens, rows=rows, f32_ratio=ratio), open("target/bench/eval.json", "w"), indent=2)
PY
