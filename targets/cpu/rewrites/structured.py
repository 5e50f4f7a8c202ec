"""Float convolutions and matmuls whose constant weights have structure -- mostly zeros, or
few distinct values -- onto the kernels that exploit it, with their bias and clamp epilogue.

After constants are folded (the weights are constants), before legalization, every float32
``conv2d`` (groups 1, NCHW / OIHW, static shapes) and ``matmul`` with a constant 2-D right
operand is looked at:

* **few values** (a ``matmul`` at a batch of at most 4 rows whose weight takes at most 16
  distinct values, on x86): the reuse-lookup kernel (:mod:`..kernels.lut`): each distinct
  product once, tables of their sums, one in-register lookup per 1-4 weights;
* **zeros** below the measured break-even density of the shape class on the target's ISA
  (:func:`..kernels.sparse.choose`), the sparse kernels (:mod:`..kernels.sparse`):

  - 1x1 convolution, no padding: ``y = spmm(x)`` on the image flattened (a stride first
    takes every ``s``-th pixel with a strided slice);
  - ``kh x kw`` convolution of stride 1 (any padding, dilation): the input padded once (one
    extra zero row below, so the last row's taps past the right edge stay inside the
    image), ``spmm`` over ``Hout x Wp`` positions, then the ``Wout`` real columns sliced out;
  - ``matmul(x, W[K, N])``: ``spmv`` over the ``prod(x.shape[:-1])`` rows.

The chain that follows -- a per-channel constant bias ``add``, then a clamp (``relu``,
``max`` then ``min`` with scalar constants: ReLU6) -- when each link has a single reader,
is the kernel's epilogue. The kernels are hand-scheduled (``tirx.is_scheduled``) and opaque
to fusion. Every layer with zeros or few values gets a
:class:`~edgec.targets.records.StructuredLayer` in the build record: the kernel it got,
why, and the multiplies it executes against the dense layer's. ``EDGEC_SPARSE=dense`` /
``=sparse`` overrides the break-even, ``EDGEC_LOOKUP=0`` turns the lookup kernel off,
``=force`` takes it also where the dense kernel is faster (benchmarks compare the kernels
on one model).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from ...records import BuildRecord, StructuredLayer
from ..compute import ints
from ..isa import simd_floats
from ..kernels import lut as LT
from ..kernels import sparse as K
from .common import (ADD, CONV, MATMUL, MULTIPLY, SIGMOID, const_value, plan_and_rewrite,
                     readers, static_shape, use_counts)
from .requant_fold import clamp_of

log = logging.getLogger("edgec.cpu")


def force() -> str | None:
    v = os.environ.get("EDGEC_SPARSE", "").strip().lower()
    return v if v in ("sparse", "dense") else None


class _Plan:
    """A layer taking a sparse kernel: its anchor call, the compressed weight, the epilogue."""

    def __init__(self, anchor, kind, w, shape_class):
        self.anchor, self.kind, self.shape_class = anchor, kind, shape_class
        self.wt, self.w = w, w.value
        self.end = anchor
        self.bias = None
        self.lo = self.hi = None


@dataclass(frozen=True)
class _Weight:
    """A constant weight and what the kernel choice reads of it, counted once."""

    value: np.ndarray
    nonzero: int
    distinct: int      # distinct values, counted up to MAX_VALUES + 1

    @property
    def zeros(self) -> bool:
        return self.nonzero < self.value.size

    @property
    def few(self) -> bool:
        """At most :data:`LT.MAX_VALUES` distinct values (the lookup kernel's)."""
        return self.distinct <= LT.MAX_VALUES


def _weight(w: np.ndarray) -> _Weight:
    """``w``'s nonzero count and distinct values (the first 64 Ki values first: a weight with
    many values is told apart without sorting all of it)."""
    head = len(np.unique(w.reshape(-1)[: 1 << 16]))
    distinct = head if head > LT.MAX_VALUES else len(np.unique(w))
    return _Weight(w, int(np.count_nonzero(w)), min(distinct, LT.MAX_VALUES + 1))


def _positions(kind: str, call) -> int:
    """Where each weight is applied: batch rows of a matmul, images x output pixels of a
    convolution (0 when a shape is not static)."""
    xs, ys = static_shape(call.args[0]), static_shape(call)
    if xs is None or ys is None:
        return 0
    if kind == "matmul":
        return int(np.prod(xs[:-1]))
    return int(ys[0]) * int(np.prod(ys[2:]))


def lookup_enabled() -> bool:
    return os.environ.get("EDGEC_LOOKUP", "").strip().lower() not in ("0", "off", "no")


def lookup_forced() -> bool:
    """``EDGEC_LOOKUP=force``: the lookup kernel wherever it applies, also where the dense
    kernel is faster (small weights with more than 2 values; benchmarks time both)."""
    return os.environ.get("EDGEC_LOOKUP", "").strip().lower() == "force"


def _per_channel(bias, oc: int, axis_from_end: int) -> bool:
    """Whether ``bias`` is float32, ``oc`` values along the output channel axis
    (``axis_from_end``: 3 for NCHW, 1 for a matmul's last axis), broadcast elsewhere."""
    if bias is None or bias.dtype != np.float32 or bias.size != oc or \
            bias.ndim < axis_from_end or bias.ndim > 4:
        return False
    return bias.shape[bias.ndim - axis_from_end] == oc


@dataclass
class Epilogue:
    """What follows a kernel's output through single readers: a per-channel bias, then
    clamps or (:func:`follow_epilogue`'s ``silu``) a SiLU; ``end`` / ``var``: the last call
    of the chain and its variable (None / the kernel's own when the chain is empty)."""

    end: object
    var: object
    bias: np.ndarray | None = None
    lo: float | None = None
    hi: float | None = None
    silu: bool = False   # v * sigmoid(v) after the bias (then nothing more)


def _silu(var, counts: dict, users: dict):
    """``(sigmoid(var) * var call, its variable)`` where ``var``'s only readers are the
    two, else None."""
    if counts.get(var) != 2 or len(users.get(var, [])) != 2:
        return None
    sig = next(((v, c) for v, c in users[var] if c.op == SIGMOID), None)
    mul = next(((v, c) for v, c in users[var] if c.op == MULTIPLY), None)
    if sig is None or mul is None or counts.get(sig[0]) != 1:
        return None
    args = list(mul[1].args)
    if not ((args[0].same_as(var) and args[1].same_as(sig[0])) or
            (args[1].same_as(var) and args[0].same_as(sig[0]))):
        return None
    return mul[1], mul[0]


def follow_epilogue(var, oc: int, axis_from_end: int, counts: dict, users: dict,
                    silu: bool = False) -> Epilogue:
    """The epilogue chain after ``var`` (``oc`` output channels along the axis
    ``axis_from_end`` from the end: 3 for NCHW, 1 for a matmul): while ``var`` has a single
    reader, a per-channel constant bias ``add`` (first), then ``max`` / ``min`` with
    scalar constants (ReLU, ReLU6); with ``silu``, ``v * sigmoid(v)`` may follow the bias
    instead, ending the chain."""
    ep = Epilogue(None, var)
    swish = _silu(var, counts, users) if silu else None
    while swish is None and counts.get(var) == 1 and len(users.get(var, [])) == 1:
        uvar, uval = users[var][0]
        if (uval.op == ADD and ep.bias is None and ep.lo is None and ep.hi is None
                and uval.args[0].same_as(var)):
            bias = const_value(uval.args[1])
            if not _per_channel(bias, oc, axis_from_end):
                break
            ep.bias = bias.reshape(-1)
        else:
            found = clamp_of(uval)
            if found is None or not found[2].same_as(var):
                break
            k, value, _ = found
            if k == "max" and ep.lo is None and ep.hi is None:
                ep.lo = value
            elif k == "min" and ep.hi is None:
                ep.hi = value
            else:
                break
        ep.end, ep.var = uval, uvar
        var = uvar
        if silu and ep.lo is None and ep.hi is None:
            swish = _silu(var, counts, users)
    if swish is not None:
        (ep.end, ep.var), ep.silu = swish, True
    return ep


@relax.expr_functor.mutator
class StructuredRewriter(relax.PyExprMutator):
    def __init__(self, mod, lanes: int, isa: str, record: BuildRecord | None,
                 cores: int = 1):
        super().__init__(mod)
        self.lanes, self.isa, self.record = lanes, isa, record
        self.cores = cores
        self.plans: list[_Plan] = []
        self.count = 0

    # ---------------------------------------------------------------------- which layers
    def _candidate(self, call):
        """``(kind, w2d-ready weight, shape class, reason-if-dense)`` of a float conv2d /
        matmul with a constant weight that has zeros or few distinct values, else None."""
        if not isinstance(call, relax.Call) or call.op not in (CONV, MATMUL):
            return None
        w = const_value(call.args[1])
        if w is None or w.dtype != np.float32 or w.size == 0:
            return None
        wt = _weight(w)
        if not wt.zeros and not wt.few:
            return None
        op = "matmul" if call.op == MATMUL else "conv2d"
        x = call.args[0]
        xs, ys = static_shape(x), static_shape(call)
        if xs is None or ys is None or str(x.ty.dtype) != "float32" or \
                str(call.ty.dtype) != "float32":
            return op, wt, None, "dynamic shape or not float32"
        if call.op == MATMUL:
            if w.ndim != 2 or len(xs) < 1 or xs[-1] != w.shape[0]:
                return op, wt, "gemm", "batched or broadcast weight"
            return "matmul", wt, "gemm", None
        a = call.attrs
        if (a.data_layout != "NCHW" or a.kernel_layout != "OIHW" or a.out_layout != "NCHW"
                or int(a.groups) != 1):
            return op, wt, None, "grouped or not NCHW/OIHW (sparse kernels: groups = 1)"
        kh, kw = w.shape[2:]
        strides, pads = ints(a.strides), ints(a.padding)
        if not wt.zeros:  # few values, no zeros
            return op, wt, "conv1x1" if (kh, kw) == (1, 1) else "convkxk", \
                ("few distinct values: the lookup kernel is for Gemm/MatMul (one input row "
                 "feeds every output); a convolution's products differ per pixel")
        if (kh, kw) == (1, 1) and not any(pads):
            return "conv2d", wt, "conv1x1", None
        if strides != [1, 1]:
            return op, wt, "convkxk", \
                f"stride {strides} (the sparse direct convolution is stride 1 only)"
        return "conv2d", wt, "convkxk", None

    def scan(self, func) -> bool:
        """Plan every layer that takes the lookup or a sparse kernel, with its epilogue
        chain; note the others that have zeros or few values, with the reason. Whether any
        layer is planned."""
        self.plans = []
        counts, users = use_counts(func), readers(func)
        for block in func.body.blocks:
            for b in block.bindings:
                cand = self._candidate(b.value)
                if cand is None:
                    continue
                kind, wt, shape_class, why = cand
                w2d = self._w2d(kind, wt.value)
                if why is not None:
                    self._note(kind, wt, shape_class or "-", "dense", why, call=b.value)
                    continue
                plan = self._lookup_plan(b.value, kind, wt, w2d) or \
                    self._sparse_plan(b.value, kind, wt, shape_class, w2d)
                if plan is None:
                    continue
                self._epilogue(plan, b.var, counts, users)
                self.plans.append(plan)
        return bool(self.plans)

    def _lookup_plan(self, call, kind, wt, w2d):
        """A Gemm / MatMul at a small batch whose weight takes at most 16 values on x86:
        the lookup kernel (:mod:`..kernels.lut`)."""
        if kind != "matmul" or not wt.few:
            return None
        rows = int(np.prod(static_shape(call.args[0])[:-1]))
        why = None
        if not lookup_enabled():
            why = "lookup kernel turned off (EDGEC_LOOKUP=0)"
        elif self.lanes not in (8, 16) or self.isa == "neon":
            why = "no lookup kernel for this ISA yet (x86 AVX2 / AVX-512 only)"
        elif rows > LT.MAX_ROWS:
            why = (f"{rows} batch rows: the lookup kernel builds tables per row and pays "
                   f"at most {LT.MAX_ROWS}")
        if why is not None:
            if not wt.zeros:  # (with zeros the sparse choice notes it)
                self._note(kind, wt, "gemm", "dense", why, call=call)
            return None
        cb = LT.codebook(w2d, self.lanes)
        dense, executed = LT.multiplies(rows, cb)
        if not LT.pays(cb, self.lanes) and not lookup_forced():
            if not wt.zeros:
                self._note(kind, wt, "gemm", "dense",
                           f"{cb.count} values: {cb.group} weights per {self.lanes}-lane "
                           f"lookup, slower than the dense kernel while its weights are at "
                           f"most {LT.dense_limit(cb, self.lanes) >> 20} MiB", call=call)
            return None
        if executed * LT.MIN_SAVING > dense:
            if not wt.zeros:
                self._note(kind, wt, "gemm", "dense",
                           f"{wt.value.shape[1]} outputs: the lookup tables' {executed} multiplies "
                           f"are not {LT.MIN_SAVING}x fewer than the dense layer's {dense}",
                           call=call)
            return None
        plan = _Plan(call, "lookup", wt, "gemm")
        plan.w2d, plan.codebook = w2d, cb
        return plan

    def _sparse_plan(self, call, kind, wt, shape_class, w2d):
        """Below the break-even density: the sparse kernels (:mod:`..kernels.sparse`)."""
        if not wt.zeros:
            return None
        choice = K.choose(w2d, shape_class, self.isa, force())
        if not choice.sparse:
            self._note(kind, wt, shape_class, "dense", choice.reason, choice.block, call=call)
            return None
        plan = _Plan(call, kind, wt, shape_class)
        plan.choice, plan.w2d = choice, w2d
        return plan

    @staticmethod
    def _w2d(kind, w):
        return w.reshape(w.shape[0], -1) if kind == "conv2d" else np.ascontiguousarray(w.T)

    def _epilogue(self, plan, var, counts, users):
        """Follow single readers: a per-channel bias add, then max / min clamps."""
        ep = follow_epilogue(var, plan.w2d.shape[0], 3 if plan.kind == "conv2d" else 1,
                             counts, users)
        if ep.end is not None:
            plan.end = ep.end
        plan.bias, plan.lo, plan.hi = ep.bias, ep.lo, ep.hi

    def _note(self, kind, wt, shape_class, kernel, reason, block=1, nbytes=0,
              multiplies=None, call=None):
        if self.record is None:
            return
        w = wt.value
        dense_mult = multiplies[0] if multiplies else \
            (int(w.size) * _positions(kind, call) if call is not None else 0)
        self.record.structured.append(StructuredLayer(
            kind, tuple(int(d) for d in w.shape), shape_class,
            wt.nonzero / w.size, block, kernel, reason, nbytes or w.nbytes,
            w.nbytes, wt.distinct, dense_mult,
            multiplies[1] if multiplies else dense_mult))

    # ---------------------------------------------------------------------- the rewrite
    def visit_call_(self, call):
        plan = next((p for p in self.plans if p.end.same_as(call)), None)
        if plan is None:
            return super().visit_call_(call)
        out = self._emit(plan)
        self.count += 1
        return out

    def _emit(self, plan):
        bb = self.builder_
        x = self.visit_expr(plan.anchor.args[0])
        xs = static_shape(plan.anchor.args[0])
        if plan.kind == "lookup":
            cb = plan.codebook
            ys = (*xs[:-1], cb.rows)
            func = LT.lut_func(xs, ys, cb, self.lanes, plan.lo, plan.hi, self.cores)
            rows = int(np.prod(xs[:-1]))
            self._note("matmul", plan.wt, "gemm", "lookup",
                       f"{cb.count} distinct values: {cb.group} weights per table lookup",
                       nbytes=cb.nbytes, multiplies=LT.multiplies(rows, cb))
            nb = cb.packed.shape[0] * cb.packed.shape[2]
            bias = np.zeros(nb, np.float32)
            if plan.bias is not None:
                bias[: len(plan.bias)] = plan.bias
            gv = self.builder_.add_func(
                func.with_attr("tirx.is_scheduled", True).with_attr("op_pattern", 8),
                "lookup_matmul")
            return relax.call_tir(gv, relax.Tuple([x, relax.const(cb.coef),
                                                   relax.const(cb.packed),
                                                   relax.const(bias)]),
                                  relax.TensorType([int(d) for d in ys], "float32"))
        c = plan.choice
        if plan.kind == "matmul":
            kdim, n_out = plan.w.shape
            comp = (K.compress(plan.w2d, c.block, np.arange(kdim)) if c.block > 1
                    else K.compress_gather(plan.w2d))
            ys = (*xs[:-1], n_out)
            func = K.spmv_func(xs, ys, comp, plan.lo, plan.hi)
            self._record(plan, comp)
            return self._call(func, "sparse_matmul", x, comp, plan.bias, ys, final=True)
        a = plan.anchor.attrs
        n, ch, h, wd = xs
        oc, _, kh, kw = plan.w.shape
        strides, pads, dil = ints(a.strides), ints(a.padding), ints(a.dilation)
        if plan.shape_class == "conv1x1":
            if strides != [1, 1]:
                x = bb.emit(relax.op.strided_slice(x, [2, 3], [0, 0], [h, wd], strides))
                h, wd = -(-h // strides[0]), -(-wd // strides[1])
            comp = K.compress(plan.w2d, c.block, np.arange(ch) * h * wd)
            func = K.spmm_func((n, ch, h, wd), (n, oc, h, wd), comp, h * wd, self.lanes, ch,
                               plan.lo, plan.hi)
            self._record(plan, comp)
            return self._call(func, "sparse_conv2d", x, comp, plan.bias, (n, oc, h, wd),
                              final=True)
        pt, pl, pb, pr = pads
        hp, wp = h + pt + pb, wd + pl + pr
        hout, wout = hp - dil[0] * (kh - 1), wp - dil[1] * (kw - 1)
        xp = bb.emit(relax.op.nn.pad(x, [0, 0, 0, 0, pt, pb + 1, pl, pr]))
        cc, ky, kx = np.meshgrid(np.arange(ch), np.arange(kh), np.arange(kw), indexing="ij")
        offsets = (cc * (hp + 1) * wp + ky * dil[0] * wp + kx * dil[1]).reshape(-1)
        comp = K.compress(plan.w2d, c.block, offsets)
        func = K.spmm_func((n, ch, hp + 1, wp), (n, oc, hout, wp), comp, hout * wp,
                           self.lanes, ch * kh, plan.lo, plan.hi)
        self._record(plan, comp)
        y = self._call(func, "sparse_conv2d", xp, comp, plan.bias, (n, oc, hout, wp))
        return relax.op.strided_slice(y, [3], [0], [wout])

    def _call(self, func, name, x, comp, bias, out_shape, final=False):
        """The kernel's call_tir (``final``: returned unbound, to take the original
        binding's variable)."""
        nb = len(comp.ptr) - 1
        b = np.zeros(nb * comp.block, np.float32)
        if bias is not None:
            b[: len(bias)] = bias
        func = func.with_attr("tirx.is_scheduled", True).with_attr("op_pattern", 8)
        gv = self.builder_.add_func(func, name)
        comp = K.nonempty(comp)
        args = [x, relax.const(comp.vals), relax.const(comp.offs), relax.const(comp.ptr),
                relax.const(b)]
        call = relax.call_tir(gv, relax.Tuple(args),
                              relax.TensorType([int(d) for d in out_shape], "float32"))
        return call if final else self.builder_.emit(call)

    def _record(self, plan, comp):
        c = plan.choice
        positions = _positions(plan.kind, plan.anchor)
        dense = int(plan.w.size) * positions
        self._note(plan.kind, plan.wt, plan.shape_class, "sparse", c.reason, c.block,
                   comp.nbytes, (dense, comp.nnz * positions))


def structured_pass(target, record: BuildRecord | None = None):
    """Relax pass (constants folded): layers whose constant weights are mostly zeros or take
    few values -> the sparse / lookup kernels (see the module docstring)."""
    lanes = simd_floats(target)
    arch = "aarch64" if "aarch64" in str(target.attrs.get("mtriple", "")) else "x86_64"
    isa = K.isa_key(lanes, arch)
    cores = int(target.attrs.get("num-cores", 1) or 1)

    @tvm.transform.module_pass(opt_level=0, name="EdgecStructuredWeights")
    def _pass(mod, _ctx):
        return plan_and_rewrite(StructuredRewriter(mod, lanes, isa, record, cores), mod)

    return _pass
