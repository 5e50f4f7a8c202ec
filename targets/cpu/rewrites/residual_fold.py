"""The residual fold (Relax, after :mod:`.requant_fold`): ``q(clamp(dq(K) + dq(R)))`` with
``K`` a requantizing kernel's 8-bit output (one reader) and ``R`` another 8-bit tensor of the
same shape, scalar scales, becomes the kernel's second epilogue,
``round(clamp(K * a + R * b + c))`` with ``a = sK / s``, ``b = sR / s``,
``c = z - zK * a - zR * b`` -- what onnxruntime's QLinearAdd computes (both roundings kept),
without the float round trip.

Pattern: :meth:`ResidualFolder._fold` (an ``add`` of two dequantizes under the clamps of a
``quantize``); check: :func:`residual_operands`; rewrite: the kernel's residual re-emitter.
:func:`requant_pass` runs both folds.
"""

from __future__ import annotations

import tvm
from tvm import relax

from ...records import BuildRecord
from .common import (ADD, CALL_TIR, DQ, QRANGE, RESIDUAL, kernel_key, scalar_value,
                     static_shape)
from .requant_fold import FolderBase, RequantFolder, clamp_range, run_folder


def residual_operands(dk, dr, k):
    """``(sK, zK, sR, zR)`` as floats when both dequantizes have scalar constants and ``R``
    is an 8-bit tensor of the kernel output's static shape, else None."""
    sk, zk, sr, zr = (scalar_value(a) for a in (*dk.args[1:3], *dr.args[1:3]))
    r = dr.args[0]
    if any(v is None for v in (sk, zk, sr, zr)) or str(r.ty.dtype) not in QRANGE or \
            static_shape(r) is None or static_shape(r) != static_shape(k):
        return None
    return tuple(float(v) for v in (sk, zk, sr, zr))


class _ResidualFolder(FolderBase):
    def _fold(self, qp, clamps, val):
        inv, zp, dtype = qp
        if val is None or val.op != ADD:
            return None
        for kside, rside in ((0, 1), (1, 0)):
            dk = self._single(val.args[kside])
            dr = self.var2val.get(val.args[rside]) \
                if isinstance(val.args[rside], relax.Var) else None
            if not (isinstance(dk, relax.Call) and dk.op == DQ and
                    isinstance(dr, relax.Call) and dr.op == DQ):
                continue
            k = self._single(dk.args[0])
            entry = self.kernels.get((RESIDUAL, kernel_key(k))) \
                if k is not None and k.op == CALL_TIR else None
            if entry is None:
                continue
            scales = residual_operands(dk, dr, k)
            if scales is None:
                continue
            sk, zk, sr, zr = scales
            a, b = sk * inv, sr * inv
            res = (a, b, zp - zk * a - zr * b, *clamp_range(clamps, inv, zp, dtype), dtype)
            emit, _ = entry
            return emit(self.builder_, self.visit_expr(k.args[1].fields[0]),
                        self.visit_expr(dr.args[0]), res)
        return None


ResidualFolder = relax.expr_functor.mutator(_ResidualFolder)


def requant_pass(kernels: dict, record: BuildRecord | None = None):
    """Relax pass, run after constants are folded: the requantize fold
    (:mod:`.requant_fold`), then where it folded anything the residual fold."""

    @tvm.transform.module_pass(opt_level=0, name="EdgecFoldRequantize")
    def _pass(mod, _ctx):
        if not kernels:
            return mod
        mod, folded = run_folder(RequantFolder, mod, kernels)
        mod, residual = run_folder(ResidualFolder, mod, kernels) if folded else (mod, 0)
        if record is not None and record.int8 is not None:
            record.int8.requant_fused = folded
            record.int8.residual_fused = residual
        return mod

    return _pass
