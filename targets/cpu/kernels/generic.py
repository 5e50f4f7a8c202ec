"""The fallback for every other fused function: outer spatial loops fused and parallel, a
plain innermost spatial loop vectorized, reductions over trailing axes split into vector
lanes (:func:`schedule_reduce`)."""

from __future__ import annotations

from ..schedule import ScheduleRule, all_blocks, extent, parallel_vectorized


def schedule_generic(sch, lanes: int, min_parallel: int = 4096) -> bool:
    """Parallelize the outer spatial loops of every root block; vectorize the inner ones of an
    element-wise block (:func:`..schedule.parallel_vectorized`); reductions over trailing axes by
    :func:`schedule_reduce`. Returns whether a reduction was scheduled."""
    reduced = False
    for blk in all_blocks(sch):
        loops = sch.get_loops(blk)
        if not loops:
            continue
        iters = sch.get(blk).iter_vars
        kinds = [iv.iter_type for iv in iters]  # 0 = spatial, 2 = reduction
        n_sp = 0
        for k in kinds:
            if k != 0:
                break
            n_sp += 1
        if n_sp == 0 or len(loops) < n_sp:
            continue
        if n_sp < len(kinds) and schedule_reduce(sch, blk, lanes, n_sp):
            reduced = True
            continue
        total = 1
        for lp in loops[:n_sp]:
            e = extent(sch, lp)
            total *= e or 1
        if total < min_parallel:
            continue
        if n_sp == len(loops) and n_sp > 1:
            parallel_vectorized(sch, loops, lanes)
            continue
        outer = loops[: max(1, n_sp - 1)] if n_sp > 1 else loops[:1]
        try:
            sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
        except Exception:  # noqa: BLE001
            continue
    return reduced


def schedule_reduce(sch, block, lanes: int, n_sp: int) -> bool:
    """A sum/max over trailing contiguous axes (a global average pool, ``mean``):
    the reduction is split into ``U`` lanes (``rfactor``: ``U`` partial results per
    output, ``U`` up to four vectors, i.e. independent accumulator chains), vectorized
    along them, with the outputs in parallel; the partials are then combined per output.
    TOPI's loop is one scalar chain per output and, with few outputs, not parallel at all.
    Returns False (schedule untouched) when it does not apply."""
    loops = sch.get_loops(block)
    iters = sch.get(block).iter_vars
    if len(loops) != len(iters) or any(iv.iter_type != 2 for iv in iters[n_sp:]):
        return False
    red = loops[n_sp:]
    total = 1
    for lp in red:
        total *= extent(sch, lp) or 0
    unit = next((u for u in (4 * lanes, 2 * lanes, lanes)
                 if total and total % u == 0 and total >= 2 * u), None)
    if unit is None and total >= 2 * lanes:
        unit = lanes  # a last partial vector (14 x 14 = 196 = 12 x 16 + 4), predicated
    if unit is None:
        return False
    # the reduction must read the trailing axes of its input contiguously, in loop order
    reads = sch.get(block).reads
    rvars = [iv.var for iv in iters[n_sp:]]
    if not any(
            len(r.region) >= len(rvars) and all(
                rg.min.same_as(v) for rg, v in zip(list(r.region)[-len(rvars):], rvars))
            for r in reads):
        return False
    def steps(s_):
        lp = s_.get_loops(block)
        r = s_.fuse(*lp[n_sp:]) if len(lp) - n_sp > 1 else lp[n_sp]
        _, ri = s_.split(r, [None, unit])
        rf = s_.rfactor(ri, 0)  # raises for a reducer TIR does not recognize
        sp = s_.get_loops(rf)[:n_sp]
        s_.parallel(s_.fuse(*sp) if len(sp) > 1 else sp[0])
        s_.vectorize(s_.get_loops(rf)[-1])

    try:
        steps(sch.copy())  # on a copy first: a failure must not leave half a schedule
    except Exception:  # noqa: BLE001
        return False
    steps(sch)
    return True



def _apply(sch, blocks, ctx) -> str:
    return "reduce" if schedule_generic(sch, ctx.lanes) else "generic"


RULE = ScheduleRule("generic", lambda sch: [None], _apply, anchor=False)
