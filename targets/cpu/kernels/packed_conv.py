"""Packed direct convolution (float, groups = 1), no tuning needed.

Convolution is legalized (:mod:`..rewrites.float_conv`) into a direct convolution with
**weights packed at compile time** and an output computed in register tiles::

    Wp[oc // B, ic, kh, kw, oc % B] = W[oc, ic, kh, kw]                  (numpy, at compile time)
    P[n, ob, oh, ow, b] = sum_{ic,kh,kw} X[n, ic, oh*s+kh*d, ow*s+kw*d] * Wp[ob, ic, kh, kw, b]
    Y[n, oc, oh, ow]    = epilogue(P[n, oc // B, oh, ow, oc % B])        (bias, BN, ReLU, Add...)

``B`` is the SIMD width in floats (16 on AVX-512, 8 on AVX2, 4 on NEON). The inner kernel
keeps ``R x B`` accumulators in registers (``R`` output columns, one vector of ``B`` output
channels): per reduction step one weight vector load, ``R`` broadcasts of input scalars and
``R`` FMAs. The graph stays NCHW, so no layout transforms are inserted between layers; the
epilogue is applied per tile while it is in registers/L1.

Everything here is a rewrite of the schedule only: the math is the ONNX graph's. A function
whose schedule fails keeps its (correct, slow) default loops.
"""

from __future__ import annotations

import numpy as np
from tvm import te

from ..compute import conv_out, ints, pad_likely
from ..isa import max_cols
from ..schedule import (ScheduleRule, blocks_named, default_tile, extent, fuse_epilogue,
                        parallel_pad, pick_tile, register_tile, vectorize_innermost)

CONV_BLOCK = "edgec_conv2d_packed"
STEM_CHANNELS = 4  # input channels of an image stem (RGB, RGBA, gray)
K_BLOCK_BYTES = 16 * 1024  # weights of one reduction chunk of a task (in L1)
MIN_TASKS = 8  # parallel tasks of a chunked convolution, at least (where the rows allow)
ROWS_OUTER_WEIGHTS = 2 << 20  # bytes: a strided 1x1 conv's weights re-read per row (_rows_outer)
SMALL_WEIGHTS = 64 << 10  # bytes: any 1x1 conv's weights re-read per row (_rows_outer)
MIN_PAD_BLOCKS = 9  # channel blocks, at least, before one of zeros is added (channel_blocks)
QUAD_PAD_SHARE = 16  # AVX2: blocks of zeros up to a multiple of 4, at most 1/16 of the blocks
# a 1x1 convolution over a deep reduction on rows of at least DEEP_WIDTH columns (AVX-512)
DEEP_IC, DEEP_WIDTH, DEEP_BLOCKS, DEEP_COLS = 256, 28, 4, 7
# AVX2: a 1x1 convolution over at least NARROW_IC input channels on rows of at most
# NARROW_WIDTH columns takes 4 channel blocks x 2 columns (deep_tile)
NARROW_IC, NARROW_WIDTH = 96, 14
# AVX-512: such a convolution on rows too wide for two channel blocks of the default tile
# (8 to 27 columns) takes 2 (or 3) channel blocks x tiles of at most NARROW_COLS_512 columns
NARROW_COLS_512, NARROW_BLOCKS_512 = 7, 8


def pack_weight(w: np.ndarray, lanes: int, blocks: int | None = None) -> np.ndarray:
    """``W[oc, ic, kh, kw]`` -> ``Wp[oc // B, ic, kh, kw, oc % B]`` (zero padded; ``blocks``:
    that many channel blocks, :func:`channel_blocks`)."""
    oc = w.shape[0]
    occ = max(-(-oc // lanes), blocks or 0)
    wp = np.zeros((occ * lanes,) + w.shape[1:], w.dtype)
    wp[:oc] = w
    return np.ascontiguousarray(wp.reshape(occ, lanes, *w.shape[1:]).transpose(0, 2, 3, 4, 1))


def padded_width(ow: int, max_cols: int) -> int:
    """The output columns the packed kernel computes for an ``ow``-wide map: ``ow`` when it
    has a divisor of at least half a register tile, else the fewest columns that a tile of
    ``max_cols / 2 .. max_cols`` divides (17 columns with AVX2's 13-column tiles: 18, two
    9-column tiles, instead of seventeen 1-column tiles that load a weight vector per FMA;
    the extra columns read zero padding and are never stored)."""
    from ..schedule import pick_tile

    if ow <= max_cols or pick_tile(ow, max_cols) * 2 >= max_cols:
        return ow
    return min((-(-ow // c) * c for c in range(max_cols, (max_cols + 1) // 2 - 1, -1)))


def channel_blocks(oc: int, ic: int, ow_pad: int, lanes: int, max_cols: int,
                   kh: int = 1, kw: int = 1) -> int:
    """Output-channel blocks of the packed weight: ``ceil(oc / B)``, plus one block of zeros
    where rows short enough for a tile of two channel blocks (at most ``max_cols / 2``
    columns) meet an odd count that :func:`~..schedule.register_tile` cannot split in two or
    three, and would otherwise tile one block at a time (per reduction step a weight load and
    ``cols`` broadcasts for ``cols`` FMAs). RegNet-X-400MF's 400 channels at 7x7: 25 blocks,
    a 1 x 7 tile; as 26, 2 x 7. Its 1x1 400->400 layer then took 0.88-0.90x the time and the
    whole model 0.95-0.96x (2 threads; 0.91x on one), in interleaved runs on AVX-512. At
    least ``MIN_PAD_BLOCKS`` blocks, so that the zeros cost at most a tenth more FMAs.

    AVX2 (``kh x kw``: the window): blocks of zeros up to a multiple of 4 where that gives
    :func:`deep_tile`'s 4 x 2 tile and they are at most ``1 / QUAD_PAD_SHARE`` of the
    blocks. RegNet-X-400MF's 400 channels (50 -> 52 blocks, 1 x 7 -> 4 x 2): its 1x1
    400->400 layers at 7x7 0.91-0.94x the time, the model 0.99x; SqueezeNet's classifier
    (125 -> 128 at 13x13) the model 0.97x (``-mcpu haswell``, interleaved runs). Up to 1/8
    of zeros also took ShuffleNetV2's 232 and 116 channels (29 -> 32, 15 -> 16): 1.07x."""
    occ = -(-oc // lanes)
    if ic <= STEM_CHANNELS or occ < MIN_PAD_BLOCKS:
        return occ
    quad = -(-occ // 4) * 4
    if lanes == 8 and quad != occ and (quad - occ) * QUAD_PAD_SHARE <= occ and \
            deep_tile(lanes, ic, kh, kw, ow_pad, quad) == (4, 2):
        return quad
    blocks, cols = default_tile(occ, ow_pad, max_cols)
    if blocks > 1 or 2 * cols > max_cols:
        return occ
    return occ + 1


def grouped_applies(oc: int, groups: int, lanes: int) -> bool:
    """A grouped convolution runs on the packed kernel when every vector of output channels
    lies in one group (RegNet's group width 16 on 4-, 8- and 16-lane CPUs)."""
    return groups > 1 and oc % groups == 0 and (oc // groups) % lanes == 0


def deep_tile(lanes: int, ic: int, kh: int, kw: int, ow: int, occ: int
              ) -> tuple[int, int] | None:
    """The register tile ``(channel blocks, columns)`` of a 1x1 convolution with at least
    ``DEEP_IC`` input channels on rows of at least ``DEEP_WIDTH`` columns, AVX-512 only:
    4 vectors of output channels x up to 7 columns (28 of the 32 zmm registers accumulate,
    4 hold weights; per reduction step 4 weight loads and 7 broadcasts feed 28 FMAs, where
    the default 1 x 14 tile loads 15 times for 14). Measured against the default tile in
    interleaved runs: ResNet-50's 512->128 at 28x28 0.80-0.84x the time, 256->512 at 56x56
    stride 2 0.96x; whole ResNet-50 and DenseNet-121 0.96-0.98x. Not on 14-wide rows
    (1024->256 at 14x14: 1.04x with 4 x 7, 1.07-1.17x with 2 x 7 and 4 x 2), nor on AVX2,
    where 2 x 7, 3 x 4 and 2 x 4 ran at par with the default 1 x 7.

    AVX2 on narrow rows (at most ``NARROW_WIDTH`` columns, at least ``NARROW_IC`` input
    channels): 4 vectors of output channels x 2 columns (8 accumulators; per reduction step 4
    weight loads, 2 broadcasts, 8 FMAs, and each input line read by 4 channel blocks at once)
    instead of the default 1 x 7. Interleaved one-layer runs, ``-mcpu haswell``: 1024->256 at
    14x14 0.71-0.75x the time, 256->1024 0.84x, 512->128 0.81x, 128->512 0.90x, 96->576 0.92x;
    on 7x7 rows (a last tile of one column) 2048->512 0.79x, 512->2048 0.81x. Tried there too:
    6 x 2 (0.68x at 14x14, 1.39x at 7x7), 8 x 1 0.81x, 4 x 1 0.98x, 2 x 7 0.97x, rows outer
    0.94x. The same 4 x 2 for AVX2 convolutions with a spatial window (a multiple of 4
    channel blocks, not an image stem) where the default is one block x 7-13 columns:
    interleaved, one layer, ``-mcpu haswell``: the Fashion CNN's 3x3 32->32 at 28x28 0.70x,
    64->64 and 32->64 at 14x14 0.91x; ResNet's 3x3 stride 2 64->128 onto 28x28 0.77x,
    128->256 0.87x, 256->512 onto 7x7 0.92x; DenseNet's 128->32 at 14x14 0.73x; 5x5 16->32
    at 28x28 0.86x, 32->96 at 14x14 0.88x; 48->64 5x5 at 27x27 (a last tile of one
    column) 1.03x. (2 x 4 0.97x, 2 x 6 1.05-1.26x, 1 x 14 1.07x.)

    AVX-512 on rows of 8 to 27 columns (at least ``DEEP_IC`` input channels and
    ``NARROW_BLOCKS_512`` channel blocks; the default there is one channel block x the whole
    row, 14 loads per 13 or 14 FMAs): 2 channel blocks (3 where the count is odd) x the row
    cut in tiles of at most 7 columns (13 -> 7 + 6). Interleaved one-layer runs (Sapphire
    Rapids, 2 threads): SqueezeNet's classifier 512->1000 at 13x13 (63 blocks, 3 x 7) 0.79x
    the time, 1024->256 at 14x14 0.85x, 992->128 0.83x, 512->128 0.78x, 528->256 0.88x,
    256->1024 0.94x; whole SqueezeNet 0.96x, ResNet-50 0.97x, GoogLeNet 0.99x, DenseNet-121
    at par. Narrower layers won alone (512->64 at 13x13 0.85x, 384->64 and 576->96 at
    14x14 with a residual 0.83x and 0.95x, 96->576 0.94x) but not in MobileNetV2 (1.04x)
    and EfficientNet-B0 (1.01x), hence the input channels and blocks; 64->256 at 13x13
    1.06x, 128->32 1.11x; 2 x 14 spills (1.3-1.7x), 4 x 7 0.96-1.11x. None: the default
    tile."""
    if lanes == 8:
        narrow = (kh, kw) == (1, 1) and ic >= NARROW_IC and ow <= NARROW_WIDTH and occ % 4 == 0
        # a spatial window where the default tile is one channel block (rows of 7+ columns)
        spatial = kh * kw > 1 and ic > STEM_CHANNELS and occ % 4 == 0 and \
            default_tile(occ, ow, max_cols(lanes))[0] == 1
        return (4, 2) if narrow or spatial else None
    if lanes == 16 and (kh, kw) == (1, 1) and ic >= DEEP_IC and \
            max_cols(lanes) // 2 < ow < DEEP_WIDTH and occ >= NARROW_BLOCKS_512:
        # the default is one channel block x the whole row (14 loads per 13 FMAs)
        blocks = next((k for k in (2, 3) if occ % k == 0), None)
        if blocks is not None:
            return blocks, -(-ow // -(-ow // NARROW_COLS_512))
    if lanes != 16 or (kh, kw) != (1, 1) or ic < DEEP_IC or ow < DEEP_WIDTH or occ % DEEP_BLOCKS:
        return None
    cols = pick_tile(ow, DEEP_COLS)
    return (DEEP_BLOCKS, cols) if cols * 2 >= DEEP_COLS else None


def conv_packed_te(x, wp, oc, strides, pads, dil, ow_pad: int | None = None,
                   groups: int = 1):
    """``ow_pad``: compute that many output columns (:func:`padded_width`), store ``ow``.
    ``groups``: a grouped convolution (:func:`grouped_applies`), each block of output
    channels reading its group's input channels::

        P[n, ob, oh, ow, b] = sum_{ic < C/G} X[n, g(ob) * C/G + ic, ...] * Wp[ob, ic, ..., b]
        g(ob) = ob * B // (K/G)"""
    _, _, h, w = ints(x.shape)
    occ, ic, kh, kw, lanes_ = ints(wp.shape)
    (sh, sw), (dh, dw) = strides, dil
    pt, pl, pb, pr = pads
    oh, ow = conv_out(h, pt, pb, kh, sh, dh), conv_out(w, pl, pr, kw, sw, dw)
    if ow_pad is not None and ow_pad > ow:  # zero columns to the right for the extra ones
        pads = (pt, pl, pb, pr + (ow_pad - ow) * sw)
        ow = ow_pad
    xp = pad_likely(x, pads)
    ric = te.reduce_axis((0, ic), "ric")
    rkh = te.reduce_axis((0, kh), "rkh")
    rkw = te.reduce_axis((0, kw), "rkw")
    nb = ints(x.shape)[0]
    cout_g = oc // groups

    def chan(o):
        return ric if groups == 1 else (o * lanes_) // cout_g * ic + ric

    packed = te.compute(
        (nb, occ, oh, ow, lanes_),
        lambda n, o, y, xx, b: te.sum(
            xp[n, chan(o), y * sh + rkh * dh, xx * sw + rkw * dw] * wp[o, ric, rkh, rkw, b],
            axis=[ric, rkh, rkw]),
        name=CONV_BLOCK)
    ow_out = conv_out(w, pl, pr, kw, sw, dw)
    return te.compute((nb, oc, oh, ow_out),
                      lambda n, c_, y, xx: packed[n, c_ // lanes_, y, xx, c_ % lanes_],
                      name="edgec_conv2d_unpack")



def schedule_conv(sch, block, lanes: int, max_cols: int) -> None:
    """Register tile: ``ob2`` vectors of output channels x ``cols`` output columns; per
    reduction step ``ob2`` weight-vector loads and ``cols`` input broadcasts feed
    ``ob2 * cols`` FMAs. Narrow rows (7x7 maps) take two or three channel blocks, else a
    7-column tile would load nearly once per FMA; deep 1x1 convolutions, four
    (:func:`deep_tile`)."""
    n, o, y, x, b, ric, rkh, rkw = sch.get_loops(block)
    ic, kh, kw, ow, occ = (extent(sch, lp) for lp in (ric, rkh, rkw, x, o))
    oo, oi, xo, xi = register_tile(sch, o, x, max_cols, stem=ic <= STEM_CHANNELS,
                                   tile=deep_tile(lanes, ic, kh, kw, ow, occ))
    ob2 = extent(sch, oi)
    chunk = _k_chunk(ic, kh * kw * ob2 * lanes * 4, extent(sch, y))
    if chunk:
        # enough tasks for the threads: the rows split in blocks when there are few
        # channel blocks (the Fashion CNN's 32 channels: one block, one thread otherwise)
        blocks = extent(sch, n) * extent(sch, oo)
        oh = extent(sch, y)
        yb = next((d for d in range(1, oh + 1) if oh % d == 0 and blocks * d >= MIN_TASKS), oh)
        yo, yi = sch.split(y, [yb, None])
        rco, rci = sch.split(ric, [None, chunk])
        sch.reorder(n, oo, yo, rco, yi, xo, rci, rkh, rkw, oi, xi, b)
        epilogue = fuse_epilogue(sch, block, yo)
        sch.parallel(sch.fuse(n, oo, yo))
        first = rco
    elif kh * kw == 1 and _rows_outer(sch, block, ow, occ * ic * lanes * 4):
        sch.reorder(n, y, oo, xo, ric, rkh, rkw, oi, xi, b)
        epilogue = fuse_epilogue(sch, block, xo)
        sch.parallel(sch.fuse(n, y, oo))
        first = ric
    else:
        sch.reorder(n, oo, y, xo, ric, rkh, rkw, oi, xi, b)
        epilogue = fuse_epilogue(sch, block, xo)
        sch.parallel(sch.fuse(n, oo, y))
        first = ric
    sch.vectorize(b)
    sch.unroll(oi)
    sch.unroll(xi)
    sch.decompose_reduction(block, first)
    vectorize_innermost(sch, epilogue)  # along the tile's columns: contiguous NCHW stores
    parallel_pad(sch)


def _rows_outer(sch, block, ow: int, weight_bytes: int) -> bool:
    """Whether a 1x1 convolution runs its tasks row by row rather than channel block by
    channel block.

    Small weights (at most ``SMALL_WEIGHTS``, e.g. ShuffleNetV2's and SqueezeNet's 1x1
    layers): they stay in L1/L2 when re-read per row, and each thread then reads and writes
    a band of rows of every channel, not every row of a band of channels. Interleaved whole
    models (AVX-512 / ``-mcpu haswell``): ShuffleNetV2 0.91x / 0.92x the time, SqueezeNet
    0.99x / 0.95x, MobileNetV2 0.99x / 0.99x, MobileNetV3, EfficientNet-B0, GoogLeNet,
    RegNet-X and DenseNet-121 within 1 % either way.

    A strided 1x1 convolution (ResNet's projection shortcuts) with larger weights: its
    input rows (all input channels, every other column read) are re-read from L2 by every
    channel block, while its weights are few enough (at most ``ROWS_OUTER_WEIGHTS``) to be
    re-read per row instead. Interleaved, one layer: 256->512 onto 28x28 0.65x the time on
    AVX2 (0.98 on AVX-512, where the deep tile chunks it), 512->1024 onto 14x14 0.73x (AVX2)
    and 0.81x (AVX-512); 1024->2048 onto 7x7, 8 MiB of weights, 1.25x and 1.02x: left
    channel-block first. (The narrow tiles of :func:`deep_tile` now take 512->1024 onto
    14x14, chunked: on AVX2 0.89x the time of rows outer, on AVX-512 0.63x.)"""
    if weight_bytes <= SMALL_WEIGHTS:
        return True
    if weight_bytes > ROWS_OUTER_WEIGHTS:
        return False
    # the padded input is the update's only 4-D read (the weights and the output are 5-D)
    width = next(int(r.source.shape[3]) for r in sch.get(block).reads if len(r.source.shape) == 4)
    return width >= 2 * ow


def _k_chunk(ic: int, bytes_per_channel: int, rows: int) -> int | None:
    """Input channels per reduction chunk when a task's weights (``ic x bytes_per_channel``)
    exceed L1 by far: each chunk's weights stay in L1 while every output row of the block
    passes over them, the partial sums kept in the output; None: no chunking."""
    if rows < 2 or ic * bytes_per_channel <= K_BLOCK_BYTES * 2:
        return None
    chunk = pick_tile(ic, max(1, K_BLOCK_BYTES // bytes_per_channel))
    return chunk if chunk * 4 >= K_BLOCK_BYTES // bytes_per_channel else None



def _apply(sch, blocks, ctx) -> str:
    schedule_conv(sch, blocks[0], ctx.lanes, ctx.max_cols)
    return "conv2d-packed"


RULE = ScheduleRule("conv2d-packed", lambda sch: blocks_named(sch, CONV_BLOCK), _apply)
