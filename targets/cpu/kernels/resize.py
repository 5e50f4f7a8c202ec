"""Resize (ONNX Resize / Upsample, ``relax.image.resize2d``: NCHW, nearest or linear) with
the source coordinates computed at compile time.

TOPI's resize evaluates the coordinate transform, floors, clamps and four loads per output
element in scalar code (LRASPP's 21 x 224 x 224 bilinear upsample: 1.6 ms, onnxruntime
0.09 ms). Here the per-column and per-row tables are numpy constants, computed with
onnxruntime's float32 formulas, and bilinear runs as two separable passes::

    x0, x1, ax = columns(W, Wo)         y0, y1, ay = rows(H, Ho)      (numpy, compile time)
    T[n, c, r, x] = X[n, c, R[r], x0[x]] * (1 - ax[x]) + X[n, c, R[r], x1[x]] * ax[x]
    Y[n, c, y, x] = T[n, c, y0'[y], x] * (1 - ay[y]) + T[n, c, y1'[y], x] * ay[y]

``R`` lists the source rows some output row reads (``y0'``, ``y1'`` index into it), so a
downscale filters only those. The first pass is ``len(R) x Wo`` per channel (gathers along
the row), the second reads whole rows of ``T``: contiguous vectors, one FMA pair per vector.
Nearest is one gather pass, ``Y[n, c, y, x] = X[n, c, yn[y], xn[x]]``. A fused epilogue
runs on each channel's rows.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import te

from edgec.core.resize_coords import linear_taps, nearest_index

from ..compute import ints
from ..schedule import (ScheduleRule, blocks_named, extent, fuse_epilogue,
                        vectorize_in_vectors)

RESIZE_BLOCK = "edgec_resize"
ROWS_BLOCK = "edgec_resize_rows"


def resize_tables(h: int, w: int, oh: int, ow: int, method: str, mode: str, rounding: str):
    """The constant tables :func:`resize_te` reads (numpy arrays, in its argument order)."""
    if method == "nearest_neighbor":
        return [nearest_index(h, oh, mode, rounding), nearest_index(w, ow, mode, rounding)]
    y0, y1, ay = linear_taps(h, oh, mode)
    x0, x1, ax = linear_taps(w, ow, mode)
    rows = np.unique(np.concatenate([y0, y1]))
    pos = np.searchsorted(rows, np.arange(h)).astype(np.int32)
    return [rows.astype(np.int32), pos[y0], pos[y1], ay, x0, x1, ax]


def resize_te(x, *tables, out_hw):
    """``Y[n, c, y, x]``: nearest (two index tables) or separable bilinear (seven)."""
    nb, c, _, _ = ints(x.shape)
    oh, ow = out_hw
    if len(tables) == 2:
        yn, xn = tables
        return te.compute((nb, c, oh, ow), lambda n, c_, y, xx: x[n, c_, yn[y], xn[xx]],
                          name=RESIZE_BLOCK)
    rows, y0, y1, ay, x0, x1, ax = tables
    nr = ints(rows.shape)[0]
    one = tvm.tirx.const(1.0, "float32")

    def horizontal(n, c_, r, xx):
        src = rows[r]
        return x[n, c_, src, x0[xx]] * (one - ax[xx]) + x[n, c_, src, x1[xx]] * ax[xx]

    t = te.compute((nb, c, nr, ow), horizontal, name=ROWS_BLOCK)
    return te.compute((nb, c, oh, ow),
                      lambda n, c_, y, xx: t[n, c_, y0[y], xx] * (one - ay[y])
                      + t[n, c_, y1[y], xx] * ay[y], name=RESIZE_BLOCK)


def schedule_resize(sch, block, lanes: int) -> None:
    """The row pass first (its rows in parallel), then the output: channels in parallel
    (with fewer than 8 channels, their rows), both vectorized along the row, the epilogue
    on each task's rows. (The row pass cannot move under the channel loop: its rows are
    read through a table, so their region is not an affine function of the loop.)"""
    n, c, y, x = sch.get_loops(block)
    for r in blocks_named(sch, ROWS_BLOCK):
        rn, rc, ry, _ = sch.get_loops(r)
        sch.parallel(sch.fuse(rn, rc, ry))
        vectorize_in_vectors(sch, [r], lanes)
    outer = sch.fuse(n, c)
    if extent(sch, outer) < 8:
        outer = sch.fuse(outer, y)
    epilogue = fuse_epilogue(sch, block, outer)
    sch.parallel(outer)
    vectorize_in_vectors(sch, [block, *epilogue], lanes)


def _apply(sch, blocks, ctx) -> str:
    schedule_resize(sch, blocks[0], ctx.lanes)
    return "resize"


RULE = ScheduleRule("resize", lambda sch: blocks_named(sch, RESIZE_BLOCK), _apply)
