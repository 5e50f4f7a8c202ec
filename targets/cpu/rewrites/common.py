"""What the Relax rewrites share: constants out of expressions, static shapes, use counts,
and the reason a layer is left alone (:class:`Skip`)."""

from __future__ import annotations

import tvm
from tvm import relax

CONV = tvm.ir.Op.get("relax.nn.conv2d")
MATMUL = tvm.ir.Op.get("relax.matmul")
PERMUTE = tvm.ir.Op.get("relax.permute_dims")
POOL = tvm.ir.Op.get("relax.nn.max_pool2d")
Q = tvm.ir.Op.get("relax.quantize")
DQ = tvm.ir.Op.get("relax.dequantize")
ADD = tvm.ir.Op.get("relax.add")
MULTIPLY = tvm.ir.Op.get("relax.multiply")
SIGMOID = tvm.ir.Op.get("relax.sigmoid")
RELU = tvm.ir.Op.get("relax.nn.relu")
MAX = tvm.ir.Op.get("relax.maximum")
MIN = tvm.ir.Op.get("relax.minimum")
CALL_TIR = tvm.ir.Op.get("relax.call_tir")
QRANGE = {"uint8": (0, 255), "int8": (-128, 127)}  # 8-bit types: (min, max)

RESIDUAL = "residual"  # kernels[RESIDUAL, key]: a requantizing kernel's residual re-emitter


class Skip(Exception):
    """A QDQ layer left in float; the message is the reason recorded."""


def const_value(expr):
    return expr.value.numpy() if isinstance(expr, tvm.ir.expr.Constant) else None


def kernel_key(call) -> tuple:
    """A ``call_tir`` of an emitted kernel, as the folds look it up: its function's name and
    a digest of its constant arguments (weights, scales, corrections). Layers of one shape
    share one function -- the builder deduplicates structurally equal PrimFuncs, the
    constants being arguments -- so the name alone would give every such layer the last
    one's scales."""
    import hashlib

    import numpy as np

    h = hashlib.sha1()
    for arg in call.args[1].fields:
        v = const_value(arg)
        if v is not None:
            h.update(f"{v.dtype}{v.shape}".encode())
            h.update(np.ascontiguousarray(v).tobytes())
    return call.args[0].name_hint, h.hexdigest()


def scalar_value(expr):
    v = const_value(expr)
    if v is None or v.size != 1:
        return None
    return v.reshape(())[()]


def static_shape(expr):
    """The static shape of a tensor-typed relax expression, else None."""
    shape = getattr(expr.ty, "shape", None)
    if shape is None or not all(isinstance(d, tvm.tirx.IntImm) for d in shape.values):
        return None
    return tuple(int(d) for d in shape.values)


def use_counts(func) -> dict:
    """How often each relax Var is read in ``func`` (bindings and the function's result)."""
    counts: dict = {}

    def walk(e):
        if isinstance(e, relax.Var):
            counts[e] = counts.get(e, 0) + 1
        elif isinstance(e, relax.Call):
            for a in e.args:
                walk(a)
        elif isinstance(e, relax.Tuple):
            for f in e.fields:
                walk(f)
        elif isinstance(e, relax.TupleGetItem):
            walk(e.tuple_value)

    body = func.body
    for block in body.blocks:
        for b in block.bindings:
            walk(b.value)
    walk(body.body)
    return counts


def readers(func) -> dict:
    """Per relax Var of ``func``: the ``(var, call)`` bindings that read it."""
    users: dict = {}
    for block in func.body.blocks:
        for b in block.bindings:
            if isinstance(b.value, relax.Call):
                for arg in b.value.args:  # (a call_tir's operands are in a Tuple)
                    for v in (arg.fields if isinstance(arg, relax.Tuple) else [arg]):
                        if isinstance(v, relax.Var):
                            users.setdefault(v, []).append((b.var, b.value))
    return users



KERNEL_ATTRS = {"op_pattern": 4}
"""PrimFunc attributes of an emitted kernel: out-elementwise fusable (its epilogue fuses)."""


def plan_and_rewrite(rw, mod):
    """Run a planning mutator ``rw`` (built on ``mod``): per Relax function ``rw.scan(func)``
    plans its rewrites and returns whether there are any; only those functions are visited.
    Returns ``mod`` itself when nothing was rewritten (``rw.count``), else the rewritten
    module without the bindings that became dead."""
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function) and isinstance(func.body, relax.SeqExpr) and \
                rw.scan(func):
            rw.builder_.update_func(gv, rw.visit_expr(func))
    if not rw.count:
        return mod
    return relax.transform.DeadCodeElimination()(rw.builder_.get())


def rewrite_functions(rw, mod):
    """Run the mutator ``rw`` (built on ``mod``) over every Relax function of ``mod``;
    returns its builder's module."""
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rw.builder_.update_func(gv, rw.visit_expr(func))
    return rw.builder_.get()
