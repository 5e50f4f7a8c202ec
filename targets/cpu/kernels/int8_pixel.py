"""Pixels-in-lanes 1x1 integer convolution: the lanes are ``L`` pixels, the ``D`` weights of
one output channel broadcast from one word, so the requantizing epilogue reads and writes
whole NCHW vectors (:func:`int8_conv1x1_px_te`)."""

from __future__ import annotations

import numpy as np
from tvm import te, tirx

from ..compute import ints
from ..isa import ISA_ATTR, DotISA, px_accumulators, za_of
from ..schedule import ScheduleRule, blocks_named, extent
from . import pixel_conv
from .int8_common import finish_int8, kernel_isa, pack_word
from .int8_intrin import register_px_intrin
from .pixel_conv import PX_TILE

INT8_PX_BLOCK = "edgec_conv2d_int8px"


def px_tile(isa: DotISA, shape, wshape, strides, pads):
    """The tile (:func:`.pixel_conv.px_tile`; ``L`` pixels per vector, the ISA's
    accumulator budget, input pixels of ``ceil(C / D)`` words) of the pixel-oriented
    kernel for a 1x1 stride-1 unpadded convolution, else None."""
    n, c, h, w = shape
    if tuple(wshape[2:]) != (1, 1) or list(strides) != [1, 1] or any(pads):
        return None
    return pixel_conv.px_tile(isa.lanes, px_accumulators(isa), h, w, 4 * -(-c // isa.depth),
                int(wshape[0]))



def px_applies(isa: DotISA, shape, wshape, strides, pads, dil) -> bool:
    """Whether a convolution takes :func:`int8_conv1x1_px_te` (see :func:`px_tile`)."""
    return px_tile(isa, shape, wshape, strides, pads) is not None


def pack_weight_px(wq: np.ndarray, isa: DotISA, rows: int) -> np.ndarray:
    """``W[o, c, 1, 1]`` -> ``B[o // R, c // D, o % R, c % D]`` (``R`` = the tile's ``rows``,
    zero padded): one tile's weights for one reduction step are one contiguous run of
    words, and only ``oc`` up to a multiple of the tile is computed."""
    R, D = rows, isa.depth
    oc, ic = wq.shape[:2]
    ocb, icb = -(-oc // R), -(-ic // D)
    w = np.zeros((ocb * R, icb * D), isa.b_dtype)
    w[:oc, :ic] = wq.reshape(oc, ic)
    return np.ascontiguousarray(w.reshape(ocb, R, icb, D).transpose(0, 2, 1, 3))



def int8_conv1x1_px_te(xq, wp, corr, scale, zx: int, oc: int, isa: DotISA, tile,
                       requant=None, residual=None):
    """1x1 stride-1 integer convolution with pixels in the vector lanes::

        acc[n, o, y, x] += sum_d A[n, c // D, y, x].d * B[o // R, c // D, o % R, d]

    over the map as :func:`px_tile` views it: one flat row of ``H*W`` pixels when they fill
    whole vectors (contiguous in NCHW), else rows padded to whole vectors (the padding
    holds the zero point; its results are never read). The accumulators of one output
    channel are ``L`` consecutive pixels -- the layout of the NCHW output -- so the
    requantizing epilogue reads and stores whole vectors; with output channels in the lanes
    (:func:`int8_conv_te`) it first transposes the tile, which costs more than the dot
    products when the convolution has few input channels (MobileNet's expansions and
    projections)."""
    nb, c, h, w = ints(xq.shape)
    ocb, icb, R, D = ints(wp.shape)
    hv, wv, wpad, vecs, rows = tile
    za = za_of(isa, str(xq.dtype), zx)
    shift = -zx if isa.a_shift is None else za - zx
    bits = 32 // D

    def at(y, x):  # the view's (y, x) in the map (a flat row: x // w, x % w)
        return (y, x) if hv == h else (x // w, x % w)

    def pack(n, cb, y, x):
        vals = []
        for d in range(D):
            ch = cb * D + d
            v = (xq[(n, tirx.min(ch, c - 1), *at(y, tirx.min(x, wv - 1)))].astype("int32")
                 + shift).astype(isa.a_dtype)
            keep = x < wv if c % D == 0 else tirx.all(ch < c, x < wv)
            vals.append(tirx.if_then_else(keep, v, tirx.const(za, isa.a_dtype)))
        return pack_word(vals, bits)

    ap = te.compute((nb, icb, hv, wpad), pack, name="edgec_pad_int8")
    rc = te.reduce_axis((0, icb), "rc")
    rd = te.reduce_axis((0, D), "rd")
    mask = tirx.const((1 << bits) - 1, "uint32")
    acc = te.compute(
        (nb, ocb * R, hv, wpad),
        lambda n, o, y, x: te.sum(
            ((ap[n, rc, y, x] >> (rd * bits).astype("uint32")) & mask
             ).astype(isa.a_dtype).astype("int32")
            * wp[o // R, rc, o % R, rd].astype("int32"), axis=[rc, rd]),
        name=INT8_PX_BLOCK, attrs={PX_TILE: [vecs, rows], ISA_ATTR: isa.name})
    if hv == h:
        acc_at = lambda n, o, y, x: acc[n, o, y, x]  # noqa: E731
    else:
        acc_at = lambda n, o, y, x: acc[n, o, 0, y * w + x]  # noqa: E731
    return finish_int8((nb, oc, h, w), acc_at, lambda n, o, y, x: o, corr, scale, requant,
                       residual)



def schedule_int8_px(sch, block, isa: DotISA) -> None:
    """Register tile of :func:`int8_conv1x1_px_te` (:func:`.pixel_conv.schedule_px`): per
    reduction step ``vecs`` pixel-vector loads and ``rows`` broadcast weight words feed
    ``rows * vecs`` dot-product instructions."""
    L = isa.lanes
    intrin = register_px_intrin(isa)
    n, o, y, x, rc, rd = sch.get_loops(block)

    def inner(xi):
        if intrin is None:  # (before the init is split off: vectorize needs the whole sum)
            sch.unroll(rd)
            sch.vectorize(xi)

    def after(xi):
        if intrin is not None:
            sch.tensorize(xi, intrin)

    pixel_conv.schedule_px(sch, block, L, rd=rd if intrin is not None else None,
                inner=inner, after=after, innermost=None if intrin is not None else rd)
    for pad in sch.get_child_blocks(sch.get_sblock("root")):
        if sch.get(pad).name_hint == "edgec_pad_int8":  # rows of words, vectors along x
            n_, cb, y_, x_ = sch.get_loops(pad)
            sch.parallel(sch.fuse(n_, cb, y_))
            if extent(sch, x_) % L == 0:
                _, x_ = sch.split(x_, [None, L])
                sch.vectorize(x_)



def _apply(sch, blocks, ctx) -> str:
    isa = kernel_isa(sch, blocks[0], ctx.isa)
    schedule_int8_px(sch, blocks[0], isa)
    return "conv2d-int8px-" + isa.name


RULE = ScheduleRule("conv2d-int8px", lambda sch: blocks_named(sch, INT8_PX_BLOCK), _apply)
