"""Resize (``relax.image.resize2d``) onto the table-driven kernel (:mod:`..kernels.resize`).

A Relax pass rather than a LegalizeOps override, and before constants are folded: the
first ``FoldConstant`` legalizes every resize with TOPI's compute to see whether it folds,
and TOPI's ``align_corners`` divides by ``out - 1`` at trace time (a 1-pixel output
failed the build with "Divide by zero"). NCHW float32 resizes with static shapes, nearest
or linear, without a region of interest, are emitted here; the rest (cubic,
crop-and-resize, other layouts) keep TOPI's.
"""

from __future__ import annotations

import functools

import tvm
from tvm import relax

from edgec.core.resize_coords import COORD_MODES, ROUNDING

from ..kernels.resize import resize_tables, resize_te
from .common import KERNEL_ATTRS as _KERNEL
from .common import rewrite_functions, static_shape

RESIZE = tvm.ir.Op.get("relax.image.resize2d")


def supported(call) -> tuple[int, int, int, int] | None:
    """``(h, w, oh, ow)`` of a resize the kernel takes, else None."""
    a = call.attrs
    x = call.args[0]
    shape, oshape = static_shape(x), static_shape(call)
    if (a.layout != "NCHW" or str(x.ty.dtype) != "float32" or str(call.ty.dtype) != "float32"
            or a.method not in ("linear", "nearest_neighbor")
            or a.coordinate_transformation_mode not in COORD_MODES
            or a.rounding_method not in ROUNDING or any(float(r) for r in a.roi)
            or shape is None or oshape is None or len(shape) != 4):
        return None
    (h, w), (oh, ow) = shape[2:], oshape[2:]
    return (h, w, oh, ow) if min(h, w, oh, ow) > 0 else None


@relax.expr_functor.mutator
class ResizeRewriter(relax.PyExprMutator):
    """Each supported resize -> ``call_tir`` of :func:`resize_te` with its tables."""

    def __init__(self, mod):
        super().__init__(mod)
        self.count = 0

    def visit_call_(self, call):  # noqa: D102 - PyExprMutator hook
        call = self.visit_expr_post_order(call)
        if call.op != RESIZE:
            return call
        dims = supported(call)
        if dims is None:
            return call
        h, w, oh, ow = dims
        a = call.attrs
        tables = resize_tables(h, w, oh, ow, a.method, a.coordinate_transformation_mode,
                               a.rounding_method)
        self.count += 1
        return self.builder_.call_te(functools.partial(resize_te, out_hw=(oh, ow)),
                                     call.args[0], *[relax.const(t) for t in tables],
                                     primfunc_name_hint="resize2d", primfunc_attrs=_KERNEL)


def resize_pass():
    """Relax pass (before constants fold): supported resizes onto the resize kernel."""

    @tvm.transform.module_pass(opt_level=0, name="EdgecResize")
    def _pass(mod, _ctx):
        rw = ResizeRewriter(mod)
        out = rewrite_functions(rw, mod)
        return out if rw.count else mod

    return _pass
