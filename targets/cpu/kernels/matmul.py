"""Matmul (``C[.., i, j] += A[.., i, k] * B[.., k, j]``, TOPI's legalization) on a register
tile of rows x vectors along ``j``."""

from __future__ import annotations

from ..schedule import (ScheduleRule, all_blocks, extent, fuse_epilogue, pick_tile,
                        pick_vec_tile, vectorize_innermost)

MATMUL_BLOCKS = ("matmul", "T_matmul_NN", "T_matmul")


def schedule_matmul(sch, block, lanes: int) -> None:
    """C[.., i, j] += A[.., i, k] * B[.., k, j] with B's j contiguous: a register tile of
    ``ri`` rows x ``rj`` columns (vectors along j), k streamed, epilogue per tile."""
    loops = sch.get_loops(block)
    iters = sch.get(block).iter_vars
    if [iv.iter_type for iv in iters][-1] != 2 or len(loops) < 3:
        raise ValueError("not a matmul block")
    *batch, i, j, k = loops
    m_, n_ = extent(sch, i), extent(sch, j)
    rj = pick_vec_tile(n_, lanes, 4 * lanes)
    ri = pick_tile(m_, 4)
    io, ii = sch.split(i, [None, ri])
    jo, ji = sch.split(j, [None, rj])
    sch.reorder(*batch, io, jo, k, ii, ji)
    epilogue = fuse_epilogue(sch, block, jo)
    outer = [*batch, io, jo]
    sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
    sch.vectorize(ji)
    sch.unroll(ii)
    sch.decompose_reduction(block, k)
    vectorize_innermost(sch, epilogue)



def _match(sch) -> list:
    """The function's matmul block when it has exactly one."""
    mms = [b for b in all_blocks(sch) if sch.get(b).name_hint in MATMUL_BLOCKS]
    return mms if len(mms) == 1 else []


def _apply(sch, blocks, ctx) -> str:
    schedule_matmul(sch, blocks[0], ctx.lanes)
    return "matmul"


RULE = ScheduleRule("matmul", _match, _apply, anchor=False)
