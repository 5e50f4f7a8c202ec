"""Pixels-in-lanes 1x1 convolution (float): ``W[O x C] . X[C x pixels]``, pixels in the
vector lanes, so the NCHW output rows are the accumulators themselves. :func:`px_tile`
chooses the register tile (also for the integer form, :mod:`.int8_pixel`)."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import te

from ..compute import ints
from ..isa import px_budget
from ..schedule import (ScheduleRule, blocks_named, extent, fuse_epilogue, parallel_pad,
                        vectorize_in_vectors)

CONV_PX_BLOCK = "edgec_conv2d_px"
PX_TILE = "edgec_px_tile"  # block annotation of a pixels-in-lanes kernel: [vecs, rows]

PX_L1_BYTES = 16 * 1024  # a tile's input pixels (all input channels) stay in half of L1
# AVX-512, deep inputs: a wider tile's pixels may spill to L2 when each is reused by at least
# PX_WIDE_ROWS channels per load (:func:`px_tile`)
PX_WIDE_BYTES, PX_WIDE_ROWS = 64 * 1024, 3



def px_tile(lanes: int, budget: int, h: int, w: int, kbytes: int, oc: int,
            wide: bool = False):
    """How a pixels-in-lanes 1x1 kernel walks an ``h x w`` map: ``(hv, wv, wpad, vecs,
    rows)``, or None when no tile fits.

    When the ``h * w`` pixels fill whole vectors the map is one flat row (``hv = 1``,
    ``wv = h * w``; contiguous in NCHW) cut into tiles of ``vecs`` vectors, else each image
    row is padded to whole vectors (``wpad``) and is one tile. A tile is ``rows`` output
    channels x ``vecs`` vectors of 32-bit accumulators: at most ``budget`` and under 1 KiB
    (a larger per-task buffer is a workspace call per task instead of registers), and its
    input pixels (``kbytes`` per pixel: every input channel) within :data:`PX_L1_BYTES`, so
    the channel tiles that follow each other reuse them from L1. Among those, the most
    multiply-adds per load (``rows * vecs / (rows + vecs)``) times the share of the
    ``oc`` channels padded to whole tiles that is real.

    ``wide`` (float, AVX-512): where L1 leaves a flat map one vector per tile (deep inputs:
    ResNet-50's 256 -> 64 and 256 -> 128 at 56 x 56 took 1 x 13, 14 loads per 13 FMAs),
    a tile of more vectors whose pixels fit :data:`PX_WIDE_BYTES` (L2) and which has at
    least :data:`PX_WIDE_ROWS` channels, so that each pixel vector loaded from L2 feeds 3+
    FMAs (4 x 3: 7 loads per 12 FMAs). Interleaved against 1 x 13 (AVX-512): those two
    layers 0.82-0.86x the time, whole ResNet-50 0.96-0.97x, DenseNet-121 0.94x,
    MobileNetV2 0.97x, EfficientNet-B0 and MobileNetV3 at par; 128 -> 512 at 28 x 28 as
    7 x 2 (2 channels per L2 load) 1.12x, hence the rows; AVX2's 2 x 6 -> 4 x 3 on the
    same layers 1.05-1.09x, hence AVX-512 only."""
    npix = h * w
    flat = npix % lanes == 0
    wpad = npix if flat else -(-w // lanes) * lanes
    nv = wpad // lanes
    best = lane_tile(lanes, budget, nv, oc, lambda vecs: (flat or vecs == nv) and
                     kbytes * vecs * lanes <= PX_L1_BYTES)
    if best is None or (not flat and 4 * (wpad - w) > wpad):
        return None
    if wide and lanes >= 16 and best[0] == 1 and flat:
        wider = lane_tile(lanes, budget, nv, oc,
                          lambda vecs: vecs > 1 and kbytes * vecs * lanes <= PX_WIDE_BYTES,
                          min_rows=PX_WIDE_ROWS)
        best = wider or best
    return (1, npix, wpad, *best) if flat else (h, w, wpad, *best)


def lane_tile(lanes: int, budget: int, nv: int, oc: int, allowed=None, min_rows: int = 1):
    """``(vecs, rows)``: the register tile of a pixels-in-lanes kernel over ``nv`` vectors
    of pixels and ``oc`` output channels -- ``vecs`` (a divisor of ``nv``, ``allowed`` by
    the caller) x ``rows`` accumulators, at most ``budget`` and under 1 KiB, with the most
    multiply-adds per load (``rows * vecs / (rows + vecs)``) times the share of the ``oc``
    channels padded to whole tiles that is real; None when no ``vecs`` is allowed (and no
    tile has ``min_rows`` rows)."""
    limit = min(budget, 1023 // (4 * lanes))
    best = None
    for vecs in range(1, min(limit, nv) + 1):
        if nv % vecs or (allowed is not None and not allowed(vecs)):
            continue
        for rows in range(min_rows, min(16, limit // vecs) + 1):
            score = (rows * vecs / (rows + vecs) * oc / (-(-oc // rows) * rows), rows * vecs)
            if best is None or score > best[0]:
                best = (score, vecs, rows)
    return None if best is None else best[1:]


def conv_px_tile(lanes: int, shape, wshape, strides, pads):
    """The :func:`px_tile` of a 1x1 stride-1 unpadded float convolution on a map whose pixels
    fill whole vectors, else None. Rows padded to whole vectors (a tile is then one row)
    lost to the packed kernel in one-layer runs (AVX-512, same run): 64 -> 384 at 14 x 14
    0.08 ms packed against 0.11, 256 -> 1024 at 14 x 14 0.79 against 0.95, 128 -> 32 at
    27 x 27 0.056 against 0.089, 64 -> 16 at 55 x 55 0.076 against 0.14; only 16 -> 64 at
    55 x 55 gained (0.090 against 0.101). Flat maps keep it (128 -> 512 at 28 x 28: 0.87
    against 1.01)."""
    n, c, h, w = shape
    if tuple(wshape[2:]) != (1, 1) or list(strides) != [1, 1] or any(pads) or \
            (h * w) % lanes:
        return None
    return px_tile(lanes, px_budget(lanes), h, w, 4 * c, int(wshape[0]), wide=True)



def pack_weight_px(w: np.ndarray, rows: int) -> np.ndarray:
    """``W[o, c, 1, 1]`` -> ``Wt[o // R, c, o % R]`` (``R`` = the tile's ``rows``, zero padded)."""
    oc, c = w.shape[:2]
    ocb = -(-oc // rows)
    wpx = np.zeros((ocb * rows, c), w.dtype)
    wpx[:oc] = w.reshape(oc, c)
    return np.ascontiguousarray(wpx.reshape(ocb, rows, c).transpose(0, 2, 1))


def conv1x1_px_te(x, wpx, oc: int, tile):
    """1x1 stride-1 convolution as ``W[O x C] . X[C x pixels]`` with pixels in the lanes::

        acc[n, o, y, x] = sum_c X[n, c, y, x] * Wt[o // R, c, o % R]

    over the map as :func:`px_tile` views it (one flat row of ``H*W`` pixels when they fill
    whole vectors -- no copy at all -- else rows padded to whole vectors). Per input
    channel a tile loads ``vecs`` pixel vectors and broadcasts ``R`` weights; the NCHW
    output rows are the accumulators themselves, so the fused epilogue (bias, BN, ReLU,
    residual Add) reads and writes whole vectors with no transpose -- which the
    channels-in-lanes kernel needs, and which costs more than the multiply-adds when
    there are few input channels (MobileNet's expansions and projections)."""
    nb, c, h, w = ints(x.shape)
    ocb, ic, rows = ints(wpx.shape)
    hv, wv, wpad, vecs, _ = tile
    if hv == 1 and h > 1:
        def xin(n, c_, y, xx):
            return x[n, c_, xx // w, xx % w]
    elif wpad != w:
        xp = te.compute((nb, c, h, wpad), lambda n, c_, y, xx: tvm.tirx.if_then_else(
            tvm.tirx.likely(xx < w), x[n, c_, y, tvm.tirx.min(xx, w - 1)],
            tvm.tirx.const(0.0, "float32")), name="edgec_pad")

        def xin(n, c_, y, xx):
            return xp[n, c_, y, xx]
    else:
        def xin(n, c_, y, xx):
            return x[n, c_, y, xx]
    rc = te.reduce_axis((0, ic), "rc")
    acc = te.compute((nb, ocb * rows, hv, wpad),
                     lambda n, o, y, xx: te.sum(xin(n, rc, y, xx) * wpx[o // rows, rc, o % rows],
                                                axis=rc),
                     name=CONV_PX_BLOCK, attrs={PX_TILE: [vecs, rows]})
    if hv == 1 and h > 1:
        return te.compute((nb, oc, h, w), lambda n, o, y, xx: acc[n, o, 0, y * w + xx],
                          name="edgec_conv2d_px_out")
    return te.compute((nb, oc, h, w), lambda n, o, y, xx: acc[n, o, y, xx],
                      name="edgec_conv2d_px_out")



def schedule_px(sch, block, lanes: int, rd=None, inner=None, after=None,
                innermost=None) -> None:
    """Register tile of a pixels-in-lanes 1x1 convolution ``acc[n, o, y, x]`` (reduction
    ``rc`` over input channels, and for packed 8-bit words ``rd`` within a word): ``rows``
    output channels x ``vecs`` vectors of pixels (:func:`px_tile`; the kernel's
    ``PX_TILE`` annotation), channel tiles innermost
    so consecutive tasks reuse the same input pixels from L1 with other weights. The
    epilogue is computed per tile; on a flat view its (y, x) iteration is flattened to the
    kernel's pixel index first, so that it covers exactly the tile, whole vectors along the
    pixels. ``inner(xi)`` runs before the reduction's init is split off, ``after(xi)``
    after (tensorize)."""
    loops = sch.get_loops(block)
    n, o, y, x, rc = loops[:5]
    flat = extent(sch, y) == 1
    vecs, rows = (int(v) for v in sch.get(block).annotations[PX_TILE])
    if extent(sch, o) % rows or extent(sch, x) % (vecs * lanes):
        raise ValueError("kernel computed for another tile")
    oo, oi = sch.split(o, [None, rows])
    xo, xv, xi = sch.split(x, [None, vecs, lanes])
    order = [n, y, xo, oo, rc, oi, xv]
    order += [xi, rd] if rd is not None else ([innermost, xi] if innermost is not None
                                              else [xi])
    sch.reorder(*order)

    def flatten(blk):  # (n, o, y, x) -> (n, o, y * W + x): the tile's pixels, contiguous
        iters = sch.get(blk).iter_vars
        if flat and len(iters) == 4 and int(iters[2].dom.extent) > 1:
            w = int(iters[3].dom.extent)
            sch.transform_block_layout(blk, lambda a, b, yy, xx: (a, b, yy * w + xx))

    epilogue = fuse_epilogue(sch, block, oo, prepare=flatten)
    sch.parallel(sch.fuse(n, y, xo, oo))
    sch.unroll(oi)
    sch.unroll(xv)
    if inner is not None:
        inner(xi)
    sch.decompose_reduction(block, rc)
    if after is not None:
        after(xi)
    # (channel, pixel) loops: pixels in the vector lanes, whole vectors
    vectorize_in_vectors(sch, epilogue, lanes)



def _apply(sch, blocks, ctx) -> str:
    schedule_px(sch, blocks[0], ctx.lanes, inner=sch.vectorize)
    parallel_pad(sch)
    return "conv2d-px"


RULE = ScheduleRule("conv2d-px", lambda sch: blocks_named(sch, CONV_PX_BLOCK), _apply)
