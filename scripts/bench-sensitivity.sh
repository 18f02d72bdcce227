#!/usr/bin/env bash
# Benchmark (not a test) of issue #21, item 5: the gradient (Fisher) sensitivity against the KL
# tables. One `search` stage per measure in MEASURES (default "fisher scaled every") on SmolLM2 at
# the byte size of llama.cpp's Q4_K_M file, calibrated on the mix (shrink's default), one verified
# round each; shrink's sensitivity cache is emptied first (every model's tables), so every table
# is measured in this run. With `every` the run takes about an hour and a half on 2 cores.
# Prints and writes to target/bench/sensitivity/sensitivity.json: each table's time, Spearman's
# rank correlation of every table with the others over every (linear, format) pair and over the
# linears in one format, and each searched file's `llama-perplexity` and mean KL on Hamlet, pip
# docs and requests code (through scripts/bench-calib.sh's scoring, FILES=…).
BENCH=sensitivity LLAMA=1
source "$(dirname "$0")/bench-common.sh"
MEASURES="${MEASURES:-fisher scaled every}"
CACHE="${SHRINK_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/shrink}"
rm -rf "$CACHE/sensitivity"
python3 - "$MEASURES" <<'PY'
import json, os, sys
from benchlib import Bench
b = Bench()
measures = sys.argv[1].split()
stages = "".join(f'''
[[stage]]
kind = "search"
name = "{m}"
input = "model"
sensitivity = "{m}"
formats = ["q8_0", "q6_k", "q5_k", "q5_1", "q5_0", "q4_k", "q4_0", "q3_k", "q2_k"]
embedding_formats = ["q8_0", "q5_1", "q5_0", "q4_0"]

[stage.budget]
max_size_mb = 105.454368
rounds = 1
''' for m in measures)
pipeline = os.path.join(b.out, "pipeline.toml")
open(pipeline, "w").write(f'''name = "sensitivity-measures"
seed = 0

[model]
source = "smollm2"

[data]
calib = "shakespeare:calib+setuptools-docs:calib+click-code:calib"
eval = "shakespeare:eval"
samples = 128
seq_len = 512
{stages}
[eval]
protocol = "llama-cpp"
ctx = 512
chunks = 32

[export]
formats = ["gguf"]
''')
run_dir = os.path.join(b.out, "run")
b.shrink_run("run", pipeline, "-o", run_dir)
report = json.load(open(os.path.join(run_dir, "report.json")))
tables, rows = {}, []
for sec in report["searches"]:
    m = sec["stage"]
    record = json.load(open(os.path.join(run_dir, "stages", m, "stage.json")))["search"]
    tables[m] = {(it["name"], c["name"]): c["loss"] for it in record["sensitivity"] for c in it["choices"]}
    best = sec["rounds"][sec["best_round"]]
    rows.append(dict(measure=m, sensitivity_s=round(sec["sensitivity_s"], 1),
                     predicted_kl=best["predicted_kl"], verified_kl=best["kl"],
                     size=best["size_bytes"], types=best["types"]))
    print(json.dumps(rows[-1]), flush=True)

def spearman(pairs):
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):  # ties share their mean rank
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    a, b2 = ranks([p[0] for p in pairs]), ranks([p[1] for p in pairs])
    ma, mb = sum(a) / len(a), sum(b2) / len(b2)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b2))
    return cov / (sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b2)) ** 0.5

correlations = []
names = list(tables)
for i, p in enumerate(names):
    for q in names[i + 1:]:
        keys = [k for k in tables[p] if k[0] != "embeddings" and k in tables[q]]
        if len(keys) < 3:
            continue
        row = dict(pair=f"{p} vs {q}", all=round(spearman([(tables[p][k], tables[q][k]) for k in keys]), 4))
        for fmt in ["q8_0", "q4_0", "q4_k"]:
            ks = [k for k in keys if k[1] == fmt]
            if len(ks) > 2:
                row[fmt] = round(spearman([(tables[p][k], tables[q][k]) for k in ks]), 4)
        correlations.append(row)
        print(json.dumps(row), flush=True)
json.dump(dict(searches=rows, correlations=correlations), open(os.path.join(b.out, "sensitivity.json"), "w"), indent=1)
# Each searched file under a name of its own (the scoring keys its rows by file name).
files = []
for m in names:
    link = os.path.join(b.out, f"search-{m}.gguf")
    if os.path.lexists(link):
        os.remove(link)
    os.symlink(os.path.join(run_dir, "stages", m, "model.gguf"), link)
    files.append(link)
print(" ".join(files), file=open(os.path.join(b.out, "files"), "w"))
PY
FILES="$(cat "$OUT/files")" PRESETS="" OUT="$PWD/target/bench/calib" scripts/bench-calib.sh
