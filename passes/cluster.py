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
moment of input column k (``H = X^T X / n`` over sampled im2col rows / input rows of the
original model): the diagonal of the output error ``(w_o - q_o)^T H (w_o - q_o)``. Then the
codebook is refitted (``refit``): the outputs are linear in the codebook values, ``X q_o =
sum_v c_v X e_{o,v}``, so ``min_c sum_o (w_o - q_o)^T H (w_o - q_o)`` with the full H is a
least-squares problem in ``2^bits`` unknowns per codebook (ternary: one, ``a``), pulled to the
k-means values by ``damp`` x the mean diagonal. Every layer is clustered against the
original model's inputs (not sequentially).

Report, per layer: bits, granularity, codebook size and distinct values stored, the weight
relative error, with calib the output relative error (from H) before/after the refit,
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
    H = {}
    if data:
        got = calibrate(m, list(enumerate(t.L for t in targets)), ctx.calib, config, ctx.seed)
        for name, X in got.items():
            X = X.reshape(len(X), -1).astype(np.float64)
            if len(X) >= 16:
                H[name] = X.T @ X / len(X)
    w = Writer(m, PASS)
    table = []
    for li, t in enumerate(targets):
        Hl = H.get(t.name)
        row = _cluster_layer(t, Hl, np.random.default_rng([ctx.seed, li]), config)
        if row is None:
            report.skip(t.L.node, f"every codebook group already holds <= {config.k} distinct "
                        "values: kept exactly")
            continue
        Wq = row.pop("_Wq")
        w.set_input(t.name, 1, t.to_stored(Wq), "shared", "weights shared",
                    values=row["distinct_values"], granularity=config.granularity)
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


def _cluster_layer(t, H, rng, config: ClusterConfig) -> dict | None:
    """The clustered weight matrix and the report row of one layer (None: unchanged)."""
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
    for gi, rows in enumerate(groups):
        v = Wm[rows].reshape(-1)
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
        row["output_error_kmeans"] = round(output_error(Wm, Q0, H), 6)
        if config.refit:
            kmax = max(len(c) for c in books)
            A, b = normal_equations(idx, Wm, H, kmax)
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
            e1 = output_error(Wm, Q1, H)
            if e1 < row["output_error_kmeans"]:
                Q, books = Q1, new
                row["refit"] = True
            row["output_error_refit"] = round(e1, 6)
        row["output_error"] = round(output_error(Wm, Q, H), 6)
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
