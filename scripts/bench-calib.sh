#!/usr/bin/env bash
# Benchmark (not a test) of issue #21, item 0: does a quantizer's gain carry off the calibration
# domain? For each calibration text in CALIBS it makes shrink's GPTQ `q4_k_m` file (the preset,
# 128 × 512 windows) and llama.cpp's reference — `llama-imatrix` over the same text, then
# `llama-quantize --imatrix … Q4_K_M` — and scores every file in llama.cpp on Hamlet (32 chunks)
# and on the two off-domain texts that are in no calibration set, pip-docs:eval (technical prose,
# 37 chunks) and requests-code:eval (Python code, 59 chunks): perplexity and mean KL divergence to
# the F32 model (`llama-perplexity --kl-divergence` against the F32 GGUF's saved logits).
#
#   CALIBS="shakespeare:calib shakespeare:calib+setuptools-docs:calib+click-code:calib" (default)
#   GPTQ_ARGS="--damp 0.1"    extra arguments for every shrink file (e.g. a dampening to try)
#   LABEL=damp0.1             appended to the shrink files' names
#   FILES="a.gguf b.gguf"     score these files too (made elsewhere)
#   PRESETS="q4_k_m:Q4_K_M iq4_xs:IQ4_XS"   shrink presets and the llama-quantize types they
#                             mirror (default q4_k_m:Q4_K_M)
#   MODEL=gemma3              another packaged model (default smollm2; its files go to
#                             target/bench/calib-MODEL)
#
# Adds its rows to target/bench/calib/calib.json (`scripts/plot-curve.py` draws the curve from it)
# and prints a table; files already made are reused.
MODEL="${MODEL:-smollm2}"
BENCH=calib LLAMA=1
[ "$MODEL" = smollm2 ] || BENCH="calib-$MODEL"
source "$(dirname "$0")/bench-common.sh"
F32="$(model_f32 "$MODEL")"
export MODEL
python3 - "$F32" <<'PY'
import json, os, re, subprocess, sys
from benchlib import Bench, run
f32 = sys.argv[1]
b = Bench()
calibs = os.environ.get("CALIBS", "shakespeare:calib shakespeare:calib+setuptools-docs:calib+click-code:calib").split()
gptq_args = os.environ.get("GPTQ_ARGS", "").split()
label = os.environ.get("LABEL", "")
presets = [p.split(":") for p in os.environ.get("PRESETS", "q4_k_m:Q4_K_M").split()]
texts = [("shakespeare:eval", 32), ("pip-docs:eval", None), ("requests-code:eval", None)]

def joined(spec):
    """The text as one file (what llama.cpp's tools read), the parts of a `+` spec in order."""
    path = os.path.join(b.out, re.sub(r"[^A-Za-z0-9_.-]+", "_", spec) + ".txt")
    if not os.path.exists(path):
        files = subprocess.check_output([b.shrink, "data", "path", spec]).decode().split()
        with open(path, "wb") as out:
            for f in files:
                out.write(open(f, "rb").read())
    return path

def short(spec):
    return "+".join(p.split(":")[0] for p in spec.split("+"))

files = []
for calib in calibs:
    for preset, ftype in presets:
        name = f"gptq-{preset}-{short(calib)}{'-' + label if label else ''}.gguf"
        path = os.path.join(b.out, name)
        if not os.path.exists(path):
            _, _, wall, _ = b.shrink_run("quantize", os.environ["MODEL"], "--preset", preset, "--calib", calib,
                                         *gptq_args, "-o", path)
            print(f"{name}: {wall:.0f} s", flush=True)
        files.append((f"shrink GPTQ {preset} {' '.join(gptq_args)}".strip(), calib, path))
        imatrix = os.path.join(b.out, f"llama-{short(calib)}.imatrix")
        if not os.path.exists(imatrix):
            run([f"{b.bin_dir}/llama-imatrix", "-m", f32, "-f", joined(calib), "-c", "512", "-t", b.threads, "-o", imatrix + ".part"])
            os.rename(imatrix + ".part", imatrix)
        ref = os.path.join(b.out, f"llama-imatrix-{ftype}-{short(calib)}.gguf")
        if not os.path.exists(ref):
            # llama-quantize writes in place: a killed run must not leave a file to reuse.
            run([f"{b.bin_dir}/llama-quantize", "--imatrix", imatrix, f32, ref + ".part", ftype])
            os.rename(ref + ".part", ref)
        files.append((f"llama.cpp {ftype} + imatrix", calib, ref))
files += [("given", "", f) for f in os.environ.get("FILES", "").split()]

rows = []
for text, chunks in texts:
    limit = ["--chunks", str(chunks)] if chunks else []
    base = os.path.join(b.out, f"f32-{text.split(':')[0]}.kld")
    if not os.path.exists(base):
        run([f"{b.bin_dir}/llama-perplexity", "-m", f32, "-f", joined(text), "-c", "512", "-t", b.threads,
             *limit, "--kl-divergence-base", base])
    for kind, calib, path in files:
        so, se, _, _ = run([f"{b.bin_dir}/llama-perplexity", "-m", path, "-c", "512", "-t", b.threads,
                            "--kl-divergence", "--kl-divergence-base", base])
        log = se + so
        ppl = float(re.search(r"Mean PPL\(Q\)\s*:\s*([0-9.]+)", log).group(1))
        kld = float(re.search(r"Mean    KLD:\s*([0-9.]+)", log).group(1))
        rows.append(dict(text=text, kind=kind, calib=calib, file=os.path.basename(path),
                         bytes=os.path.getsize(path), ppl=ppl, kld=kld))
        print(json.dumps(rows[-1]), flush=True)

print(f"\n{'text':<19} {'file':<48} {'bytes':>12} {'ppl':>9} {'mean KL':>9}")
for r in rows:
    print(f"{r['text']:<19} {r['file'][:48]:<48} {r['bytes']:>12,} {r['ppl']:>9.4f} {r['kld']:>9.6f}")
# The curve accumulates over runs: a file's row for a text replaces the earlier one.
out = os.path.join(b.out, "calib.json")
kept = json.load(open(out))["rows"] if os.path.exists(out) else []
fresh = {(r["text"], r["file"]) for r in rows}
kept = [r for r in kept if (r["text"], r["file"]) not in fresh] + rows
json.dump(dict(rows=kept), open(out + ".part", "w"), indent=2)
os.replace(out + ".part", out)
PY
