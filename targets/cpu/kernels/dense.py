"""Dense layer with a constant weight (``matmul(X[M, K], W[K, N])``: ONNX Gemm, MatMul), the
weight **packed at compile time** into one contiguous stream per tile of outputs::

    Wp[jo, k, t] = W[k, jo * T + t]                    (numpy, zero padded; T = V vectors)
    P[m, jo, t]  = sum_k X[m, k] * Wp[jo, k, t]
    Y[m, j]      = epilogue(P[m, j // T, j % T])       (bias, activation, ...)

At batch 1 a classifier is a matrix-vector product: every weight is read once, so its time
is the weight's bytes over the memory bandwidth. TOPI's ``matmul`` reads ``W[k, j0:j0+T]``
row after row (a ``4 N``-byte stride per step: a few cache lines per row, which the
prefetchers do not follow well) -- 4-11 GFLOP/s on ResNet-50's, MobileNet's and
EfficientNet's classifiers against onnxruntime's 20-50. Here each tile of ``T`` outputs
reads one contiguous ``K x T`` block, ``V`` independent accumulators per row (``R`` rows at
a time), the epilogue applied to the tile while it is in registers.
"""

from __future__ import annotations

import numpy as np
from tvm import te

from ..compute import ints
from ..schedule import (ScheduleRule, blocks_named, extent, fuse_epilogue, pick_tile,
                        vectorize_innermost)

DENSE_BLOCK = "edgec_dense_packed"
MAX_VECTORS = 4  # vectors of outputs per tile (accumulators per row)
MAX_ROWS = 4     # rows per register tile


def dense_rows(m: int, lanes: int) -> int:
    """Rows per register tile: all of a small batch (at most :data:`MAX_ROWS`); for more rows
    (a ConvNeXt block's ``[1, H, W, C] @ W``: H x W rows) 4 on AVX-512 (16 accumulators of 32
    registers), 2 with 16 registers (4 x 4 spilled), the rows padded to a multiple."""
    return m if m <= MAX_ROWS else (MAX_ROWS if lanes >= 16 else 2)


def dense_vectors(n: int, lanes: int) -> int:
    """Vectors per output tile: up to :data:`MAX_VECTORS`, fewer for a narrow layer."""
    return max(1, min(MAX_VECTORS, -(-n // lanes)))


def pack_dense(w: np.ndarray, lanes: int) -> np.ndarray:
    """``W[K, N]`` -> ``Wp[ceil(N / T), K, T]``, ``T = dense_vectors(N) * lanes``, zero padded."""
    k, n = w.shape
    t = dense_vectors(n, lanes) * lanes
    tiles = -(-n // t)
    wp = np.zeros((k, tiles * t), np.float32)
    wp[:, :n] = w
    return np.ascontiguousarray(wp.reshape(k, tiles, t).transpose(1, 0, 2))


def dense_packed_te(x, wp, n: int, lanes: int = 16):
    """``Y[..., m, j] = sum_k X[..., m, k] * W[k, j]`` for ``j < n`` from the packed weight.
    An N-D ``X`` (ConvNeXt's and transformers' ``[1, H, W, C] @ W``) keeps its leading axes;
    the register tile's rows lie along the last of them, padded to a multiple of the tile
    (rows past it are computed from the last row and not stored)."""
    *lead, k = ints(x.shape)
    outer, rows = lead[:-1], lead[-1]
    tiles, k2, t = ints(wp.shape)
    assert k2 == k, (k, k2)
    r = min(dense_rows(int(np.prod(lead)), lanes), rows)
    rp = -(-rows // r) * r
    rk = te.reduce_axis((0, k), "rk")

    def row(i):
        return te.min(i, rows - 1) if rp > rows else i

    packed = te.compute(
        (*outer, rp, tiles, t),
        lambda *idx: te.sum(x[(*idx[:-3], row(idx[-3]), rk)] * wp[idx[-2], rk, idx[-1]],
                            axis=[rk]),
        name=DENSE_BLOCK)
    return te.compute((*lead, n), lambda *ij: packed[(*ij[:-1], ij[-1] // t, ij[-1] % t)],
                      name="edgec_dense_unpack")


def schedule_dense(sch, block, lanes: int) -> None:
    """Register tile: ``R`` rows x ``V`` vectors of the tile's outputs; per reduction step
    ``V`` contiguous weight-vector loads, ``R`` broadcasts and ``R * V`` FMAs; the row
    blocks x output tiles are the parallel tasks (output tile outer where there are many
    rows: its weights stay in cache across the row blocks); the epilogue per tile."""
    *outer, i, jo, jt, rk = sch.get_loops(block)
    m = extent(sch, i) * int(np.prod([extent(sch, o) for o in outer]))
    r = pick_tile(extent(sch, i), dense_rows(m, lanes))
    io, ii = sch.split(i, [None, r])
    t = extent(sch, jt)
    jv, jb = sch.split(jt, [None, min(lanes, t)])
    if m > MAX_ROWS:
        sch.reorder(jo, *outer, io, rk, ii, jv, jb)
        epilogue = fuse_epilogue(sch, block, io)
        sch.parallel(sch.fuse(jo, *outer, io))
    else:
        sch.reorder(*outer, io, jo, rk, ii, jv, jb)
        epilogue = fuse_epilogue(sch, block, jo)
        sch.parallel(sch.fuse(*outer, io, jo))
    sch.unroll(ii)
    sch.unroll(jv)
    sch.vectorize(jb)
    sch.decompose_reduction(block, rk)
    vectorize_innermost(sch, epilogue)


def _apply(sch, blocks, ctx) -> str:
    schedule_dense(sch, blocks[0], ctx.lanes)
    return "dense-packed"


RULE = ScheduleRule("dense-packed", lambda sch: blocks_named(sch, DENSE_BLOCK), _apply)
