"""The default CPU schedules as an ordered rule list (as dlight's ``ApplyDefaultSchedule``).

Each fused function gets the first rule that matches it (:class:`~.schedule.ScheduleRule`):
a kernel's own block (at most one per function), else a single matmul, else the generic
fallback. A new kernel is one module in :mod:`.kernels` with a ``RULE`` and one line here.
A function whose schedule fails keeps its (correct, slow) default loops, the reason recorded.
"""

from __future__ import annotations

import logging

import tvm

from ..records import BuildRecord
from .isa import select_isa, simd_floats
from .kernels import (concat, dense, generic, group_conv, int8_conv, int8_pixel, int8_winograd,
                      matmul, packed_conv, pixel_conv, resize, row_conv, stem_conv,
                      winograd)
from .kernels.sparse import KERNEL_ATTR, MACS_ATTR
from .schedule import RuleContext, mac_count

log = logging.getLogger("edgec.cpu")

RULES = [
    int8_winograd.RULE,   # QDQ 3x3 convolutions, integer Winograd F(2, 3)
    int8_pixel.RULE,      # QDQ 1x1 convolutions, pixels in the lanes
    int8_conv.RULE,       # QDQ convolutions and matmuls, channels in the lanes
    winograd.RULE,        # float 3x3 convolutions, Winograd F(4, 3) / F(2, 3)
    pixel_conv.RULE,      # float 1x1 convolutions, pixels in the lanes
    stem_conv.RULE,       # float convolutions of an image (<= 4 channels), pixels in the lanes
    packed_conv.RULE,     # float convolutions, packed weights
    row_conv.RULE,        # depthwise convolutions and max pools, a row at a time
    group_conv.RULE,      # grouped convolutions, narrow groups: a row x a group's channels
    dense.RULE,           # matmuls by a constant weight, packed per tile of outputs
    resize.RULE,          # nearest / bilinear resize from compile-time tables
    matmul.RULE,          # one matmul (TOPI's)
    concat.RULE,          # concatenation (+ elementwise epilogue), one input at a time
    generic.RULE,         # everything else: parallel, vectorized, reductions in lanes
]


def schedule_func(func, lanes: int, isa=None):
    """Schedule one fused function with the first rule that matches; ``(func, kernel)``.
    Raises if no schedule applies cleanly."""
    sch = tvm.s_tir.Schedule(func)
    matches = [(rule, rule.match(sch)) for rule in RULES]
    if sum(len(blocks) for rule, blocks in matches if rule.anchor) > 1:
        raise ValueError("more than one convolution in a fused function")
    ctx = RuleContext(lanes, isa)
    rule, blocks = next((r, b) for r, b in matches if b)
    kind = rule.apply(sch, blocks, ctx)
    return sch.mod["main"], kind


def schedule_pass(target, record: BuildRecord | None = None):
    """Module pass: schedule every PrimFunc. ``record`` (if given) receives, per function,
    the kernel used, and for those left with default loops, the reason."""
    lanes = simd_floats(target)
    isa = select_isa(target)

    @tvm.transform.module_pass(opt_level=0, name="EdgecCPUSchedule")
    def _pass(mod, _ctx):
        updates = {}
        for gv, func in mod.functions.items():
            if not isinstance(func, tvm.tirx.PrimFunc):
                continue
            own = func.attrs.get(KERNEL_ATTR) if func.attrs is not None else None
            if record is not None:
                record.macs[gv.name_hint] = (int(func.attrs[MACS_ATTR]) if own is not None
                                             else _macs(func))
                if own is not None:
                    record.kernels[gv.name_hint] = str(own)
            if func.attrs is not None and func.attrs.get("tirx.is_scheduled", False):
                continue  # a tuned schedule was applied, or a hand-scheduled kernel
            try:
                updates[gv], kind = schedule_func(
                    func.with_attr("global_symbol", gv.name_hint), lanes, isa)
                if record is not None:
                    record.kernels[gv.name_hint] = kind
            except Exception as e:  # noqa: BLE001 - keep the correct default loops
                msg = str(e).strip().splitlines()
                log.debug("no schedule for %s: %s", gv.name_hint, e)
                if record is not None:
                    record.unscheduled[gv.name_hint] = \
                        (msg[-1] if msg else type(e).__name__)[:200]
        for gv, f in updates.items():
            mod[gv] = f
        return mod

    return _pass


def _macs(func) -> int:
    try:
        return mac_count(func)
    except Exception:  # noqa: BLE001 - statistics only: never fail a build over them
        return 0
