"""Relu and Clip that keep NaN, as onnxruntime's do.

TOPI writes ``relu(x) = max(x, 0)`` and ``clip(x) = min(max(x, lo), hi)``; LLVM lowers a
float max as ``x > 0 ? x : 0``, which turns NaN into 0 (or the clip bound), so a corrupt
input gave plausible finite outputs where onnxruntime gives NaN. Written the other way
round -- ``x < 0 ? 0 : x``, ``x < lo ? lo : (x > hi ? hi : x)`` -- every comparison with NaN
is false and NaN passes through; it still compiles to one ``maxps`` / ``minps`` per bound
(operands swapped), so the fused epilogues cost the same.

Relu and ``relax.clip`` are legalized so (:func:`make_nan_clamp_legalizers`); the ONNX
frontend imports Clip as prebuilt TIR ``maximum`` / ``minimum`` functions with a scalar
constant, which :func:`nan_clamp_pass` re-emits the same way (after the int8 folds, which
read those clamps as bounds of the quantized output).
"""

from __future__ import annotations

import tvm
from tvm import relax, te, tirx, topi
from tvm.relax.transform.legalize_ops.unary import _call_topi_without_attr

from .common import RELU, rewrite_functions, static_shape
from .requant_fold import clamp_of


def _clamp(v, lo=None, hi=None):
    """``min(max(v, lo), hi)`` as ONNX's Clip orders it (``hi`` wins if ``lo > hi``)."""
    if lo is not None:
        v = tirx.Select(v < lo, lo, v)
    if hi is not None:
        v = tirx.Select(v > hi, hi, v)
    return v


def clamp_te(x, lo=None, hi=None):
    """``x`` clamped to ``lo`` / ``hi`` (numbers or scalar expressions; either may be None),
    NaN kept."""
    lo, hi = (None if v is None else tirx.Cast(x.dtype, v) for v in (lo, hi))
    return te.compute(x.shape, lambda *i: _clamp(x(*i), lo, hi), name="edgec_clamp")


def make_nan_clamp_legalizers() -> dict:
    """LegalizeOps overrides for float ``relu`` and ``clip`` (integer ones keep TOPI's)."""
    def _float(call):
        return str(call.args[0].ty.dtype).startswith("float")

    def relu(bb, call):
        if not _float(call):
            return _call_topi_without_attr(topi.nn.relu, "relu")(bb, call)
        return bb.call_te(clamp_te, call.args[0], lo=0.0, primfunc_name_hint="relu")

    def clip(bb, call):
        if not _float(call):
            return _call_topi_without_attr(topi.clip, "tir_clip")(bb, call)
        return bb.call_te(clamp_te, *call.args, primfunc_name_hint="tir_clip")

    return {"relax.nn.relu": relu, "relax.clip": clip}


class _NaNClamp(relax.PyExprMutator):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        found = clamp_of(call) if isinstance(call, relax.Call) and call.op != RELU else None
        if found is None:
            return call
        kind, value, data = found
        shape = static_shape(data)
        if shape is None or shape != static_shape(call) or \
                not str(data.ty.dtype).startswith("float"):
            return call
        bounds = {"lo": value} if kind == "max" else {"hi": value}
        return self.builder_.call_te(clamp_te, data, **bounds,
                                     primfunc_name_hint="maximum" if kind == "max"
                                     else "minimum")


NaNClamp = relax.expr_functor.mutator(_NaNClamp)


def nan_clamp_pass():
    """Relax pass: float max/min with a scalar constant (prebuilt or Relax ops) re-emitted
    as NaN-keeping clamps."""

    @tvm.transform.module_pass(opt_level=0, name="EdgecNaNClamp")
    def _pass(mod, _ctx):
        rw = NaNClamp(mod)
        return relax.transform.DeadCodeElimination()(rewrite_functions(rw, mod))

    return _pass
