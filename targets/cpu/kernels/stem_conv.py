"""Pixels-in-lanes direct convolution of an image stem (float, at most
:data:`~.packed_conv.STEM_CHANNELS` input channels, any kernel size and stride).

The packed kernel keeps output channels in the lanes and must transpose every tile back
to NCHW in its epilogue; with 3 input channels a 3x3 tile has only 27 reduction steps, so
that transpose (a gather per output value) cost as much as the multiply-adds (SqueezeNet's
3x3/2 stem ran at a third of the machine's peak). Here the output pixels of a row are the
lanes, as in the 1x1 kernel (:mod:`.pixel_conv`), and the input's column phases
(:func:`~..compute.column_phases`, as the depthwise kernel's) make every tap of a strided
window one contiguous vector load::

    acc[n, o, y, x] = sum_{c, i, k} Xs_{(k*dw) % sw}[n, c, y*sh + i*dh, x + (k*dw) // sw]
                                    * Wt[o // R, c, i, k, o % R]       for x < Wp
    Y[n, o, y, x]   = acc[n, o, y, x]                                 for x < Wo

A register tile is ``R`` output channels x ``V`` vectors of a row (:func:`stem_tile`): per
tap ``V`` unaligned loads and ``R`` weight broadcasts feed ``R * V`` FMAs, each straight
into its accumulator (the column tap is a loop over the taps, unrolled: written out as one
sum per kernel row, added to the accumulator once, it cost a multiply and an add more per
row and spilled the tile's registers, 3x slower), and the NCHW output rows are the
accumulators themselves, so the fused epilogue works on whole vectors.
"""

from __future__ import annotations

import numpy as np
from tvm import te

from ..compute import column_phases, column_tap, conv_out, ints
from ..isa import px_budget
from ..schedule import (ScheduleRule, blocks_named, extent, fuse_epilogue, parallel_pad,
                        vectorize_in_vectors)
from .packed_conv import STEM_CHANNELS
from .pixel_conv import lane_tile

STEM_BLOCK = "edgec_conv2d_stem"
STEM_TILE = "edgec_stem_tile"  # block annotation: [vecs, rows]
MAX_STEPS = 36  # reduction steps (channels x taps), at most: a 3x3 window on <= 4 channels


def stem_tile(lanes: int, shape, wshape, strides, pads, dil, groups: int = 1):
    """``(owp, vecs, rows)`` for a stem convolution: the output row padded to whole vectors,
    then ``vecs`` vectors x ``rows`` channels per register tile (the 1x1 kernel's choice,
    :func:`~.pixel_conv.lane_tile`); None when the kernel does not apply (more input channels,
    groups, a 1x1 window, or a row that whole vectors would pad by over a quarter) or does
    not pay: past :data:`MAX_STEPS` reduction steps the packed kernel's transpose is spread
    over enough multiply-adds, and its broadcasts beat this kernel's unaligned vector loads
    (ResNet's 7x7/2 stem on 3 channels, 147 steps: 1.5 ms packed, 2.4 ms here; SqueezeNet's
    3x3/2 on 3 channels to 64, 27 steps: 0.75 ms packed, 0.6 ms here; to 32 channels and a
    1-channel 3x3 on 28 x 28: the same). Re-measured since every tap is one multiply-add
    into its accumulator (AVX-512, interleaved runs): the 7x7/2 stem here 1.04x the packed
    kernel's time (it stays packed), SqueezeNet's 3x3/2 stem 0.48 ms against onnxruntime's
    0.62 (1.6 ms before), MobileNetV2's 3x3/2 to 32 channels 0.24 ms (0.42 before)."""
    n, c, h, w = shape
    oc, ic, kh, kw = wshape
    if groups != 1 or c > STEM_CHANNELS or ic != c or kh * kw == 1 or c * kh * kw > MAX_STEPS:
        return None
    ow = conv_out(w, pads[1], pads[3], kw, strides[1], dil[1])
    owp = -(-ow // lanes) * lanes
    if ow < 1 or 4 * (owp - ow) > owp:
        return None
    best = lane_tile(lanes, px_budget(lanes), owp // lanes, oc)
    return None if best is None else (owp, *best)


def pack_weight_stem(w: np.ndarray, rows: int) -> np.ndarray:
    """``W[o, c, kh, kw]`` -> ``Wt[o // R, c, kh, kw, o % R]`` (``R``: the tile's rows, zero
    padded): the ``R`` weights of a tap are one contiguous run."""
    oc = w.shape[0]
    ocb = -(-oc // rows)
    wp = np.zeros((ocb * rows,) + w.shape[1:], w.dtype)
    wp[:oc] = w
    return np.ascontiguousarray(wp.reshape(ocb, rows, *w.shape[1:]).transpose(0, 2, 3, 4, 1))


def conv_stem_te(x, wt, oc: int, strides, pads, dil, tile):
    """The stem convolution (module docstring) of ``x`` by the packed ``wt``."""
    nb, _, h, w = ints(x.shape)
    ocb, ic, kh, kw, rows = ints(wt.shape)
    owp, vecs, _ = tile
    (sh, sw), (dh, dw) = strides, dil
    pt, pl, pb, pr = pads
    oh, ow = conv_out(h, pt, pb, kh, sh, dh), conv_out(w, pl, pr, kw, sw, dw)
    xs = column_phases(x, kh, kw, strides, pads, dil, owp, 0.0)
    rc = te.reduce_axis((0, ic), "rc")
    rkh = te.reduce_axis((0, kh), "rkh")
    rkw = te.reduce_axis((0, kw), "rkw")

    def body(n, o, y, xx):  # one multiply-add per tap into the accumulator
        return te.sum(column_tap(xs, sw, dw, rkw, n, rc, y * sh + rkh * dh, xx, kw)
                      * wt[o // rows, rc, rkh, rkw, o % rows], axis=[rc, rkh, rkw])

    acc = te.compute((nb, ocb * rows, oh, owp), body, name=STEM_BLOCK,
                     attrs={STEM_TILE: [vecs, rows]})
    return te.compute((nb, oc, oh, ow), lambda n, o, y, xx: acc[n, o, y, xx],
                      name="edgec_conv2d_stem_out")


def schedule_stem(sch, block, lanes: int) -> None:
    """Tasks: (image, output row, column tile, channel tile), channel tiles innermost so
    that consecutive tasks read the same input rows; per task the tile's ``rows x vecs``
    accumulators over every (channel, kernel row) with the taps unrolled, then the fused
    epilogue on the tile. The column phases are computed first, every (image, channel,
    row) a parallel task (3 channels alone would leave a thread idle)."""
    n, o, y, x, rc, rkh, rkw = sch.get_loops(block)
    vecs, rows = (int(v) for v in sch.get(block).annotations[STEM_TILE])
    if extent(sch, o) % rows or extent(sch, x) % (vecs * lanes):
        raise ValueError("kernel computed for another tile")
    oo, oi = sch.split(o, [None, rows])
    xo, xv, xi = sch.split(x, [None, vecs, lanes])
    sch.reorder(n, y, xo, oo, rc, rkh, rkw, oi, xv, xi)
    epilogue = fuse_epilogue(sch, block, oo)
    sch.parallel(sch.fuse(n, y, xo, oo))
    sch.unroll(rkw)
    sch.unroll(oi)
    sch.unroll(xv)
    sch.vectorize(xi)
    sch.decompose_reduction(block, rc)
    vectorize_in_vectors(sch, epilogue, lanes)
    parallel_pad(sch, depth=3)


def _apply(sch, blocks, ctx) -> str:
    schedule_stem(sch, blocks[0], ctx.lanes)
    return "conv2d-stem"


RULE = ScheduleRule("conv2d-stem", lambda sch: blocks_named(sch, STEM_BLOCK), _apply)
