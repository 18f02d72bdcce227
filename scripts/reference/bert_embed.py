#!/usr/bin/env python3
"""Independent reference for shrink's BERT encoder: the forward pass written from the BERT paper's
equations in float64 numpy, read straight from model.safetensors, then sentence-transformers'
pooling. Reads {"sentences": [{"tokens": [...]}, ...]} on stdin (the ids shrink embedded) and prints
{"embeddings": [[...], ...]}.

usage: bert_embed.py MODEL_DIR < tokens.json
"""
import json
import math
import os
import struct
import sys

import numpy as np

DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64}


def load_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        arr = np.frombuffer(data[start:end], dtype=DTYPES[info["dtype"]]).reshape(info["shape"])
        out[name] = arr.astype(np.float64)
    return out


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def gelu(x):
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def encode(w, cfg, ids):
    eps = cfg.get("layer_norm_eps", 1e-12)
    heads = cfg["num_attention_heads"]
    t = len(ids)
    x = w["embeddings.word_embeddings.weight"][ids]
    x = x + w["embeddings.position_embeddings.weight"][:t]
    x = x + w["embeddings.token_type_embeddings.weight"][0]
    x = layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
    for l in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{l}."
        lin = lambda name, h: h @ w[p + name + ".weight"].T + w[p + name + ".bias"]
        q = lin("attention.self.query", x)
        k = lin("attention.self.key", x)
        v = lin("attention.self.value", x)
        d = q.shape[1] // heads
        ctx = np.zeros_like(q)
        for h in range(heads):
            s = slice(h * d, (h + 1) * d)
            scores = q[:, s] @ k[:, s].T / math.sqrt(d)
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            probs = scores / scores.sum(-1, keepdims=True)
            ctx[:, s] = probs @ v[:, s]
        x = layer_norm(
            x + lin("attention.output.dense", ctx),
            w[p + "attention.output.LayerNorm.weight"],
            w[p + "attention.output.LayerNorm.bias"],
            eps,
        )
        m = lin("output.dense", gelu(lin("intermediate.dense", x)))
        x = layer_norm(x + m, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], eps)
    return x


def main():
    model = sys.argv[1]
    cfg = json.load(open(os.path.join(model, "config.json")))
    w = load_safetensors(os.path.join(model, "model.safetensors"))
    pooling = json.load(open(os.path.join(model, "1_Pooling", "config.json")))
    assert pooling["pooling_mode_mean_tokens"], "this reference implements mean pooling"
    modules = json.load(open(os.path.join(model, "modules.json")))
    normalize = any(m["type"].endswith("Normalize") for m in modules)
    out = []
    for s in json.load(sys.stdin)["sentences"]:
        e = encode(w, cfg, np.array(s["tokens"])).mean(0)
        if normalize:
            e = e / np.linalg.norm(e)
        out.append(e.tolist())
    json.dump({"embeddings": out}, sys.stdout)


if __name__ == "__main__":
    main()
