#!/usr/bin/env bash
# Benchmark (not a test): `shrink eval` against `llama-perplexity` on the same files, same text and
# protocol (ctx 512), 2 threads, measured back to back in one run: SmolLM2-135M as F32 (made by
# llama-quantize from the packaged file) and as the packaged Q4_1 file, plus any quantized GGUFs
# named in QFILES (space-separated; e.g. the GPTQ files of scripts/bench-quant.sh). Quantized
# files are scored by shrink twice: with llama.cpp's integer products (the default) and with
# `--dequantize` (f32 products of the dequantized weights). Texts: Hamlet (32 chunks) and the
# off-domain pip documentation (all 37 chunks); TEXTS=hamlet scores Hamlet only.
# Prints a table and writes target/bench/eval.json.
BENCH=eval LLAMA=1
source "$(dirname "$0")/bench-common.sh"
MODEL="$($SHRINK data path smollm2)"
F32="$(smollm2_f32)"
mkdir -p target/bench
SCRIPTS="$PWD/scripts" python3 - "$SHRINK" "$BIN/llama-perplexity" "$F32" "$MODEL" "$THREADS" "${TEXTS:-all}" ${QFILES:-} <<'PY'
import json, os, re, sys
sys.path.insert(0, os.environ["SCRIPTS"])
from benchlib import run
shrink, llama, f32, q41, threads, texts = sys.argv[1:7]
extra = sys.argv[7:]
texts = [("shakespeare:eval", 32), ("pip-docs:eval", 37)][: 1 if texts == "hamlet" else 2]

def path(spec):
    """The text as one file, as llama-perplexity reads it (a split's files concatenated); shrink
    is given the same file."""
    files = run([shrink, "data", "path", spec])[0].split()
    if len(files) == 1:
        return files[0]
    joined = os.path.join(os.environ["OUT"], spec.replace(":", "-") + ".txt")
    with open(joined, "wb") as out:
        for f in files:
            out.write(open(f, "rb").read())
    return joined

rows = []
def llama_cpp(model, label, text, chunks):
    _, stderr, wall, rss = run([llama, "-m", model, "-f", path(text), "-c", "512", "--chunks", str(chunks), "-t", threads])
    ppl = float(re.search(r"Final estimate: PPL = ([0-9.]+)", stderr).group(1))
    rows.append(dict(text=text, tool="llama-perplexity", weights=label, ppl=ppl, wall_s=wall,
                     tokens_per_s=chunks * 512 / wall, peak_rss_mb=rss))
    return ppl

def ours(model, label, text, chunks, *flags):
    stdout, _, wall, rss = run([shrink, "--threads", threads, "eval", model, "--text", path(text), "--ctx", "512",
                                "--chunks", str(chunks), "--json", *flags])
    r = json.loads(stdout)
    rows.append(dict(text=text, tool="shrink eval" + "".join(" " + f for f in flags), weights=label,
                     ppl=r["perplexity"]["ppl"], wall_s=wall, tokens_per_s=chunks * 512 / wall,
                     eval_tokens_per_s=r["tokens_per_s"], peak_rss_mb=rss))

files = [(f32, "F32", False), (q41, "Q4_1 (packaged)", True)] + [(f, os.path.basename(f), True) for f in extra]
for text, chunks in texts:
    for model, label, quantized in files:
        theirs = llama_cpp(model, label, text, chunks)
        ours(model, label, text, chunks)
        rows[-1]["vs_llama"] = rows[-1]["ppl"] / theirs - 1
        rows[-1]["speed_vs_llama"] = rows[-1]["tokens_per_s"] / rows[-2]["tokens_per_s"]
        if quantized:
            ours(model, label, text, chunks, "--dequantize")
            rows[-1]["vs_llama"] = rows[-1]["ppl"] / theirs - 1
            rows[-1]["speed_vs_llama"] = rows[-1]["tokens_per_s"] / rows[-3]["tokens_per_s"]
print(f"{'text':<17} {'tool':<27} {'weights':<22} {'ppl':>9} {'vs llama':>9} {'tokens/s':>9} {'speed':>6} {'RSS MB':>7}")
for r in rows:
    vs = f"{100 * r['vs_llama']:+.3f}%" if "vs_llama" in r else ""
    speed = f"{r['speed_vs_llama']:.2f}x" if "speed_vs_llama" in r else ""
    print(f"{r['text']:<17} {r['tool']:<27} {r['weights'][:22]:<22} {r['ppl']:>9.4f} {vs:>9} {r['tokens_per_s']:>9.1f} {speed:>6} {r['peak_rss_mb']:>7.0f}")
json.dump(dict(threads=int(threads), rows=rows), open("target/bench/eval.json", "w"), indent=2)
PY
