"""Row kernel of depthwise convolution and max pooling: one padded output row of whole
vectors at a time, column phases for the stride, the taps unrolled (:func:`dwconv_te`)."""

from __future__ import annotations

import functools

import tvm
from tvm import te

from ..compute import column_phases, column_tap, conv_out, ints
from ..schedule import (ScheduleRule, blocks_named, buffer_bytes, extent, find_blocks,
                        fuse_epilogue, pick_tile, vectorize_in_vectors)
from .int8_common import round_clamp

DWCONV_BLOCK = "edgec_dwconv2d"


def dw_vector(ow: int, lanes: int) -> int:
    """Vector width for a depthwise output row of ``ow`` pixels: the fewest vectors, and
    of those the narrowest (a 7-pixel row is one 8-lane vector, not a 16-lane one)."""
    widths = [u for u in (16, 8, 4) if u <= max(lanes, 4)]
    return min(widths, key=lambda u: (-(-ow // u), u))


def dwconv_te(x, wt, strides, pads, dil, load=None, lanes: int = 8, finish=None, pool=None):
    """Depthwise convolution, one padded row of vectors at a time::

        Xs_p[n, c, y, j] = Xpad[n, c, y, j * sw + p]                 (column phases)
        acc[n, c, y, x]  = sum_{i, k} Xs_{(k*dw) % sw}[n, c, y*sh + i*dh, x + (k*dw) // sw]
                                      * W[c, 0, i, k]                 for x < Wp
        Y[n, c, y, x]    = finish(acc[n, c, y, x])                    for x < Wo

    The row is padded to whole vectors (``Wp``, :func:`dw_vector`), so every tap is one
    unaligned vector load and one FMA per vector and the accumulators of a row stay in
    registers; the columns beyond ``Wo`` are computed from padding and never read. With
    ``sw`` column phases every tap of a strided convolution reads contiguous columns.
    ``load(n, c, y, x)`` (default ``x[n, c, y, x]``) reads one float input value, e.g.
    dequantizing an 8-bit input; ``finish(v, n, c, y, x)`` (default ``v``) maps a sum to
    the output value, e.g. requantizing it. With ``wt = None`` and ``pool = (kh, kw)`` it is
    a max pool instead (``max`` over the taps, padding with the type's lowest value) in the
    input's own type."""
    nb, c, h, w = ints(x.shape)
    kh, kw = pool if wt is None else ints(wt.shape)[2:]
    if wt is None:
        dt = str(x.dtype)
        fill = tvm.tirx.min_value(dt)
    else:
        fill = tvm.tirx.const(0.0, "float32")
    (sh, sw), (dh, dw) = strides, dil
    pt, pl, pb, pr = pads
    oh, ow = conv_out(h, pt, pb, kh, sh, dh), conv_out(w, pl, pr, kw, sw, dw)
    v = dw_vector(ow, lanes)
    owp = -(-ow // v) * v
    rkh = te.reduce_axis((0, kh), "rkh")
    xs = column_phases(x, kh, kw, strides, pads, dil, owp, fill, load)
    if wt is None:  # max pool: the same taps, max instead of multiply-add
        def tap(n, c_, y, xx, k):
            return column_tap(xs, sw, dw, k, n, c_, y * sh + rkh * dh, xx)

        acc = te.compute(
            (nb, c, oh, owp),
            lambda n, c_, y, xx: te.max(functools.reduce(
                tvm.tirx.max, [tap(n, c_, y, xx, k) for k in range(kw)]), axis=[rkh]),
            name=DWCONV_BLOCK)
    else:  # one multiply-add per tap into the accumulator, each tap reading its phase
        rkw = te.reduce_axis((0, kw), "rkw")
        acc = te.compute(
            (nb, c, oh, owp),
            lambda n, c_, y, xx: te.sum(
                column_tap(xs, sw, dw, rkw, n, c_, y * sh + rkh * dh, xx, kw)
                * wt[c_, 0, rkh, rkw], axis=[rkh, rkw]),
            name=DWCONV_BLOCK)
    finish = finish or (lambda v, *i: v)
    return te.compute((nb, c, oh, ow),
                      lambda n, c_, y, xx: finish(acc[n, c_, y, xx], n, c_, y, xx),
                      name="edgec_dwconv2d_crop")


def schedule_dwconv(sch, block, lanes: int) -> None:
    """Per channel (the parallel tasks): the channel's padded input, then row by row a
    register tile of up to ``V`` vectors of the padded row, every tap unrolled (one load and
    one FMA per vector), and the fused epilogue on the row while it is in L1."""
    n, c, y, x, *red = sch.get_loops(block)
    owp = extent(sch, x)
    crop = blocks_named(sch, "edgec_dwconv2d_crop")[0]
    v = dw_vector(extent(sch, sch.get_loops(crop)[-1]), lanes)
    small_map = extent(sch, sch.get_loops(crop)[-2]) * extent(sch, sch.get_loops(crop)[-1]) \
        <= 256  # output pixels per channel
    nv = owp // v
    xo, xv, xi = sch.split(x, [None, pick_tile(nv, 8 if lanes >= 16 else 4), v])
    sch.reorder(n, c, y, xo, *red, xv, xi)
    epilogue = fuse_epilogue(sch, block, y)
    nc = sch.fuse(n, c)
    sch.parallel(nc)
    # a channel's padded rows under 1 KiB stay on the stack; larger ones are a workspace
    # call per task, which costs more than a small map's convolution (14x14: 2 threads
    # ran 1.36x, not 2x, faster): then all channels are padded first, in parallel
    for pad in find_blocks(sch, "edgec_pad"):
        loops = sch.get_loops(pad)
        per_channel = buffer_bytes(sch, pad) // (extent(sch, loops[0]) * extent(sch, loops[1]))
        if per_channel >= 1024 and small_map:
            sch.parallel(sch.fuse(*loops[:2]))
        else:
            sch.compute_at(pad, nc, preserve_unit_loops=True)
    for r in red:
        sch.unroll(r)
    sch.unroll(xv)
    sch.vectorize(xi)
    sch.decompose_reduction(block, red[0])
    # whole vectors along the row (LLVM splits a 112-lane vector badly) where the row is
    # whole vectors (56 = 3 x 16 + 8: LLVM's split is better)
    ow = extent(sch, sch.get_loops(epilogue[-1])[-1]) if epilogue else 0
    vectorize_in_vectors(sch, epilogue, v, only_extent=ow)



def q_dwconv_te(xq, wt, zx: int, strides, pads, dil, lanes: int, bias=None, requant=None):
    """Depthwise convolution reading the 8-bit input: ``(Xq - zx)`` converted while padding
    (the input scale is folded into ``wt``), float sums. With ``requant = (lo, hi, dtype)``
    (``wt`` then also carries the output's 1/scale, ``bias`` its zero point) the output is
    the next layer's 8-bit input, ``round(clamp(acc + bias[c], lo, hi))``."""
    def load(n, c_, y, x):
        return (xq[n, c_, y, x].astype("int32") - zx).astype("float32")

    def requantize(v, n, c_, y, x):
        return round_clamp(v + bias[c_], requant)

    return dwconv_te(xq, wt, strides, pads, dil, load=load, lanes=lanes,
                     finish=None if requant is None else requantize)



def _apply(sch, blocks, ctx) -> str:
    pool = isinstance(getattr(sch.get(blocks[0]).body, "value", None), tvm.tirx.Max)
    schedule_dwconv(sch, blocks[0], ctx.lanes)
    return "maxpool2d" if pool else "dwconv2d"


RULE = ScheduleRule("dwconv2d", lambda sch: blocks_named(sch, DWCONV_BLOCK), _apply)
