#!/usr/bin/env bash
# Benchmark (not a test): quantization quality and cost on SmolLM2-135M. Each variant is quantized
# by shrink (calibration: 128 × 512 tokens of shakespeare:calib, seed 0), then scored on Hamlet
# (ctx 512, 32 chunks) by llama-perplexity and by shrink eval; wall time and peak RSS of the
# quantization are recorded. Optionally (LLAMA_REFS=1) llama.cpp's own Q4_0 / Q4_K_M with an
# importance matrix from the same calibration text are made and scored in the same run.
# Writes target/bench/quant.json. VARIANTS selects a subset: "gptq-q4_0 gptq-q4_k_m …".
BENCH=quant LLAMA=1
source "$(dirname "$0")/bench-common.sh"
python3 - <<'PY'
import json, os, subprocess, sys
from benchlib import Bench, run
bench = Bench()
model = bench.asset("smollm2")
# The figures of the README were measured calibrated on Shakespeare (CALIB=… for another text).
CALIB = os.environ.get("CALIB", "shakespeare:calib")

def size(path):
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    return os.path.getsize(path)

variants = {
    "rtn-q4_0": (["--method", "rtn", "--format", "gguf:q4_0"], "gguf"),
    "gptq-q4_0": (["--preset", "q4_0"], "gguf"),
    "rtn-imatrix-q4_k_m": (["--preset", "q4_k_m", "--method", "rtn", "--imatrix"], "gguf"),
    "gptq-q4_k_m": (["--preset", "q4_k_m"], "gguf"),
    "rtn-q8_0": (["--method", "rtn", "--format", "gguf:q8_0"], "gguf"),
    "w8a8-gptq": (["--preset", "w8a8"], "hf"),
    "w4a16-g64-gptq": (["--format", "hf", "--bits", "4", "--group", "64", "--method", "gptq"], "hf"),
}
wanted = os.environ.get("VARIANTS", " ".join(variants)).split()
rows = []
for name in wanted:
    args, kind = variants[name]
    path = os.path.join(bench.out, name + (".gguf" if kind == "gguf" else ""))
    so, _, wall, rss = bench.shrink_run("quantize", model, *args, "--calib", CALIB, "-o", path, "--json")
    row = dict(variant=name, args=" ".join(args), bytes=size(path), quantize_s=round(wall, 1), peak_rss_mb=round(rss),
               types=json.loads(so)["types"], shrink_ppl=bench.shrink_ppl(path))
    row["llama_ppl"] = bench.llama_ppl(path) if kind == "gguf" else None
    rows.append(row)
    print(json.dumps(row), flush=True)

if os.environ.get("LLAMA_REFS") == "1":
    imatrix = os.path.join(bench.out, "imatrix.dat")
    calib = os.path.join(bench.out, "calib.txt")
    with open(calib, "w") as f:
        for part in subprocess.check_output([bench.shrink, "data", "path", CALIB]).decode().split():
            f.write(open(part).read())
    f32 = os.path.join(bench.out, "f32.gguf")
    run([f"{bench.bin_dir}/llama-quantize", "--allow-requantize", model, f32, "F32"])
    _, _, wall, _ = run([f"{bench.bin_dir}/llama-imatrix", "-m", f32, "-f", calib, "-c", "512", "-t", bench.threads, "-o", imatrix])
    for ty in ["Q4_0", "Q4_K_M"]:
        path = os.path.join(bench.out, f"llama-imatrix-{ty}.gguf")
        _, _, qwall, _ = run([f"{bench.bin_dir}/llama-quantize", "--imatrix", imatrix, f32, path, ty])
        row = dict(variant=f"llama.cpp {ty} + imatrix", bytes=size(path), quantize_s=round(wall + qwall, 1), llama_ppl=bench.llama_ppl(path))
        rows.append(row)
        print(json.dumps(row), flush=True)

print(f"\n{'variant':<26} {'bytes':>12} {'llama ppl':>10} {'shrink ppl':>10} {'quantize s':>10} {'RSS MB':>7}")
for r in rows:
    lp = f"{r['llama_ppl']:.4f}" if r.get("llama_ppl") else "—"
    sp = f"{r['shrink_ppl']:.4f}" if r.get("shrink_ppl") else "—"
    print(f"{r['variant']:<26} {r['bytes']:>12,} {lp:>10} {sp:>10} {r['quantize_s']:>10} {r.get('peak_rss_mb', '—'):>7}")
json.dump(rows, open(os.path.join(os.path.dirname(bench.out), "quant.json"), "w"), indent=2)
PY
