"""Winograd F(m x m, 3 x 3) for 3x3 stride-1 float convolutions on CPUs.

For an output tile ``Y`` of ``m x m`` pixels, its ``a x a`` input tile ``d`` (``a = m + 2``)
and one 3x3 filter ``g`` (Lavin & Gray, *Fast Algorithms for Convolutional Neural Networks*)::

    Y = A^T [ (G g G^T) (.) (B^T d B) ] A

so with ``U[e, k, c] = (G g[k, c] G^T)[e]`` (computed at compile time) and
``V[e, c, p] = (B^T d[c, p] B)[e]`` for every tile ``p``, the convolution is ``a^2``
independent matrix products ``M[e] = U[e] . V[e]`` followed by the output transform
``Y[k, p] = A^T M[:, k, p] A``. F(4x4, 3x3) does 36 multiply-adds per 16 outputs and input
channel where the direct convolution does 144 (4x fewer); F(2x2, 3x3) 16 per 4 (2.25x).

The kernel, in stages of one function::

    Xs[n, c, q, y, j] = Xpad[n, c, y, j * m + q]       column phases: every tile row reads
                                                         contiguous tiles (q = column % m)
    V[e1 * a + e2, c, p] = sum_{r1, r2} B[r1, e1] B[r2, e2] Xs[.., r2 % m, ty*m + r1, tx + r2 // m]
    M[e, kb, p, l]       = sum_c V[e, c, p] * U[e, kb, c, l]         (l: output-channel lanes)
    P[n, kb, oy, ox, l]  = sum_{r1, r2} A[r1, oy % m] A[r2, ox % m] M[r1 * a + r2, kb, p, l]
    Y[n, k, oy, ox]      = epilogue(P[n, k // L, oy, ox, k % L])    (bias, BN, ReLU, Add ...)

Both transforms are separable (two passes of ``a`` terms, not ``a^2``) with the
coefficients as constants: the transform loops are unrolled, so the zero and unit entries
of ``A`` and ``B`` vanish when TIR simplifies. The product ``M`` is the packed direct
convolution's register tile (``cols`` tiles x one or two vectors of output channels, one
weight-vector load per ``cols`` FMAs) with a ``C``-long reduction per product.

``Xs`` and ``V`` are computed per input channel (channels in parallel), ``M`` per (e,
block of output channels), ``P`` and the epilogue per (block of output channels, tile row);
with a batch, or a map whose ``V`` and ``M`` exceed ``WINO_CHUNK_BYTES``, all of it runs
image by image / chunk of tile rows by chunk (:func:`schedule_winograd`).

The cost is in memory, not in multiplies: ``U`` is ``a^2 / 9`` times the weights (4x for
F(4, 3)) and ``V``/``M`` are ``a^2 / m^2`` times the activations, so :func:`winograd_tile`
takes Winograd only where the weights are small next to the work (many tiles), and the
direct kernel elsewhere (7x7 maps, 512 channels).
"""

from __future__ import annotations

import numpy as np
from tvm import te, tirx

from ..schedule import (ScheduleRule, block_named, extent, find_blocks, fuse_epilogue,
                        register_tile, vectorize_innermost)

WINO_GEMM_BLOCK = "edgec_wino_gemm"
WINO_IN_BLOCK = "edgec_wino_v"
WINO_IN1_BLOCK = "edgec_wino_v1"
WINO_OUT_BLOCK = "edgec_wino_p"
WINO_OUT1_BLOCK = "edgec_wino_p1"
WINO_PHASE_BLOCK = "edgec_wino_xs"

# B^T, G, A^T (Lavin & Gray 2016; interpolation points 0, +-1, +-2, infinity for m = 4)
_MATRICES = {
    2: (np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], np.float64),
        np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float64),
        np.array([[1, 1, 1, 0], [0, 1, -1, -1]], np.float64)),
    4: (np.array([[4, 0, -5, 0, 1, 0],
                  [0, -4, -4, 1, 1, 0],
                  [0, 4, -4, -1, 1, 0],
                  [0, -2, -1, 2, 1, 0],
                  [0, 2, -1, -2, 1, 0],
                  [0, 4, 0, -5, 0, 1]], np.float64),
        np.array([[1 / 4, 0, 0],
                  [-1 / 6, -1 / 6, -1 / 6],
                  [-1 / 6, 1 / 6, -1 / 6],
                  [1 / 24, 1 / 12, 1 / 6],
                  [1 / 24, -1 / 12, 1 / 6],
                  [0, 0, 1]], np.float64),
        np.array([[1, 1, 1, 1, 1, 0],
                  [0, 1, -1, 2, -2, 0],
                  [0, 1, 1, 4, 4, 0],
                  [0, 1, -1, 8, -8, 1]], np.float64)),
}


def matrices(m: int):
    """``(B^T, G, A^T)`` of F(m x m, 3 x 3)."""
    return _MATRICES[m]


def transform_weight(w: np.ndarray, m: int, lanes: int) -> np.ndarray:
    """``U[e, kb, c, l] = (G W[kb * L + l, c] G^T)[e]`` (float64 then float32), output
    channels padded to whole vectors of ``lanes``."""
    _, g, _ = matrices(m)
    k, c = w.shape[:2]
    a = m + 2
    u = np.einsum("ei,kcij,fj->efkc", g, w.astype(np.float64), g).reshape(a * a, k, c)
    kb = -(-k // lanes)
    up = np.zeros((a * a, kb * lanes, c), np.float64)
    up[:, :k] = u
    return np.ascontiguousarray(
        up.reshape(a * a, kb, lanes, c).transpose(0, 1, 3, 2)).astype(np.float32)


WINO_MIN_MACS = 6_000_000  # products' multiply-adds per image below which Winograd loses
WINO_MIN_OC = 24  # output channels below which the input transform outweighs the products


def winograd_tile(lanes: int, shape, wshape, strides, pads, dil, groups: int) -> int | None:
    """The tile size ``m`` to run a float convolution with, or None for the direct kernel.

    3x3, stride 1, no dilation, groups 1, at least one vector and ``WINO_MIN_OC`` output
    channels and 16 input channels, and enough work: F(4, 3) with at least 36 tiles per
    image, else F(2, 3) with at least 36 (so 56x56 and 28x28 maps take F(4, 3), 14x14
    F(2, 3), 7x7 the direct kernel), at most a quarter of the tiles' outputs beyond the map, and
    at least ``WINO_MIN_MACS`` multiply-adds in the products per image. Measured on a Zen 4
    core pair (2 threads, one layer, against the direct kernel): 64@56 1.90x, 128@28 2.43x,
    64@28 1.69x, 256@14 1.57x, 128@14 1.47x, 32@112 1.49x. Below the work threshold the gain
    at batch 1 is small (32->64@14 1.09x, 64@14 1.21x, 32@28 1.31x) and with a batch, run
    image by image, it turns into a loss (batch 8: 0.92x, 1.09x, 0.60x). 512@7 gains alone
    (1.17x) but not inside ResNet-18, where its transformed weights (16 MiB against 9) are
    read from memory. With 16 output channels the input transform (per input channel and
    tile) outweighs the products it saves (a U-Net's 16-channel levels; interleaved, one
    layer, direct against F(4, 3)): 16->16 at 256x256 0.81x the time (AVX-512) and 0.84x
    (AVX2), 32->16 0.95x / 0.89x. From 24 on, Winograd is kept: 96->24 at 160x160 0.83x
    direct on AVX-512 but 1.38x on AVX2 (three vectors of 8 channels), at 80x80 1.06x;
    16->32 at 128x128 at par, 32->32 1.14x, 64->64 at 64x64 1.38x."""
    n, c, h, w = shape
    k = int(wshape[0])
    if tuple(wshape[2:]) != (3, 3) or list(strides) != [1, 1] or list(dil) != [1, 1] \
            or groups != 1 or k < max(lanes, WINO_MIN_OC) or c < 16:
        return None
    pt, pl, pb, pr = pads
    oh, ow = h + pt + pb - 2, w + pl + pr - 2
    for m in (4, 2):
        tiles = -(-oh // m) * -(-ow // m)
        if tiles >= 36 and oh * ow >= 0.75 * tiles * m * m and \
                tiles * (m + 2) ** 2 * c * k >= WINO_MIN_MACS:
            return m
    return None


def coef(mat: np.ndarray, i, j, dtype: str = "float32"):
    """``mat[i, j]`` for loop variables (or ints) ``i``, ``j`` as a chain of selects over
    the nonzero entries: constant once the loops are unrolled, zero terms then vanish."""
    cast = float if dtype.startswith("float") else int
    out = tirx.const(cast(0), dtype)
    for (a, b), v in np.ndenumerate(mat):
        if v == 0:
            continue
        cond = []
        if isinstance(i, int):
            if i != a:
                continue
        else:
            cond.append(i == a)
        if isinstance(j, int):
            if j != b:
                continue
        else:
            cond.append(j == b)
        val = tirx.const(cast(v), dtype)
        if not cond:
            return val
        out = tirx.Select(tirx.all(*cond), val, out)
    return out


def winograd_te(x, u, oc: int, pads, m: int):
    """TE of the Winograd convolution (module docstring); returns ``Y[n, oc, oh, ow]``."""
    v, geom = winograd_input_te(x, pads, m)
    return winograd_output_te(winograd_gemm_te(v, u), oc, geom)


def winograd_input_te(x, pads, m: int):
    """``V[e, c, p]`` of the input (tiles ``p`` over ``n, ty, tx``) and the geometry
    ``(nb, oh, ow, th, tw, m)`` for :func:`winograd_output_te`."""
    bt, _, _ = matrices(m)
    a = m + 2
    nb, c, h, w = (int(d) for d in x.shape)
    pt, pl, pb, pr = pads
    oh, ow = h + pt + pb - 2, w + pl + pr - 2
    th, tw = -(-oh // m), -(-ow // m)
    ptiles = nb * th * tw
    rows, jcols = th * m + 2, tw + (a - 1) // m

    def phase(n, c_, q, y, j):
        col, row = j * m + q - pl, y - pt
        inside = tirx.all(row >= 0, row < h, col >= 0, col < w)
        return tirx.if_then_else(inside, x[n, c_, tirx.min(tirx.max(row, 0), h - 1),
                                           tirx.min(tirx.max(col, 0), w - 1)],
                                 tirx.const(0.0, "float32"))

    xs = te.compute((nb, c, m, rows, jcols), phase, name=WINO_PHASE_BLOCK)
    # V1[n, c, ty, e1, r2, tx] = sum_r1 B[r1, e1] d[r1, r2]     (B^T[e1, r1])
    r1 = te.reduce_axis((0, a), "r1")
    v1 = te.compute(
        (nb, c, th, a, a, tw),
        lambda n, c_, ty, e1, r2, tx: te.sum(
            coef(bt, e1, r1) * xs[n, c_, r2 % m, ty * m + r1, tx + r2 // m], axis=r1),
        name=WINO_IN1_BLOCK)
    r2 = te.reduce_axis((0, a), "r2")

    def vbody(e, c_, p):
        n, ty, tx = p // (th * tw), (p // tw) % th, p % tw
        return te.sum(coef(bt, e % a, r2) * v1[n, c_, ty, e // a, r2, tx], axis=r2)

    return te.compute((a * a, c, ptiles), vbody, name=WINO_IN_BLOCK), \
        (nb, oh, ow, th, tw, m)


def winograd_gemm_te(v, u):
    """``M[e, kb, p, l] = sum_c V[e, c, p] * U[e, kb, c, l]``."""
    a2, c, ptiles = (int(d) for d in v.shape)
    _, kb, _, lanes = (int(d) for d in u.shape)
    rc = te.reduce_axis((0, c), "rc")
    return te.compute((a2, kb, ptiles, lanes),
                      lambda e, o, p, l: te.sum(v[e, rc, p] * u[e, o, rc, l], axis=rc),
                      name=WINO_GEMM_BLOCK)


def winograd_output_te(mm, oc: int, geom):
    """``Y[n, k, oy, ox]`` from the products ``M`` (the output transform and unpacking)."""
    nb, oh, ow, th, tw, m = geom
    _, at = matrices(m)[1:]
    a = m + 2
    lanes = int(mm.shape[3])
    # P1[n, kb, ty, i, r2, tx, l] = sum_r1 A[r1, i] M[r1 * a + r2, kb, p, l]
    s1 = te.reduce_axis((0, a), "s1")
    p1 = te.compute(
        (nb, int(mm.shape[1]), th, m, a, tw, lanes),
        lambda n, o, ty, i, r, tx, l: te.sum(
            coef(at, i, s1) * mm[s1 * a + r, o, (n * th + ty) * tw + tx, l], axis=s1),
        name=WINO_OUT1_BLOCK)
    s2 = te.reduce_axis((0, a), "s2")
    pk = te.compute(
        (nb, int(mm.shape[1]), th * m, tw * m, lanes),
        lambda n, o, y, xx, l: te.sum(
            coef(at, xx % m, s2) * p1[n, o, y // m, y % m, s2, xx // m, l], axis=s2),
        name=WINO_OUT_BLOCK)
    return te.compute((nb, oc, oh, ow),
                      lambda n, k, y, xx: pk[n, k // lanes, y, xx, k % lanes],
                      name="edgec_wino_unpack")


def schedule_winograd(sch, gemm, max_cols: int) -> None:
    """Column phases and input transform per input channel, the products per (e, channel
    block) with the packed-convolution register tile (``max_cols`` tiles), output
    transform and fused epilogue per (channel block, tile row); every stage parallel,
    transforms unrolled and vectorized along tiles (input) or output-channel lanes
    (output). Any of the blocks may be absent (the stages can be scheduled alone)."""
    def block(name):
        return block_named(sch, name)

    xs, v1, v = block(WINO_PHASE_BLOCK), block(WINO_IN1_BLOCK), block(WINO_IN_BLOCK)
    p1, pk = block(WINO_OUT1_BLOCK), block(WINO_OUT_BLOCK)
    # consumers first: with a batch or a large map, every stage moves under the output's
    # loop over images / chunks of tile rows, so the transformed tiles of one chunk (not of
    # the whole map) pass through the caches
    chunk = _chunk_rows(sch, gemm, p1) if gemm is not None and p1 is not None else None
    anchor = schedule_output(sch, p1, pk, chunk) if pk is not None else None
    if gemm is not None:
        if anchor is not None:
            sch.compute_at(gemm, anchor, preserve_unit_loops=True)
        _schedule_gemm(sch, gemm, max_cols)
    if xs is not None:
        if anchor is not None:
            sch.compute_at(v, anchor, preserve_unit_loops=True)
        _schedule_input(sch, xs, v1, v)


WINO_CHUNK_BYTES = 16 << 20  # V and M of one chunk of tile rows (half of this L3)


def _chunk_rows(sch, gemm, p1) -> int | None:
    """Tile rows per chunk: the most (a divisor of the rows) whose transformed input and
    products fit ``WINO_CHUNK_BYTES``; None when the whole map does. One layer, 2 threads,
    against the direct kernel: 64 channels at 224x224 (29 MiB each of V and M) 1.04x whole,
    1.55x in chunks of 16 MiB, 1.63x of 8 MiB; but 64 at 112x112 (14 MiB in all) 1.9-2.0x
    whole and 1.23x in two chunks of 8 MiB (each chunk reloads the transformed weights and
    starts three parallel stages)."""
    a2, kb, _, lanes, c = (extent(sch, lp) for lp in sch.get_loops(gemm))
    th, tw = (extent(sch, lp) for lp in (sch.get_loops(p1)[2], sch.get_loops(p1)[5]))
    row = tw * a2 * (c + kb * lanes) * 4
    if th * row <= WINO_CHUNK_BYTES:
        return None
    return max(r for r in range(1, th + 1) if th % r == 0 and (r * row <= WINO_CHUNK_BYTES
                                                                 or r == 1))


def _schedule_input(sch, xs, v1, v):
    """column phases, V1 and V per input channel (parallel)"""
    a_ = extent(sch, sch.get_loops(v1)[3])

    # input transform per channel: V1 of all tiles, then V, both vectorized along tile rows
    *_, e, c, p, r2 = sch.get_loops(v)
    tw = extent(sch, sch.get_loops(v1)[-2])
    e1, e2 = sch.split(e, [None, a_])
    po, tx = sch.split(p, [None, tw])
    sch.reorder(c, e1, po, e2, r2, tx)
    sch.parallel(c)
    sch.compute_at(v1, c, preserve_unit_loops=True)
    sch.unroll(e2)
    sch.unroll(r2)
    sch.vectorize(tx)
    *_, ve1, vr2, vtx, vr1 = sch.get_loops(v1)
    sch.reorder(ve1, vr2, vr1, vtx)
    sch.unroll(ve1)
    sch.unroll(vr2)
    sch.unroll(vr1)
    sch.vectorize(vtx)

    # column phases: per channel too, just before its V1 (they stay in L1/L2)
    sch.compute_at(xs, c, preserve_unit_loops=True)
    sch.vectorize(sch.get_loops(xs)[-1])


def _schedule_gemm(sch, gemm, max_cols):
    """products: parallel over (e, channel block), the direct kernel's register tile"""
    *_, e, o, p, l, rc = sch.get_loops(gemm)
    oo, oi, po, pi = register_tile(sch, o, p, max_cols)
    sch.reorder(e, oo, po, rc, oi, pi, l)
    sch.parallel(sch.fuse(e, oo))
    sch.unroll(oi)
    sch.unroll(pi)
    sch.vectorize(l)
    sch.decompose_reduction(gemm, rc)


def schedule_output(sch, p1, pk, chunk=None):
    """output transform + unpack + epilogue per (n, channel block, tile row); returns the
    serial loop (over images, or over chunks of ``chunk`` tile rows) the other stages are
    computed under, or None"""
    n, o, y, xx, l, s2 = sch.get_loops(pk)
    ty, i = sch.split(y, [None, extent(sch, sch.get_loops(p1)[3])])
    mt = extent(sch, i)
    tx, jj = sch.split(xx, [None, mt])
    anchor = n if extent(sch, n) > 1 else None
    if chunk is not None:
        anchor, ty = sch.split(ty, [None, chunk])
        sch.reorder(n, anchor, o, ty, i, tx, jj, s2, l)
    else:
        sch.reorder(n, o, ty, i, tx, jj, s2, l)
    epilogue = fuse_epilogue(sch, pk, ty)
    outer = sch.fuse(o, ty) if anchor is not None else sch.fuse(n, o, ty)
    sch.parallel(outer)
    sch.compute_at(p1, outer, preserve_unit_loops=True)
    *_, pi_, pr, ptx, pl_, ps1 = sch.get_loops(p1)
    sch.reorder(pi_, pr, ptx, ps1, pl_)
    sch.unroll(pi_)
    sch.unroll(pr)
    sch.unroll(ps1)
    sch.vectorize(pl_)
    sch.unroll(i)
    sch.unroll(jj)
    sch.unroll(s2)
    sch.vectorize(l)
    vectorize_innermost(sch, epilogue)
    return anchor



def _apply(sch, blocks, ctx) -> str:
    m = extent(sch, sch.get_loops(find_blocks(sch, WINO_OUT1_BLOCK)[0])[3])
    schedule_winograd(sch, blocks[0], ctx.max_cols)
    return f"conv2d-winograd-f{m}"


RULE = ScheduleRule("conv2d-winograd", lambda sch: find_blocks(sch, WINO_GEMM_BLOCK), _apply)
