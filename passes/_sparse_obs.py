"""The sparse pass's solvers on weight matrices ``W [out, in]``: magnitude masks, the one-shot
OBS pruner with reconstruction (SparseGPT), per-layer error curves over a density grid and the
allocation of one weight budget across layers.

Masks are boolean ``[out, in]`` arrays, True where a weight is zeroed. With ``block = B`` the
output rows form blocks ``[bB, bB + B)`` (the last one may be shorter) that share one mask
over the inputs: the selection scores a (block, input) entry by the sum of its rows' saliency
and counts it as as many weights as the block has rows.
"""

from __future__ import annotations

import heapq
import math

import numpy as np

# densities at which the per-layer error curves are measured for a model budget
GRID = (0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.065, 0.08, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3,
        0.4, 0.5, 0.6, 0.75, 0.9, 1.0)


def keep_count(n: int, density: float) -> int:
    """Weights kept out of ``n`` at ``density`` (at least one)."""
    return min(n, max(1, int(round(density * n))))


def row_blocks(rows: int, block: int | None) -> tuple[np.ndarray, np.ndarray] | None:
    """(first row, row count) of each output block, aligned at multiples of ``block``; None
    for the unstructured pattern."""
    if not block or block <= 1:
        return None
    starts = np.arange(0, rows, block)
    return starts, np.diff(np.append(starts, rows))


def prune_mask(score: np.ndarray, n_prune: int, blocks) -> np.ndarray:
    """Mask of the ``n_prune`` weights of least ``score`` ([out, in]), whole (block, input)
    entries with ``blocks`` (then the count is the nearest a whole number of entries gives)."""
    rows, cols = score.shape
    if n_prune <= 0:
        return np.zeros((rows, cols), bool)
    if blocks is None:
        flat = np.zeros(rows * cols, bool)
        flat[np.argsort(score, axis=None, kind="stable")[:n_prune]] = True
        return flat.reshape(rows, cols)
    starts, sizes = blocks
    sg = np.add.reduceat(score, starts, axis=0)               # [blocks, in]
    order = np.argsort(sg, axis=None, kind="stable")
    cum = np.cumsum(np.broadcast_to(sizes[:, None], sg.shape).reshape(-1)[order])
    t = int(np.searchsorted(cum, n_prune, side="right"))      # entries with cum <= n_prune
    if t < len(cum) and (t == 0 or cum[t] - n_prune < n_prune - cum[t - 1]):
        t += 1
    mg = np.zeros(sg.size, bool)
    mg[order[:t]] = True
    return np.repeat(mg.reshape(sg.shape), sizes, axis=0)


def magnitude(W: np.ndarray, density: float, block: int | None = None) -> np.ndarray:
    """``W`` with its smallest-magnitude weights zeroed (per layer; per output block)."""
    n = W.size
    mask = prune_mask(np.asarray(W, np.float64) ** 2, n - keep_count(n, density),
                      row_blocks(W.shape[0], block))
    return np.where(mask, 0.0, W)


def inverse_factor(H: np.ndarray, damp: float) -> tuple[np.ndarray, np.ndarray]:
    """(upper Cholesky factor U of (H + lambda I)^-1 = U^T U, inputs never seen on the
    calibration rows), lambda = ``damp`` * mean diag(H)."""
    H = np.array(H, np.float64, copy=True)
    dead = np.diag(H) <= 0
    H[dead, dead] = 1.0
    lam = damp * max(float(np.mean(np.diag(H))), 1e-12)
    while True:
        Hd = H + lam * np.eye(len(H))
        try:
            L = np.linalg.cholesky(Hd)
            Linv = np.linalg.solve(L, np.eye(len(H)))       # H^-1 = Linv^T Linv
            Hinv = Linv.T @ Linv
            return np.linalg.cholesky((Hinv + Hinv.T) / 2).T, dead
        except np.linalg.LinAlgError:
            lam *= 10


def obs(W: np.ndarray, Hinv_u: np.ndarray, dead: np.ndarray, density: float,
        block: int | None = None, blocksize: int = 128,
        row_weight: np.ndarray | None = None, spread: str = "global") -> np.ndarray:
    """One-shot OBS pruning with reconstruction (SparseGPT), all output rows at once.

    Inputs are processed in order; at the start of every ``blocksize`` columns the mask of
    that column block is chosen by the saliency ``w^2 / [U]_ii^2`` (summed over an output
    block's rows), with the layer's prune count spread evenly over the column blocks; each
    zeroed column's error is propagated to the columns not yet processed through the rows of
    U, which minimizes ``||X (W - W')^T||`` for the remaining weights. ``row_weight`` (one
    per output row) scales the saliency: how much an output row's error matters."""
    W = np.array(W, np.float64, copy=True)
    rows, cols = W.shape
    W[:, dead] = 0.0                      # inputs that are always zero: free to drop
    n_prune = W.size - keep_count(W.size, density)
    blocks = row_blocks(rows, block)
    bounds = list(range(0, cols, blocksize)) + [cols]
    if spread == "global":
        # how many weights each column block loses: from the whole layer's saliency ranking
        # before any update (the inputs that matter less lose more)
        sal = W ** 2 / np.diag(Hinv_u)[None, :] ** 2
        if row_weight is not None:
            sal = sal * row_weight[:, None]
        per_col = prune_mask(sal, n_prune, blocks).sum(axis=0)
        cum = [0] + [int(x) for x in np.cumsum([per_col[a:b].sum() for a, b in
                                                 zip(bounds[:-1], bounds[1:])])]
    else:
        cum = [int(round(n_prune * b / cols)) for b in bounds]
    mask = np.zeros_like(W, bool)
    for j, (i1, i2) in enumerate(zip(bounds[:-1], bounds[1:])):
        W1 = W[:, i1:i2].copy()
        U1 = Hinv_u[i1:i2, i1:i2]
        d = np.diag(U1)
        sal = W1 ** 2 / d[None, :] ** 2
        if row_weight is not None:
            sal = sal * row_weight[:, None]
        M1 = prune_mask(sal, cum[j + 1] - cum[j], blocks)
        Err = np.zeros_like(W1)
        for i in range(i2 - i1):
            w = W1[:, i]
            q = np.where(M1[:, i], 0.0, w)
            err = (w - q) / d[i]
            W1[:, i:] -= np.outer(err, U1[i, i:])
            W1[:, i] = q
            Err[:, i] = err
        W[:, i1:i2] = W1
        if i2 < cols:
            W[:, i2:] -= Err @ Hinv_u[i1:i2, i2:]
        mask[:, i1:i2] = M1
    W[mask] = 0.0
    return W


def refit(W: np.ndarray, X: np.ndarray, X0: np.ndarray, damp: float) -> np.ndarray:
    """The dense weight that best maps the current inputs X to the dense model's outputs
    ``X0 W^T`` (ridge towards W, ``damp`` * mean diag of ``X^T X / n``): OBS from there
    minimizes ``||X W'^T - X0 W^T||`` instead of ``||X (W - W')^T||``."""
    n = len(X)
    H = X.T @ X / n
    lam = damp * max(float(np.mean(np.diag(H))), 1e-12)
    rhs = (X.T @ X0 / n) @ W.T + lam * W.T
    return np.linalg.solve(H + lam * np.eye(len(H)), rhs).T


def weight_error(W: np.ndarray, Wp: np.ndarray) -> float:
    return float(np.linalg.norm(W - Wp) / max(np.linalg.norm(W), 1e-30))


def output_error(W: np.ndarray, Wp: np.ndarray, H: np.ndarray,
                 row_weight: np.ndarray | None = None) -> float:
    """``||X (W - W')^T|| / ||X W^T||`` from the input second moments ``H = X^T X / n``, the
    output rows weighted by ``row_weight`` when given."""
    E = W - Wp
    rw = 1.0 if row_weight is None else row_weight
    num = float(np.sum(rw * np.sum((E @ H) * E, axis=1)))
    den = float(np.sum(rw * np.sum((W @ H) * W, axis=1)))
    return math.sqrt(max(num, 0.0) / max(den, 1e-30))


def curve(W: np.ndarray, H: np.ndarray | None, block: int | None, blocksize: int,
          damp: float, data_aware: bool, row_weight: np.ndarray | None = None,
          spread: str = "global") -> np.ndarray:
    """Relative error of the layer at each density of :data:`GRID`: output error (OBS when
    ``data_aware``, else magnitude masks) from H when given, else weight error."""
    W = np.asarray(W, np.float64)
    fac = inverse_factor(H, damp) if (H is not None and data_aware) else None
    out = []
    for d in GRID:
        if d >= 1.0:
            out.append(0.0)
            continue
        Wp = obs(W, *fac, d, block, blocksize, row_weight, spread) if fac is not None else \
            magnitude(W, d, block)
        out.append(output_error(W, Wp, H, row_weight) if H is not None
                   else weight_error(W, Wp))
    return np.array(out)


def _hull(x: np.ndarray, y: np.ndarray) -> list[int]:
    """Indices of the lower convex hull of the points (x increasing, y the error)."""
    hull: list[int] = []
    for i in range(len(x)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            if (y[b] - y[a]) * (x[i] - x[a]) >= (y[i] - y[a]) * (x[b] - x[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def allocate(curves: list[np.ndarray], sizes: list[int], budget: float) -> list[float]:
    """Densities (one per layer) minimizing the summed relative error with at most
    ``budget`` weights kept in all: greedy on each curve's lower convex hull (the cheapest
    error reduction per kept weight first, optimal for the convexified curves); the last
    step that does not fit whole is taken in part (density between two grid points)."""
    grid = np.array(GRID)
    hulls = [_hull(grid * n, c) for c, n in zip(curves, sizes)]
    pos = [0] * len(curves)
    dens = [float(grid[h[0]]) for h in hulls]
    used = sum(d * n for d, n in zip(dens, sizes))
    heap = []

    def push(li):
        h = hulls[li]
        if pos[li] + 1 < len(h):
            a, b = h[pos[li]], h[pos[li] + 1]
            dk = (grid[b] - grid[a]) * sizes[li]
            heapq.heappush(heap, ((curves[li][b] - curves[li][a]) / dk, li, dk, a, b))

    for li in range(len(curves)):
        push(li)
    while heap:
        slope, li, dk, a, b = heapq.heappop(heap)
        if slope >= 0:
            break
        if used + dk <= budget:
            used += dk
            pos[li] += 1
            dens[li] = float(grid[b])
            push(li)
            continue
        frac = max(0.0, (budget - used) / dk)
        dens[li] = float(grid[a] + frac * (grid[b] - grid[a]))
        break
    return dens
