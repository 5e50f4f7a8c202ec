"""Schedule helpers shared by every CPU kernel (one home, public names).

Each works on a :class:`tvm.s_tir.Schedule` of one fused function; the kernels'
schedules (:mod:`.kernels`) are written with them. :class:`ScheduleRule` is the unit of the
default-schedule rule list (:mod:`.rules`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import tvm

from .isa import DotISA, int_cols, max_cols


@dataclass(frozen=True)
class RuleContext:
    """What a schedule rule knows of the target: float lanes and the integer ISA."""

    lanes: int
    isa: DotISA | None = None

    @property
    def max_cols(self) -> int:
        """Columns of a float register tile (:func:`~.isa.max_cols`)."""
        return max_cols(self.lanes)

    @property
    def int_cols(self) -> int:
        """Columns of an int8 register tile (:func:`~.isa.int_cols`)."""
        return int_cols(self.lanes)


@dataclass(frozen=True)
class ScheduleRule:
    """One default schedule: ``match(sch)`` lists the anchor blocks it would schedule (empty:
    it does not apply); ``apply(sch, blocks, ctx)`` schedules them and returns the kernel's
    name for the build record. ``anchor``: the rule's blocks are a kernel's main loop nest,
    of which a fused function may hold only one."""

    name: str
    match: Callable[..., list]
    apply: Callable[..., str]
    anchor: bool = True


# ---------------------------------------------------------------------------------- blocks
def extent(sch, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tvm.tirx.IntImm) else None


def pick_tile(n: int, limit: int) -> int:
    """Largest divisor of n not above limit (at least 1)."""
    for t in range(min(n, limit), 0, -1):
        if n % t == 0:
            return t
    return 1


def pick_vec_tile(n: int, lanes: int, limit: int) -> int:
    """A column tile for vectors: the largest divisor of n that is a multiple of the vector
    width (or of 8, or of 4) and at most limit; else the largest divisor at most limit."""
    for unit in (lanes, 8, 4):
        for t in range(limit - limit % unit, 0, -unit):
            if n % t == 0:
                return t
    return pick_tile(n, limit)


def find_blocks(sch, prefix: str) -> list:
    out = []
    for b in all_blocks(sch):
        if sch.get(b).name_hint.startswith(prefix):
            out.append(b)
    return out


def all_blocks(sch) -> list:
    root = sch.get_sblock("root")
    return list(sch.get_child_blocks(root))



def blocks_named(sch, name: str) -> list:
    """The root's child blocks called exactly ``name``."""
    return [b for b in all_blocks(sch) if sch.get(b).name_hint == name]


def block_named(sch, name: str):
    """The first root child block called ``name``, or None."""
    return next(iter(blocks_named(sch, name)), None)


def buffer_bytes(sch, block) -> int:
    """Bytes of the (single) buffer a block writes."""
    reg = sch.get(block).writes[0]
    buf = getattr(reg, "buffer", None) or reg.source
    n = 1
    for d in buf.shape:
        n *= int(d)
    return n * tvm.runtime.DataType(buf.dtype).bits // 8



# ---------------------------------------------------------------------------------- loops
def fuse_epilogue(sch, producer, loop, prepare=None) -> list:
    """Move everything computed from ``producer`` (the unpack and the fused elementwise
    epilogue, a chain or a DAG such as ``x * sigmoid(x)``) under its tile loop ``loop``.

    Injective intermediate blocks are inlined into their readers first (recomputing an
    elementwise value is cheaper than storing it); what remains is placed at ``loop`` in
    dataflow order, so each tile is finished while it is in registers / L1 (``prepare``, if
    given, is applied to each block just before it moves)."""
    blocks = all_blocks(sch)
    names = [sch.get(b).name_hint for b in blocks]
    start = names.index(sch.get(producer).name_hint) + 1
    # an elementwise side input of the epilogue (e.g. a residual's dequantize) computed
    # before the kernel: inline it into its reader, else the epilogue cannot move
    for blk, name in zip(blocks[:start - 1], names):
        if not name.startswith(("edgec_pad", "edgec_wino", "edgec_resize")):
            try:
                sch.compute_inline(blk)
            except Exception:  # noqa: BLE001
                pass
    blocks = all_blocks(sch)
    names = [sch.get(b).name_hint for b in blocks]
    start = names.index(sch.get(producer).name_hint) + 1
    for blk in blocks[start:-1]:
        try:
            sch.compute_inline(blk)
        except Exception:  # noqa: BLE001 - e.g. a reduction in the epilogue: keep it
            pass
    blocks = all_blocks(sch)
    names = [sch.get(b).name_hint for b in blocks]
    start = names.index(sch.get(producer).name_hint) + 1
    moved = []
    rest = blocks[start:]
    for i, blk in enumerate(rest):
        if prepare is not None:
            prepare(blk)
        try:
            sch.reverse_compute_at(blk, loop, preserve_unit_loops=True)
        except Exception:  # noqa: BLE001 - see below
            # an epilogue that writes more than the tile it reads (MobileNetV3's
            # squeeze-excitation scale times the whole feature map, a [C, 1, 1] tile
            # broadcast to [C, H, W]): it and what follows it stay after the kernel, in
            # parallel and vectorized, instead of leaving the function unscheduled
            # (16 lanes: the widest float vector of any CPU target; LLVM splits it for less)
            for later in rest[i:]:
                parallel_vectorized(sch, sch.get_loops(later), 16)
            break
        moved.append(blk)
    return moved


def vector_split(extents: list[int], lanes: int) -> tuple[int, int] | None:
    """``(k, unit)``: fuse the last ``k`` loops into the vector loop, cut in ``unit`` lanes
    -- the innermost loop when a vector divides it, else the last two (a 56x56 map: 3136
    pixels, 196 vectors of 16, where 56 alone leaves a 8-lane tail), a whole vector before
    a half or a quarter; at least one outer loop stays for the threads."""
    for unit in (lanes, lanes // 2, lanes // 4):
        if unit < 4:
            break
        for k in (1, 2):
            if k >= len(extents):
                break
            inner = 1
            for e in extents[-k:]:
                inner *= e
            if inner % unit == 0:
                return k, unit
    return None


def parallel_vectorized(sch, loops, lanes: int) -> None:
    """An element-wise block: the outer loops fused and parallel, the inner ones fused and
    vectorized (:func:`vector_split`), or only the former where no vector fits."""
    extents = [extent(sch, lp) or 0 for lp in loops]
    split = vector_split(extents, lanes) if all(extents) else None
    k = split[0] if split else 1
    outer = loops[:len(loops) - k]
    try:
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
    except Exception:  # noqa: BLE001
        return
    if split is None:
        return
    inner = loops[len(loops) - k:]
    try:
        vec = sch.fuse(*inner) if len(inner) > 1 else inner[0]
        _, vi = sch.split(vec, [None, split[1]])
        sch.vectorize(vi)
    except Exception:  # noqa: BLE001 - keep the parallel loops
        pass


def vectorize_innermost(sch, blocks) -> None:
    for blk in blocks or []:
        try:
            sch.vectorize(sch.get_loops(blk)[-1])
        except Exception:  # noqa: BLE001 - a scalar epilogue is still correct
            pass



def vectorize_in_vectors(sch, blocks, unit: int, only_extent: int | None = None) -> None:
    """Vectorize each block's innermost loop in whole vectors of ``unit`` lanes when its
    extent is a multiple of ``unit`` above it (and, with ``only_extent``, equal to that),
    else as it is (LLVM splits a long vector badly); a scalar epilogue is still correct."""
    for blk in blocks or []:
        loops = sch.get_loops(blk)
        try:
            e = extent(sch, loops[-1])
            if e % unit == 0 and e > unit and only_extent in (None, e):
                _, inner = sch.split(loops[-1], [None, unit])
                sch.vectorize(inner)
            else:
                sch.vectorize(loops[-1])
        except Exception:  # noqa: BLE001 - a scalar epilogue is still correct
            pass


def parallel_pad(sch, depth: int = 2) -> None:
    """Every padding block in parallel over its ``depth`` outer loops fused."""
    for b in find_blocks(sch, "edgec_pad"):
        loops = sch.get_loops(b)
        if len(loops) >= depth:
            sch.parallel(sch.fuse(*loops[:depth]))


def default_tile(blocks: int, cols: int, max_cols: int) -> tuple[int, int]:
    """The default register tile ``(channel blocks, columns)`` over ``blocks`` channel blocks
    and rows of ``cols`` columns: a divisor of the columns up to ``max_cols``, and 3 or 2
    channel blocks where they divide the count and the columns leave room for them, else 1."""
    c = pick_tile(cols, max_cols)
    return next((k for k in (3, 2) if k * c <= max_cols and blocks % k == 0), 1), c


def register_tile(sch, o, x, max_cols: int, stem: bool = False,
                  tile: tuple[int, int] | None = None):
    """Split the channel-block loop ``o`` and the column loop ``x`` into a register tile:
    ``cols`` columns (a divisor of ``x`` up to ``max_cols``) x ``ob2`` channel blocks (2 or 3
    when the columns leave room for them). ``stem``: a convolution of the image itself (at
    most 4 input channels): two channel blocks x half the columns where the channels allow
    (per reduction step 2 weight loads + 7 broadcasts for 14 FMAs instead of 1 + 14; the
    7x7/2 and 3x3/2 stems ran 1.3-1.6x faster on AVX-512). ``tile``: ``(ob2, cols)`` chosen
    by the caller. Returns ``(oo, oi, xo, xi)``."""
    oe = extent(sch, o)
    if tile is None and stem and oe % 2 == 0:
        cols = pick_tile(extent(sch, x), max_cols // 2)
        if 2 * cols >= max_cols // 2:
            tile = (2, cols)
    if tile is None:
        tile = default_tile(oe, extent(sch, x), max_cols)
    oo, oi = sch.split(o, [None, tile[0]])
    xo, xi = sch.split(x, [None, tile[1]])
    return oo, oi, xo, xi



def _macs_per_update(value) -> int:
    """Products an update ``acc + a * b`` adds (casts around either side allowed; a window
    row written out, ``acc + (a0 * b0 + a1 * b1 + ...)``, adds one per term); 0 when it is
    not a multiply-accumulate."""
    from tvm import tirx

    def strip(t):
        while isinstance(t, tirx.Cast):
            t = t.value
        return t

    def products(t) -> int:
        t = strip(t)
        if isinstance(t, tirx.Mul):
            return 1
        if isinstance(t, tirx.Add):
            a, b = products(t.a), products(t.b)
            return a + b if a and b else 0
        return 0

    value = strip(value)
    if not isinstance(value, tirx.Add):
        return 0
    return max(products(value.a), products(value.b))


def mac_count(func) -> int:
    """Multiply-accumulates a function executes: the iteration space of every block whose
    update is ``acc + a * b`` over reduction axes, times the products it adds (zeros a loop
    multiplies by included)."""
    from tvm import tirx

    sch = tvm.s_tir.Schedule(func)
    total = 0
    for blk in all_blocks(sch):
        block = sch.get(blk)
        if not any(iv.iter_type == 2 for iv in block.iter_vars):
            continue
        per = _macs_per_update(block.body.value) if isinstance(block.body, tirx.BufferStore) \
            else 0
        if not per:
            continue
        n = per
        for iv in block.iter_vars:
            try:
                n *= int(iv.dom.extent)
            except TypeError:
                n = 0
        total += n
    return total
