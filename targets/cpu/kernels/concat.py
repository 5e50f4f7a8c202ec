"""Concatenation (and the elementwise epilogue fused after it: DenseNet's BN-ReLU, a fire
module's next layer input), one input at a time.

TOPI's concat is one loop nest whose every element picks its input by a chain of selects
(``T_concat[.., c, ..] = c >= o_2 ? X_2[.., c - o_2, ..] : c >= o_1 ? X_1[..] : X_0[..]``);
vectorized, each vector evaluates the chain and loads from every input, and with a narrow
map or many inputs (DenseNet's 33) it is several times slower than a copy. Here the
concatenated axis is partitioned at the inputs' offsets (``loop_partition``), so that in
each piece the selects are decided at compile time and the body is a plain vectorized copy
with the epilogue applied. Many inputs (DenseNet's) share one parallel loop::

    for task in parallel(outer x inner // chunk):         # one thread-pool launch
        for k in inputs:                                   # partitions of the axis
            for c in [o_k, o_k + C_k):
                Y[.., c, chunk] = epilogue(X_k[.., c - o_k, chunk])   (vectors)

with up to :data:`FEW_INPUTS` inputs (a fire module's two) the channels are the parallel
tasks instead, each row one vectorized copy; the input is then picked once per channel,
not per vector, and a 13 x 13 map needs no chunk of its rows (one launch; 13-float chunks
ran 6x slower). With DenseNet's 17-33 inputs that per-channel chain of picks costs 2-3x.
"""

from __future__ import annotations

import tvm

from ..schedule import ScheduleRule, all_blocks, extent, pick_vec_tile

CONCAT_BLOCK = "T_concat"
MIN_CHUNK = 64  # floats per task and input row, at least (a 7 x 7 map: 49, one task)
FEW_INPUTS = 4  # up to this many inputs, channels are the parallel tasks


def _offsets(block, axis: int) -> list[int] | None:
    """The inputs' offsets along ``axis`` from the block's reads (``X_k[.., v - o_k, ..]``)."""
    offs = []
    var = block.iter_vars[axis].var
    for r in block.reads:
        idx = r.region[axis].min
        if idx.same_as(var):
            offs.append(0)
        elif isinstance(idx, tvm.tirx.Sub) and idx.a.same_as(var) and \
                isinstance(idx.b, tvm.tirx.IntImm):
            offs.append(int(idx.b))
        else:
            return None
    return sorted(set(offs)) if len(set(offs)) == len(offs) else None


def _match(sch) -> list:
    """The function's last block when it is a concat (along a non-innermost axis of a static
    shape) followed only by elementwise blocks."""
    blocks = all_blocks(sch)
    names = [sch.get(b).name_hint for b in blocks]
    if names.count(CONCAT_BLOCK) != 1:
        return []
    for b in blocks:
        blk = sch.get(b)
        if any(iv.iter_type != 0 for iv in blk.iter_vars) or len(sch.get_loops(b)) != \
                len(blk.iter_vars) or any(extent(sch, lp) is None for lp in sch.get_loops(b)):
            return []
    cat = blocks[names.index(CONCAT_BLOCK)]
    return [cat] if _axis(sch, cat) is not None else []


def _axis(sch, cat) -> tuple[int, list[int]] | None:
    """``(axis, sizes)``: the concatenated axis and each input's extent along it, in order."""
    blk = sch.get(cat)
    rank = len(blk.iter_vars)
    for axis in range(rank - 1):
        offs = _offsets(blk, axis)
        if offs is None or len(offs) < 2:
            continue
        total = int(blk.iter_vars[axis].dom.extent)
        sizes = [b - a for a, b in zip(offs, offs[1:] + [total])]
        if offs[0] == 0 and all(s > 0 for s in sizes):
            return axis, sizes
    return None


def schedule_concat(sch, cat, lanes: int) -> None:
    axis, sizes = _axis(sch, cat)
    blocks = all_blocks(sch)
    for b in blocks[:-1]:  # the concat and the epilogue into the last block
        sch.compute_inline(b)
    last = all_blocks(sch)[-1]
    loops = sch.get_loops(last)
    outer, part, inner = loops[:axis], loops[axis], loops[axis + 1:]
    inner = sch.fuse(*inner) if len(inner) > 1 else inner[0]
    n_in = extent(sch, inner)
    if len(sizes) <= FEW_INPUTS:
        _per_channel(sch, outer, part, inner, lanes)
        return
    chunk = pick_vec_tile(n_in, lanes, max(MIN_CHUNK, n_in // 8)) if n_in > MIN_CHUNK \
        else n_in
    io, ii = sch.split(inner, [None, chunk])
    sch.reorder(*outer, io, part, ii)
    task = sch.fuse(*outer, io) if outer else io
    for piece in sch.loop_partition(part, [*sizes[:-1], None]):
        for b in sch.get_child_blocks(piece):
            try:
                sch.vectorize(sch.get_loops(b)[-1])
            except Exception:  # noqa: BLE001 - a scalar copy is still correct
                pass
    sch.parallel(task)


def _per_channel(sch, outer, part, inner, lanes: int) -> None:
    """Channels in parallel, each row of the slice vectorized; the input is picked once per
    channel (the condition does not depend on the vector lanes)."""
    task = sch.fuse(*outer, part) if outer else part
    sch.parallel(task)
    n = extent(sch, inner)
    if n <= lanes:
        sch.vectorize(inner)
        return
    body = n - n % lanes
    if body < n:  # a 55 x 55 map: 3024 floats in vectors, then one (not a 3025-lane vector)
        inner, _tail = sch.loop_partition(inner, [body, None])
        (blk,) = sch.get_child_blocks(inner)
        inner = sch.get_loops(blk)[-1]
    _, vec = sch.split(inner, [None, lanes])
    sch.vectorize(vec)


def _apply(sch, blocks, ctx) -> str:
    schedule_concat(sch, blocks[0], ctx.lanes)
    return "concat"


RULE = ScheduleRule("concat", _match, _apply, anchor=False)
