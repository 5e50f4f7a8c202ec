"""Fast-math legalizers: sigmoid, tanh and erf without libm calls, so epilogues vectorize."""

from __future__ import annotations

import tvm
from tvm import te, topi
from tvm.relax.transform.legalize_ops.unary import _call_topi_without_attr

from ..compute import fast_sigmoid


def make_fast_math_legalizers() -> dict:
    """sigmoid(x) = 1 / (1 + exp(-x)) with :func:`~..compute.fast_exp`
    (:func:`~..compute.fast_sigmoid`), tanh and erf with TVM's polynomial ``fast_tanh`` /
    ``fast_erf`` (errors ~1e-7 over the float range) instead of libm calls, so SiLU/Swish
    and GELU epilogues vectorize (ConvNeXt's GELU after each block's first Linear, a scalar
    ``erff`` per element: 31.6 of its 100 ms). The
    sigmoid's exp is most of a SiLU epilogue's work (EfficientNet-B0 with a sigmoid of no
    cost ran 0.82x the time): with ``fast_exp`` instead of TOPI's, EfficientNet-B0
    0.97-0.98x the time (interleaved A/B; AVX-512 and ``-mcpu haswell`` alike). Replacing
    the division too (a reciprocal from the exponent bits and three Newton steps) was
    slower: 1.3x the sigmoid's time, a longer dependency chain."""
    def sigmoid_te(x):
        return te.compute(x.shape, lambda *i: fast_sigmoid(x(*i)), name="edgec_sigmoid")

    def _float32(call):
        return str(call.args[0].ty.dtype) == "float32"

    def sigmoid(bb, call):
        if not _float32(call):
            return _call_topi_without_attr(topi.sigmoid, "tir_sigmoid")(bb, call)
        return bb.call_te(sigmoid_te, call.args[0], primfunc_name_hint="tir_sigmoid")

    def tanh(bb, call):
        if not _float32(call):
            return bb.call_te(topi.tanh, call.args[0], primfunc_name_hint="tir_tanh")
        return bb.call_te(topi.fast_tanh, call.args[0], primfunc_name_hint="tir_tanh")

    def erf_te(x):  # fast_erf clamps its input to [-4, 4], NaN included: keep NaN
        e = topi.fast_erf(x)
        return te.compute(x.shape, lambda *i: tvm.tirx.Select(tvm.tirx.isnan(x(*i)), x(*i),
                                                               e(*i)), name="edgec_erf")

    def erf(bb, call):
        if not _float32(call):
            return bb.call_te(topi.erf, call.args[0], primfunc_name_hint="tir_erf")
        return bb.call_te(erf_te, call.args[0], primfunc_name_hint="tir_erf")

    return {"relax.sigmoid": sigmoid, "relax.tanh": tanh, "relax.erf": erf}

