"""The lowrank pass's factorizations: truncated SVD of a layer's matrix (plain, or in the
metric of its calibration inputs), the rank each criterion picks, the model-wide MAC
allocation, the two factors' tensors and the least-squares refit of the second one."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ._lowrank_layer import Layer
from ._toolkit import output_error, ridge_solve


def _chol(S: np.ndarray, ridge: float) -> np.ndarray:
    scale = max(np.trace(S) / len(S), 1e-12)
    for extra in (0.0, 1e-8, 1e-6, 1e-4, 1e-2):
        try:
            return np.linalg.cholesky(S + np.eye(len(S)) * (ridge + extra) * scale)
        except np.linalg.LinAlgError:
            continue
    raise np.linalg.LinAlgError("covariance is not positive definite")


@dataclass
class Factorized:
    form: str
    U: np.ndarray       # first-factor columns:  weight: [D, R]; spatial: [C*kh, R]
    S: np.ndarray       # singular values [R]
    V: np.ndarray       # second-factor rows:    weight: [R, K]; spatial: [R, K*kw]
    err: np.ndarray     # relative error (weights, or outputs with calib) at rank 1..R
    data: bool          # err measured on activations


def _tail_err(s: np.ndarray, floor: float = 0.0, total: float | None = None) -> np.ndarray:
    """Relative error at rank 1..R from the singular values (plus an irreducible floor)."""
    e2 = np.cumsum((s ** 2)[::-1])[::-1]
    total = total if total is not None else float(e2[0]) + floor
    return np.sqrt((np.append(e2[1:], 0.0) + floor) / max(total, 1e-30))


def layer_output(L: Layer, A: np.ndarray) -> np.ndarray:
    """The original layer's output (without bias) on input rows A: [n, K]."""
    K = L.W.shape[0]
    return A.reshape(len(A), -1).astype(np.float64) @ L.W.reshape(K, -1).T.astype(np.float64)


def factor(L: Layer, form: str, X: np.ndarray | None, Y: np.ndarray | None,
            config) -> Factorized:
    """Rank-ordered factors of the layer's matrix in ``form``.

    ``W_r = (U[:, :r] * S[:r]) @ V[:r]`` in the form's layout (weight: [D, K], spatial:
    [C*kh, K*kw]). Without data: plain SVD, errors of the weights. With input rows X (and
    targets Y, default X W^T): reduced-rank regression -- the least-squares map
    ``M = (X^T X)^-1 X^T Y`` truncated in the metric of the inputs, ``S = X^T X / n = L L^T``,
    SVD of ``L^T M`` -- and errors of the outputs.
    """
    M = L.matrix(form)
    weight = L.kind != "conv" or form == "weight"
    if X is None:
        u, s, vt = np.linalg.svd(M.T if weight else M, full_matrices=False)
        return Factorized(form, u, s, vt, _tail_err(s), False)
    n = len(X)
    X2 = X.reshape(n, -1).astype(np.float64)
    Wt = L.matrix("weight").T  # [D, K]
    if Y is None:
        Mls = Wt
    else:
        Sx = X2.T @ X2 / n
        Sx += np.eye(len(Sx)) * config.ridge * max(np.trace(Sx) / len(Sx), 1e-12)
        Y = Y.astype(np.float64)
        # ridge towards the original weights: directions the data does not cover keep W
        Mls = Wt + np.linalg.solve(Sx, X2.T @ (Y - X2 @ Wt) / n)
    Yt = X2 @ Wt if Y is None else Y
    ny = float(np.sum(Yt ** 2)) / n
    if weight:
        Lc = _chol(X2.T @ X2 / n, config.ridge)
        u, s, vt = np.linalg.svd(Lc.T @ Mls, full_matrices=False)
        U = np.linalg.solve(Lc.T, u)
        floor = 0.0 if Y is None else float(np.sum((X2 @ Mls - Yt) ** 2)) / n
        return Factorized(form, U, s, vt, _tail_err(s, floor, ny if Y is not None else None),
                          True)
    K, C, kh, kw = L.W.shape
    Ms = Mls.T.reshape(K, C, kh, kw).transpose(1, 2, 0, 3).reshape(C * kh, K * kw)
    cols = X.transpose(0, 3, 1, 2).reshape(-1, C * kh).astype(np.float64)  # kh x 1 patches
    Lc = _chol(cols.T @ cols / len(cols), config.ridge)
    u, s, vt = np.linalg.svd(Lc.T @ Ms, full_matrices=False)
    U = np.linalg.solve(Lc.T, u)
    err = _spatial_output_error(L, X, Yt, U, s, vt)
    return Factorized(form, U, s, vt, err, True)


def _spatial_z(A: np.ndarray, U: np.ndarray) -> np.ndarray:
    """First-stage outputs at the sampled positions: Z[rows, r, j] = patch_j . U[:, r]."""
    n, C, kh, kw = A.shape
    cols = A.transpose(0, 3, 1, 2).reshape(n, kw, C * kh)
    return np.einsum("njd,dr->nrj", cols, U.astype(np.float32), optimize=True)


def _spatial_output_error(L: Layer, X, Y, U, s, vt) -> np.ndarray:
    K, C, kh, kw = L.W.shape
    Y = Y.astype(np.float32)
    ny = max(float(np.sum(Y.astype(np.float64) ** 2)), 1e-30)
    Z = _spatial_z(X, U)                                               # [n, R, kw]
    V = (s[:, None] * vt).reshape(len(s), K, kw).astype(np.float32)   # [R, K, kw]
    err = np.empty(len(s))
    out = np.zeros_like(Y)
    for r in range(len(s)):
        out += Z[:, r, :] @ V[r].T
        err[r] = math.sqrt(float(np.sum((out - Y).astype(np.float64) ** 2)) / ny)
    return err


def rank_for(L: Layer, f: Factorized, crit: str, value: float) -> int:
    R = len(f.S)
    if crit == "sigma_threshold":
        r = int(np.sum(f.S >= value * f.S[0])) if R else 0
    elif crit == "energy":
        # 1 - err^2 is the kept fraction of the (output) energy
        ok = np.nonzero(1.0 - f.err ** 2 >= value - 1e-12)[0]
        r = int(ok[0]) + 1 if len(ok) else R
    elif crit == "max_error":
        ok = np.nonzero(f.err <= value + 1e-12)[0]
        r = int(ok[0]) + 1 if len(ok) else R
    elif crit == "rank_ratio":
        r = math.ceil(value * R)
    else:  # mac_ratio
        budget = value * L.macs()
        r = 0
        while r < R and L.form_macs(f.form, r + 1) <= budget:
            r += 1
    return max(1, r)


def round_rank(r: int, R: int, round_to: int) -> int:
    return min(R, math.ceil(r / round_to) * round_to) if round_to > 1 else r


def allocate(plans, ratio: float, round_to: int) -> dict[str, tuple[int, int]]:
    """Global rank allocation for ``model_mac_ratio``: minimise the sum of squared relative
    errors over layers subject to total MACs <= ratio * total, by a Lagrange multiplier on
    MACs (each layer picks the (form, rank) -- or no factorization -- minimising err^2 +
    lam * MACs / total; bisection on lam)."""
    total = sum(L.macs() for L, _ in plans)
    if not plans or total <= 0:
        return {}
    budget = ratio * total
    pts = []
    for L, facts in plans:
        cand = [(L.macs(), 0.0, None, 0)]  # unfactorized
        for i, f in enumerate(facts):
            R = len(f.S)
            for r in sorted({round_rank(r, R, round_to) for r in range(1, R + 1)}):
                macs = L.form_macs(f.form, r)
                if macs < L.macs() and L.form_params(f.form, r) < L.W.size:
                    cand.append((macs, float(f.err[r - 1]) ** 2, i, r))
        pts.append(cand)

    def pick(lam):
        out, used = [], 0
        for cand in pts:
            best = min(cand, key=lambda c: c[1] + lam * c[0] / total)
            out.append(best)
            used += best[0]
        return out, used

    lo, hi = 0.0, 1.0
    while pick(hi)[1] > budget and hi < 1e12:
        hi *= 4
    for _ in range(60):
        mid = (lo + hi) / 2
        if pick(mid)[1] > budget:
            lo = mid
        else:
            hi = mid
    chosen, _ = pick(hi)
    return {L.node.name: (c[2], c[3]) for (L, _), c in zip(plans, chosen)}


def factors(L: Layer, f: Factorized, r: int):
    """(W1, W2) tensors of the two nodes at rank r (float64)."""
    sq = np.sqrt(f.S[:r])
    first = f.U[:, :r] * sq          # [D or C*kh, r]
    second = sq[:, None] * f.V[:r]   # [r, K or K*kw]
    if L.kind != "conv":
        return first, second          # y = x @ first @ second
    K, C, kh, kw = L.W.shape
    if f.form == "weight":
        return first.T.reshape(r, C, kh, kw), second.T.reshape(K, r, 1, 1)
    W1 = first.T.reshape(r, C, kh, 1)
    W2 = second.reshape(r, K, kw).transpose(1, 0, 2).reshape(K, r, 1, kw)
    return W1, W2


def _stage1(L: Layer, form: str, W1, X: np.ndarray) -> np.ndarray:
    """First-factor outputs at the sampled rows, flattened as the second factor reads them."""
    n = len(X)
    if L.kind != "conv":
        return X.astype(np.float64) @ W1
    r = W1.shape[0]
    if form == "weight":
        return X.reshape(n, -1).astype(np.float64) @ W1.reshape(r, -1).T
    return _spatial_z(X, W1.reshape(r, -1).T).reshape(n, -1).astype(np.float64)  # (r, j)


def _second_matrix(L: Layer, form: str, W2) -> np.ndarray:
    """W2 as [r(*kw), K] so that y = stage1 @ it."""
    if L.kind != "conv":
        return W2
    K = L.W.shape[0]
    return W2.reshape(K, -1).T  # weight: [K, r, 1, 1]; spatial: [K, r, 1, kw] -> (r, j)


def refit_second(L: Layer, form: str, W1, W2, X: np.ndarray, Y: np.ndarray, ridge: float,
                 with_bias: bool):
    """Least-squares second factor (and bias shift) from stage-1 outputs on X to targets Y,
    ridge-regularized towards the current second factor W2."""
    Z = _stage1(L, form, W1, X)
    prior = _second_matrix(L, form, W2)
    if with_bias:
        Z = np.concatenate([Z, np.ones((len(Z), 1))], axis=1)
        prior = np.concatenate([prior, np.zeros((1, prior.shape[1]))], axis=0)
    sol = ridge_solve(Z, Y, prior, ridge)  # [r(*kw) (+1), K]
    err = output_error(Z @ sol, Y)
    db = sol[-1] if with_bias else None
    X2 = sol[:-1] if with_bias else sol
    if L.kind != "conv":
        return X2, db, err
    K = L.W.shape[0]
    if form == "weight":
        return X2.T.reshape(K, -1, 1, 1), db, err
    kw = L.W.shape[3]
    return X2.reshape(-1, kw, K).transpose(2, 0, 1).reshape(K, -1, 1, kw), db, err


def factored_error(L: Layer, form: str, W1, W2, X: np.ndarray, Y: np.ndarray) -> float:
    return output_error(_stage1(L, form, W1, X) @ _second_matrix(L, form, W2), Y)


def spectrum(values: np.ndarray, n: int = 512) -> list:
    v = np.asarray(values, dtype=np.float64)
    idx = np.arange(len(v))
    if len(v) > n:
        idx = np.unique(np.round(np.geomspace(1, len(v), n)).astype(int) - 1)
    return [[int(i) + 1, float(f"{v[i]:.4g}")] for i in idx]


def energy_rank(s: np.ndarray, fraction: float) -> int:
    e = np.cumsum(np.asarray(s, dtype=np.float64) ** 2)
    return int(np.searchsorted(e, fraction * e[-1] * (1 - 1e-12))) + 1 if len(e) else 0


def image_spectrum(A: np.ndarray) -> np.ndarray:
    A64 = A.reshape(len(A), -1).astype(np.float64)
    ev = np.linalg.eigvalsh(A64.T @ A64)[::-1]
    return np.sqrt(np.clip(ev, 0, None))
