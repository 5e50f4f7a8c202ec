"""The algebra of the ``cluster`` pass: weighted 1-D k-means (k-means++ seeding, Lloyd on the
sorted distinct values), ternary codebooks {-a, 0, +a}, and the least-squares refit of the
codebook values on the layer outputs."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def kmeans1d(v: np.ndarray, w: np.ndarray, k: int, rng, n_init: int = 4, iters: int = 100
             ) -> tuple[np.ndarray, np.ndarray]:
    """(sorted codebook [<=k], index of each value) minimizing ``sum w (v - c[idx])^2``.

    With at most ``k`` distinct values the codebook is those values, exactly (identity)."""
    uniq, inv = np.unique(v, return_inverse=True)
    inv = inv.reshape(-1)
    if len(uniq) <= k:
        return uniq.astype(np.float64), inv
    wu = np.bincount(inv, weights=w, minlength=len(uniq)) + 1e-300
    cw, cwv = np.cumsum(wu), np.cumsum(wu * uniq)
    best = None
    for _ in range(n_init):
        c = _seed(uniq, wu, k, rng)
        for _ in range(iters):
            cut = np.searchsorted(uniq, (c[1:] + c[:-1]) / 2, side="right")
            lo = np.concatenate([[0], cut])
            hi = np.concatenate([cut, [len(uniq)]])
            ok = hi > lo
            lo, hi = lo[ok], hi[ok]
            sw = cw[hi - 1] - np.where(lo > 0, cw[lo - 1], 0.0)
            swv = cwv[hi - 1] - np.where(lo > 0, cwv[lo - 1], 0.0)
            new = swv / sw
            if len(new) == len(c) and np.allclose(new, c, rtol=0, atol=1e-15):
                c = new
                break
            c = new
        idx = _assign(uniq, c)
        sse = float(np.sum(wu * (uniq - c[idx]) ** 2))
        if best is None or sse < best[0]:
            best = (sse, c, idx)
    _, c, idx = best
    return c, idx[inv]


def _seed(uniq: np.ndarray, wu: np.ndarray, k: int, rng) -> np.ndarray:
    """k-means++: each next centre drawn with probability ~ weight x squared distance."""
    c = [uniq[rng.choice(len(uniq), p=wu / wu.sum())]]
    d2 = (uniq - c[0]) ** 2
    for _ in range(1, k):
        p = wu * d2
        if p.sum() <= 0:
            break
        c.append(uniq[rng.choice(len(uniq), p=p / p.sum())])
        d2 = np.minimum(d2, (uniq - c[-1]) ** 2)
    return np.sort(np.array(c))


def _assign(v: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Index of the nearest value of the sorted codebook ``c`` for each of ``v``."""
    if len(c) == 1:
        return np.zeros(len(v), dtype=np.int64)
    return np.searchsorted((c[1:] + c[:-1]) / 2, v, side="right")


def ternary(v: np.ndarray, w: np.ndarray, iters: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """(codebook [-a, 0, a], index in 0..2) minimizing ``sum w (v - q)^2`` over q in
    {-a, 0, a}: TWN's start (threshold 0.7 mean|v|), then Lloyd (zero where |v| <= a/2)."""
    av = np.abs(v)
    ws = w.sum()
    delta = 0.7 * float(np.sum(w * av) / max(ws, 1e-300))
    nz = av > delta
    a = float(np.sum(w[nz] * av[nz]) / max(np.sum(w[nz]), 1e-300)) if nz.any() else 0.0
    for _ in range(iters):
        nz = av > a / 2
        if not nz.any():
            break
        a_new = float(np.sum(w[nz] * av[nz]) / max(np.sum(w[nz]), 1e-300))
        if abs(a_new - a) <= 1e-15 * max(a, 1e-300):
            a = a_new
            break
        a = a_new
    nz = av > a / 2
    idx = np.where(nz, np.where(v > 0, 2, 0), 1)
    return np.array([-a, 0.0, a]), idx


def normal_equations(idx: np.ndarray, W: np.ndarray, H: np.ndarray, k: int,
                     G: np.ndarray | None = None, chunk_elems: int = 1 << 22
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Per output row o: ``A_o [k, k]`` and ``b_o [k]`` of ``min_c (w_o - q_o)^T H (w_o - q_o)``
    with ``q_o = sum_v c_v e_{o,v}`` (``e_{o,v}`` the indicator of ``idx[o] == v``): the outputs
    ``X q_o`` are linear in the codebook values, so this is least squares in k unknowns.

    ``A_o[u, v] = e_u^T H e_v`` and ``b_o[u] = e_u^T H w_o`` are formed from the segment sums
    ``E_o H`` (a sparse one-hot times H: out x in x in multiply-adds in all).

    With ``G = X^T X0 / n`` (the layer's current inputs X against the original model's X0)
    the target is the original output instead: ``min ||X q_o - X0 w_o||^2``, i.e.
    ``b_o[u] = e_u^T G w_o``."""
    out, n_in = W.shape
    A = np.zeros((out, k, k))
    b = np.zeros((out, k))
    step = max(1, chunk_elems // max(k * n_in, 1))
    for lo in range(0, out, step):
        hi = min(out, lo + step)
        r = hi - lo
        ii = idx[lo:hi]
        rows = (np.arange(r)[:, None] * k + ii).reshape(-1)
        cols = np.tile(np.arange(n_in), r)
        S = sp.csr_matrix((np.ones(r * n_in), (rows, cols)), shape=(r * k, n_in))
        T = np.asarray(S @ H).reshape(r, k, n_in)                  # E_o H
        O = np.zeros((r, k, n_in))
        O[np.arange(r)[:, None], ii, np.arange(n_in)[None, :]] = 1.0
        A[lo:hi] = np.matmul(T, O.transpose(0, 2, 1))
        if G is not None:
            T = np.asarray(S @ G).reshape(r, k, n_in)
        b[lo:hi] = np.einsum("ouk,ok->ou", T, W[lo:hi])
    return A, b


def refit_codebook(A: np.ndarray, b: np.ndarray, c0: np.ndarray, B: np.ndarray | None,
                   damp: float) -> np.ndarray:
    """The codebook minimizing the output error from the normal equations ``(A, b)``; the
    values are ``B theta`` when a structure ``B`` is given (ternary: ``[-1, 0, 1]^T a``),
    pulled towards ``c0`` by ``damp`` x the mean diagonal (values no weight uses stay)."""
    Bm = np.eye(len(c0)) if B is None else B
    At = Bm.T @ A @ Bm
    bt = Bm.T @ b
    th0 = np.linalg.lstsq(Bm, c0, rcond=None)[0]
    lam = damp * max(float(np.trace(At)) / len(At), 1e-30)
    th = th0 + np.linalg.solve(At + lam * np.eye(len(At)), bt - At @ th0)
    return Bm @ th
