"""The quantize legalizer: ``relax.quantize`` with constant scales as a multiply by 1/s."""

from __future__ import annotations

import numpy as np
from tvm import relax, te, tirx
from tvm.relax.transform.legalize_ops.qdq import _quantize as default

from .common import const_value


def make_quantize_legalizer():
    """relax.quantize with constant scales: ``clip(round(x * (1/s)) + zp)``. The default
    divides (a ``vdivps`` per vector in every requantizing epilogue); onnxruntime's fused
    QLinearConv also multiplies by a folded scale, so results agree to the rounding step."""
    def legalize(bb, call):
        data, scale, zp = call.args
        s, z = const_value(scale), const_value(zp)
        if s is None or z is None or str(data.ty.dtype) != "float32" or \
                s.dtype != np.float32 or not np.all(s != 0):
            return default(bb, call)
        inv = (1.0 / s.astype(np.float64)).astype(np.float32)
        axis = int(call.attrs.axis)
        out_dtype = str(call.attrs.out_dtype)
        ndim = len(data.ty.shape.values) if data.ty.shape is not None else 0
        axis = axis % ndim if ndim else 0

        def te_q(x, inv_t, z_t):
            def f(*i):
                iv = (tirx.const(float(inv.reshape(-1)[0]), "float32") if inv.size == 1
                      else inv_t[i[axis]])
                zv = (tirx.const(float(z.reshape(-1)[0]), "float32") if z.size == 1
                      else z_t[i[axis]].astype("float32"))
                v = te.round(x[i] * iv) + zv
                lo = tirx.min_value(out_dtype).astype("float32")
                hi = tirx.max_value(out_dtype).astype("float32")
                return te.max(te.min(v, hi), lo).astype(out_dtype)
            return te.compute(x.shape, f, name="quantized")

        return bb.call_te(te_q, data, relax.const(inv.reshape(-1)),
                          relax.const(z.reshape(-1)), primfunc_name_hint="quantize")

    return legalize

