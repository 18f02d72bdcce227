#!/usr/bin/env python3
"""Draws issue #21's size–quality curve from scripts/bench-calib.sh's rows as one SVG file (no
plotting library): per text (Hamlet, pip docs, requests code) two panels, file size against
llama-perplexity's perplexity and against its mean KL divergence to the F32 model, shrink's GPTQ
files and llama.cpp's importance-matrix files as two lines.

    scripts/plot-curve.py [target/bench/calib/calib.json] [docs/curve.svg]

Only rows calibrated on the mix (the default calibration) and named as bench-calib.sh names its
files (shrink's `gptq-<preset>-<calib>.gguf`, llama.cpp's `llama-imatrix-<TYPE>-<calib>.gguf`)
are drawn; variants with a label are left out.
"""
import json
import math
import os
import re
import sys

MIX = "shakespeare:calib+setuptools-docs:calib+click-code:calib"
TEXTS = [("shakespeare:eval", "Hamlet"), ("pip-docs:eval", "pip docs"),
         ("requests-code:eval", "requests code")]
SERIES = [("shrink", "#1f6feb", r"^gptq-([a-z0-9_]+)-shakespeare\+setuptools-docs\+click-code\.gguf$"),
          ("llama.cpp", "#cf222e", r"^llama-imatrix-([A-Z0-9_]+)-shakespeare\+setuptools-docs\+click-code\.gguf$")]
W, H, PAD = 330, 230, 48


def points(rows, text, pattern):
    out = []
    for r in rows:
        m = re.match(pattern, r["file"])
        if r["text"] == text and r["calib"] == MIX and m:
            out.append((r["bytes"] / 1e6, r["ppl"], r["kld"], m.group(1).upper()))
    return sorted(out)


def panel(x0, y0, title, series, key, log):
    """One chart at (x0, y0): series = [(name, colour, [(mb, ppl, kld, label)])]."""
    xs = [p[0] for _, _, ps in series for p in ps]
    ys = [p[key] for _, _, ps in series for p in ps]
    f = math.log if log else (lambda v: v)
    xlo, xhi = min(xs), max(xs)
    ylo, yhi = f(min(ys)), f(max(ys))
    sx = lambda v: x0 + PAD + (v - xlo) / (xhi - xlo) * (W - PAD - 30)
    sy = lambda v: y0 + H - 30 - (f(v) - ylo) / (yhi - ylo) * (H - 60)
    out = [f'<text x="{x0 + W / 2}" y="{y0 + 14}" text-anchor="middle" font-weight="bold">{title}</text>',
           f'<line x1="{x0 + PAD}" y1="{y0 + H - 30}" x2="{x0 + W - 30}" y2="{y0 + H - 30}" stroke="#888"/>',
           f'<line x1="{x0 + PAD}" y1="{y0 + 24}" x2="{x0 + PAD}" y2="{y0 + H - 30}" stroke="#888"/>']
    for v in (xlo, (xlo + xhi) / 2, xhi):
        out.append(f'<text x="{sx(v):.1f}" y="{y0 + H - 16}" text-anchor="middle">{v:.0f} MB</text>')
    for v in (min(ys), math.exp((ylo + yhi) / 2) if log else (ylo + yhi) / 2, max(ys)):
        out.append(f'<text x="{x0 + PAD - 4}" y="{sy(v) + 4:.1f}" text-anchor="end">{v:.3g}</text>')
    for name, colour, ps in series:
        path = " ".join(f"{sx(p[0]):.1f},{sy(p[key]):.1f}" for p in ps)
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        for p in ps:
            out.append(f'<circle cx="{sx(p[0]):.1f}" cy="{sy(p[key]):.1f}" r="2.5" fill="{colour}">'
                       f'<title>{name} {p[3]}: {p[0]:.2f} MB, ppl {p[1]:.4f}, KL {p[2]:.4f}</title></circle>')
    return out


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else "target/bench/calib/calib.json"
    dst = sys.argv[2] if len(sys.argv) > 2 else "docs/curve.svg"
    rows = json.load(open(src))["rows"]
    body = []
    for i, (text, label) in enumerate(TEXTS):
        series = [(n, c, points(rows, text, pat)) for n, c, pat in SERIES]
        if not all(ps for _, _, ps in series):
            sys.exit(f"{src}: no rows for {text}")
        body += panel(0, i * H, f"{label}: perplexity (log scale)", series, 1, True)
        body += panel(W, i * H, f"{label}: mean KL to F32 (log scale)", series, 2, True)
    legend = [f'<text x="{PAD + 170 * k}" y="{3 * H + 14}" fill="{c}" font-weight="bold">'
              f'— {n}{" GPTQ" if n == "shrink" else " + imatrix"}</text>'
              for k, (n, c, _) in enumerate(SERIES)]
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * W}" height="{3 * H + 24}" '
           f'font-family="sans-serif" font-size="10">\n<rect width="100%" height="100%" fill="white"/>\n'
           + "\n".join(body + legend) + "\n</svg>\n")
    with open(dst + ".part", "w") as f:
        f.write(svg)
    os.replace(dst + ".part", dst)
    print(f"{dst}: {sum(len(points(rows, t, p)) for t, _ in TEXTS for _, _, p in SERIES)} points")


if __name__ == "__main__":
    main()
