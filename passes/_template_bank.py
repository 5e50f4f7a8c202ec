"""The template banks of the ``template`` pass and the fit of a filter by a scaled template.

HLAC (higher-order local autocorrelation, Otsu) masks of a 3x3 window: the reference point
(the centre) and up to two displacements in its 3x3 neighbourhood, i.e. the sets
``{centre} u A`` with ``|A| <= 2``, taken up to translation (two sets that are shifts of each
other give the same autocorrelation feature): 1 of order 0, 4 of order 1 and 20 of order 2,
25 masks with 0/1 taps. ``hlac_masks()`` gives each in its canonical placement (containing
the centre); as a conv filter a mask may sit at any placement that fits in the window (a
shift of one pixel), and the fit picks the best one.

LBC (local binary convolution, Juefei-Xu et al.): ``n`` random ±1 filters over the whole
``C x 3 x 3`` patch with a fraction ``sparsity`` of the taps zero, drawn from
``default_rng([seed, 0x1bc, layer])``.
"""

from __future__ import annotations

import itertools

import numpy as np

CENTRE = (1, 1)


def _hlac_keys() -> list[tuple[tuple, tuple]]:
    """[(normal form, canonical set)] of the 25 classes, order 0, 1, 2."""
    others = [(r, c) for r in range(3) for c in range(3) if (r, c) != CENTRE]
    seen: dict[tuple, tuple] = {}
    for n in range(3):
        for combo in itertools.combinations(others, n):
            S = (CENTRE, *combo)
            r0, c0 = min(p[0] for p in S), min(p[1] for p in S)
            key = tuple(sorted((r - r0, c - c0) for r, c in S))
            seen.setdefault(key, S)
    return list(seen.items())


def hlac_masks() -> np.ndarray:
    """The 25 HLAC masks ``[25, 3, 3]`` (0/1) in their canonical placement."""
    out = np.zeros((25, 3, 3))
    keys = _hlac_keys()
    assert len(keys) == 25
    for i, (_, S) in enumerate(keys):
        for r, c in S:
            out[i, r, c] = 1.0
    return out


def hlac_placements() -> list[np.ndarray]:
    """Per HLAC class, every placement in the 3x3 window: ``[n_placements, 9]`` 0/1."""
    out = []
    for key, _ in _hlac_keys():
        h = max(r for r, _ in key) + 1
        w = max(c for _, c in key) + 1
        pl = []
        for dr in range(4 - h):
            for dc in range(4 - w):
                M = np.zeros((3, 3))
                for r, c in key:
                    M[r + dr, c + dc] = 1.0
                pl.append(M.reshape(-1))
        out.append(np.array(pl))
    return out


def lbc_bank(n: int, C: int, sparsity: float, seed: int, layer: int) -> np.ndarray:
    """``[n, C*9]`` random sparse ±1 filters (at least one nonzero tap each)."""
    rng = np.random.default_rng([seed, 0x1BC, layer])
    T = rng.choice([-1.0, 1.0], size=(n, C * 9)) * (rng.random((n, C * 9)) >= sparsity)
    for i in range(n):
        if not T[i].any():
            T[i, rng.integers(C * 9)] = rng.choice([-1.0, 1.0])
    return T


def fit_hlac(W: np.ndarray, H: np.ndarray) -> tuple[np.ndarray, list]:
    """Relative (H-weighted) error ``e[k, j]`` of filter k ``[C*9]`` as ``alpha * T`` with T
    the HLAC class j with a sign per input channel: ``T[c] = s_c M`` (``s_c`` in {-1, 0, +1},
    one placement M for all channels, one scale alpha per filter). For each placement the
    channels are ranked by ``|<w, T_c>_H| / ||T_c||_H`` and the best of the top-m
    (m = 1, 2, 4, ..., C) kept; the error of ``alpha* T`` is
    ``1 - <w, T>_H^2 / (||T||_H^2 ||w||_H^2)``. Returns e and per (k, j) the template [C*9]."""
    K, n = W.shape
    C = n // 9
    Hb = H.reshape(C, 9, C, 9)
    HW = (W @ H).reshape(K, C, 9)
    wHw = np.maximum(np.einsum("ki,ki->k", W @ H, W), 1e-30)
    ms = sorted({min(C, 2 ** i) for i in range(int(np.ceil(np.log2(max(C, 1)))) + 1)})
    classes = hlac_placements()
    err = np.full((K, len(classes)), np.inf)
    best: list[list] = [[None] * len(classes) for _ in range(K)]
    for j, pls in enumerate(classes):
        for M in pls:
            G = np.einsum("i,cidj,j->cd", M, Hb, M)               # [C, C]
            P = HW @ M                                            # [K, C] = <w, M e_c>_H
            rank = np.argsort(-np.abs(P) / np.sqrt(np.maximum(np.diag(G), 1e-30)), axis=1)
            for m in ms:
                sel = rank[:, :m]
                s = np.zeros((K, C))
                np.put_along_axis(s, sel, np.sign(np.take_along_axis(P, sel, 1)), 1)
                num = np.sum(s * P, axis=1) ** 2
                den = np.maximum(np.einsum("kc,cd,kd->k", s, G, s), 1e-30)
                e = 1.0 - num / (den * wHw)
                for k in np.nonzero(e < err[:, j])[0]:
                    err[k, j] = e[k]
                    best[k][j] = (s[k][:, None] * M[None, :]).reshape(-1)
    return np.sqrt(np.clip(err, 0.0, None)), best


def fit_bank(W: np.ndarray, H: np.ndarray, T: np.ndarray) -> tuple[np.ndarray, list]:
    """``e[k, j]`` of filter k as ``alpha * T_j`` (fixed templates ``T [n, C*9]``)."""
    wHw = np.maximum(np.einsum("ki,ki->k", W @ H, W), 1e-30)
    THT = np.maximum(np.einsum("ji,ji->j", T @ H, T), 1e-30)
    num = (W @ H @ T.T) ** 2
    e = 1.0 - num / (wHw[:, None] * THT[None, :])
    return np.sqrt(np.clip(e, 0.0, None)), [[T[j] for j in range(len(T))]
                                            for _ in range(len(W))]


def scale(w: np.ndarray, T: np.ndarray, H: np.ndarray) -> float:
    """The least-squares scale of template T for filter w under H."""
    return float(T @ H @ w / max(float(T @ H @ T), 1e-30))
