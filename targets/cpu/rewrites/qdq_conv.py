"""The QDQ -> integer-kernel rewrite (Relax, before constants are folded).

Pattern: ``conv2d`` / ``matmul`` whose input and weight are ``dequantize`` outputs, and
``quantize(max_pool2d(dequantize(Xq)))`` with the same scale and zero point.
Check: an 8-bit activation with one scale, a static shape, constant int8 weights with zero
point 0 and per-output-channel scales (:func:`check_weight`); a layer that fails a check stays
float, its reason counted in :class:`~edgec.targets.records.Int8Stats`.
Rewrite: the integer kernel (:mod:`..kernels.int8_conv`, :mod:`..kernels.int8_pixel`,
:mod:`..kernels.int8_winograd`, depthwise :func:`..kernels.row_conv.q_dwconv_te`), with how
to emit it again with a requantizing epilogue remembered in ``kernels`` for the folds
(:mod:`.requant_fold`, :mod:`.residual_fold`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from ...records import BuildRecord, Int8Stats
from ..compute import ints
from ..isa import DotISA, isa_for_weights, select_isa, za_of
from ..kernels.int8_conv import int8_conv_te, int8_matmul_te, pack_weight
from ..kernels.int8_pixel import int8_conv1x1_px_te, pack_weight_px, px_tile
from ..kernels.int8_winograd import int8_winograd_te, transform_weight_int8, wino8_applies
from ..kernels.row_conv import q_dwconv_te
from .common import KERNEL_ATTRS as _KERNEL
from .common import (CONV, DQ, MATMUL, PERMUTE, POOL, RESIDUAL, Q, Skip, const_value,
                     kernel_key, rewrite_functions, scalar_value, static_shape)


@dataclass
class Activation:
    """``dq(Xq; sx, zx)`` with one scale: the 8-bit tensor, its dtype, scale and zero point."""

    xq: object
    dtype: str
    sx: float
    zx: int


def check_activation(dqx, rank: int, what: str) -> Activation:
    """Xq, its dtype, scale and zero point, from ``dq(Xq)`` with one scale."""
    if dqx is None:
        raise Skip(f"{what}input or weight not dequantized")
    xq = dqx.args[0]
    xdt = str(xq.ty.dtype)
    sx, zx = scalar_value(dqx.args[1]), scalar_value(dqx.args[2])
    if xdt not in ("uint8", "int8") or sx is None or zx is None:
        raise Skip(f"{what}activation not 8-bit with one scale")
    shape = static_shape(xq)
    if shape is None:
        raise Skip(f"{what}dynamic shape")
    if len(shape) != rank:
        raise Skip(f"{what}input rank {len(shape)}, not {rank}")
    return Activation(xq, xdt, sx, zx)


def check_weight(dqw, ndim: int, what: str):
    """``(Wq, sw, zw)`` of a constant int8 weight with zero point 0."""
    wq, sw, zw = (const_value(x) for x in dqw.args[:3])
    if wq is None or sw is None or zw is None or wq.dtype != np.int8 or wq.ndim != ndim:
        raise Skip(f"{what}weight not constant {'2-D ' if ndim == 2 else ''}int8")
    if np.any(zw != 0):
        raise Skip(f"{what}weight zero point not 0")
    return wq, sw


@relax.expr_functor.mutator
class QdqRewriter(relax.PyExprMutator):
    """QDQ conv2d / matmul / max pool -> integer kernels (see the module docstring)."""

    def __init__(self, mod, isa: DotISA, kernels: dict):
        super().__init__(mod)
        self.isa = isa
        self.kernels = kernels
        self.stats = Int8Stats(isa.name)

    # ------------------------------------------------------------------ pattern
    def _dq(self, expr):
        if not isinstance(expr, relax.Var):
            return None
        b = self.lookup_binding(expr)
        if isinstance(b, relax.Call) and b.op == DQ:
            return b
        return None

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if isinstance(call, relax.Call) and call.op == Q:
            return self._pool(call)
        if not (isinstance(call, relax.Call) and call.op in (CONV, MATMUL)):
            return call
        if all(self._dq(a) is None for a in call.args[:2]):
            return call  # a float layer, not a QDQ one left in float
        try:
            return self._conv(call) if call.op == CONV else self._matmul(call)
        except Skip as e:
            self.stats.skip(str(e))
            return call

    def _pool(self, q):
        """q(maxpool(dq(Xq; s, z)); s, z) = maxpool(Xq): max commutes with the
        increasing dequantize map, and padding with the type's minimum (0 for uint8)
        never wins over a real value. The pool then reads 8-bit data."""
        mp = self.lookup_binding(q.args[0]) if isinstance(q.args[0], relax.Var) else None
        if not (isinstance(mp, relax.Call) and mp.op == POOL):
            return q
        dq = self._dq(mp.args[0])
        if dq is None:
            return q
        xq = dq.args[0]
        same = all(const_value(a) is not None and const_value(b) is not None and
                   np.array_equal(const_value(a), const_value(b))
                   for a, b in ((q.args[1], dq.args[1]), (q.args[2], dq.args[2])))
        if not same or str(q.attrs.out_dtype) != str(xq.ty.dtype):
            return q
        self.stats.maxpool += 1
        return relax.Call(POOL, [xq], mp.attrs)

    # ------------------------------------------------------------------ matmul
    def _matmul(self, call):
        """``dq(Xq)[M, K] @ W`` with ``W = dq(Wq)[K, N]`` or ``permute(dq(Wq)[N, K])``
        (Gemm with transB), per-channel scales along N -> :func:`int8_matmul_te`."""
        if call.attrs.out_dtype not in (None, "", "void", "float32"):
            raise Skip("matmul: out_dtype")
        w, transposed = call.args[1], False
        wb = self.lookup_binding(w) if isinstance(w, relax.Var) else None
        if isinstance(wb, relax.Call) and wb.op == PERMUTE and (
                wb.attrs.axes is None or ints(wb.attrs.axes) == [1, 0]):
            w, transposed = wb.args[0], True
        dqx, dqw = self._dq(call.args[0]), self._dq(w)
        act = check_activation(dqx if dqw is not None else None, 2, "matmul: ")
        wq, sw = check_weight(dqw, 2, "matmul: ")
        axis = int(dqw.attrs.axis) % 2
        if not transposed:  # [K, N] -> [N, K]: the scale's axis must be N's
            wq, axis = wq.T, 1 - axis
        n = wq.shape[0]
        if sw.size not in (1, n) or (sw.size == n and n > 1 and axis != 0):
            raise Skip("matmul: weight scale not per output column")
        sw = np.broadcast_to(sw.reshape(-1).astype(np.float32), (n,))
        wq = np.ascontiguousarray(wq)
        lisa = self._layer_isa(wq)
        za = za_of(lisa, act.dtype, int(act.zx))
        corr = (za * wq.astype(np.int64).sum(1)).astype(np.int32)
        scale = (np.float32(act.sx) * sw).astype(np.float32)
        self.stats.matmul += 1
        return self._int8_kernel(int8_matmul_te, lisa, act.xq,
                                 pack_weight(wq[:, :, None, None], lisa),
                                 corr, scale, (int(act.zx), n), "matmul_int8")

    # ------------------------------------------------------------------ conv2d
    def _conv(self, call):
        a = call.attrs
        if a.data_layout != "NCHW" or a.kernel_layout != "OIHW" or \
                a.out_layout != "NCHW" or a.out_dtype not in (None, "", "float32"):
            raise Skip("layout or out_dtype")
        dqx, dqw = self._dq(call.args[0]), self._dq(call.args[1])
        act = check_activation(dqx if dqw is not None else None, 4, "")
        wq, sw = check_weight(dqw, 4, "")
        oc = wq.shape[0]
        if sw.size not in (1, oc) or (sw.size == oc and oc > 1 and
                                      int(dqw.attrs.axis) not in (0, -4)):
            raise Skip("weight scale not per output channel")
        sw = np.broadcast_to(sw.reshape(-1).astype(np.float32), (oc,))
        groups = int(a.groups)
        geom = (ints(act.xq.ty.shape.values), ints(a.strides), ints(a.padding),
                ints(a.dilation))
        c = geom[0][1]
        if groups == 1 and wino8_applies(
                self.isa, geom[0], wq.shape, geom[1], geom[2], geom[3],
                weights_7bit=isa_for_weights(self.isa, wq) is not self.isa):
            return self._winograd(act, wq, sw, geom[2])
        if groups == 1:
            return self._direct(act, wq, sw, geom)
        if groups == c == oc and wq.shape[1] == 1:
            return self._depthwise(act, wq, sw, geom)
        raise Skip("grouped convolution")

    def _winograd(self, act, wq, sw, pads):
        """integer Winograd F(2, 3) (x86 without VNNI): exact, 1/4 in the scale"""
        oc = wq.shape[0]
        self.stats.conv2d += 1
        self.stats.winograd += 1
        scale = (np.float32(act.sx) * sw * np.float32(0.25)).astype(np.float32)
        return self._int8_kernel(int8_winograd_te, self.isa, act.xq,
                                 transform_weight_int8(wq, self.isa.lanes),
                                 np.zeros(oc, np.int32), scale, (int(act.zx), oc, pads),
                                 "conv2d_int8wino")

    def _direct(self, act, wq, sw, geom):
        """the direct integer kernel: pixels in the lanes (1x1) or channels in the lanes"""
        shape, strides, pads, dil = geom
        oc = wq.shape[0]
        lisa = self._layer_isa(wq)
        za = za_of(lisa, act.dtype, int(act.zx))
        corr = (za * wq.reshape(oc, -1).astype(np.int64).sum(1)).astype(np.int32)
        scale = (np.float32(act.sx) * sw).astype(np.float32)
        self.stats.conv2d += 1
        tile = px_tile(lisa, shape, wq.shape, strides, pads)
        if tile is not None:
            return self._int8_kernel(functools.partial(int8_conv1x1_px_te, tile=tile),
                                     lisa, act.xq, pack_weight_px(wq, lisa, tile[4]),
                                     corr, scale, (int(act.zx), oc), "conv2d_int8px")
        return self._int8_kernel(int8_conv_te, lisa, act.xq, pack_weight(wq, lisa), corr,
                                 scale, (int(act.zx), oc, strides, pads, dil), "conv2d_int8")

    def _depthwise(self, act, wq, sw, geom):
        """depthwise: float sums over the 8-bit input (the scales folded into the weights)"""
        _, strides, pads, dil = geom
        oc, lanes, zx = wq.shape[0], self.isa.lanes, int(act.zx)
        wt = (wq.astype(np.float32) * (np.float32(act.sx) * sw)[:, None, None, None]
              ).astype(np.float32)
        self.stats.dwconv2d += 1
        call = self.builder_.call_te(functools.partial(q_dwconv_te, lanes=lanes), act.xq,
                                     relax.const(wt), zx, strides, pads, dil,
                                     primfunc_name_hint="dwconv2d_q", primfunc_attrs=_KERNEL)

        def remake(bb_, x_new, inv, bias, zp, rq):  # sum * inv + (bias * inv + zp)
            wt2 = (wt.astype(np.float64) * inv).astype(np.float32)
            b2 = (bias * inv + zp).astype(np.float32)
            return bb_.call_te(
                functools.partial(q_dwconv_te, lanes=lanes, requant=rq), x_new,
                relax.const(wt2), zx, strides, pads, dil, bias=relax.const(b2),
                primfunc_name_hint="dwconv2d_q_rq", primfunc_attrs=_KERNEL)

        self.kernels[kernel_key(call)] = (remake, oc)
        return call

    # ------------------------------------------------------------------ emit
    def _layer_isa(self, wq):
        """The target's ISA, or its 7-bit-weight form where the weights fit it."""
        lisa = isa_for_weights(self.isa, wq)
        if lisa is not self.isa:
            self.stats.weights_7bit += 1
        return lisa

    def _int8_kernel(self, te_fn, isa, xq, wpk, corr, scale, tail, name):
        """Emit an integer kernel (float output) and remember how to emit it with the
        requantizing one: ``(acc - corr) * scale + bias`` times ``inv`` plus ``zp``
        is ``acc * s2 + b2``."""
        call = self.builder_.call_te(
            functools.partial(te_fn, isa=isa), xq, relax.const(wpk), relax.const(corr),
            relax.const(scale), *tail, primfunc_name_hint=name, primfunc_attrs=_KERNEL)
        kernels = self.kernels

        def remake(bb, x_new, inv, bias, zp, rq):
            s64 = scale.astype(np.float64)
            s2 = (s64 * inv).astype(np.float32)
            b2 = ((bias - corr.astype(np.float64) * s64) * inv + zp).astype(np.float32)

            def emit(bb_, x_, rq_, suffix, **residual):
                return bb_.call_te(functools.partial(te_fn, isa=isa, requant=rq_), x_,
                                   relax.const(wpk), relax.const(b2), relax.const(s2),
                                   *tail, **residual, primfunc_name_hint=name + suffix,
                                   primfunc_attrs=_KERNEL)

            out = emit(bb, x_new, rq, "_rq")
            # (the residual fold re-emits it with a second, residual epilogue)
            kernels[RESIDUAL, kernel_key(out)] = (
                lambda bb_, x_, r, res: emit(bb_, x_, (*rq, res), "_res", residual=r),
                len(scale))
            return out

        kernels[kernel_key(call)] = (remake, len(scale))
        return call


def rewrite_pass(target, record: BuildRecord | None = None, kernels: dict | None = None):
    """Relax pass, run before constant folding: QDQ Conv -> integer kernels.

    ``kernels`` (if given) receives, per emitted kernel (by PrimFunc name), how to emit it
    again with a requantizing output: what the folds need."""
    kernels = {} if kernels is None else kernels
    isa = select_isa(target)

    @tvm.transform.module_pass(opt_level=0, name="EdgecQuantizedConv")
    def _pass(mod, _ctx):
        rw = QdqRewriter(mod, isa, kernels)
        out = rewrite_functions(rw, mod)
        if record is not None and rw.stats.any():
            record.int8 = rw.stats
        return relax.transform.DeadCodeElimination()(out)

    return _pass
