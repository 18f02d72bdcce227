#!/usr/bin/env bash
# Benchmark (not a test): serving speed of quantized GGUFs with shrink's integer products against
# llama.cpp on the same file, 2 threads, alternating runs: prefill of a 512-token prompt (tokens/s)
# and greedy decoding of 64 tokens after it (ms/token). shrink: `shrink generate` with Hamlet's
# first 1,440 characters as the prompt (502 tokens; prefill = prompt tokens / time to first
# token, and ms/token). llama.cpp: `llama-bench -p 512` (pp512) and `-n 64 -d P` (tg64 after P
# cached tokens, P = shrink's prompt tokens: attention's cost grows with them). Files: the
# packaged Q4_1 file and any named in QFILES.
# Prints a table and writes target/bench/qspeed.json.
BENCH=qspeed LLAMA=1
source "$(dirname "$0")/bench-common.sh"
MODEL="$($SHRINK data path smollm2)"
HAMLET="$($SHRINK data path shakespeare:eval)"
REPEATS="${REPEATS:-3}"
python3 - "$SHRINK" "$BIN/llama-bench" "$HAMLET" "$THREADS" "$REPEATS" "$MODEL" ${QFILES:-} <<'PY'
import json, os, re, statistics, sys
from benchlib import run, loadavg
shrink, bench, hamlet, threads, repeats = sys.argv[1:6]
files = sys.argv[6:]
prompt = open(hamlet).read()[:1440]
rows, before = [], loadavg()
for f in files:
    lp, lt, sp, st = [], [], [], []
    for _ in range(int(repeats)):
        _, err, _, _ = run([shrink, "--threads", threads, "generate", f, "--prompt", prompt, "--max-tokens", "64"])
        m = re.search(r"prompt (\d+) tokens, generated (\d+) tokens; time to first token (\d+) ms, ([0-9.]+) ms/token", err)
        sp.append(int(m.group(1)) / (int(m.group(3)) / 1e3))
        st.append(float(m.group(4)))
        # Decoding after as many cached tokens as shrink's prompt had (`-d`): attention's cost grows with them.
        for args, into in (["-p", "512", "-n", "0"], lp), (["-p", "0", "-n", "64", "-d", m.group(1)], lt):
            out, _, _, _ = run([bench, "-m", f, "-t", threads, *args, "-r", "1", "-o", "json"])
            into.extend(r["avg_ts"] for r in json.loads(out))
    row = dict(file=os.path.basename(f), prompt_tokens=int(m.group(1)), llama_prefill_tps=statistics.median(lp), shrink_prefill_tps=statistics.median(sp),
               llama_decode_ms=1e3 / statistics.median(lt), shrink_decode_ms=statistics.median(st))
    row["prefill_ratio"] = row["shrink_prefill_tps"] / row["llama_prefill_tps"]
    row["decode_ratio"] = row["shrink_decode_ms"] / row["llama_decode_ms"]
    rows.append(row)
    print(json.dumps(row), flush=True)
print(f"load average {before} -> {loadavg()}")
json.dump(dict(threads=int(threads), repeats=int(repeats), rows=rows), open(os.path.join(os.environ["OUT"], "..", "qspeed.json"), "w"), indent=1)
PY
