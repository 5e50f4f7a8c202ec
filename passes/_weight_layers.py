"""The layer view of a Conv / Gemm / MatMul with a constant weight, shared by the passes
that rewrite weights in place (``sparse``, ``cluster``, ``template``): the weight as a
matrix ``[out, in]`` (Conv, group 1: ``[K, C*kh*kw]`` over the im2col patch; Gemm:
``op(B)^T``; MatMul with a constant right operand ``B``: ``B^T``), the lowrank layer view
for sampling its input rows, and how to store a new matrix back in the original layout."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from edgec.core.graph import attr, value_shapes

from ._lowrank_layer import Layer, _explicit_pads
from ._toolkit import producers


@dataclass
class WeightLayer:
    """One layer whose weight is rewritten: the lowrank layer view (for row sampling), the
    weight matrix and how the weight is stored."""

    L: Layer
    Wm: np.ndarray        # [out, in] float64
    stored: np.ndarray    # the weight as stored (dtype, layout)
    alpha: float = 1.0

    @property
    def name(self) -> str:
        return self.L.node.name

    def to_stored(self, Wm: np.ndarray) -> np.ndarray:
        if self.L.kind == "conv":
            out = Wm.reshape(self.stored.shape)
        elif self.L.kind == "gemm" and attr(self.L.node, "transB", 0):
            out = Wm
        else:
            out = Wm.T
        return np.ascontiguousarray(out).astype(self.stored.dtype)


def constant(m: onnx.ModelProto, name: str, inits: dict, prod: dict) -> np.ndarray | None:
    """The value of tensor ``name`` if it is a constant: an initializer (also one listed as a
    graph input) or a ``Constant`` node's ``value``."""
    if name in inits:
        return numpy_helper.to_array(inits[name])
    p = prod.get(name)
    if p is not None and p.op_type == "Constant":
        for a in p.attribute:
            if a.name == "value":
                return numpy_helper.to_array(a.t)
    return None


def candidate(node, m, inits, prod, shapes, config, pass_name: str,
              ops=("Conv", "Gemm", "MatMul")) -> tuple[WeightLayer | None, str | None]:
    """The layer view of ``node`` (weight matrix ``[out, in]``, float64), or why it is left
    alone (None, None: not a candidate at all). ``config`` has include/exclude/min_weights."""
    if node.op_type not in ops:
        return None, None
    if config.include and node.name not in config.include:
        return None, f"not in {pass_name}.include"
    if node.name in config.exclude:
        return None, f"in {pass_name}.exclude"
    if len(node.input) < 2:
        return None, "no weight input"
    W = constant(m, node.input[1], inits, prod)
    if W is None:
        return None, "weight is not a constant"
    if not np.issubdtype(W.dtype, np.floating):
        return None, f"weight is {W.dtype}, not floating point"
    if not np.all(np.isfinite(W)):
        return None, "weight holds NaN or infinity"
    if W.size < config.min_weights:
        return None, f"{W.size} weights < {pass_name}.min_weights={config.min_weights}"
    xs, ys = shapes.get(node.input[0]), shapes.get(node.output[0])
    if node.op_type == "Conv":
        if attr(node, "group", 1) != 1:
            return None, f"grouped/depthwise conv (group={attr(node, 'group', 1)})"
        if W.ndim != 4:
            return None, f"{W.ndim - 2}-D conv: only 2-D convs are handled"
        if not xs or not ys or len(xs) != 4 or any(not d for d in xs[1:]) or \
                any(not d for d in ys[1:]):
            return None, "input/output shapes are not known"
        L = Layer(node, "conv", W, W.dtype, xs, ys, tuple(attr(node, "strides", [1, 1])),
                  tuple(attr(node, "dilations", [1, 1])), _explicit_pads(node, xs, W))
        return WeightLayer(L, W.reshape(W.shape[0], -1).astype(np.float64), W), None
    if constant(m, node.input[0], inits, prod) is not None:
        return None, "first operand is a constant too"
    if W.ndim != 2:
        return None, f"weight has rank {W.ndim}: only 2-D weights are handled"
    if node.op_type == "Gemm":
        Wm = W if attr(node, "transB", 0) else W.T
        L = Layer(node, "gemm", Wm, W.dtype, xs or (), ys or (),
                  trans_a=int(attr(node, "transA", 0)))
        return WeightLayer(L, Wm.astype(np.float64), W, float(attr(node, "alpha", 1.0))), None
    L = Layer(node, "matmul", W.T, W.dtype, xs or (), ys or ())
    return WeightLayer(L, W.T.astype(np.float64), W), None


def select(m, config, report, pass_name: str, ops=("Conv", "Gemm", "MatMul"),
           disabled: dict[str, str] | None = None) -> list[WeightLayer]:
    """Every candidate layer of ``m`` (graph order); the others with a reason go to
    ``report.skip``. ``disabled``: op type -> the reason that op type is left alone."""
    from edgec.core.importer import infer_shapes

    inits = {t.name: t for t in m.graph.initializer}
    prod = producers(m)
    try:
        shapes = value_shapes(infer_shapes(m))
    except Exception:  # noqa: BLE001 - shapes unknown: convs are skipped with the reason
        shapes = value_shapes(m)
    out = []
    for node in m.graph.node:
        if disabled and node.op_type in disabled:
            report.skip(node, disabled[node.op_type])
            continue
        t, why = candidate(node, m, inits, prod, shapes, config, pass_name, ops)
        if why:
            report.skip(node, why)
        elif t is not None:
            out.append(t)
    return out
