#!/usr/bin/env python3
"""An independent numpy implementation of SparseGPT (Frantar & Alistarh, 2023), written from the
paper's Algorithm 1 in its usual batched form (lazy updates of the columns after each block), to
check shrink's Rust implementation on real layers.

    sparsegpt.py W.npy H.npy SPARSITY OUT.npy [--damp 0.01] [--block 128]

W is rows × cols (float32), H = Σ x xᵀ is cols × cols (float64). SPARSITY is a fraction (0.5) or
N:M (2:4: at most N non-zeros in every M consecutive weights of a row). Masks are chosen per block
of columns from w² / [U]_jj² on the weights updated so far, U being the upper Cholesky factor of
(H + λI)⁻¹ with λ = damp · mean(diag H); a fraction removes exactly
round(f · rows · end) − round(f · rows · start) weights in the block [start, end) (lowest scores,
ties to the lower flat index), so the layer's count is exact.
"""
import sys

import numpy as np


def upper_inverse_cholesky(h, damp):
    h = h.copy()
    n = h.shape[0]
    mean = np.mean(np.diag(h))
    lam = damp * (mean if mean > 0 else 1.0)
    dead = np.flatnonzero(np.diag(h) == 0)
    h[dead, dead] = 1.0
    h[np.arange(n), np.arange(n)] += lam
    hinv = np.linalg.inv(h)
    # (H + λI)⁻¹ = Uᵀ U with U upper: U = chol(H⁻¹)ᵀ (lower factor transposed).
    return np.linalg.cholesky(hinv).T


def smallest_mask(scores, k):
    flat = scores.ravel()
    order = np.lexsort((np.arange(flat.size), flat))  # by score, then by index
    mask = np.zeros(flat.size, dtype=bool)
    mask[order[:k]] = True
    return mask.reshape(scores.shape)


def sparsegpt(w, h, sparsity, damp=0.01, block=128):
    w = w.astype(np.float64).copy()
    rows, cols = w.shape
    u = upper_inverse_cholesky(h, damp)
    nm = None
    if ":" in sparsity:
        n, m = (int(x) for x in sparsity.split(":"))
        nm = (n, m)
        block = -(-block // m) * m
    else:
        frac = float(sparsity)
    for start in range(0, cols, block):
        end = min(start + block, cols)
        w1 = w[:, start:end].copy()
        u1 = u[start:end, start:end]
        d = np.diag(u1)
        scores = w1 ** 2 / d[None, :] ** 2
        if nm is None:
            k = round(frac * rows * end) - round(frac * rows * start)
            mask = smallest_mask(scores, k)
        else:
            n, m = nm
            mask = np.zeros_like(scores, dtype=bool)
            for g in range(0, end - start, m):
                for r in range(rows):
                    mask[r, g:g + m] = smallest_mask(scores[r, g:g + m], m - n)
        err1 = np.zeros_like(w1)
        for i in range(end - start):
            q = np.where(mask[:, i], 0.0, w1[:, i])
            e = (w1[:, i] - q) / d[i]
            w1[:, i:] -= np.outer(e, u1[i, i:])
            w1[:, i] = q
            err1[:, i] = e
        w[:, start:end] = w1
        # Lazy update of the columns after the block.
        w[:, end:] -= err1 @ u[start:end, end:]
    return w.astype(np.float32)


if __name__ == "__main__":
    args = sys.argv[1:]
    damp, block = 0.01, 128
    if "--damp" in args:
        i = args.index("--damp"); damp = float(args[i + 1]); del args[i:i + 2]
    if "--block" in args:
        i = args.index("--block"); block = int(args[i + 1]); del args[i:i + 2]
    w_path, h_path, sparsity, out = args
    np.save(out, sparsegpt(np.load(w_path), np.load(h_path), sparsity, damp, block))
