"""Row kernel of grouped convolution with fewer output channels per group than a vector
(ResNeXt's 32 groups of 4 channels, RegNet's group width 8 on AVX-512, a depthwise
convolution with a channel multiplier): the packed kernel needs whole vectors of output
channels in one group (:func:`.packed_conv.grouped_applies`), and TOPI's grouped
convolution left to the fallback schedule ran 7-40x slower than onnxruntime.

Pixels in the lanes, as the depthwise row kernel (:mod:`.row_conv`), and the group's
output channels in registers::

    Xs_p[n, c, y, j] = Xpad[n, c, y, j * sw + p]                      (column phases)
    acc[n, o, y, x]  = sum_{r, i, k} Xs[n, (o // Co) * Ci + r, y * sh + i * dh, x + tap k]
                                     * W[o, r, i, k]                   for x < Wp
    Y[n, o, y, x]    = epilogue(acc[n, o, y, x])                      for x < Wo

with ``Ci`` input and ``Co`` output channels per group. Per output row, a register tile of
the group's ``Co`` channels (or a divisor of them) x ``V`` vectors of the row (at most 12
accumulators of AVX2's 16 registers, 24 of AVX-512's 32): each input vector (one channel,
one tap) is loaded once and feeds ``Co`` multiply-adds with broadcast weights. The parallel
tasks are the groups (with their rows where there are few groups); each pads its own
channels.
"""

from __future__ import annotations

from tvm import te

from ..compute import column_phases, column_tap, conv_out, ints
from ..schedule import (ScheduleRule, blocks_named, extent, find_blocks, fuse_epilogue,
                        parallel_pad, pick_tile, vectorize_in_vectors)
from .row_conv import dw_vector

GCONV_BLOCK = "edgec_gconv2d"
GROUP_OUT = "edgec_group_out"   # block annotation: output channels per group
MIN_TASKS = 8                   # fewer groups than this: the rows are parallel tasks too


def gconv_applies(c: int, oc: int, cpg_in: int, groups: int) -> bool:
    """A grouped convolution; the caller offers it to the packed kernel
    (:func:`.packed_conv.grouped_applies`) and the depthwise one first."""
    return groups > 1 and c == cpg_in * groups and oc % groups == 0


def accumulators(lanes: int) -> int:
    """Vector registers the tile may hold as accumulators."""
    return 24 if lanes >= 16 else 12


def gconv_te(x, wt, strides, pads, dil, groups: int, lanes: int = 8):
    """Grouped convolution, a padded row of vectors at a time (see the module docstring)."""
    nb, c, h, w = ints(x.shape)
    oc, ci, kh, kw = ints(wt.shape)
    co = oc // groups
    (sh, sw), (dh, dw) = strides, dil
    pt, pl, pb, pr = pads
    oh, ow = conv_out(h, pt, pb, kh, sh, dh), conv_out(w, pl, pr, kw, sw, dw)
    v = dw_vector(ow, lanes)
    owp = -(-ow // v) * v
    xs = column_phases(x, kh, kw, strides, pads, dil, owp, te.const(0.0, "float32"))
    rc = te.reduce_axis((0, ci), "rc")
    rkh = te.reduce_axis((0, kh), "rkh")
    rkw = te.reduce_axis((0, kw), "rkw")
    acc = te.compute(
        (nb, oc, oh, owp),
        lambda n, o, y, xx: te.sum(
            column_tap(xs, sw, dw, rkw, n, o // co * ci + rc, y * sh + rkh * dh, xx, kw)
            * wt[o, rc, rkh, rkw], axis=[rc, rkh, rkw]),
        name=GCONV_BLOCK, attrs={GROUP_OUT: co})
    return te.compute((nb, oc, oh, ow), lambda n, o, y, xx: acc[n, o, y, xx],
                      name="edgec_gconv2d_crop")


def schedule_gconv(sch, block, lanes: int) -> None:
    """Tasks: groups (x rows where the groups are few); per output row, tiles of ``V``
    vectors x the group's ``Co`` channels, every tap and channel of the tile unrolled."""
    co = int(sch.get(block).annotations[GROUP_OUT])
    n, o, y, x, rc, rkh, rkw = sch.get_loops(block)
    crop = blocks_named(sch, "edgec_gconv2d_crop")[0]
    ow = extent(sch, sch.get_loops(crop)[-1])
    v = dw_vector(ow, lanes)
    nv = extent(sch, x) // v
    ct = pick_tile(co, accumulators(lanes))  # channels per tile (all of a group's, mostly)
    go, oo, oi = sch.split(o, [None, co // ct, ct])
    xo, xv, xi = sch.split(x, [None, pick_tile(nv, max(1, accumulators(lanes) // ct)), v])
    sch.reorder(n, go, y, xo, oo, rc, rkh, rkw, oi, xv, xi)
    epilogue = fuse_epilogue(sch, block, xo)
    if extent(sch, go) * extent(sch, n) >= MIN_TASKS:
        task = sch.fuse(n, go)
        for pad in find_blocks(sch, "edgec_pad"):  # each group pads its own channels
            sch.compute_at(pad, task, preserve_unit_loops=True)
    else:
        task = sch.fuse(n, go, y)
        parallel_pad(sch)
    sch.parallel(task)
    for loop in (rkh, rkw, oi, xv):
        sch.unroll(loop)
    sch.vectorize(xi)
    sch.decompose_reduction(block, rc)
    vectorize_in_vectors(sch, epilogue, v, only_extent=ow)


def _apply(sch, blocks, ctx) -> str:
    schedule_gconv(sch, blocks[0], ctx.lanes)
    return "gconv2d"


RULE = ScheduleRule("gconv2d", lambda sch: blocks_named(sch, GCONV_BLOCK), _apply)
