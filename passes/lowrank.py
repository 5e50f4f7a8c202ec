"""lowrank: factorize Conv and Gemm/MatMul weights into low-rank pairs (SVD), data-aware with --calib.

Algebra. Write a layer as ``y = W x`` with W the weight matrix (out x in):

* **weight SVD** (Conv, groups=1): W[K,C,kh,kw] viewed as K x (C*kh*kw) = U S V^T. Keep r
  singular values: ``W ~ W2 W1`` with ``W1 = sqrt(S_r) V_r^T`` (r x C*kh*kw, a Conv with the
  original kernel, stride, pads and dilation, no bias) and ``W2 = U_r sqrt(S_r)`` (K x r, a 1x1
  Conv carrying the bias). MACs per output pixel: ``K*C*kh*kw -> r*(C*kh*kw + K)``.
* **spatial SVD** (as AIMET does): W viewed as (C*kh) x (K*kw), ``M[(c,i),(k,j)] = W[k,c,i,j]``
  = U S V^T; ``W1[r,c,i,0] = (U_r sqrt(S_r))[(c,i),r]`` is a kh x 1 Conv (vertical stride, pads
  and dilation) and ``W2[k,r,0,j] = (sqrt(S_r) V_r^T)[r,(k,j)]`` a 1 x kw Conv (horizontal
  ones, and the bias). Exact at full rank because zero padding commutes with the split.
* **Gemm / MatMul** with a constant weight: ``alpha * op(A) op(B) + beta * C`` with
  ``W = alpha * op(B)^T`` -> ``Gemm(A, W1^T, transA) -> Gemm(., W2^T, C, beta)`` (MatMul:
  two MatMuls).

Data-aware (``--calib``): with the layer's input patches A (im2col rows sampled from real
activations) and ``Sigma = A^T A / n = L L^T``, the output error is ``||A (W - W_r)^T|| =
||(W - W_r) L||``, so the rank-r factors come from the SVD of ``W L`` (``W1 = sqrt(S_r) V_r^T
L^-1``) and the rank is chosen from the *output* error; the second factor is then refitted by
least squares ``W2 = argmin ||Z W2^T - A W^T||`` with ``Z = A W1^T``. Spatial SVD whitens with
the covariance of the kh x 1 column patches and its output error is measured on the data.

Rank: one of ``sigma_threshold`` (keep sigma >= a * sigma_max, the seed's rule), ``energy``
(keep that fraction of sum sigma^2, i.e. 1 - relative error^2), ``max_error`` (relative error
of the weights, or of the outputs with calib), ``rank_ratio`` or ``mac_ratio`` (per-layer MAC
budget). With ``form=auto`` each layer gets the form with fewer MACs at that criterion (at a
MAC budget: the smaller error). A layer is rewritten only if MACs and parameters both drop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgec.core.graph import all_names, attr, initializers, provenance, set_provenance
from edgec.core.graph import unique_name, value_shapes

from . import PassContext, PassReport, Tolerance, copy_model, register_pass

PASS = "lowrank"
CRITERIA = ("sigma_threshold", "energy", "max_error", "rank_ratio", "mac_ratio",
            "model_mac_ratio")
DEFAULT_ENERGY = 0.95


@dataclass(frozen=True)
class LowRankConfig:
    # rank criterion: set one (none set: energy=0.95)
    sigma_threshold: float | None = None  # drop sigma < a * sigma_max
    energy: float | None = None           # keep this fraction of sum(sigma^2)
    max_error: float | None = None        # max relative error (weights; outputs with calib)
    rank_ratio: float | None = None       # rank = ceil(ratio * full rank)
    mac_ratio: float | None = None        # per-layer MACs after <= ratio * before
    model_mac_ratio: float | None = None  # all candidates' MACs after <= ratio * before,
    #                                       ranks allocated across layers (least total error)
    form: Literal["auto", "weight", "spatial"] = "auto"
    data_aware: bool = True      # use --calib activations when given
    refit: bool = True           # least-squares refit of the second factor (with calib)
    refit_bias: bool = True      # ... and of the bias (absorbs the mean shift)
    sequential: bool = True      # refit on the inputs the rewritten layers above produce
    calib_samples: int = 512     # calibration rows (images) used at most
    calib_rows: int = 4096       # im2col rows sampled per layer
    ridge: float = 1e-4          # Tikhonov term, relative to the mean input energy
    round_to: int = 1            # round ranks up to a multiple (SIMD width)
    min_macs: int = 0            # leave layers with fewer MACs per sample alone
    conv: bool = True
    gemm: bool = True
    include: tuple[str, ...] = ()  # only these nodes (names), if given
    exclude: tuple[str, ...] = ()
    spectra: bool = True         # singular values (weights and, with calib, im2col) in report
    force: bool = False          # rewrite even where MACs/params do not drop (experiments)

    def __post_init__(self):
        for k in ("sigma_threshold", "rank_ratio", "mac_ratio", "max_error", "model_mac_ratio"):
            v = getattr(self, k)
            if v is not None and not (0.0 <= v <= 1.0):
                raise ValueError(f"{k} must be within [0, 1], got {v}")
        if self.energy is not None and not (0.0 < self.energy <= 1.0):
            raise ValueError(f"energy must be within (0, 1], got {self.energy}")
        if sum(getattr(self, k) is not None for k in CRITERIA) > 1:
            set_ = [k for k in CRITERIA if getattr(self, k) is not None]
            raise ValueError(f"set only one rank criterion, got {', '.join(set_)}")
        if self.round_to < 1 or self.calib_rows < 16 or self.calib_samples < 1:
            raise ValueError("round_to >= 1, calib_rows >= 16 and calib_samples >= 1 required")
        if self.ridge < 0:
            raise ValueError("ridge must be >= 0")

    def criterion(self) -> tuple[str, float]:
        for k in CRITERIA:
            if getattr(self, k) is not None:
                return k, float(getattr(self, k))
        return "energy", DEFAULT_ENERGY


# ----------------------------------------------------------------------------- layer views

@dataclass
class Layer:
    node: onnx.NodeProto
    kind: str                 # "conv" | "gemm" | "matmul"
    W: np.ndarray             # conv: [K,C,kh,kw]; gemm/matmul: [out, in] (alpha folded)
    dtype: np.dtype
    x_shape: tuple            # input shape (conv: N,C,H,W)
    y_shape: tuple
    strides: tuple = (1, 1)
    dils: tuple = (1, 1)
    pads: tuple = (0, 0, 0, 0)  # top, left, bottom, right
    trans_a: int = 0
    beta: float = 1.0
    bias: str | None = None

    @property
    def out_pixels(self) -> int:
        """Output positions per sample that each apply the whole weight."""
        if self.kind == "conv":
            return int(np.prod(self.y_shape[2:]))
        return int(np.prod(self.y_shape[1:-1])) if self.kind == "matmul" else 1

    def macs(self) -> int:
        if self.kind == "conv":
            return self.out_pixels * int(np.prod(self.W.shape))
        return self.out_pixels * self.W.shape[0] * self.W.shape[1]

    def form_macs(self, form: str, r: int) -> int:
        if self.kind != "conv":
            return self.out_pixels * r * (self.W.shape[0] + self.W.shape[1])
        K, C, kh, kw = self.W.shape
        if form == "weight":
            return self.out_pixels * r * (C * kh * kw + K)
        h_out, w_out = self.y_shape[2], self.y_shape[3]
        w_in = self.x_shape[3]
        return h_out * w_in * r * C * kh + h_out * w_out * K * r * kw

    def form_params(self, form: str, r: int) -> int:
        if self.kind != "conv":
            return r * (self.W.shape[0] + self.W.shape[1])
        K, C, kh, kw = self.W.shape
        return r * (C * kh * kw + K) if form == "weight" else r * (C * kh + K * kw)

    def matrix(self, form: str) -> np.ndarray:
        W = self.W.astype(np.float64)
        if self.kind != "conv":
            return W
        K, C, kh, kw = W.shape
        if form == "weight":
            return W.reshape(K, -1)
        return W.transpose(1, 2, 0, 3).reshape(C * kh, K * kw)

    def forms(self, wanted: str) -> list[str]:
        if self.kind != "conv":
            return ["weight"]
        spatial_ok = self.W.ndim == 4 and self.W.shape[2] > 1 and self.W.shape[3] > 1
        if wanted == "spatial":
            return ["spatial"] if spatial_ok else []
        if wanted == "weight":
            return ["weight"]
        return ["weight", "spatial"] if spatial_ok else ["weight"]


def _explicit_pads(node, x_shape, W) -> tuple | None:
    kh, kw = W.shape[2:]
    s = list(attr(node, "strides", [1, 1]))
    d = list(attr(node, "dilations", [1, 1]))
    auto = attr(node, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("NOTSET", ""):
        p = list(attr(node, "pads", [0, 0, 0, 0]))
        return (p[0], p[1], p[2], p[3])
    if auto == "VALID":
        return (0, 0, 0, 0)
    out = []
    for ax, k in ((0, kh), (1, kw)):
        n = x_shape[2 + ax]
        total = max((math.ceil(n / s[ax]) - 1) * s[ax] + (k - 1) * d[ax] + 1 - n, 0)
        small, big = total // 2, total - total // 2
        out.append((small, big) if auto == "SAME_UPPER" else (big, small))
    return (out[0][0], out[1][0], out[0][1], out[1][1])


def _candidate(node, inits, shapes, config) -> tuple[Layer | None, str | None]:
    """The layer view of ``node``, or the reason it cannot be factorized."""
    if provenance(node).get("edgec.pass") == PASS:
        return None, "already factorized by lowrank"
    if config.include and node.name not in config.include:
        return None, "not in lowrank.include"
    if node.name in config.exclude:
        return None, "in lowrank.exclude"
    if node.op_type == "Conv":
        if not config.conv:
            return None, "conv factorization disabled (lowrank.conv=false)"
        if len(node.input) < 2 or node.input[1] not in inits:
            return None, "weight is not a constant"
        W = numpy_helper.to_array(inits[node.input[1]])
        if not np.all(np.isfinite(W)):
            return None, "weight holds NaN or infinity"
        if attr(node, "group", 1) != 1:
            return None, f"grouped/depthwise conv (group={attr(node, 'group', 1)}) is not " \
                         "factorized"
        if W.ndim != 4:
            return None, f"{W.ndim - 2}-D conv: only 2-D convs are factorized"
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if bias is not None and bias not in inits:
            return None, "bias is not a constant"
        xs, ys = shapes.get(node.input[0]), shapes.get(node.output[0])
        if not xs or not ys or len(xs) != 4 or any(not d for d in xs[1:]) or \
                any(not d for d in ys[1:]):
            return None, "input/output shapes are not known"
        pads = _explicit_pads(node, xs, W)
        return Layer(node, "conv", W, W.dtype, xs, ys,
                     tuple(attr(node, "strides", [1, 1])), tuple(attr(node, "dilations", [1, 1])),
                     pads, bias=bias), None
    if node.op_type in ("Gemm", "MatMul"):
        if not config.gemm:
            return None, "gemm factorization disabled (lowrank.gemm=false)"
        if len(node.input) < 2 or node.input[1] not in inits:
            return None, "second operand (the weight) is not a constant"
        if node.input[0] in inits:
            return None, "first operand is a constant too"
        B = numpy_helper.to_array(inits[node.input[1]])
        if np.issubdtype(B.dtype, np.floating) and not np.all(np.isfinite(B)):
            return None, "weight holds NaN or infinity"
        if B.ndim != 2:
            return None, f"weight has rank {B.ndim}: only 2-D weights are factorized"
        xs, ys = shapes.get(node.input[0]), shapes.get(node.output[0])
        if not ys or any(d is None for d in ys[1:]):
            return None, "output shape is not known"
        if node.op_type == "Gemm":
            alpha = float(attr(node, "alpha", 1.0))
            Wm = (B.T if attr(node, "transB", 0) else B).T * alpha  # [in, out] -> [out, in]
            Wm = Wm.astype(B.dtype)
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
            if bias is not None and bias not in inits:
                return None, "bias C is not a constant"
            return Layer(node, "gemm", np.ascontiguousarray(Wm), B.dtype, xs or (), ys,
                         trans_a=int(attr(node, "transA", 0)),
                         beta=float(attr(node, "beta", 1.0)), bias=bias), None
        return Layer(node, "matmul", np.ascontiguousarray(B.T), B.dtype, xs or (), ys), None
    return None, None


# ----------------------------------------------------------------------------- calibration

def _sample_patches(x: np.ndarray, L: Layer, n_rows: int, rng) -> np.ndarray:
    from ._calib import sample_patches

    return sample_patches(x, L.W.shape[2:], L.strides, L.dils, L.pads, L.y_shape[2:4],
                          n_rows, rng)


def _gemm_rows(x: np.ndarray, L: Layer, n_rows: int, rng) -> np.ndarray:
    from ._calib import sample_rows

    return sample_rows(x.T if (L.kind == "gemm" and L.trans_a) else x, n_rows, rng)


def _calibrate(model, layers: list[tuple[int, Layer]], calib, config, seed
               ) -> dict[str, np.ndarray]:
    """Input rows per layer, sampled over the calibration batches.

    The positions depend only on (seed, layer index, batch index), so a second capture from a
    rewritten model samples exactly the same positions (sequential reconstruction needs that).
    """
    from ._calib import calib_rows, fixed_batch, stream_activations

    total = min(calib_rows(calib), config.calib_samples)
    batch = fixed_batch(model) or 32
    per = math.ceil(config.calib_rows / max(1, math.ceil(total / batch)))
    parts: dict[str, list] = {L.node.name: [] for _, L in layers}
    names = [L.node.input[0] for _, L in layers]
    for bi, acts in enumerate(stream_activations(model, calib, names, batch=batch,
                                                 limit=total)):
        for li, L in layers:
            x = acts[L.node.input[0]]
            rng = np.random.default_rng([seed, li, bi])
            if L.kind == "conv":
                parts[L.node.name].append(_sample_patches(x, L, per, rng))
            else:
                parts[L.node.name].append(_gemm_rows(x, L, per, rng))
    return {k: np.concatenate(v)[: config.calib_rows] for k, v in parts.items() if v}


def _chol(S: np.ndarray, ridge: float) -> np.ndarray:
    scale = max(np.trace(S) / len(S), 1e-12)
    for extra in (0.0, 1e-8, 1e-6, 1e-4, 1e-2):
        try:
            return np.linalg.cholesky(S + np.eye(len(S)) * (ridge + extra) * scale)
        except np.linalg.LinAlgError:
            continue
    raise np.linalg.LinAlgError("covariance is not positive definite")


# ----------------------------------------------------------------------------- factorization

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


def _target(L: Layer, A: np.ndarray) -> np.ndarray:
    """The original layer's output (without bias) on input rows A: [n, K]."""
    K = L.W.shape[0]
    return A.reshape(len(A), -1).astype(np.float64) @ L.W.reshape(K, -1).T.astype(np.float64)


def _factor(L: Layer, form: str, X: np.ndarray | None, Y: np.ndarray | None,
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


def _rank_for(L: Layer, f: Factorized, crit: str, value: float) -> int:
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


def _round(r: int, R: int, round_to: int) -> int:
    return min(R, math.ceil(r / round_to) * round_to) if round_to > 1 else r


def _allocate(plans, ratio: float, round_to: int) -> dict[str, tuple[int, int]]:
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
            for r in sorted({_round(r, R, round_to) for r in range(1, R + 1)}):
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


def _factors(L: Layer, f: Factorized, r: int):
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


def _refit(L: Layer, form: str, W1, W2, X: np.ndarray, Y: np.ndarray, ridge: float,
           with_bias: bool):
    """Least-squares second factor (and bias shift) from stage-1 outputs on X to targets Y,
    ridge-regularized towards the current second factor W2."""
    Z = _stage1(L, form, W1, X)
    prior = _second_matrix(L, form, W2)
    if with_bias:
        Z = np.concatenate([Z, np.ones((len(Z), 1))], axis=1)
        prior = np.concatenate([prior, np.zeros((1, prior.shape[1]))], axis=0)
    G = Z.T @ Z
    G += np.eye(len(G)) * (ridge * max(np.trace(G) / len(G), 1e-12))
    sol = prior + np.linalg.solve(G, Z.T @ (Y - Z @ prior))  # [r(*kw) (+1), K]
    err = math.sqrt(float(np.sum((Z @ sol - Y) ** 2)) / max(float(np.sum(Y ** 2)), 1e-30))
    db = sol[-1] if with_bias else None
    X2 = sol[:-1] if with_bias else sol
    if L.kind != "conv":
        return X2, db, err
    K = L.W.shape[0]
    if form == "weight":
        return X2.T.reshape(K, -1, 1, 1), db, err
    kw = L.W.shape[3]
    return X2.reshape(-1, kw, K).transpose(2, 0, 1).reshape(K, -1, 1, kw), db, err


def _output_error(L: Layer, form: str, W1, W2, X: np.ndarray, Y: np.ndarray) -> float:
    out = _stage1(L, form, W1, X) @ _second_matrix(L, form, W2)
    return math.sqrt(float(np.sum((out - Y) ** 2)) / max(float(np.sum(Y ** 2)), 1e-30))


def _spectrum(values: np.ndarray, n: int = 512) -> list:
    v = np.asarray(values, dtype=np.float64)
    idx = np.arange(len(v))
    if len(v) > n:
        idx = np.unique(np.round(np.geomspace(1, len(v), n)).astype(int) - 1)
    return [[int(i) + 1, float(f"{v[i]:.4g}")] for i in idx]


def _energy_rank(s: np.ndarray, fraction: float) -> int:
    e = np.cumsum(np.asarray(s, dtype=np.float64) ** 2)
    return int(np.searchsorted(e, fraction * e[-1] * (1 - 1e-12))) + 1 if len(e) else 0


def _image_spectrum(A: np.ndarray) -> np.ndarray:
    A64 = A.reshape(len(A), -1).astype(np.float64)
    ev = np.linalg.eigvalsh(A64.T @ A64)[::-1]
    return np.sqrt(np.clip(ev, 0, None))


# ----------------------------------------------------------------------------- the pass

def _plot(report: dict, out_dir):
    import matplotlib.pyplot as plt

    spectra = report.get("details", {}).get("spectra", {})
    paths = []
    for key, title, fname in (
            ("weight", "weight matrices (K x C*kh*kw)", "lowrank_weight_spectra.png"),
            ("image", "im2col activation (image) matrices, calibration data",
             "lowrank_image_spectra.png")):
        series = {k: v[key] for k, v in spectra.items() if v.get(key)}
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(8, 5))
        for name, pts in series.items():
            idx = np.array([p[0] for p in pts], dtype=float)
            val = np.array([p[1] for p in pts], dtype=float)
            ax.semilogy(idx / idx.max(), val / max(val.max(), 1e-30), label=name, lw=1)
        ax.set_ylim(1e-6, 1.5)  # below ~1e-6: round-off, or fewer sampled rows than columns
        ax.set_xlabel("singular value index / full rank")
        ax.set_ylabel("sigma / sigma_max")
        ax.set_title(f"singular-value decay: {title}")
        ax.grid(True, which="both", alpha=0.3)
        if len(series) <= 24:
            ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        p = out_dir / fname
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


@register_pass(PASS, LowRankConfig, tolerance=Tolerance(rtol=0.0, atol=0.0, min_cosine=0.9),
               plot=_plot)
def lowrank(model: onnx.ModelProto, config: LowRankConfig, ctx: PassContext):
    m = copy_model(model)
    report = PassReport(PASS)
    crit, value = config.criterion()
    inits = initializers(m)
    shapes = value_shapes(m)
    layers: list[Layer] = []
    for node in m.graph.node:
        L, why = _candidate(node, inits, shapes, config)
        if why:
            report.skip(node, why)
        elif L is not None:
            if L.macs() < config.min_macs:
                report.skip(node, f"{L.macs()} MACs per sample < lowrank.min_macs")
            else:
                layers.append(L)
    index = {L.node.name: i for i, L in enumerate(layers)}
    use_data = bool(ctx.calib) and config.data_aware and bool(layers)
    rows = _calibrate(m, list(enumerate(layers)), ctx.calib, config, ctx.seed) \
        if use_data else {}
    rows = {k: v for k, v in rows.items() if len(v) >= 16}

    # 1. factor every layer in every applicable form (symmetric: original inputs)
    plans = []
    for L in layers:
        forms = L.forms(config.form)
        if not forms:
            report.skip(L.node, f"form '{config.form}' does not apply to this layer "
                                f"(kernel {list(L.W.shape[2:])})")
            continue
        A = rows.get(L.node.name)
        plans.append((L, [_factor(L, form, A, None, config) for form in forms]))

    # 2. choose form and rank per layer
    if crit == "model_mac_ratio":
        choice = _allocate(plans, value, config.round_to)
    else:
        choice = {}
        for L, facts in plans:
            opts = []
            for i, f in enumerate(facts):
                r = _round(_rank_for(L, f, crit, value), len(f.S), config.round_to)
                opts.append((L.form_macs(f.form, r), float(f.err[r - 1]), i, r))
            key = (lambda o: (o[1], o[0])) if crit == "mac_ratio" else (lambda o: o[:2])
            _, _, i, r = min(opts, key=key)
            choice[L.node.name] = (i, r)

    # 3. fit the chosen factors in graph order; with calib and `sequential`, each layer's
    #    second factor is refitted on the inputs the already-rewritten layers above produce
    names = all_names(m)
    producer = {o: n for n in m.graph.node for o in n.output}
    table, spectra = [], {}
    new_nodes: dict[str, list[onnx.NodeProto]] = {}
    new_inits: list[onnx.TensorProto] = []
    for L, facts in plans:
        i, r = choice[L.node.name]
        params0, macs0 = int(L.W.size), L.macs()
        A = rows.get(L.node.name)
        energy99 = {}
        if config.spectra:
            sv = {"weight": np.linalg.svd(L.matrix("weight"), compute_uv=False)}
            if A is not None:
                sv["image"] = _image_spectrum(A)
            spectra[L.node.name] = {k: _spectrum(v) for k, v in sv.items()}
            # the seed's comparison: how much of each matrix's rank 99 % of the energy needs
            energy99 = {k: round(_energy_rank(v, 0.99) / len(v), 4) for k, v in sv.items()}
        if i is None:  # global allocation left it alone
            report.skip(L.node, "the model MAC budget is met more cheaply elsewhere")
            table.append({"node": L.node.name, "op": L.node.op_type, "form": None,
                          "macs_before": macs0, "macs_after": macs0,
                          "params_before": params0, "params_after": params0,
                          "skipped": "budget met elsewhere", **(
                              {"rank_fraction_for_99pct_energy": energy99} if energy99 else {})})
            continue
        if energy99:
            table_extra = {"rank_fraction_for_99pct_energy": energy99}
        else:
            table_extra = {}
        f = facts[i]
        macs, params1 = L.form_macs(f.form, r), L.form_params(f.form, r)
        row = {"node": L.node.name, "op": L.node.op_type, "form": f.form, "rank": r,
               "full_rank": len(f.S), "macs_before": macs0, "macs_after": macs,
               "params_before": params0, "params_after": params1,
               "error": round(float(f.err[r - 1]), 5),
               "error_of": "outputs" if f.data else "weights",
               "candidates": {g.form: {"rank": _round(_rank_for(L, g, crit, value), len(g.S),
                                                      config.round_to)
                                       if crit != "model_mac_ratio" else None,
                                       "error_at_rank": round(float(g.err[min(r, len(g.S)) - 1]),
                                                              5)}
                              for g in facts}, **table_extra}
        if (macs >= macs0 or params1 >= params0) and not config.force:
            why = (f"rank {r} of {len(f.S)} ({f.form} form) would not reduce "
                   f"{'MACs' if macs >= macs0 else 'parameters'} ({macs} vs {macs0} MACs, "
                   f"{params1} vs {params0} params)")
            report.skip(L.node, why, rank=r, form=f.form)
            row["skipped"] = why
            table.append(row)
            continue
        M = L.matrix(f.form)
        Wr = (f.U[:, :r] * f.S[:r]) @ f.V[:r]
        row["weight_error"] = round(float(np.linalg.norm(
            (Wr.T if (L.kind != "conv" or f.form == "weight") else Wr) - M)
            / max(np.linalg.norm(M), 1e-30)), 5)
        bias_shift = None
        if A is not None:
            Y = _target(L, A)
            X = A
            upstream = _ancestors(L.node, producer) & set(new_nodes)
            if config.sequential and upstream:
                cur = _with_rewrites(m, new_nodes, new_inits)
                X = _calibrate(cur, [(index[L.node.name], L)], ctx.calib, config,
                               ctx.seed)[L.node.name]
                f = _factor(L, f.form, X, Y, config)
                row["sequential"] = True
            W1, W2 = _factors(L, f, r)
            e_before = _output_error(L, f.form, W1, W2, X, Y)
            row["output_error"] = round(e_before, 5)
            if config.refit:
                W2_fit, db, e_after = _refit(L, f.form, W1, W2, X, Y, config.ridge,
                                             with_bias=config.refit_bias)
                row["output_error_refit"] = round(e_after, 5)
                if e_after < e_before:  # keep the refit only where it helps
                    W2, bias_shift = W2_fit, db
        else:
            W1, W2 = _factors(L, f, r)
        nodes, inits_ = _rewrite(L, f.form, r, W1, W2, bias_shift, inits, names)
        new_nodes[L.node.name] = nodes
        new_inits += inits_
        report.rewrite(L.node, f"{f.form} SVD rank {r}/{len(f.S)}: {macs0} -> {macs} MACs",
                       form=f.form, rank=r)
        table.append(row)

    report.details = {"criterion": {crit: value}, "data_aware": bool(rows), "layers": table,
                      "calib_rows": {k: len(v) for k, v in rows.items()}}
    if config.spectra:
        report.details["spectra"] = spectra
    if not new_nodes:
        return m, report
    return _with_rewrites(m, new_nodes, new_inits), report


def _ancestors(node: onnx.NodeProto, producer: dict) -> set[str]:
    seen: set[str] = set()
    stack = [i for i in node.input if i in producer]
    while stack:
        p = producer[stack.pop()]
        if p.name in seen:
            continue
        seen.add(p.name)
        stack += [i for i in p.input if i in producer]
    return seen


def _with_rewrites(m: onnx.ModelProto, new_nodes: dict, new_inits: list) -> onnx.ModelProto:
    out = copy_model(m)
    nodes = []
    for n in out.graph.node:
        nodes += new_nodes.get(n.name, [n])
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(new_inits)
    used = {i for n in out.graph.node for i in n.input}
    kept = [t for t in out.graph.initializer if t.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    return out


def _rewrite(L: Layer, form: str, r: int, W1, W2, bias_shift, inits, names: set[str]):
    node = L.node
    base = node.name or node.output[0]
    mid = unique_name(names, f"{base}_lowrank_mid")
    w1n = unique_name(names, f"{base}_lowrank_w1")
    w2n = unique_name(names, f"{base}_lowrank_w2")
    dt = L.dtype
    new = [numpy_helper.from_array(np.ascontiguousarray(W1).astype(dt), w1n),
           numpy_helper.from_array(np.ascontiguousarray(W2).astype(dt), w2n)]
    bias, beta = L.bias, L.beta
    if bias_shift is not None and np.any(bias_shift != 0):
        K = L.W.shape[0]
        b0 = np.zeros(K)
        if bias is not None:
            b = numpy_helper.to_array(inits[bias]).astype(np.float64) * beta
            b0 = np.broadcast_to(b.reshape(-1) if b.size == K else b, (K,))
        bias = unique_name(names, f"{base}_lowrank_bias")
        beta = 1.0
        new.append(numpy_helper.from_array((b0 + bias_shift).astype(dt), bias))
    n1name = unique_name(names, f"{base}/lowrank_a")
    n2name = unique_name(names, f"{base}/lowrank_b")
    if L.kind == "conv":
        pt, pl, pb, pr = L.pads
        sh, sw = L.strides
        dh, dw = L.dils
        kh, kw = L.W.shape[2:]
        if form == "weight":
            a1 = dict(kernel_shape=[kh, kw], strides=[sh, sw], dilations=[dh, dw],
                      pads=[pt, pl, pb, pr])
            a2 = dict(kernel_shape=[1, 1])
        else:
            a1 = dict(kernel_shape=[kh, 1], strides=[sh, 1], dilations=[dh, 1],
                      pads=[pt, 0, pb, 0])
            a2 = dict(kernel_shape=[1, kw], strides=[1, sw], dilations=[1, dw],
                      pads=[0, pl, 0, pr])
        n1 = helper.make_node("Conv", [node.input[0], w1n], [mid], name=n1name, **a1)
        n2 = helper.make_node("Conv", [mid, w2n] + ([bias] if bias else []), [node.output[0]],
                              name=n2name, **a2)
        out = [n1, n2]
    elif L.kind == "gemm":
        n1 = helper.make_node("Gemm", [node.input[0], w1n], [mid], name=n1name,
                              transA=L.trans_a)
        n2 = helper.make_node("Gemm", [mid, w2n] + ([bias] if bias else []), [node.output[0]],
                              name=n2name, **({"beta": beta} if bias and beta != 1.0 else {}))
        out = [n1, n2]
    else:
        n1 = helper.make_node("MatMul", [node.input[0], w1n], [mid], name=n1name)
        if bias and bias != L.bias:
            mid2 = unique_name(names, f"{base}_lowrank_mid2")
            n2 = helper.make_node("MatMul", [mid, w2n], [mid2], name=n2name)
            n3 = helper.make_node("Add", [mid2, bias], [node.output[0]],
                                  name=unique_name(names, f"{base}/lowrank_bias"))
            out = [n1, n2, n3]
        else:
            n2 = helper.make_node("MatMul", [mid, w2n], [node.output[0]], name=n2name)
            out = [n1, n2]
    for n, part in zip(out, ("first", "second", "bias")):
        set_provenance(n, PASS, base, form=form, rank=r, factor=part)
    return out, new
