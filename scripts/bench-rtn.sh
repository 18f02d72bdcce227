#!/usr/bin/env bash
# Benchmark (not a test): round-to-nearest Q4_0 of SmolLM2-135M by `shrink quantize --method rtn`
# against `llama-quantize … Q4_0`, both from the same F32 GGUF (made once from the packaged Q4_1
# file by llama-quantize and cached), THREADS threads (default 2). The two commands alternate
# REPEATS times (default 7); the median, the spread (slowest over fastest) and the load average
# before and after are printed, with the ratio of the medians. Writes target/bench/rtn/rtn.json.
BENCH=rtn LLAMA=1
source "$(dirname "$0")/bench-common.sh"
F32="$(smollm2_f32)"
python3 - "$F32" "${REPEATS:-7}" <<'PY'
import json, os, sys
from benchlib import Bench, repeated
f32, repeats = sys.argv[1], int(sys.argv[2])
b = Bench()
ours, theirs = f"{b.out}/shrink-q4_0.gguf", f"{b.out}/llama-q4_0.gguf"
r = repeated({
    "shrink quantize": [b.shrink, "--threads", b.threads, "quantize", f32, "--method", "rtn",
                        "--format", "gguf:q4_0", "-o", ours],
    "llama-quantize": [f"{b.bin_dir}/llama-quantize", f32, theirs, "Q4_0", b.threads],
}, repeats)
print(f"{'tool':<16} {'median s':>9} {'min s':>7} {'max s':>7} {'spread':>7} {'RSS MB':>7} {'bytes':>12}")
for name, path in (("shrink quantize", ours), ("llama-quantize", theirs)):
    x = r[name]
    print(f"{name:<16} {x['median_s']:>9.3f} {x['min_s']:>7.3f} {x['max_s']:>7.3f} {x['spread']:>7.2f} "
          f"{x['peak_rss_mb']:>7.0f} {os.path.getsize(path):>12,}")
ratio = r["shrink quantize"]["median_s"] / r["llama-quantize"]["median_s"]
print(f"\nratio of medians shrink / llama-quantize: {ratio:.2f}x ({repeats} alternating runs each, "
      f"{b.threads} threads; load average {r['load']['before']:.2f} before, {r['load']['after']:.2f} after)")
json.dump(dict(ratio=ratio, **r), open(f"{b.out}/rtn.json", "w"), indent=2)
PY
