"""Integer Winograd F(2x2, 3x3) for QDQ 3x3 convolutions on x86 CPUs without VNNI.

With the activation ``d = Xq - zx`` (integers, 0 in the padding) and the int8 filter ``g``,
Winograd's identity (:mod:`.winograd`) holds over the integers once ``G`` is doubled::

    4 * Y = A^T [ ((2G) g (2G)^T) (.) (B^T d B) ] A          (F(2, 3): B, A in {0, +-1})

so ``U = (2G) g (2G)^T`` is an integer (``|U| <= 9 * 127``), ``V = B^T d B`` too
(``|V| <= 4 * 255``), both fit int16, and every product ``U * V`` and the sums over input
channels stay exact in int32 (``|U V| < 2^21``: exact for up to 1000 channels). The
output transform gives ``4 Y`` exactly; the kernel's float scale carries the 1/4 (a power of
two: ``float(4 Y) * (s / 4)`` is ``float(Y) * s`` to the bit), so the result is the direct
integer convolution's, not an approximation of it.

The products run on ``vpmaddwd`` (two int16 channels per 32-bit word, 16 multiply-adds per
ymm instruction), each standing for 2.25 multiply-adds of the direct convolution: 36 per
instruction, against 32 per three instructions of the u8 x s7 ``vpmaddubsw`` form and 16 per
two of the s16 one, which is why it pays on CPUs without VNNI (on VNNI, ``vpdpbusd`` does 64
direct multiply-adds per instruction and stays).

Stages (as the float kernel's, with the two channels of a word innermost in every int16
tensor, so the transforms vectorize along ``(tile, channel pair)`` without shuffles)::

    Xs[n, cb, q, y, j, d] = X[n, 2 cb + d, y, 2 j + q] - zx       (column phases, 0 outside)
    V1, V[e, cb, p, d]    = B^T d B                                  (int16)
    M[e, kb, p, l]        = sum_{cb, d} V[e, cb, p, d] U[e, kb, cb, l, d]     (int32)
    P[n, kb, y, x, l]     = A^T M A                                  (int32, = 4 Y)
    out                   = the integer kernel's epilogue (:func:`.int8_common.finish_int8`)
"""

from __future__ import annotations

import numpy as np
from tvm import te, tirx

from ..isa import ISA_ATTR
from ..schedule import ScheduleRule, block_named, extent, find_blocks, register_tile
from .int8_common import finish_int8, kernel_isa
from .int8_intrin import register_pair_intrin
from .winograd import WINO_OUT1_BLOCK, WINO_OUT_BLOCK, coef, matrices, schedule_output

WINO8_PHASE_BLOCK = "edgec_wino8_xs"
WINO8_IN1_BLOCK = "edgec_wino8_v1"
WINO8_IN_BLOCK = "edgec_wino8_v"
WINO8_GEMM_BLOCK = "edgec_wino8_gemm"
M, A = 2, 4          # F(2x2, 3x3): output tile, input tile
WINO8_ISAS = ("avx2", "avx512bw", "avx2-s7", "avx512bw-s7")
WINO8_MIN_MACS = 6_000_000  # products' multiply-adds per image below which it loses
WINO8_MAX_TILES_S7 = 256    # with 7-bit weights: tiles per image above which the s7 form wins


def wino8_applies(isa, shape, wshape, strides, pads, dil, weights_7bit: bool = False) -> bool:
    """3x3, stride 1, no dilation, at least 16 input channels and one vector of output
    channels, on an x86 ISA without VNNI, with at least 36 tiles per image, at most a quarter
    of the tiles' outputs beyond the map, and ``WINO8_MIN_MACS`` product multiply-adds.

    Against the direct kernels (one layer, 2 threads of a Zen 4 pair, -mcpu haswell /
    skylake-avx512, ms): 64@56 s16 0.92 / 0.65, s7 0.64 / 0.51, Winograd 0.65 / 0.62;
    128@28 s16 0.92 / 0.66, s7 0.76 / 0.49, Winograd 0.50 / 0.47; 256@14 s16 0.89 / 0.64,
    s7 0.68 / 0.47, Winograd 0.42 / 0.37. So with 8-bit weights (the s16 form) it is taken
    wherever it applies, with 7-bit ones only up to ``WINO8_MAX_TILES_S7`` tiles (maps up to
    32x32), beyond which its transforms cost what the products save."""
    n, c, h, w = shape
    k = int(wshape[0])
    if isa.name not in WINO8_ISAS or tuple(wshape[2:]) != (3, 3) or list(strides) != [1, 1] \
            or list(dil) != [1, 1] or k < isa.lanes or c < 16:
        return False
    pt, pl, pb, pr = pads
    oh, ow = h + pt + pb - 2, w + pl + pr - 2
    tiles = -(-oh // M) * -(-ow // M)
    if weights_7bit and tiles > WINO8_MAX_TILES_S7:
        return False
    return tiles >= 36 and oh * ow >= 0.75 * tiles * M * M and \
        tiles * A * A * c * k >= WINO8_MIN_MACS


def transform_weight_int8(wq: np.ndarray, lanes: int) -> np.ndarray:
    """``U[e, kb, cb, l, d] = ((2G) W[kb L + l, 2 cb + d] (2G)^T)[e]`` as int16, output
    channels padded to whole vectors of ``lanes`` and input channels to pairs."""
    _, g, _ = matrices(M)
    g2 = np.rint(2 * g).astype(np.int64)
    k, c = wq.shape[:2]
    u = np.einsum("ei,kcij,fj->efkc", g2, wq.astype(np.int64), g2).reshape(A * A, k, c)
    assert np.abs(u).max(initial=0) < 2 ** 15
    kb, cb = -(-k // lanes), -(-c // 2)
    up = np.zeros((A * A, kb * lanes, cb * 2), np.int16)
    up[:, :k, :c] = u
    return np.ascontiguousarray(up.reshape(A * A, kb, lanes, cb, 2).transpose(0, 1, 3, 2, 4))


def int8_winograd_te(xq, up, corr, scale, zx: int, oc: int, pads, isa, requant=None,
                     residual=None):
    """TE of the integer Winograd convolution; ``scale`` already holds the 1/4 (module
    docstring). Same signature and output as :func:`.int8_conv.int8_conv_te`."""
    bt, _, at = matrices(M)
    nb, c, h, w = (int(d) for d in xq.shape)
    a2, kbn, cbn, lanes, depth = (int(d) for d in up.shape)
    pt, pl, pb, pr = pads
    oh, ow = h + pt + pb - 2, w + pl + pr - 2
    th, tw = -(-oh // M), -(-ow // M)
    rows, jcols = th * M + 2, tw + (A - 1) // M
    i16 = "int16"

    def phase(n, cb, q, y, j, d):
        ch, row, col = cb * 2 + d, y - pt, j * M + q - pl
        inside = tirx.all(row >= 0, row < h, col >= 0, col < w, ch < c)
        v = xq[n, tirx.min(ch, c - 1), tirx.min(tirx.max(row, 0), h - 1),
               tirx.min(tirx.max(col, 0), w - 1)].astype(i16) - tirx.const(zx, i16)
        return tirx.if_then_else(inside, v, tirx.const(0, i16))

    xs = te.compute((nb, cbn, M, rows, jcols, 2), phase, name=WINO8_PHASE_BLOCK)
    r1 = te.reduce_axis((0, A), "r1")
    v1 = te.compute(
        (nb, cbn, th, A, A, tw, 2),
        lambda n, cb, ty, e1, r2, tx, d: te.sum(
            coef(bt, e1, r1, i16) * xs[n, cb, r2 % M, ty * M + r1, tx + r2 // M, d], axis=r1),
        name=WINO8_IN1_BLOCK)
    r2 = te.reduce_axis((0, A), "r2")

    ptiles = nb * th * tw

    def vbody(e, cb, p, d):
        n, ty, tx = p // (th * tw), (p // tw) % th, p % tw
        return te.sum(coef(bt, e % A, r2, i16) * v1[n, cb, ty, e // A, r2, tx, d], axis=r2)

    v = te.compute((a2, cbn, ptiles, 2), vbody, name=WINO8_IN_BLOCK)
    rc = te.reduce_axis((0, cbn), "rc")
    rd = te.reduce_axis((0, depth), "rd")
    mm = te.compute(
        (a2, kbn, ptiles, lanes),
        lambda e, o, p, l: te.sum(v[e, rc, p, rd].astype("int32")
                                  * up[e, o, rc, l, rd].astype("int32"), axis=[rc, rd]),
        name=WINO8_GEMM_BLOCK, attrs={ISA_ATTR: isa.name})
    s1 = te.reduce_axis((0, A), "s1")
    p1 = te.compute(
        (nb, kbn, th, M, A, tw, lanes),
        lambda n, o, ty, i, r, tx, l: te.sum(
            coef(at, i, s1, "int32") * mm[s1 * A + r, o, (n * th + ty) * tw + tx, l],
            axis=s1),
        name=WINO_OUT1_BLOCK)
    s2 = te.reduce_axis((0, A), "s2")
    pk = te.compute(
        (nb, kbn, th * M, tw * M, lanes),
        lambda n, o, y, xx, l: te.sum(
            coef(at, xx % M, s2, "int32") * p1[n, o, y // M, y % M, s2, xx // M, l], axis=s2),
        name=WINO_OUT_BLOCK)
    return finish_int8((nb, oc, oh, ow), lambda n, o, y, x: pk[n, o // lanes, y, x, o % lanes],
                       lambda n, o, y, x: o, corr, scale, requant, residual)


WINO8_CHUNK_BYTES = 16 << 20  # V and M of one chunk of tile rows


def schedule_int8_winograd(sch, gemm, isa, max_cols: int) -> None:
    """Output transform and epilogue per (channel block, tile row) (the float kernel's
    schedule), products per (e, channel block) on the ``vpmaddwd`` register tile, the input
    transform per channel pair, vectorized along (tile, channel of the pair)."""
    def block(name):
        return block_named(sch, name)

    xs, v1, v = block(WINO8_PHASE_BLOCK), block(WINO8_IN1_BLOCK), block(WINO8_IN_BLOCK)
    p1, pk = block(WINO_OUT1_BLOCK), block(WINO_OUT_BLOCK)
    a2, kbn, _, lanes, cbn, _ = (extent(sch, lp) for lp in sch.get_loops(gemm))
    th, tw = (extent(sch, lp) for lp in (sch.get_loops(p1)[2], sch.get_loops(p1)[5]))
    row = tw * a2 * (cbn * 4 + kbn * lanes * 4)  # bytes of V and M per tile row
    chunk = None
    if th * row > WINO8_CHUNK_BYTES:
        chunk = max(r for r in range(1, th + 1)
                    if th % r == 0 and (r * row <= WINO8_CHUNK_BYTES or r == 1))
    anchor = schedule_output(sch, p1, pk, chunk)

    if anchor is not None:  # (both before the products are tensorized)
        sch.compute_at(gemm, anchor, preserve_unit_loops=True)
        sch.compute_at(v, anchor, preserve_unit_loops=True)
    *_, e, o, p, l, rc, rd = sch.get_loops(gemm)
    oo, oi, po, pi = register_tile(sch, o, p, max_cols)
    sch.reorder(e, oo, po, rc, oi, pi, l, rd)
    sch.parallel(sch.fuse(e, oo))
    sch.unroll(oi)
    sch.unroll(pi)
    init = sch.decompose_reduction(gemm, rc)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(l, register_pair_intrin(isa))

    *_, e, cb, p, d, r2 = sch.get_loops(v)
    e1, e2 = sch.split(e, [None, A])
    po, tx = sch.split(p, [None, tw])
    sch.reorder(cb, e1, po, e2, r2, tx, d)
    sch.parallel(cb)
    sch.compute_at(v1, cb, preserve_unit_loops=True)
    sch.unroll(e2)
    sch.unroll(r2)
    sch.vectorize(sch.fuse(tx, d))
    *_, ve1, vr2, vtx, vd, vr1 = sch.get_loops(v1)
    sch.reorder(ve1, vr2, vr1, vtx, vd)
    sch.unroll(ve1)
    sch.unroll(vr2)
    sch.unroll(vr1)
    sch.vectorize(sch.fuse(vtx, vd))
    sch.compute_at(xs, cb, preserve_unit_loops=True)
    *_, j, d = sch.get_loops(xs)
    sch.vectorize(sch.fuse(j, d))


def _apply(sch, blocks, ctx) -> str:
    isa = kernel_isa(sch, blocks[0], ctx.isa)
    schedule_int8_winograd(sch, blocks[0], isa, ctx.int_cols)
    return "conv2d-int8wino-" + isa.name


RULE = ScheduleRule("conv2d-int8wino", lambda sch: find_blocks(sch, WINO8_GEMM_BLOCK), _apply)
