"""A 1x1 expansion and the depthwise convolution that reads it, as one kernel
(:mod:`..kernels.expand_dw`), where the expanded map is too large for the caches.

Pattern (constants folded, before legalization): ``e = conv2d(x, W1)`` (float32, 1x1,
stride 1, no padding, groups 1, NCHW / OIHW, constant weight), its epilogue chain (a
per-channel bias, then ReLU / ReLU6 clamps or SiLU; :func:`.structured.follow_epilogue`),
read by nothing but ``d = conv2d(e, W2, groups=C)`` (depthwise, stride 1 or 2, no
dilation, constant weight), and ``d``'s own chain.
Check: static shapes, and an expanded map of at least :data:`FUSE_MIN_BYTES` -- below it
the two kernels' intermediate stays in L2 and they are faster than the fused kernel, which
recomputes the rows its bands share; no SiLU (see there).
Rewrite: one ``call_tir`` of the fused kernel, hand-scheduled, both epilogues inside.
``EDGEC_FUSE_DW=0`` turns it off, ``=force`` fuses every matching pair (benchmarks).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from ..compute import ints
from ..isa import simd_floats
from ..kernels import expand_dw as K
from .common import CONV, plan_and_rewrite, readers, static_shape, use_counts
from .float_conv import float_conv_weight
from .structured import Epilogue, follow_epilogue

# bytes of the expanded map (float32) from which the fused kernel is faster. One block
# alone, AVX-512, 2 threads, fused / two kernels: MobileNetV2's 16 -> 96 at 112 x 112 then
# 3x3/2 (4.8 MB) 0.62-0.67x; 24 -> 144 at 56 x 56 (1.8 MB) 3x3/2 1.01x, 3x3/1 1.05-1.25x;
# 32 -> 192 at 28 x 28 3x3/2 1.1x. Whole models, interleaved against the two kernels: MobileNetV2
# (one pair fused) 0.92x the time (-mcpu haswell 0.97x), MobileNetV3-Large 0.91x, LR-ASPP
# 0.96x; MnasNet's 16 -> 48 at 112 x 112 (2.4 MB) 0.99x; MobileNetV2 with its 1.8 MB pairs
# also fused 1.02x, with every pair 1.14x.
FUSE_MIN_BYTES = 2 << 20
# SiLU epilogues (EfficientNet) are fused only when forced: the fused kernel computes the
# expansion's SiLU (a division per vector) on the rows two bands share too, and that cost
# more than the round trip saves: EfficientNet-B0's 16 -> 96 at 112 x 112 then 3x3/2 alone
# 1.18x the time of the two kernels, the whole model 1.01x.


def mode() -> str:
    v = os.environ.get("EDGEC_FUSE_DW", "").strip().lower()
    return {"0": "off", "off": "off", "no": "off", "force": "force"}.get(v, "auto")


def _conv(call):
    """``(attrs, constant weight)`` of a float32 NCHW/OIHW conv2d on a static input (the
    legalizer's check, :func:`.float_conv.float_conv_weight`), else None."""
    if not isinstance(call, relax.Call) or call.op != CONV:
        return None
    w = float_conv_weight(call)
    return None if w is None else (call.attrs, w)


def pointwise(call):
    """The weight ``[C, Cin]`` of a 1x1 stride-1 unpadded dense conv2d, else None."""
    found = _conv(call)
    if found is None:
        return None
    a, w = found
    if w.shape[2:] != (1, 1) or int(a.groups) != 1 or ints(a.strides) != [1, 1] or \
            any(ints(a.padding)) or ints(a.dilation) != [1, 1]:
        return None
    return w.reshape(w.shape[0], -1)


def depthwise(call, c: int):
    """``(weight [C, kh, kw], stride, pads)`` of a depthwise conv2d over ``c`` channels
    (stride 1 or 2 both ways, no dilation), else None."""
    found = _conv(call)
    if found is None:
        return None
    a, w = found
    s = ints(a.strides)
    if int(a.groups) != c or w.shape[:2] != (c, 1) or s[0] != s[1] or s[0] not in (1, 2) \
            or ints(a.dilation) != [1, 1]:
        return None
    return w.reshape(c, *w.shape[2:]), s[0], ints(a.padding)


@dataclass
class _Pair:
    x: object            # the expansion's input
    x_shape: tuple
    w1: np.ndarray
    ep1: Epilogue
    w2: np.ndarray
    stride: int
    pads: list
    ep2: Epilogue
    end: object          # the last call the kernel replaces
    out_shape: list


@relax.expr_functor.mutator
class ExpandDwRewriter(relax.PyExprMutator):
    def __init__(self, mod, lanes: int, cores: int, how: str):
        super().__init__(mod)
        self.lanes, self.cores, self.how = lanes, cores, how  # how: mode()
        self.pairs: list[_Pair] = []
        self.count = 0

    def scan(self, func) -> bool:
        """Plan every pair to fuse in ``func``; whether there is any."""
        counts, users = use_counts(func), readers(func)
        self.pairs = []
        for block in func.body.blocks:
            for b in block.bindings:
                w1 = pointwise(b.value)
                if w1 is not None:
                    pair = self._pair(b, w1, counts, users)
                    if pair is not None:
                        self.pairs.append(pair)
        return bool(self.pairs)

    def _pair(self, b, w1, counts, users):
        c = w1.shape[0]
        ep1 = follow_epilogue(b.var, c, 3, counts, users, silu=True)
        var = ep1.var
        if counts.get(var) != 1 or len(users.get(var, [])) != 1:
            return None
        dvar, dcall = users[var][0]
        found = depthwise(dcall, c)
        if found is None or not dcall.args[0].same_as(var):
            return None
        w2, s, pads = found
        xs = static_shape(b.value.args[0])
        if self.how == "auto" and xs[0] * c * xs[2] * xs[3] * 4 < FUSE_MIN_BYTES:
            return None
        ep2 = follow_epilogue(dvar, c, 3, counts, users, silu=True)
        if self.how == "auto" and (ep1.silu or ep2.silu):
            return None  # (see FUSE_MIN_BYTES)
        end = ep2.end if ep2.end is not None else dcall
        return _Pair(b.value.args[0], xs, w1, ep1, w2, s, pads, ep2, end, static_shape(dcall))

    def visit_call_(self, call):
        pair = next((p for p in self.pairs if p.end.same_as(call)), None)
        if pair is None:
            return super().visit_call_(call)
        self.count += 1
        return self._emit(pair)

    def _emit(self, pair: _Pair):
        x = self.visit_expr(pair.x)
        c = pair.w1.shape[0]
        kh, kw = pair.w2.shape[1:]
        plan = K.plan_for(c, pair.out_shape[2], pair.stride, self.cores)
        func = K.expand_dw_func(
            pair.x_shape, c, kh, kw, pair.stride, pair.pads, self.lanes, plan,
            (pair.ep1.lo, pair.ep1.hi, pair.ep1.silu), (pair.ep2.lo, pair.ep2.hi, pair.ep2.silu))
        gv = self.builder_.add_func(
            func.with_attr("tirx.is_scheduled", True).with_attr("op_pattern", 8),
            "expand_dwconv2d")

        def bias(ep):
            return np.zeros(c, np.float32) if ep.bias is None else \
                np.ascontiguousarray(ep.bias, np.float32)

        args = [x, relax.const(np.ascontiguousarray(pair.w1)), relax.const(bias(pair.ep1)),
                relax.const(np.ascontiguousarray(pair.w2)), relax.const(bias(pair.ep2))]
        return relax.call_tir(gv, relax.Tuple(args),
                              relax.TensorType([int(d) for d in pair.out_shape], "float32"))


def expand_dw_pass(target):
    """Relax pass (constants folded): expansion + depthwise pairs over large maps -> the
    fused kernel (see the module docstring)."""
    lanes = simd_floats(target)
    cores = int(target.attrs.get("num-cores", 1) or 1)

    @tvm.transform.module_pass(opt_level=0, name="EdgecExpandDepthwise")
    def _pass(mod, _ctx):
        how = mode()
        if how == "off":
            return mod
        return plan_and_rewrite(ExpandDwRewriter(mod, lanes, cores, how), mod)

    return _pass
