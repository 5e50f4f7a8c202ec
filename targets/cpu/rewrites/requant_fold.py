"""The requantize fold (Relax, after constants are folded): the epilogue that ends in the
next layer's quantize becomes the integer kernel's own::

    q(clamp(K + bias[o], lo, hi); s, z)  ->  round(clamp(acc * s2[o] + b2[o], lo', hi'))

where ``K = (acc - corr[o]) * scale[o]`` is the kernel's float output (or a depthwise
float sum), ``s2 = scale / s``, ``b2 = (bias - corr * scale) / s + z``,
``lo' = max(lo / s + z, qmin)``, ``hi' = min(hi / s + z, qmax)`` (``z`` an integer, so
adding it before rounding moves only exact ties, by one step). ``clamp`` is any chain of
ReLU / maximum / minimum with scalar constants (ONNX Clip). One multiply-add, a clamp and
a round per output replace the dequantize, bias, clip and quantize steps; every
intermediate must have no other reader.

Pattern: :meth:`RequantFolder._clamps` and the ``add`` of a constant below a ``quantize``,
then a call of a kernel the QDQ rewrite emitted. Check: :meth:`RequantFolder._quantize`,
the bias per output channel. Rewrite: the kernel's ``remake`` with the folded constants.
"""

from __future__ import annotations

import numpy as np
from tvm import relax

from .common import (ADD, CALL_TIR, MAX, MIN, QRANGE, RELU, Q, const_value, kernel_key,
                     scalar_value, use_counts)


def clamp_of(val):
    """``("max" | "min", c, data)`` for max/min with a scalar constant, else None."""
    if val.op == RELU:
        return "max", 0.0, val.args[0]
    if val.op in (MAX, MIN):
        kind, args = ("max" if val.op == MAX else "min"), list(val.args)
    elif val.op == CALL_TIR and isinstance(val.args[1], relax.Tuple):
        name = val.args[0].name_hint.rstrip("0123456789_")
        if name not in ("maximum", "minimum"):
            return None
        kind, args = name[:3], list(val.args[1].fields)
    else:
        return None
    if len(args) != 2:
        return None
    c = const_value(args[1])
    if c is None or c.size != 1:
        return None
    return kind, float(c.reshape(-1)[0]), args[0]


def quantize_params(q):
    """``(1/s, z, dtype)`` of a quantize with one positive scale, else None."""
    s, z = scalar_value(q.args[1]), scalar_value(q.args[2])
    dtype = str(q.attrs.out_dtype)
    if s is None or z is None or dtype not in QRANGE or float(s) <= 0:
        return None
    return 1.0 / float(s), float(z), dtype


def clamp_range(clamps, inv, zp, dtype):
    """The clamps as bounds on the quantized value: ``(lo', hi')``."""
    lo, hi = -np.inf, np.inf
    for kind, c in reversed(clamps):  # innermost first: max/min of a clamp
        lo, hi = ((max(lo, c), max(hi, c)) if kind == "max" else
                  (min(lo, c), min(hi, c)))
    qmin, qmax = QRANGE[dtype]
    lo2 = max(lo * inv + zp, qmin) if np.isfinite(lo) else qmin
    hi2 = min(hi * inv + zp, qmax) if np.isfinite(hi) else qmax
    return float(lo2), float(hi2)


def bias_vector(bias, rank: int, nch: int):
    """A constant bias as one value per output channel (all other axes 1, broadcast from the
    right; the channel axis 1 of NCHW, else the last), or None."""
    axis = 1 if rank == 4 else rank - 1
    bs = (1,) * (rank - bias.ndim) + bias.shape
    if len(bs) != rank or any(d != 1 for i, d in enumerate(bs) if i != axis) or \
            bs[axis] not in (1, nch) or not np.all(np.isfinite(bias)):
        return None
    return np.broadcast_to(bias.astype(np.float64).reshape(-1), (nch,))


class FolderBase(relax.PyExprMutator):
    """Folds at ``quantize`` calls with one positive scale (:meth:`_fold` of the quantize's
    ``(1/s, z, dtype)``, the clamps below it and the call below those; None: leave it);
    counts the folds."""

    def __init__(self, mod, kernels: dict):
        super().__init__(mod)
        self.kernels = kernels
        self.folded = 0
        self.var2val: dict = {}
        self.uses: dict = {}

    def visit_call_(self, call):
        qp = quantize_params(call) if call.op == Q else None
        if qp is not None:
            clamps, val = self._clamps(call.args[0])
            out = self._fold(qp, clamps, val)
            if out is not None:
                self.folded += 1
                return out
        return super().visit_call_(call)

    def _fold(self, qp, clamps, val):
        raise NotImplementedError

    def _single(self, v):
        """The call bound to ``v`` when ``v`` has exactly one reader, else None."""
        if not isinstance(v, relax.Var) or self.uses.get(v, 0) != 1:
            return None
        val = self.var2val.get(v)
        return val if isinstance(val, relax.Call) else None

    def _clamps(self, v):
        """The chain of scalar max/min (outermost first) read by ``v`` alone, and the
        call below it (or None)."""
        clamps, val = [], self._single(v)
        while val is not None:
            c = clamp_of(val)
            if c is None:
                break
            clamps.append(c[:2])
            val = self._single(c[2])
        return clamps, val


class _RequantFolder(FolderBase):
    def _fold(self, qp, clamps, val):
        inv, zp, dtype = qp
        bias = None
        if val is not None and val.op == ADD:
            b = const_value(val.args[1])
            if b is None:
                return None
            bias = b
            val = self._single(val.args[0])
        entry = self.kernels.get(kernel_key(val)) \
            if val is not None and val.op == CALL_TIR else None
        if entry is None:
            return None
        remake, nch = entry
        oty = val.ty
        rank = len(oty.shape.values) if oty.shape is not None else 0
        bvec = np.zeros(nch) if bias is None else bias_vector(bias, rank, nch)
        if bvec is None:
            return None
        x_new = self.visit_expr(val.args[1].fields[0])
        return remake(self.builder_, x_new, inv, bvec, zp,
                      (*clamp_range(clamps, inv, zp, dtype), dtype))


RequantFolder = relax.expr_functor.mutator(_RequantFolder)


def run_folder(folder_cls, mod, kernels: dict):
    """Run a folder over every Relax function; ``(module, folds)``."""
    f = folder_cls(mod, kernels)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            f.var2val = dict(relax.analysis.get_var2val(func))
            f.uses = use_counts(func)
            f.builder_.update_func(gv, f.visit_expr(func))
    out = f.builder_.get()
    return (relax.transform.DeadCodeElimination()(out) if f.folded else out), f.folded
