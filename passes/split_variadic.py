"""split-variadic: ``Sum``, ``Max``, ``Min`` and ``Mean`` of n inputs as chains of binary ops.

Algebra (multidirectional broadcasting throughout, as ONNX defines both forms)::

    Sum(x1, ..., xn)  = (((x1 + x2) + x3) + ... + xn)
    Max(x1, ..., xn)  = max(max(max(x1, x2), x3), ..., xn)       (Min likewise)
    Mean(x1, ..., xn) = (((x1 + x2) + ... + xn)) / n
    Op(x)             = Identity(x)                              (one input)

(a two-input Max or Min is already binary and stays.)

Exact for Sum, Max and Min (onnxruntime sums in the same order); Mean up to the rounding of
the division. Why: TVM's ONNX frontend imports a variadic op with static shapes as
broadcast_to + stack + a reduction -- three generic functions and two copies of every
input where one fused element-wise Add does (an older exporter's residual ``Sum`` in
ResNet-50 cost ~8 % of its time) -- and the binary form is what the residual epilogue
fusion of the convolution kernels recognizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgec.core.graph import all_names, unique_name

from . import PassContext, PassReport, copy_model, register_pass
from ._toolkit import set_nodes

BINARY = {"Sum": "Add", "Max": "Max", "Min": "Min", "Mean": "Add"}


@dataclass(frozen=True)
class SplitVariadicConfig:
    mean: bool = True


def _dtype(m: onnx.ModelProto, name: str) -> int | None:
    for vi in list(m.graph.input) + list(m.graph.value_info) + list(m.graph.output):
        if vi.name == name:
            return vi.type.tensor_type.elem_type
    for t in m.graph.initializer:
        if t.name == name:
            return t.data_type
    return None


def _split(node: onnx.NodeProto, m: onnx.ModelProto, taken: set[str]) -> list[onnx.NodeProto]:
    op, ins, out = node.op_type, list(node.input), node.output[0]
    base = node.name or out
    if len(ins) == 1:
        return [helper.make_node("Identity", ins, [out], name=base)]
    nodes, acc = [], ins[0]
    last = len(ins) - 1
    for i, x in enumerate(ins[1:], start=1):
        y = out if i == last and op != "Mean" else unique_name(taken, f"{base}_part{i}")
        nodes.append(helper.make_node(BINARY[op], [acc, x], [y],
                                      name=unique_name(taken, f"{base}_{i}")))
        acc = y
    if op == "Mean":
        dtype = _dtype(m, ins[0]) or onnx.TensorProto.FLOAT
        n = numpy_helper.from_array(
            np.array(len(ins), dtype=helper.tensor_dtype_to_np_dtype(dtype)),
            unique_name(taken, f"{base}_count"))
        m.graph.initializer.append(n)
        nodes.append(helper.make_node("Div", [acc, n.name], [out],
                                      name=unique_name(taken, f"{base}_div")))
    return nodes


@register_pass("split-variadic", SplitVariadicConfig)
def split_variadic(model: onnx.ModelProto, config: SplitVariadicConfig, ctx: PassContext):
    m = copy_model(model)
    report = PassReport("split-variadic")
    taken = all_names(m) | {n.name for n in m.graph.node}
    nodes = []
    for node in m.graph.node:
        if node.op_type not in BINARY or node.domain not in ("", "ai.onnx") or \
                (node.op_type == "Mean" and not config.mean) or \
                (node.op_type in ("Max", "Min") and len(node.input) == 2):
            nodes.append(node)
            continue
        if any(not name for name in node.input):
            nodes.append(node)
            report.skip(node, "an input is omitted")
            continue
        new = _split(node, m, taken)
        nodes.extend(new)
        report.rewrite(node, f"{len(node.input)} inputs -> {len(new)} binary op(s)")
    set_nodes(m, nodes)
    return m, report
