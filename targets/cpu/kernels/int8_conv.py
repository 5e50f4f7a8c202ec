"""Integer kernels for QDQ convolutions on LLVM CPU targets.

A convolution as the ``quantize`` pass writes it (and the TVM ONNX frontend imports it)::

    y = conv(dq(Xq; sx, zx), dq(Wq; sw[o], 0))      then bias, ReLU, q(.; sy, zy) ...

is, by linearity, with the padding positions of ``Xq`` holding ``zx``::

    y[o] = sx * sw[o] * ( sum Xq * Wq[o]  -  zx * sum Wq[o] )
                         `-- int32 --'      `- constant -'

so the sum runs on integers -- 8-bit products accumulated in int32 -- and one multiply per
output returns to float, where the float epilogue the graph already has (bias, ReLU, and the
quantize of the next layer's input) is fused into the same kernel: activations stay 8-bit
between layers and no fp32 activation tensor is written.

The activation is re-laid out per kernel as ``A[n, c // D, y, x]``, one 32-bit word holding the
``D`` channels ``c..c+D-1`` of a pixel (padded with the zero point), and the weights at compile
time as
``B[o // L, c // D, kh, kw, o % L, c % D]``; one instruction adds ``D`` products into each of
``L`` int32 lanes::

    acc[n, o // L, y, x, o % L] += sum_{d < D} A[.., c // D, ..].d * B[o // L, c // D, .., o % L, d]

The ISA table (``L``, ``D``, operand types, instruction) is :mod:`..isa`'s. Depthwise QDQ
convolutions read the 8-bit input directly (:func:`.row_conv.q_dwconv_te`) and compute in
float; their weights are small.
"""

from __future__ import annotations

import numpy as np
from tvm import te, tirx

from ..compute import conv_out, ints
from ..isa import ISA_ATTR, DotISA, za_of
from ..schedule import (ScheduleRule, blocks_named, extent, fuse_epilogue, parallel_pad,
                        pick_tile, vectorize_innermost)
from .int8_common import finish_int8, kernel_isa, pack_word
from .int8_intrin import register_intrin

INT8_CONV_BLOCK = "edgec_conv2d_int8"


def pack_weight(wq: np.ndarray, isa: DotISA) -> np.ndarray:
    """``W[o, c, kh, kw]`` -> ``B[o // L, c // D, kh, kw, o % L, c % D]`` (zero padded)."""
    L, D = isa.lanes, isa.depth
    oc, ic, kh, kw = wq.shape
    ocb, icb = -(-oc // L), -(-ic // D)
    w = np.zeros((ocb * L, icb * D, kh, kw), isa.b_dtype)
    w[:oc, :ic] = wq
    return np.ascontiguousarray(w.reshape(ocb, L, icb, D, kh, kw).transpose(0, 2, 4, 5, 1, 3))



def int8_conv_te(xq, wp, corr, scale, zx: int, oc: int, strides, pads, dil, isa: DotISA,
                 view=None, requant=None, residual=None):
    """TE of the integer convolution; returns the float output ``[n, oc, oh, ow]`` (or with
    ``requant``, the next layer's 8-bit input: :func:`finish_int8`).

    ``view`` (for :func:`int8_matmul_te`): ``(shape, load)``, the NCHW shape the kernel sees
    and ``load(n, c, y, x)`` reading it from ``xq``."""
    nb, c, h, w = ints(xq.shape) if view is None else view[0]
    load = (lambda n, ch, y, x: xq[n, ch, y, x]) if view is None else view[1]
    ocb, icb, kh, kw, L, D = ints(wp.shape)
    (sh, sw), (dh, dw) = strides, dil
    pt, pl, pb, pr = pads
    oh, ow = conv_out(h, pt, pb, kh, sh, dh), conv_out(w, pl, pr, kw, sw, dw)
    za = za_of(isa, str(xq.dtype), zx)
    # int16 forms: A = X - zx (padding 0); 8-bit forms: A = X + (za - zx) in A's type
    shift = -zx if isa.a_shift is None else za - zx

    def conv_a(v):
        return (v.astype("int32") + shift).astype(isa.a_dtype)

    bits = 32 // D

    def pack(n, cb, y, x):
        row, col = y - pt, x - pl
        inside = tirx.all(row >= 0, row < h, col >= 0, col < w)
        vals = []
        for d in range(D):
            ch = cb * D + d
            v = conv_a(load(n, tirx.min(ch, c - 1), row, col)) if c % D else \
                conv_a(load(n, ch, row, col))
            if c % D:  # channels past c (the last group) hold the zero point too
                v = tirx.if_then_else(ch < c, v, tirx.const(za, isa.a_dtype))
            vals.append(tirx.if_then_else(tirx.likely(inside), v, tirx.const(za, isa.a_dtype)))
        return pack_word(vals, bits)

    # A[n, c // D, y, x] holds channels c..c+D-1 of one pixel in one 32-bit word: the pack
    # is then whole-word stores (3.5x faster than byte stores), and each dot-product step
    # broadcasts one word
    ap = te.compute((nb, icb, h + pt + pb, w + pl + pr), pack, name="edgec_pad_int8")
    rc = te.reduce_axis((0, icb), "rc")
    ry = te.reduce_axis((0, kh), "ry")
    rx = te.reduce_axis((0, kw), "rx")
    rd = te.reduce_axis((0, D), "rd")
    mask = tirx.const((1 << bits) - 1, "uint32")
    acc = te.compute(
        (nb, ocb, oh, ow, L),
        lambda n, o, y, x, b: te.sum(
            ((ap[n, rc, y * sh + ry * dh, x * sw + rx * dw] >> (rd * bits).astype("uint32"))
             & mask).astype(isa.a_dtype).astype("int32")
            * wp[o, rc, ry, rx, b, rd].astype("int32"), axis=[rc, ry, rx, rd]),
        name=INT8_CONV_BLOCK, attrs={ISA_ATTR: isa.name})
    if view is not None:  # a matmul: batch rows are the columns of a 1 x M image
        return finish_int8((ow, oc), lambda m, o: acc[0, o // L, 0, m, o % L],
                           lambda m, o: o, corr, scale, requant, residual)
    return finish_int8((nb, oc, oh, ow), lambda n, o, y, x: acc[n, o // L, y, x, o % L],
                       lambda n, o, y, x: o, corr, scale, requant, residual)



def int8_matmul_te(xq, wp, corr, scale, zx: int, n_out: int, isa: DotISA, requant=None,
                   residual=None):
    """``Y[m, j] = sum_k dq(Xq)[m, k] * dq(Wq)[k, j]`` as a 1x1 integer convolution over a
    ``1 x M`` image with ``K`` channels: the ``M`` rows become the register tile's columns,
    so each weight vector loaded serves up to 16 rows (and batch 1 is an int8 GEMV reading
    a quarter of the fp32 weight bytes)."""
    m, k = ints(xq.shape)
    return int8_conv_te(xq, wp, corr, scale, zx, n_out, (1, 1), (0, 0, 0, 0), (1, 1), isa,
                        view=((1, k, 1, m), lambda n, ch, y, x: xq[x, ch]), requant=requant,
                        residual=residual)



def schedule_int8_conv(sch, block, isa: DotISA, max_cols: int) -> None:
    """Register tile: ``ob2`` blocks of ``L`` output channels x ``cols`` output columns of
    int32 accumulators; per reduction step ``ob2`` weight vectors and ``cols`` broadcast
    activations feed ``ob2 * cols`` dot-product instructions."""
    n, o, y, x, b, rc, ry, rx, rd = sch.get_loops(block)
    if isa.lanes == 16:  # 32 zmm: 16 accumulators + weight + broadcast; a 16-column tile
        max_cols = 16     # also gives the epilogue whole vectors (7x7/2 stem: -18 %)
    cols = pick_tile(extent(sch, x), max_cols)
    # narrow rows (e.g. 7x7 maps, a matmul's few rows): two or three channel blocks per tile
    # keep enough independent accumulators busy
    oe = extent(sch, o)
    ob2 = next((k for k in (2, 3) if k * cols <= max_cols and oe % k == 0), 1)
    oo, oi = sch.split(o, [None, ob2])
    xo, xi = sch.split(x, [None, cols])
    intrin = register_intrin(isa)
    if intrin is not None:
        sch.reorder(n, oo, y, xo, rc, ry, rx, oi, xi, b, rd)
    else:  # plain vector code: lanes innermost, the D products unrolled around them
        sch.reorder(n, oo, y, xo, rc, ry, rx, oi, xi, rd, b)
    epilogue = fuse_epilogue(sch, block, xo)
    sch.parallel(sch.fuse(n, oo, y))
    sch.unroll(oi)
    sch.unroll(xi)
    if intrin is None:
        sch.unroll(rd)
        sch.vectorize(b)
    sch.decompose_reduction(block, rc)
    if intrin is not None:
        sch.tensorize(b, intrin)
    vectorize_innermost(sch, epilogue)
    parallel_pad(sch)



def _apply(sch, blocks, ctx) -> str:
    isa = kernel_isa(sch, blocks[0], ctx.isa)
    schedule_int8_conv(sch, blocks[0], isa, ctx.int_cols)
    return "conv2d-int8-" + isa.name


RULE = ScheduleRule("conv2d-int8", lambda sch: blocks_named(sch, INT8_CONV_BLOCK), _apply)
