"""cluster: weight sharing -- k-means each layer's weights into 2^bits shared values; calib refit.

Algebra. Write a layer as ``y = W x + b`` with W its weight matrix ``[out, in]`` (Conv,
group 1: ``[K, C*kh*kw]`` over the im2col patch; Gemm: ``op(B)^T``; MatMul with a constant
right operand: ``B^T``). The pass replaces every weight by one of ``2^bits`` shared values
(``bits`` 1..4; ``ternary=true``: the three values {-a, 0, +a}), one codebook per layer
(``granularity=layer``, the default) or one per output channel (``granularity=channel``).
The ONNX stays dense: the weight initializer holds the shared values as float32 (the
weight's dtype) bit-identical copies of the codebook entries, so the model runs in
onnxruntime unchanged and a kernel can count the distinct values exactly. The reuse-lookup
CPU kernel recognizes a layer whose *whole* weight takes at most 16 distinct values, i.e.
``granularity=layer``; per-channel codebooks (up to 16 x out values per layer) run on the
dense kernels.

Clustering: weighted 1-D k-means, k-means++ seeding from ``np.random.default_rng([seed,
layer])`` (``n_init`` seedings, the lowest weighted squared error kept), Lloyd iterations on
the sorted distinct values (exact, deterministic). A group with at most ``2^bits`` distinct
values already keeps them exactly (identity). Without calibration every weight counts the
same; with ``--calib`` (``data_aware``) weight ``W[o, k]`` counts with ``H[k, k]``, the second
moment of input column k (``H = X^T X / n`` over sampled im2col rows / input rows): the
diagonal of the output error ``(w_o - q_o)^T H (w_o - q_o)``. Layers are processed in graph
order on the inputs X the already clustered layers produce (``sequential``; X0: the original
model's inputs at the same positions, ``G = X^T X0 / n``): what is clustered there is the
dense weight that maps X onto the original outputs, ``W' = W G^T (H + 0.01 mean diag I)^-1``
(as the sparse pass's refit). Then the codebook is refitted (``refit``): the outputs are linear
in the codebook values, ``X q_o = sum_v c_v X e_{o,v}``, so ``min_c sum_o ||X q_o - X0
w_o||^2`` (with the full H and G) is a least-squares problem in ``2^bits`` unknowns per
codebook (ternary: one, ``a``), pulled to the k-means values by ``damp`` x the mean
diagonal, kept where it lowers the error. Last, the bias absorbs the mean output shift
``alpha (mu0 W^T - mu Q^T)`` (``refit_bias``; Conv and Gemm, not a bias-less MatMul).

Report, per layer: bits, granularity, codebook size and distinct values stored, the weight
relative error, with calib the output relative error against the original model's layer
output (from the moments) of the k-means codebook and after the refit,
``multiplies_dense`` (MACs per image) and ``distinct_products`` (distinct (value, input
element) pairs per image: what a lookup kernel multiplies; see ``_cluster_common``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx

from . import PassContext, PassReport, Tolerance, copy_model, register_pass
from ._cluster_common import Writer, distinct_products, multiplies_dense, select
from ._cluster_kmeans import kmeans1d, normal_equations, refit_codebook, ternary
from ._lowrank_layer import calibrate
from ._sparse_obs import output_error, weight_error

PASS = "cluster"
MAX_BITS = 4   # the reuse-lookup kernel's tables hold at most 16 values


@dataclass(frozen=True)
class ClusterConfig:
    bits: int = 4                       # 2^bits shared values per codebook (1..4)
    ternary: bool = False               # the three values {-a, 0, +a} instead (bits ignored)
    granularity: Literal["layer", "channel"] = "layer"  # one codebook per layer / per output
    #                                     channel (channel: runs on the dense kernels)
    min_weights: int = 0                # smaller layers keep their weights
    include: tuple[str, ...] = ()       # only these nodes (names), if given
    exclude: tuple[str, ...] = ()       # never these nodes
    data_aware: bool = True             # weight by the input second moments with --calib
    refit: bool = True                  # ... and refit the codebook on the outputs
    sequential: bool = True             # ... on the inputs the clustered layers above produce,
    #                                     to the original model's outputs
    refit_bias: bool = True             # ... and the bias absorbs the mean output shift
    n_init: int = 4                     # k-means++ seedings per codebook (best kept)
    damp: float = 1e-6                  # refit ridge, relative to its mean diagonal
    calib_samples: int = 1024           # calibration rows (images) used at most
    calib_rows: int = 8192              # input rows (im2col patches) sampled per layer

    def __post_init__(self):
        if not (1 <= self.bits <= MAX_BITS):
            raise ValueError(f"bits must be within 1..{MAX_BITS} (the reuse-lookup kernel's "
                             f"tables hold at most {2 ** MAX_BITS} values), got {self.bits}")
        if self.granularity not in ("layer", "channel"):
            raise ValueError(f"granularity must be layer or channel, got '{self.granularity}'")
        if self.min_weights < 0 or self.n_init < 1:
            raise ValueError("min_weights >= 0 and n_init >= 1 required")
        if self.damp < 0:
            raise ValueError(f"damp must be >= 0, got {self.damp}")
        if self.calib_rows < 16 or self.calib_samples < 1:
            raise ValueError("calib_rows >= 16 and calib_samples >= 1 required")

    @property
    def k(self) -> int:
        return 3 if self.ternary else 2 ** self.bits


@register_pass(PASS, ClusterConfig, tolerance=Tolerance(rtol=0.0, atol=0.0, min_cosine=0.9))
def cluster(model: onnx.ModelProto, config: ClusterConfig, ctx: PassContext):
    m = copy_model(model)
    report = PassReport(PASS)
    targets = select(m, config, report, PASS)
    data = bool(ctx.calib) and config.data_aware and bool(targets)
    rows0: dict[str, np.ndarray] = {}
    if data:
        got = calibrate(m, list(enumerate(t.L for t in targets)), ctx.calib, config, ctx.seed)
        rows0 = {k: v.reshape(len(v), -1) for k, v in got.items() if len(v) >= 16}
    w = Writer(m, PASS)
    table = []
    changed = False
    for li, t in enumerate(targets):
        X0 = rows0.get(t.name)
        mom = None
        if X0 is not None:
            X0 = X0.astype(np.float64)
            X = X0
            if config.sequential and changed:
                got = calibrate(m, [(li, t.L)], ctx.calib, config, ctx.seed).get(t.name)
                if got is not None and len(got) == len(X0):
                    X = got.reshape(len(got), -1).astype(np.float64)
            mom = _Moments(X, X0)
        row = _cluster_layer(t, mom, np.random.default_rng([ctx.seed, li]), config)
        if row is None:
            report.skip(t.L.node, f"every codebook group already holds <= {config.k} distinct "
                        "values: kept exactly")
            continue
        Wq = row.pop("_Wq")
        shift = row.pop("_bias_shift", None)
        w.set_input(t.name, 1, t.to_stored(Wq), "shared", "weights shared",
                    values=row["distinct_values"], granularity=config.granularity)
        if shift is not None:
            _add_bias(w, m, t, shift, row)
        changed = True
        report.rewrite(t.L.node, f"{row['distinct_values']} distinct weight values "
                       f"({config.granularity} codebooks of <= {config.k})",
                       **{k: v for k, v in row.items() if k not in ("node", "op")})
        table.append(row)
    dense = sum(r["multiplies_dense"] for r in table)
    prods = sum(r["distinct_products"] for r in table)
    report.details = {"bits": 2 if config.ternary else config.bits, "ternary": config.ternary,
                      "granularity": config.granularity,
                      "method": "data-aware (H-weighted k-means, LS refit)" if data
                      else "k-means", "layers": table,
                      "multiplies_dense": dense, "distinct_products": prods,
                      "distinct_products_fraction": round(prods / max(dense, 1), 6)}
    if not report.modified:
        return m, report
    return w.finish(), report


class _Moments:
    """Second moments of a layer's current input rows X and the original model's X0 (the
    same positions): ``H = X^T X / n``, ``G = X^T X0 / n``, ``H0 = X0^T X0 / n``."""

    def __init__(self, X: np.ndarray, X0: np.ndarray):
        n = len(X)
        self.same = X is X0
        self.H = X.T @ X / n
        self.G = self.H if self.same else X.T @ X0 / n
        self.H0 = self.H if self.same else X0.T @ X0 / n
        self.mu, self.mu0 = X.mean(axis=0), X0.mean(axis=0)

    def error(self, W: np.ndarray, Q: np.ndarray) -> float:
        """``||X Q^T - X0 W^T|| / ||X0 W^T||`` from the moments."""
        if self.same:
            return output_error(W, Q, self.H)
        ref = float(np.sum((W @ self.H0) * W))
        num = float(np.sum((Q @ self.H) * Q)) - 2 * float(np.sum((Q @ self.G) * W)) + ref
        return float(np.sqrt(max(num, 0.0) / max(ref, 1e-30)))


def _add_bias(w: Writer, m, t, shift: np.ndarray, row: dict) -> None:
    """Add ``shift`` to the layer's bias (Conv/Gemm with a constant or no bias; a MatMul
    has none: left as it is)."""
    from edgec.core.graph import attr

    from ._toolkit import bias_vector

    node = w.node(t.name)
    if node.op_type == "MatMul":
        row["bias_refit"] = "no (MatMul has no bias input)"
        return
    inits = {x.name: x for x in m.graph.initializer}
    has = len(node.input) > 2 and node.input[2]
    if has and node.input[2] not in inits:
        row["bias_refit"] = "no (bias is not an initializer)"
        return
    beta = float(attr(node, "beta", 1.0)) if node.op_type == "Gemm" else 1.0
    b0 = bias_vector(inits, node.input[2] if has else None, beta, len(shift))
    w.set_input(t.name, 2, (b0 + shift).astype(t.stored.dtype), "shared",
                "weights shared; bias absorbs the mean shift")
    for a in list(node.attribute):
        if a.name == "beta":
            node.attribute.remove(a)
    row["bias_refit"] = True


def _cluster_layer(t, mom, rng, config: ClusterConfig) -> dict | None:
    """The clustered weight matrix and the report row of one layer (None: unchanged)."""
    H = None if mom is None else mom.H
    Wm = t.Wm
    out, n_in = Wm.shape
    dt = t.stored.dtype
    d = np.ones(n_in) if H is None else np.maximum(np.diag(H), 0.0)
    d = d + 1e-6 * max(float(d.mean()), 1e-30)        # dead inputs still count a little
    groups = [np.arange(out)] if config.granularity == "layer" else \
        [np.array([o]) for o in range(out)]
    k = config.k
    idx = np.zeros(Wm.shape, dtype=np.int64)
    books: list[np.ndarray] = []
    changed = []
    Wc = Wm
    if mom is not None and not mom.same and config.refit:
        # the dense weight that maps the current inputs onto the original outputs is what
        # gets clustered: W' = W G^T H^-1 (ridge 0.01 x mean diagonal, as in sparse)
        lam = 0.01 * max(float(np.trace(H)) / len(H), 1e-30)
        Wc = np.linalg.solve(H + lam * np.eye(len(H)), mom.G @ Wm.T).T
    for gi, rows in enumerate(groups):
        v = Wm[rows].reshape(-1)
        if len(np.unique(v)) > k:
            v = Wc[rows].reshape(-1)
        if len(np.unique(v)) <= k:                    # identity: the values kept exactly
            c, ix = np.unique(v, return_inverse=True)
            same = True
        elif config.ternary:
            c, ix = ternary(v, np.tile(d, len(rows)))
            same = False
        else:
            c, ix = kmeans1d(v, np.tile(d, len(rows)), k, rng, config.n_init)
            same = False
        idx[rows] = ix.reshape(len(rows), n_in)
        books.append(np.asarray(c, dtype=np.float64))
        changed.append(not same)
    if not any(changed):
        return None
    Q0 = _weights(idx, books, groups, dt)
    row = {"node": t.name, "op": t.L.node.op_type, "bits": 2 if config.ternary else config.bits,
           "ternary": config.ternary, "granularity": config.granularity,
           "codebook": k, "codebooks": len(groups), "weights": int(Wm.size)}
    Q = Q0
    if H is not None:
        row["sequential"] = not mom.same
        row["output_error_kmeans"] = round(mom.error(Wm, Q0), 6)
        if config.refit:
            kmax = max(len(c) for c in books)
            A, b = normal_equations(idx, Wm, H, kmax, None if mom.same else mom.G)
            B = np.array([[-1.0], [0.0], [1.0]]) if config.ternary else None
            new = []
            for rows, c, ch in zip(groups, books, changed):
                if not ch:
                    new.append(c)
                    continue
                n = len(c)
                Ag, bg = A[rows][:, :n, :n].sum(0), b[rows][:, :n].sum(0)
                Bg = B if (B is not None and n == 3) else None
                new.append(refit_codebook(Ag, bg, c, Bg, config.damp))
            Q1 = _weights(idx, new, groups, dt)
            e1 = mom.error(Wm, Q1)
            if e1 < row["output_error_kmeans"]:
                Q, books = Q1, new
                row["refit"] = True
            row["output_error_refit"] = round(e1, 6)
        row["output_error"] = round(mom.error(Wm, Q), 6)
        if config.refit_bias:
            row["_bias_shift"] = t.alpha * (mom.mu0 @ Wm.T - mom.mu @ Q.T)
    row["distinct_values"] = int(len(np.unique(Q.astype(dt))))
    row["weight_error"] = round(weight_error(Wm, Q), 6)
    if config.granularity == "layer":
        row["codebook_values"] = [float(x) for x in np.unique(Q.astype(dt))]
    row["multiplies_dense"] = multiplies_dense(t)
    row["distinct_products"] = distinct_products(t, Q.astype(dt))
    row["distinct_products_fraction"] = round(row["distinct_products"] /
                                              max(row["multiplies_dense"], 1), 6)
    row["_Wq"] = Q.astype(dt)
    return row


def _weights(idx, books, groups, dt) -> np.ndarray:
    """The weight matrix from codebook indices: each value the codebook entry cast to the
    stored dtype (bit-identical copies), held as float64."""
    Q = np.empty(idx.shape)
    for rows, c in zip(groups, books):
        cb = np.asarray(c).astype(dt).astype(np.float64)
        Q[rows] = cb[idx[rows]]
    return Q


__all__ = ["ClusterConfig", "cluster"]
